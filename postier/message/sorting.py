"""SORT (RFC 5256 §3, DISPLAYFROM/DISPLAYTO from RFC 5957) as pure functions, with RFC 5256 §2.1
base subject extraction and §2.2 sent dates, shared with THREAD (``threading``).

Written here because no maintained library implements RFC 5256. The server extracts
``SortFields`` once per message from its header (``sort_fields``; they never change, so they can
be cached), pairs them with the per-mailbox facts in ``SortItem`` and calls ``sort_messages``.
Strings compare with i;unicode-casemap (``casemap``), which is RFC 5256's i;ascii-casemap on
ASCII; ties keep mailbox order (sequence numbers).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import mktime_tz, parsedate_tz
from functools import partial

from postier.proto.imap.commands import SORT_KEYS, SortCriterion

from .envelope import ImapAddress, for_humans, parse_addresses
from .mime import HeaderField, Part, decode_header_text, parse_message

__all__ = [
    "SORT_KEYS", "SortCriterion", "SortFields", "SortItem", "base_subject", "casemap", "decode_fields",
    "encode_fields", "sent_date", "sort_fields", "sort_item", "sort_messages",
]



@dataclass(frozen=True, slots=True)
class SortFields:
    """What SORT and THREAD need from one message's header."""

    date: dt.datetime | None  # the Date header in UTC, None when missing or unparsable
    subject: str  # base subject (RFC 5256 §2.1)
    is_reply: bool  # the extraction removed a reply/forward marker (Re:, Fwd:, [fwd: ...], (fwd))
    from_: str  # addr-mailbox of the first From address (RFC 5256 §3 FROM)
    to: str
    cc: str
    display_from: str  # RFC 5957 §2: display name of the first From address, else its addr-spec
    display_to: str
    message_id: str | None  # for THREAD=REFERENCES (RFC 5256 §3)
    references: tuple[str, ...]  # References, or the first message id of In-Reply-To


@dataclass(frozen=True, slots=True)
class SortItem:
    """One message to sort: ``id`` is what the answer lists (sequence number or UID), ``seq`` the
    mailbox order for ties; ``internal_date`` must be timezone-aware."""

    id: int
    seq: int
    internal_date: dt.datetime
    size: int
    fields: SortFields

    @property
    def sent(self) -> dt.datetime:
        """RFC 5256 §2.2: the Date header, or the internal date when it has none."""
        return self.fields.date if self.fields.date is not None else self.internal_date


# -- RFC 5256 §2.1 base subject ----------------------------------------------------------------------

_BLOB = r"\[[^\[\]]*\][ \t]*"  # subj-blob
_LEADER = re.compile(rf"(?:{_BLOB})*(?:re|fwd?)[ \t]*(?:{_BLOB})?:|[ \t]+", re.IGNORECASE)  # subj-leader
_BLOB_RE = re.compile(_BLOB)
_TRAILER = re.compile(r"(?:\(fwd\)|[ \t])$", re.IGNORECASE)  # subj-trailer
_SPACES = re.compile(r"[ \t\r\n]+")


def base_subject(subject: str) -> tuple[str, bool]:
    """(base subject, is reply or forward) of a decoded Subject (RFC 5256 §2.1 steps 2-6; step 1,
    decoding and white space, is the caller's ``decode_header_text`` plus the collapse here)."""
    s = _SPACES.sub(" ", subject)  # step 1: tabs and continuations to one space
    reply = False
    while True:
        while (m := _TRAILER.search(s)) is not None:  # step 2
            reply = reply or bool(m.group().strip())  # "(fwd)"
            s = s[: m.start()]
        changed = True
        while changed:  # steps 3-5
            changed = False
            m = _LEADER.match(s)
            if m is not None and m.end() > 0:
                reply = reply or bool(m.group().strip())
                s = s[m.end() :]
                changed = True
            b = _BLOB_RE.match(s)
            if b is not None and s[b.end() :].strip(" \t"):  # step 4: only if a subject remains
                s = s[b.end() :]
                changed = True
        if s[:5].lower() == "[fwd:" and s.endswith("]"):  # step 6
            s = s[5:-1]
            reply = True
            continue
        return s, reply


def sent_date(part: Part) -> dt.datetime | None:
    """The Date header as an aware UTC datetime (RFC 5256 §2.2), or None."""
    value = None
    for f in part.headers(b"date"):
        value = f.unfolded()
    return None if value is None else _parse_date(value)


def _parse_date(value: bytes) -> dt.datetime | None:
    parsed = parsedate_tz(value.decode("ascii", "replace"))
    if parsed is None:
        return None
    try:
        return dt.datetime.fromtimestamp(mktime_tz(parsed), dt.UTC)
    except (OverflowError, ValueError, OSError):
        return None


# -- per-message fields -----------------------------------------------------------------------------

_MSG_ID = re.compile(rb"<([^<>]*)>")


_WANTED = frozenset({"subject", "from", "to", "cc", "message-id", "references", "in-reply-to", "date"})


def _fields(part: Part) -> dict[str, list[HeaderField]]:
    """The header fields SORT and THREAD use, by lower-case name, in one pass over the header."""
    out: dict[str, list[HeaderField]] = {}
    for f in part.fields:
        name = f.name.lower()
        if name in _WANTED:
            out.setdefault(name, []).append(f)
    return out


def _first_address(fields: list[HeaderField]) -> ImapAddress | None:
    """The first address of the first such field (a group's start, whose mailbox is the group
    name, counts: "undisclosed-recipients:;" sorts as such, as in Dovecot)."""
    for f in fields:
        for a in parse_addresses(f.unfolded()):
            return a
    return None


