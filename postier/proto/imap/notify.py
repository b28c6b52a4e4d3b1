"""NOTIFY (RFC 5465): which events a session asked for, for which mailboxes, checked and sans-IO.

`plan(cmd)` checks a NOTIFY SET (RFC 5465 §3, §5) and returns a `NotifyPlan`; the server watches
the mailboxes it names and, between commands and in IDLE, sends for the selected mailbox what a
notification point sends (EXISTS, EXPUNGE, FETCH FLAGS; FETCH of MessageNew's attributes), for the
other mailboxes STATUS (§5.2: MESSAGES, UIDNEXT, UIDVALIDITY, and HIGHESTMODSEQ under CONDSTORE),
for mailbox names and subscriptions LIST (§5.4, §5.5).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from .commands import FetchAttr, Notify, NotifyGroup
from .response import Code, ResponseCode
from .session import Refusal

__all__ = ["SUPPORTED_EVENTS", "NotifyPlan", "plan"]

#: The events served (RFC 5465 §5), as they are spelled in BADEVENT.
SUPPORTED_EVENTS = ("MessageNew", "MessageExpunge", "FlagChange", "MailboxName", "SubscriptionChange")
_SUPPORTED = frozenset(e.upper() for e in SUPPORTED_EVENTS)
_KNOWN = _SUPPORTED | {"ANNOTATIONCHANGE", "MAILBOXMETADATACHANGE", "SERVERMETADATACHANGE"}
MESSAGE_EVENTS = frozenset({"MESSAGENEW", "MESSAGEEXPUNGE", "FLAGCHANGE"})
NAME_EVENTS = frozenset({"MAILBOXNAME", "SUBSCRIPTIONCHANGE"})


def badevent() -> ResponseCode:
    return ResponseCode("BADEVENT", ("(" + " ".join(SUPPORTED_EVENTS) + ")").encode("ascii"))  # RFC 5465 §5.9


@dataclass(frozen=True, slots=True)
class NotifyPlan:
    """``selected``: events for the selected mailbox (None: no SELECTED group, only the updates
    every command ends with); ``delayed``: SELECTED-DELAYED (expunges wait for a command that
    allows them, §6); ``fetch``: what to FETCH for a new message in the selected mailbox;
    ``groups``: the other filters with their events (upper-cased), the first match wins (§6)."""

    selected: frozenset[str] | None
    delayed: bool
    fetch: tuple[FetchAttr, ...]
    groups: tuple[tuple[NotifyGroup, frozenset[str]], ...]
    status: bool

    def events_for(self, name: str, subscribed: Collection[str], separator: str) -> frozenset[str]:
        """The events asked for a mailbox that is not the selected one."""
        for group, events in self.groups:
            if _matches(group, name, subscribed, separator):
                return events
        return frozenset()

    @property
    def wants_names(self) -> bool:
        return any(events & NAME_EVENTS for _g, events in self.groups)


def _matches(group: NotifyGroup, name: str, subscribed: Collection[str], sep: str) -> bool:
    f = group.filter
    if f == "PERSONAL":  # every mailbox here is the user's own
        return True
    if f == "INBOXES":  # where an MDA delivers: INBOX (Sieve's fileinto targets are not tracked)
        return name == "INBOX"
    if f == "SUBSCRIBED":
        return name in subscribed
    if f == "SUBTREE":
        return any(name == m or name.startswith(m + sep) for m in group.mailboxes)
    return name in group.mailboxes  # MAILBOXES


def plan(cmd: Notify) -> NotifyPlan:
    """Check NOTIFY SET's groups (Refusal: BAD for a malformed request, NO [BADEVENT] for an
    event not served)."""
    selected: frozenset[str] | None = None
    delayed = False
    fetch: tuple[FetchAttr, ...] = ()
    groups: list[tuple[NotifyGroup, frozenset[str]]] = []
    for g in cmd.groups:
        events = frozenset(e.upper() for e in g.events)
        if events - _KNOWN:
            raise Refusal("BAD", f"Unknown event {sorted(events - _KNOWN)[0]}", Code.CLIENTBUG)
        if events - _SUPPORTED:
            raise Refusal("NO", "Event not supported", badevent())
        if ("MESSAGENEW" in events) != ("MESSAGEEXPUNGE" in events):  # RFC 5465 §5.2, §5.3
            raise Refusal("BAD", "MessageNew and MessageExpunge go together", Code.CLIENTBUG)
        if "FLAGCHANGE" in events and "MESSAGENEW" not in events:  # §5.1
            raise Refusal("BAD", "FlagChange needs MessageNew and MessageExpunge", Code.CLIENTBUG)
        if g.filter in ("SELECTED", "SELECTED-DELAYED"):
            if selected is not None:
                raise Refusal("BAD", "SELECTED given twice", Code.CLIENTBUG)
            selected, delayed, fetch = events, g.filter == "SELECTED-DELAYED", g.fetch
        else:
            if g.fetch:  # §5.2: fetch attributes only for the selected mailbox
                raise Refusal("BAD", "MessageNew attributes only for SELECTED", Code.CLIENTBUG)
            groups.append((g, events))
    return NotifyPlan(selected, delayed, fetch, tuple(groups), cmd.status)
