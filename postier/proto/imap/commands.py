"""Typed IMAP commands (RFC 9051 §6, RFC 3501 §6 and the extensions we serve), as parsed from a client.

Every command is a frozen dataclass with ``tag`` and a class-level ``name``; UID variants carry
``uid=True`` and report ``"UID FETCH"`` etc. as ``command_name``. Match on the class::

    match cmd:
        case Login(userid=user, password=pw): ...
        case Fetch(uid=True, sequence_set=s, attributes=atts): ...
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar, Protocol

from .search import AllKey, SearchKey
from .seqset import SequenceSet

__all__ = [
    "Append", "AppendMessage", "Authenticate", "CatPart", "Capability", "Check", "Close", "Command", "Copy", "Create", "Delete",
    "Enable", "Examine", "SpooledLiteral", "Expunge", "Fetch", "FetchAttr", "Id", "Idle", "List", "ListReturn", "Login",
    "Logout", "Lsub", "Move", "Namespace", "Noop", "Notify", "NotifyGroup", "QResync", "Rename", "Search", "Section", "Select",
    "StartTLS", "Status", "Store", "StoreMode", "Subscribe", "Unselect", "Unsubscribe",
]


@dataclass(frozen=True, slots=True)
class Command:
    tag: str
    name: ClassVar[str] = ""

    @property
    def command_name(self) -> str:
        """The name as the client spelt the command family, with "UID " for UID variants."""
        return ("UID " + self.name) if getattr(self, "uid", False) else self.name


# -- any state (RFC 9051 §6.1) ------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Capability(Command):
    name: ClassVar[str] = "CAPABILITY"


@dataclass(frozen=True, slots=True)
class Noop(Command):
    name: ClassVar[str] = "NOOP"


@dataclass(frozen=True, slots=True)
class Logout(Command):
    name: ClassVar[str] = "LOGOUT"


@dataclass(frozen=True, slots=True)
class Id(Command):
    """RFC 2971: ``params`` is None for ``ID NIL``; values may be None (NIL)."""

    name: ClassVar[str] = "ID"
    params: tuple[tuple[str, str | None], ...] | None = None


# -- not authenticated (RFC 9051 §6.2) ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class StartTLS(Command):
    name: ClassVar[str] = "STARTTLS"


@dataclass(frozen=True, slots=True)
class Authenticate(Command):
    """``initial_response`` is the decoded SASL-IR (RFC 4959): None if absent, b"" for "="."""

    name: ClassVar[str] = "AUTHENTICATE"
    mechanism: str = ""
    initial_response: bytes | None = None


@dataclass(frozen=True, slots=True)
class Login(Command):
    name: ClassVar[str] = "LOGIN"
    userid: str = ""
    password: str = ""


# -- authenticated (RFC 9051 §6.3) --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Enable(Command):
    """RFC 5161; capability names upper-cased."""

    name: ClassVar[str] = "ENABLE"
    capabilities: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class QResync:
    """RFC 7162 §3.2.5 QRESYNC select parameter."""

    uidvalidity: int
    modseq: int
    known_uids: SequenceSet | None = None
    known_seqs: SequenceSet | None = None  # seq-match-data: sequence numbers ...
    known_seq_uids: SequenceSet | None = None  # ... and the UIDs they correspond to


@dataclass(frozen=True, slots=True)
class Select(Command):
    name: ClassVar[str] = "SELECT"
    mailbox: str = ""
    condstore: bool = False  # RFC 7162 §3.1.8
    qresync: QResync | None = None

    @property
    def readonly(self) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class Examine(Select):
    name: ClassVar[str] = "EXAMINE"

    @property
    def readonly(self) -> bool:
        return True


@dataclass(frozen=True, slots=True)
class Create(Command):
    name: ClassVar[str] = "CREATE"
    mailbox: str = ""
    special_use: tuple[str, ...] = ()  # RFC 6154 §3: USE (\Drafts ...)


@dataclass(frozen=True, slots=True)
class Delete(Command):
    name: ClassVar[str] = "DELETE"
    mailbox: str = ""


@dataclass(frozen=True, slots=True)
class Rename(Command):
    name: ClassVar[str] = "RENAME"
    mailbox: str = ""
    new_mailbox: str = ""


@dataclass(frozen=True, slots=True)
class Subscribe(Command):
    name: ClassVar[str] = "SUBSCRIBE"
    mailbox: str = ""


@dataclass(frozen=True, slots=True)
class Unsubscribe(Command):
    name: ClassVar[str] = "UNSUBSCRIBE"
    mailbox: str = ""


@dataclass(frozen=True, slots=True)
class ListReturn:
    """RFC 5258 §3.2 return options; ``status`` is RFC 5819 RETURN (STATUS (...)) items or None."""

    subscribed: bool = False
    children: bool = False
    special_use: bool = False  # RFC 6154 §2
    status: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class List(Command):
    """LIST (RFC 9051 §6.3.9, LIST-EXTENDED RFC 5258).

    ``selection`` holds upper-cased selection options (SUBSCRIBED, REMOTE, RECURSIVEMATCH,
    SPECIAL-USE). ``extended`` is True when the client used any RFC 5258 syntax (selection options,
    several patterns or RETURN), which changes the reply format (CHILDINFO, no \\Noselect for
    non-existent subscribed parents...).
    """

    name: ClassVar[str] = "LIST"
    reference: str = ""
    patterns: tuple[str, ...] = ()
    selection: frozenset[str] = frozenset()
    returns: ListReturn = field(default_factory=ListReturn)
    extended: bool = False


@dataclass(frozen=True, slots=True)
class Lsub(Command):
    name: ClassVar[str] = "LSUB"
    reference: str = ""
    pattern: str = ""


@dataclass(frozen=True, slots=True)
class Namespace(Command):
    name: ClassVar[str] = "NAMESPACE"


@dataclass(frozen=True, slots=True)
class Status(Command):
    """Items upper-cased: MESSAGES UIDNEXT UIDVALIDITY UNSEEN DELETED SIZE RECENT HIGHESTMODSEQ
    APPENDLIMIT."""

    name: ClassVar[str] = "STATUS"
    mailbox: str = ""
    items: tuple[str, ...] = ()


class SpooledLiteral(Protocol):
    """A literal the reader passed to a file as it arrived instead of keeping it (a large APPEND
    message; `CommandReader.spool`). The server owns it once the command is parsed."""

    @property
    def size(self) -> int: ...
    def write(self, data: bytes) -> None: ...
    def discard(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CatPart:
    """One part of a CATENATE (RFC 4469 §5): ``TEXT`` with ``data``, or ``URL`` with ``url``
    (an RFC 5092 IMAP URL, absolute or relative, resolved by the server)."""

    kind: str  # "TEXT" or "URL"
    data: bytes | SpooledLiteral = b""
    url: str = ""


@dataclass(frozen=True, slots=True)
class AppendMessage:
    """One message of an APPEND (RFC 3502 MULTIAPPEND: there may be several).

    ``binary``: the message came as literal8 (RFC 3516 §4.4) or in RFC 6855's ``UTF8 (~{n})``;
    ``utf8``: it came in that UTF8 form (RFC 6855 §4); ``catenate``: the parts of a CATENATE
    (RFC 4469), ``message`` is then empty.
    """

    flags: tuple[str, ...] = ()
    internal_date: dt.datetime | None = None
    message: bytes | SpooledLiteral = b""
    binary: bool = False
    catenate: tuple[CatPart, ...] | None = None
    utf8: bool = False


@dataclass(frozen=True, slots=True)
class Append(Command):
    """The first message's fields inline (the usual one-message APPEND); ``more``: the further
    messages of a MULTIAPPEND (RFC 3502); ``messages``: all of them in order."""

    name: ClassVar[str] = "APPEND"
    mailbox: str = ""
    flags: tuple[str, ...] = ()
    internal_date: dt.datetime | None = None
    message: bytes | SpooledLiteral = b""
    binary: bool = False
    catenate: tuple[CatPart, ...] | None = None
    utf8: bool = False
    more: tuple[AppendMessage, ...] = ()

    @property
    def messages(self) -> tuple[AppendMessage, ...]:
        first = AppendMessage(self.flags, self.internal_date, self.message, self.binary, self.catenate, self.utf8)
        return (first, *self.more)


@dataclass(frozen=True, slots=True)
class Idle(Command):
    """RFC 2177: after "+ idling" the server calls ``reader.expect_line()`` to read DONE."""

    name: ClassVar[str] = "IDLE"


# -- selected (RFC 9051 §6.4) -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Check(Command):
    name: ClassVar[str] = "CHECK"


@dataclass(frozen=True, slots=True)
class Close(Command):
    name: ClassVar[str] = "CLOSE"


@dataclass(frozen=True, slots=True)
class Unselect(Command):
    name: ClassVar[str] = "UNSELECT"


@dataclass(frozen=True, slots=True)
class Expunge(Command):
    """EXPUNGE, or UID EXPUNGE <set> (RFC 4315 §2.1) when ``uid``."""

    name: ClassVar[str] = "EXPUNGE"
    uid: bool = False
    sequence_set: SequenceSet | None = None


@dataclass(frozen=True, slots=True)
class Search(Command):
    """SEARCH / UID SEARCH.

    ``returns`` is None without a RETURN clause (then a rev1 session answers ``* SEARCH``), else the
    upper-cased RFC 4731 options (MIN MAX ALL COUNT SAVE); ``RETURN ()`` means ``("ALL",)``.
    ``charset`` is the upper-cased CHARSET argument (strings in ``criteria`` are already decoded).
    """

    name: ClassVar[str] = "SEARCH"
    uid: bool = False
    charset: str | None = None
    criteria: SearchKey = field(default_factory=AllKey)
    returns: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Section:
    """A BODY[...] section (RFC 9051 §6.4.5).

    ``part`` is the part path (``(1, 2)`` for "1.2", ``()`` for the whole message); ``text`` is None,
    "HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT" or "MIME"; ``fields`` the upper-cased
    header names for HEADER.FIELDS[.NOT].
    """

    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        out = ".".join(str(p) for p in self.part)
        if self.text:
            out = (out + "." if out else "") + self.text
            if self.text.startswith("HEADER.FIELDS"):
                out += " (" + " ".join(self.fields) + ")"
        return out


@dataclass(frozen=True, slots=True)
class FetchAttr:
    """One FETCH item. ``name`` is upper-cased: FLAGS, INTERNALDATE, RFC822.SIZE, ENVELOPE,
    BODYSTRUCTURE, BODY (no section: the non-extensible structure), UID, MODSEQ, RFC822,
    RFC822.HEADER, RFC822.TEXT, BODY[] (``section`` set; ``peek`` for BODY.PEEK), BINARY,
    BINARY.SIZE. ``partial`` is (offset, length) from ``<offset.length>``.
    """

    name: str
    section: Section | None = None
    partial: tuple[int, int] | None = None
    peek: bool = False

    @property
    def response_name(self) -> str:
        """The item name in the FETCH response: BODY.PEEK[x]<5.10> is answered as BODY[x]<5>."""
        if self.section is None:
            return self.name
        out = f"{self.name}[{self.section}]"
        if self.partial is not None:
            out += f"<{self.partial[0]}>"
        return out

    @property
    def sets_seen(self) -> bool:
        """True if fetching this sets \\Seen (RFC 9051 §6.4.5: BODY[...] and BINARY[...] but not PEEK)."""
        if self.peek or self.name == "BINARY.SIZE":  # a size is not a read (RFC 3516 §4.2; as Dovecot)
            return False
        return self.section is not None or self.name in ("RFC822", "RFC822.TEXT")


@dataclass(frozen=True, slots=True)
class Fetch(Command):
    """FETCH / UID FETCH. Macros ALL/FAST/FULL are expanded. For UID FETCH the server must add UID
    to the response even if not asked (RFC 9051 §6.4.9). ``changedsince`` / ``vanished`` are the
    RFC 7162 modifiers."""

    name: ClassVar[str] = "FETCH"
    uid: bool = False
    sequence_set: SequenceSet = field(default_factory=SequenceSet)
    attributes: tuple[FetchAttr, ...] = ()
    changedsince: int | None = None
    vanished: bool = False


class StoreMode(StrEnum):
    REPLACE = "FLAGS"
    ADD = "+FLAGS"
    REMOVE = "-FLAGS"


@dataclass(frozen=True, slots=True)
class Store(Command):
    name: ClassVar[str] = "STORE"
    uid: bool = False
    sequence_set: SequenceSet = field(default_factory=SequenceSet)
    mode: StoreMode = StoreMode.REPLACE
    silent: bool = False
    flags: tuple[str, ...] = ()
    unchangedsince: int | None = None  # RFC 7162 §3.1.3


@dataclass(frozen=True, slots=True)
class Copy(Command):
    name: ClassVar[str] = "COPY"
    uid: bool = False
    sequence_set: SequenceSet = field(default_factory=SequenceSet)
    mailbox: str = ""


@dataclass(frozen=True, slots=True)
class Move(Command):
    """RFC 6851."""

    name: ClassVar[str] = "MOVE"
    uid: bool = False
    sequence_set: SequenceSet = field(default_factory=SequenceSet)
    mailbox: str = ""


# -- SORT and THREAD (RFC 5256, RFC 5957, RFC 5267) -------------------------------------------------

SORT_KEYS = frozenset({"ARRIVAL", "CC", "DATE", "FROM", "SIZE", "SUBJECT", "TO", "DISPLAYFROM", "DISPLAYTO"})
THREAD_ALGORITHMS = frozenset({"ORDEREDSUBJECT", "REFERENCES"})


@dataclass(frozen=True, slots=True)
class SortCriterion:
    """One sort key (upper-case, one of ``SORT_KEYS``), optionally reversed (RFC 5256 REVERSE)."""

    key: str
    reverse: bool = False


@dataclass(frozen=True, slots=True)
class Sort(Command):
    """SORT / UID SORT (RFC 5256 §3), with RFC 5267 ESORT return options.

    ``returns`` is None without RETURN (answer ``* SORT``), else the upper-cased options (MIN MAX
    ALL COUNT SAVE, and CONTEXT=SORT's PARTIAL CONTEXT UPDATE); ``RETURN ()`` means ``("ALL",)``;
    ``partial`` is PARTIAL's range (low, high), 1-based and inclusive (RFC 5267 §4.4).
    ``charset`` is mandatory in SORT (upper-cased; strings in ``criteria`` are already decoded).
    """

    name: ClassVar[str] = "SORT"
    uid: bool = False
    sort: tuple[SortCriterion, ...] = ()
    charset: str = "US-ASCII"
    criteria: SearchKey = field(default_factory=AllKey)
    returns: tuple[str, ...] | None = None
    partial: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Thread(Command):
    """THREAD / UID THREAD (RFC 5256 §3): ``algorithm`` is one of ``THREAD_ALGORITHMS``."""

    name: ClassVar[str] = "THREAD"
    uid: bool = False
    algorithm: str = "REFERENCES"
    charset: str = "US-ASCII"
    criteria: SearchKey = field(default_factory=AllKey)

__all__ += ["SORT_KEYS", "THREAD_ALGORITHMS", "Sort", "SortCriterion", "Thread"]


# -- QUOTA (RFC 9208 §4.1) ----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class GetQuota(Command):
    """RFC 9208 §4.1.1: ``root`` is a quota root name as the client sent it."""

    name: ClassVar[str] = "GETQUOTA"
    root: str = ""


@dataclass(frozen=True, slots=True)
class GetQuotaRoot(Command):
    """RFC 9208 §4.1.2."""

    name: ClassVar[str] = "GETQUOTAROOT"
    mailbox: str = ""


@dataclass(frozen=True, slots=True)
class SetQuota(Command):
    """RFC 9208 §4.1.3: ``limits`` are (resource name upper-cased, limit) pairs."""

    name: ClassVar[str] = "SETQUOTA"
    root: str = ""
    limits: tuple[tuple[str, int], ...] = ()

__all__ += ["GetQuota", "GetQuotaRoot", "SetQuota"]
# -- NOTIFY (RFC 5465) ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class NotifyGroup:
    """One event group: ``filter`` "SELECTED", "SELECTED-DELAYED", "INBOXES", "PERSONAL",
    "SUBSCRIBED", "SUBTREE" or "MAILBOXES" (the last two with ``mailboxes``); ``events`` the
    event names as written (case kept, compared case-insensitively), empty for NONE;
    ``fetch``: MessageNew's fetch attributes (RFC 5465 §5.2)."""

    filter: str
    mailboxes: tuple[str, ...] = ()
    events: tuple[str, ...] = ()
    fetch: tuple[FetchAttr, ...] = ()


@dataclass(frozen=True, slots=True)
class Notify(Command):
    """NOTIFY NONE (``groups`` empty, ``none``) or NOTIFY SET [STATUS] groups (RFC 5465 §3)."""

    name: ClassVar[str] = "NOTIFY"
    none: bool = False
    status: bool = False
    groups: tuple[NotifyGroup, ...] = ()
