"""Which IMAP commands are legal in which connection state (RFC 9051 §3, §6), as one table."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["COMMANDS_BY_STATE", "State", "allowed"]


class State(StrEnum):
    NOT_AUTHENTICATED = "not authenticated"  # RFC 9051 §3.1
    AUTHENTICATED = "authenticated"  # §3.2
    SELECTED = "selected"  # §3.3
    LOGOUT = "logout"  # §3.4


_ANY = frozenset({"CAPABILITY", "NOOP", "LOGOUT", "ID"})  # RFC 9051 §6.1, RFC 2971
_NOT_AUTH = frozenset({"STARTTLS", "AUTHENTICATE", "LOGIN"})  # §6.2
_AUTH = frozenset({  # §6.3 (ENABLE: RFC 5161 §3.1, authenticated state only)
    "SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB",
    "NAMESPACE", "STATUS", "APPEND", "IDLE",
    "GETQUOTA", "GETQUOTAROOT", "SETQUOTA",  # RFC 9208 §4.1
})
_SELECTED = frozenset({  # §6.4; UID variants are checked by their base name
    "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH", "FETCH", "STORE", "COPY", "MOVE",
    "SORT", "THREAD",  # RFC 5256
})

COMMANDS_BY_STATE: dict[State, frozenset[str]] = {
    State.NOT_AUTHENTICATED: _ANY | _NOT_AUTH,
    State.AUTHENTICATED: _ANY | _AUTH | {"ENABLE", "NOTIFY"},  # NOTIFY: RFC 5465 §3
    State.SELECTED: _ANY | _AUTH | _SELECTED | {"NOTIFY"},
    State.LOGOUT: frozenset(),
}


def allowed(state: State, command_name: str) -> bool:
    """``command_name`` is ``Command.name`` (the base name: "FETCH" for UID FETCH too)."""
    return command_name in COMMANDS_BY_STATE[state]