def _mailbox(a: ImapAddress | None) -> str:
    """The addr-mailbox as written (RFC 5256 §3: not RFC 2047-decoded, as in Dovecot)."""
    return "" if a is None or a.mailbox is None else a.mailbox.decode("utf-8", "replace")


def _display(a: ImapAddress | None) -> str:
    """RFC 5957 §2: the display name (RFC 2047-decoded) if non-empty, else the addr-spec."""
    if a is None:
        return ""
    if a.name:
        # 8-bit octets that are not UTF-8 become U+FFFD (as Dovecot sorts them), not Latin-1
        raw = for_humans(a.name).decode("utf-8", "replace").encode("utf-8")
        name = decode_header_text(raw).strip()
        if name:
            return name
    return _mailbox(a) + ("@" + a.host.decode("utf-8", "replace") if a.host else "")


_WS = re.compile(r"\s+")


def _ids(value: bytes) -> list[str]:
    return [_WS.sub("", m.decode("utf-8", "replace")) for m in _MSG_ID.findall(value.replace(b"\r\n", b""))]


def sort_fields(part: Part) -> SortFields:
    """The SORT/THREAD fields of a message (its top-level ``Part``; the header is enough)."""
    by_name = _fields(part)
    subjects = by_name.get("subject")
    subject = subjects[0].value if subjects else None  # the first one, as Dovecot sorts
    base, reply = base_subject(decode_header_text(subject).replace("\x00", "\ufffd")) if subject is not None \
        else ("", False)
    first_from, first_to = _first_address(by_name.get("from", [])), _first_address(by_name.get("to", []))
    message_id = None
    for f in by_name.get("message-id", []):
        found = _ids(f.value)
        message_id = found[0] if found else message_id
    refs: list[str] = []
    for f in by_name.get("references", []):
        refs.extend(_ids(f.value))
    if not refs:  # RFC 5256 §3 REFERENCES step 1: else the first id of In-Reply-To
        for f in by_name.get("in-reply-to", [])[:1]:
            refs = _ids(f.value)[:1]
    dates = by_name.get("date")
    return SortFields(
        date=_parse_date(dates[-1].unfolded()) if dates else None, subject=base, is_reply=reply,
        from_=_mailbox(first_from), to=_mailbox(first_to), cc=_mailbox(_first_address(by_name.get("cc", []))),
        display_from=_display(first_from), display_to=_display(first_to),
        message_id=message_id or None, references=tuple(r for r in refs if r)[:1000],
    )


_FIELDS_FORMAT = 1


def encode_fields(f: SortFields) -> bytes:
    """``f`` as bytes for the store's view cache (kind "sort" + VIEWS_VERSION): header parsing is
    what a SORT or THREAD over a large mailbox costs, and the fields never change."""
    return json.dumps([
        _FIELDS_FORMAT, None if f.date is None else f.date.timestamp(), f.subject, f.is_reply, f.from_, f.to, f.cc,
        f.display_from, f.display_to, f.message_id, list(f.references),
    ], ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass")


def decode_fields(data: bytes) -> SortFields | None:
    """The inverse of ``encode_fields``; None for anything else (then parse the header again)."""
    try:
        v = json.loads(data)
        if not isinstance(v, list) or len(v) != 11 or v[0] != _FIELDS_FORMAT:
            return None
        date = None if v[1] is None else dt.datetime.fromtimestamp(float(v[1]), dt.UTC)
        return SortFields(date, str(v[2]), bool(v[3]), str(v[4]), str(v[5]), str(v[6]), str(v[7]), str(v[8]),
                          None if v[9] is None else str(v[9]), tuple(str(r) for r in v[10]))
    except (ValueError, TypeError, OverflowError, OSError):
        return None


def sort_item(id: int, seq: int, internal_date: float, size: int, header: bytes) -> SortItem:  # noqa: A002
    """A ``SortItem`` from what the store has: internal date as a Unix time, RFC822.SIZE, and the
    message's header block (or the whole message)."""
    return SortItem(id, seq, dt.datetime.fromtimestamp(internal_date, dt.UTC), size,
                    sort_fields(parse_message(header)))


# -- sorting ----------------------------------------------------------------------------------------

def casemap(s: str) -> str:
    """The i;unicode-casemap collation key (RFC 5051 §2: each character titlecased, then NFKD), the
    default for SORT under RFC 5255 §4.5 and what Dovecot sorts by ("Émile" next to "Emil"); on
    ASCII it is i;ascii-casemap, RFC 5256's default."""
    if s.isascii():
        return s.upper()
    return unicodedata.normalize("NFKD", "".join(c.title() for c in s))


def _key(item: SortItem, key: str) -> str | float | int:
    f = item.fields
    match key:
        case "ARRIVAL":
            return item.internal_date.timestamp()
        case "DATE":
            return item.sent.timestamp()
        case "SIZE":
            return item.size
        case "SUBJECT":
            return casemap(f.subject)
        case "FROM":
            return casemap(f.from_)
        case "TO":
            return casemap(f.to)
        case "CC":
            return casemap(f.cc)
        case "DISPLAYFROM":
            return casemap(f.display_from)
        case "DISPLAYTO":
            return casemap(f.display_to)
    raise ValueError(f"unknown sort key {key}")


def sort_messages(items: Sequence[SortItem], criteria: Sequence[SortCriterion]) -> list[SortItem]:
    """``items`` in the order of ``criteria`` (RFC 5256 §3), ties in mailbox order."""
    out = sorted(items, key=lambda i: i.seq)
    for c in reversed(criteria):  # stable sorts, least significant key first
        if c.key not in SORT_KEYS:
            raise ValueError(f"unknown sort key {c.key}")
        out.sort(key=partial(_key, key=c.key), reverse=c.reverse)
    return out
