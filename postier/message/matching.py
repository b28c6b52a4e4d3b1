"""SEARCH evaluation (RFC 9051 §6.4.4) of a criteria tree against one message, as a pure function.

The server implements ``SearchView`` for each message (cheap attributes plus ``raw()`` for the
octets, only called when a header or text key needs them) and ``SearchContext`` once per command.
Text matching is a case-insensitive substring test on Unicode text (casefold): header values with
RFC 2047 encoded words decoded, bodies with their transfer encoding and charset undone. BODY searches
text/* parts and the headers of encapsulated messages; TEXT adds the top-level header. Dates compare
by calendar date only, disregarding time and timezone: INTERNALDATE in its own zone, SENT* on the
Date header's own zone (a message without a parseable Date matches no SENT* key).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_tz
from typing import Protocol

from postier.proto.imap.search import (
    AllKey,
    AndKey,
    DateKey,
    FlagKey,
    HeaderKey,
    ModSeqKey,
    NotKey,
    OrKey,
    SearchKey,
    SeqSetKey,
    SizeKey,
    TextKey,
    WithinKey,
)

from .envelope import address_text
from .mime import Part, decode_body, decode_header_text, parse_message

__all__ = [
    "INDEXED_FIELDS", "TEXT_LIMIT", "SearchContext", "SearchText", "SearchView", "evaluate", "part_search_text",
    "search_text", "sent_date",
]


class SearchView(Protocol):
    """What the evaluator needs of one message. ``flags`` holds system flags ("\\Seen",
    "\\Recent"...) and keywords together; ``internal_date`` should be timezone-aware."""

    @property
    def seq(self) -> int: ...
    @property
    def uid(self) -> int: ...
    @property
    def flags(self) -> frozenset[str]: ...
    @property
    def internal_date(self) -> dt.datetime: ...
    @property
    def size(self) -> int: ...
    @property
    def modseq(self) -> int: ...
    def raw(self) -> bytes:
        """The message octets (LF or CRLF); only called when a key needs the content."""
        ...


@dataclass(frozen=True, slots=True)
class SearchContext:
    """Per-command facts: the largest sequence number and UID (to resolve "*"), and the UIDs of
    the saved result for "$" (RFC 5182; None when nothing was saved, which matches nothing)."""

    max_seq: int
    max_uid: int
    saved_uids: frozenset[int] | None = None
    now: float = 0.0  # when the command runs (RFC 5032 OLDER/YOUNGER); 0: read the clock per message


class _Lazy:
    """Parses the message at most once per evaluation, only if a key needs it."""

    def __init__(self, view: SearchView) -> None:
        self.view = view
        self._part: Part | None = None
        self._flags: frozenset[str] | None = None

    @property
    def part(self) -> Part:
        if self._part is None:
            self._part = parse_message(self.view.raw())
        return self._part

    @property
    def flags(self) -> frozenset[str]:
        if self._flags is None:
            self._flags = frozenset(f.lower() for f in self.view.flags)
        return self._flags


def evaluate(key: SearchKey, view: SearchView, ctx: SearchContext) -> bool:
    """True if the message matches ``key`` (one message, one criteria tree)."""
    return _eval(key, _Lazy(view), ctx)


def _eval(key: SearchKey, m: _Lazy, ctx: SearchContext) -> bool:
    match key:
        case AllKey():
            return True
        case AndKey(keys=keys):
            return all(_eval(k, m, ctx) for k in keys)
        case OrKey(left=left, right=right):
            return _eval(left, m, ctx) or _eval(right, m, ctx)
        case NotKey(key=inner):
            return not _eval(inner, m, ctx)
        case FlagKey(flag=flag, present=present):
            return (flag.lower() in m.flags) == present
        case SeqSetKey(sequence_set=s, uid=uid):
            if s.saved:  # RFC 5182 §2.1: "$" is the saved UIDs, whatever the command
                return ctx.saved_uids is not None and m.view.uid in ctx.saved_uids
            if uid:
                return s.contains(m.view.uid, ctx.max_uid)
            return s.contains(m.view.seq, ctx.max_seq)
        case SizeKey(op=op, size=size):
            return m.view.size > size if op == "LARGER" else m.view.size < size
        case ModSeqKey(modseq=modseq):
            return m.view.modseq >= modseq  # RFC 7162 §3.1.5
        case DateKey(field=field, op=op, date=date):
            if field == "INTERNAL":
                have: dt.date | None = m.view.internal_date.date()
            else:
                have = sent_date(m.part)
            if have is None:
                return False
            if op == "BEFORE":
                return have < date
            if op == "ON":
                return have == date
            return have >= date  # SINCE: "within or later than"
        case WithinKey(op=op, seconds=seconds):  # RFC 5032 §3
            age = (ctx.now or time.time()) - m.view.internal_date.timestamp()
            return age >= seconds if op == "OLDER" else age <= seconds
        case HeaderKey(field=field, value=value):
            needle = value.casefold()
            return any(needle in _header_text(field, f.value).casefold() for f in m.part.headers(field))
        case TextKey(scope=scope, value=value):
            needle = value.casefold()
            return any(needle in chunk.casefold() for chunk in _body_texts(m.part, scope == "TEXT"))
    return False


_ADDRESS_FIELDS = frozenset({"FROM", "TO", "CC", "BCC", "SENDER", "REPLY-TO"})
_BLANKS = re.compile(r"[ \t]+")


def _header_text(field: str, value: bytes) -> str:
    """A header value as searched: address fields as their parsed addresses (``address_text``),
    others with encoded words decoded and runs of blanks as one space (as Dovecot searches)."""
    if field.upper() in _ADDRESS_FIELDS:
        return address_text(value.replace(b"\r\n", b""))
    return _BLANKS.sub(" ", decode_header_text(value))


def _body_texts(root: Part, headers: bool) -> Iterator[str]:
    """BODY: the text parts and the headers of encapsulated messages; TEXT (``headers``) also
    the top-level header and every MIME part header (RFC 9051 §6.4.4 "including MIME header
    fields")."""
    for p in root.walk():
        if headers and p.header_end > p.start:
            yield decode_header_text(p.header_bytes)
        if p.message is None and not p.children and p.maintype == "text":
            yield decode_body(p)
        elif p.message is not None and not headers:
            yield decode_header_text(p.message.header_bytes)


def sent_date(part: Part) -> dt.date | None:
    """The calendar date of the Date header in its own timezone, or None."""
    raw = part.first(b"date")
    if raw is None:
        return None
    parsed = parsedate_tz(raw.decode("ascii", "replace"))
    if parsed is None:
        return None
    try:
        return dt.date(parsed[0], parsed[1], parsed[2])
    except ValueError:
        return None


#: The header fields whose searchable text `search_text` extracts (for a full-text index).
INDEXED_FIELDS = ("SUBJECT", "FROM", "TO", "CC", "BCC")
#: Separates the chunks of one column in `SearchText` (a noncharacter: not NUL, which ends an
#: FTS5 text); with a needle that lacks it, "needle in column" holds exactly when some chunk
#: contains the needle (a needle holding it is not looked up in an index).
CHUNK_SEP = "\uffff"


@dataclass(frozen=True, slots=True)
class SearchText:
    """The text `evaluate` compares a message's text keys against, casefolded, for an index:
    ``fields`` by INDEXED_FIELDS name, ``leaves`` the text parts (BODY and TEXT), ``headers`` every
    part's header (TEXT), ``inner`` the headers of encapsulated messages (BODY). Chunks are joined
    by CHUNK_SEP. ``exact`` is False when a column is not the whole story (text beyond ``limit``
    left out, or a chunk holding CHUNK_SEP itself): such a message must be checked by `evaluate`."""

    fields: dict[str, str]
    leaves: str
    headers: str
    inner: str
    exact: bool


#: Characters of body text and headers `search_text` keeps of one message (a full-text index's bound).
TEXT_LIMIT = 4 << 20


def search_text(raw: bytes, limit: int = TEXT_LIMIT) -> SearchText:
    """What `evaluate` would search in this message (the same decoding: `_header_text` and the
    walk of `_body_texts`), at most ``limit`` characters of body text and headers."""
    return part_search_text(parse_message(raw), limit)


def part_search_text(part: Part, limit: int = TEXT_LIMIT) -> SearchText:
    """`search_text` of a message already parsed (`mime.parse_message`)."""
    exact = True
    fields: dict[str, str] = {}
    for f in INDEXED_FIELDS:
        values = [_header_text(f, h.value).casefold() for h in part.headers(f)]
        exact = exact and not any(CHUNK_SEP in v for v in values)
        fields[f] = CHUNK_SEP.join(values)
    cols: dict[str, list[str]] = {"leaves": [], "headers": [], "inner": []}
    budget = limit
    for p in part.walk():  # the walk of _body_texts, each chunk labelled by the scope that sees it
        chunks: list[tuple[str, str]] = []
        if p.header_end > p.start:
            chunks.append(("headers", decode_header_text(p.header_bytes)))
        if p.message is None and not p.children and p.maintype == "text":
            chunks.append(("leaves", decode_body(p)))
        elif p.message is not None:
            chunks.append(("inner", decode_header_text(p.message.header_bytes)))
        for col, text in chunks:
            if len(text) > budget:
                text, exact = text[:budget], False
            budget -= len(text)
            if CHUNK_SEP in text:
                exact = False
            cols[col].append(text.casefold())
    return SearchText(fields, CHUNK_SEP.join(cols["leaves"]), CHUNK_SEP.join(cols["headers"]),
                      CHUNK_SEP.join(cols["inner"]), exact)
