"""Events a POP3 session (RFC 1939, RFC 2449, RFC 2595, RFC 5034) hands to the application."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Sentinel(enum.Enum):
    NEED_DATA = "need data"  # feed more bytes with receive_data()
    PAUSED = "paused"  # answer the last event first (login_ok(), send_message(), ...)


NEED_DATA = Sentinel.NEED_DATA
PAUSED = Sentinel.PAUSED


@dataclass(frozen=True, slots=True)
class StartTLS:
    """RFC 2595 §4: "+OK" is queued; flush it, run the TLS handshake, then call ``tls_started()``."""


@dataclass(frozen=True, slots=True)
class Login:
    """Check ``password`` for ``user`` (USER/PASS, or AUTH PLAIN/LOGIN), lock the maildrop, then answer
    ``login_ok(maildrop)`` or ``login_failed(...)``."""

    user: str
    password: str
    authzid: str = ""
    mechanism: str = "USER"


@dataclass(frozen=True, slots=True)
class ScramLookup:
    """AUTH SCRAM-SHA-256: answer ``scram_credentials(stored credentials of username, or None)``."""

    username: str


@dataclass(frozen=True, slots=True)
class Authenticated:
    """The core verified the user itself (SCRAM): lock the maildrop and answer ``login_ok(maildrop)``
    or ``login_failed(in_use=True)``."""

    user: str
    authzid: str
    mechanism: str


@dataclass(frozen=True, slots=True)
class Retrieve:
    """RETR (``top_lines`` None) or TOP: answer ``send_message(...)`` or the chunk calls, or
    ``retrieve_failed()`` if the message has vanished."""

    msgno: int
    uid: str
    top_lines: int | None


@dataclass(frozen=True, slots=True)
class Update:
    """RFC 1939 §6 UPDATE state: remove ``deleted_uids`` (maybe none), release the maildrop, then answer
    ``update_done(ok)``."""

    deleted_uids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ConnectionLost:
    """The client went away without QUIT: nothing is deleted (RFC 1939 §6); release the maildrop."""

    was_authenticated: bool


@dataclass(frozen=True, slots=True)
class Close:
    """The session is over: flush ``data_to_send()`` and close the connection."""

    reason: str


type Event = StartTLS | Login | ScramLookup | Authenticated | Retrieve | Update | ConnectionLost | Close
