"""IMAP server responses as bytes (RFC 9051 §7, RFC 3501 §7): status, codes, data, continuation.

Values are serialised from plain Python: None -> NIL, int -> number, str/bytes -> string (quoted
when allowed, literal otherwise), tuple/list -> parenthesised list, ``Atom`` -> as is, ``Raw`` ->
pre-serialised bytes (an ENVELOPE or BODYSTRUCTURE), ``Literal``/``Literal8`` -> forced literal.
``utf8=True`` (IMAP4rev2 or UTF8=ACCEPT enabled) allows UTF-8 in quoted strings and mailbox names;
otherwise 8-bit text goes out as a literal and mailbox names in modified UTF-7.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..mutf7 import mutf7_encode
from .seqset import SequenceSet

__all__ = [
    "Atom", "Code", "Literal", "Literal8", "Raw", "ResponseCode", "Value", "bye", "capability",
    "continuation", "enabled", "encode_astring", "encode_mailbox", "encode_nstring", "encode_string",
    "encode_value", "esearch", "exists", "expunge", "fetch", "fetch_split", "flags", "format_date_time", "id_response",
    "list_response", "namespace", "recent", "sasl_challenge", "search", "status", "tagged", "untagged",
    "untagged_status", "vanished",
]

CRLF = b"\r\n"


class Atom(str):
    """Sent verbatim: flags, keywords, capability names."""


class Raw(bytes):
    """Already-serialised IMAP bytes."""


class Literal(bytes):
    """Always sent as ``{n}`` literal (message content)."""


class Literal8(bytes):
    """Sent as ``~{n}`` (RFC 3516 §4.2: BINARY content that contains NUL)."""


type Value = None | int | str | bytes | Sequence[Value]


# -- strings -----------------------------------------------------------------------------------

_QUOTABLE = re.compile(rb"[\x01-\x09\x0b\x0c\x0e-\x7f]*")  # RFC 9051 §9 TEXT-CHAR
_ATOM_SAFE = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\\]]+')
_ASTRING_SAFE = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\]+')
_MAX_QUOTED = 1024  # longer strings go as literals, like Dovecot


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)


def encode_literal(data: bytes, binary: bool = False) -> bytes:
    return (b"~{" if binary else b"{") + str(len(data)).encode() + b"}\r\n" + data


def encode_string(value: str | bytes, *, utf8: bool = False) -> bytes:
    """A quoted string when RFC 9051 §4.3 allows one, else a literal (CR, LF, NUL, 8-bit in rev1)."""
    raw = _as_bytes(value)
    if len(raw) <= _MAX_QUOTED:
        quotable = _QUOTABLE.fullmatch(raw) is not None
        if not quotable and utf8 and b"\x00" not in raw and b"\r" not in raw and b"\n" not in raw:
            try:
                raw.decode("utf-8")  # RFC 9051 §9 utf8-quoted
                quotable = True
            except UnicodeDecodeError:
                pass
        if quotable:
            return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return encode_literal(raw)


def encode_nstring(value: str | bytes | None, *, utf8: bool = False) -> bytes:
    return b"NIL" if value is None else encode_string(value, utf8=utf8)


def encode_astring(value: str | bytes, *, utf8: bool = False) -> bytes:
    raw = _as_bytes(value)
    if _ASTRING_SAFE.fullmatch(raw) and raw.upper() != b"NIL":
        return raw
    return encode_string(raw, utf8=utf8)


def encode_mailbox(name: str, *, utf8: bool = False) -> bytes:
    """A mailbox name: UTF-8 after ENABLE IMAP4rev2/UTF8=ACCEPT, else modified UTF-7 (RFC 3501
    §5.1.3). Always quoted (Dovecot does the same; some clients mis-parse atoms with "]")."""
    raw = name.encode("utf-8") if utf8 else mutf7_encode(name).encode("ascii")
    return encode_string(raw, utf8=utf8)


def encode_value(value: Value, *, utf8: bool = False) -> bytes:
    if value is None:
        return b"NIL"
    if isinstance(value, bool):
        raise TypeError("booleans have no IMAP form")
    if isinstance(value, int):
        return str(value).encode()
    if isinstance(value, Atom):
        return value.encode("utf-8")
    if isinstance(value, Raw):
        return bytes(value)
    if isinstance(value, Literal8):
        return encode_literal(bytes(value), binary=True)
    if isinstance(value, Literal):
        return encode_literal(bytes(value))
    if isinstance(value, (str, bytes)):
        return encode_string(value, utf8=utf8)
    return b"(" + b" ".join(encode_value(v, utf8=utf8) for v in value) + b")"


def format_date_time(when: dt.datetime) -> bytes:
    """RFC 9051 §9 date-time: ``"17-Jul-1996 02:44:25 -0700"`` (naive datetimes are taken as UTC)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    off = when.utcoffset() or dt.timedelta()
    minutes = int(off.total_seconds()) // 60
    sign = "-" if minutes < 0 else "+"
    minutes = abs(minutes)
    month = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")[when.month - 1]
    text = f'"{when.day:2d}-{month}-{when.year:04d} {when:%H:%M:%S} {sign}{minutes // 60:02d}{minutes % 60:02d}"'
    return text.encode("ascii")


# -- response codes (RFC 9051 §7.1) -----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ResponseCode:
    """``[ATOM data]`` inside a status response."""

    atom: str
    data: bytes = b""

    def encode(self) -> bytes:
        inner = self.atom.encode("ascii") + (b" " + self.data if self.data else b"")
        return b"[" + inner + b"]"


def _flag_list(flag_names: Iterable[str]) -> bytes:
    return b"(" + b" ".join(f.encode("utf-8") for f in flag_names) + b")"


class Code:
    """Response codes: constants for the data-less ones, functions for the others."""

    ALERT = ResponseCode("ALERT")
    ALREADYEXISTS = ResponseCode("ALREADYEXISTS")  # RFC 5530 §3
    AUTHENTICATIONFAILED = ResponseCode("AUTHENTICATIONFAILED")
    AUTHORIZATIONFAILED = ResponseCode("AUTHORIZATIONFAILED")
    CANNOT = ResponseCode("CANNOT")
    CLIENTBUG = ResponseCode("CLIENTBUG")
    CLOSED = ResponseCode("CLOSED")  # RFC 7162 §3.2.11
    CONTACTADMIN = ResponseCode("CONTACTADMIN")
    CORRUPTION = ResponseCode("CORRUPTION")
    EXPIRED = ResponseCode("EXPIRED")
    EXPUNGEISSUED = ResponseCode("EXPUNGEISSUED")
    HASCHILDREN = ResponseCode("HASCHILDREN")
    INUSE = ResponseCode("INUSE")
    LIMIT = ResponseCode("LIMIT")
    NONEXISTENT = ResponseCode("NONEXISTENT")
    NOMODSEQ = ResponseCode("NOMODSEQ")  # RFC 7162 §3.1.2
    NOPERM = ResponseCode("NOPERM")
    NOTSAVED = ResponseCode("NOTSAVED")  # RFC 5182 §2.1
    OVERQUOTA = ResponseCode("OVERQUOTA")
    PARSE = ResponseCode("PARSE")
    PRIVACYREQUIRED = ResponseCode("PRIVACYREQUIRED")
    READ_ONLY = ResponseCode("READ-ONLY")
    READ_WRITE = ResponseCode("READ-WRITE")
    SERVERBUG = ResponseCode("SERVERBUG")
    TOOBIG = ResponseCode("TOOBIG")  # RFC 4469 §7 / RFC 7889
    TRYCREATE = ResponseCode("TRYCREATE")
    UIDNOTSTICKY = ResponseCode("UIDNOTSTICKY")  # RFC 4315 §3
    UNAVAILABLE = ResponseCode("UNAVAILABLE")
    UNKNOWN_CTE = ResponseCode("UNKNOWN-CTE")  # RFC 3516 §4.3

    @staticmethod
    def uidnext(n: int) -> ResponseCode:
        return ResponseCode("UIDNEXT", str(n).encode())

    @staticmethod
    def uidvalidity(n: int) -> ResponseCode:
        return ResponseCode("UIDVALIDITY", str(n).encode())

    @staticmethod
    def unseen(n: int) -> ResponseCode:
        return ResponseCode("UNSEEN", str(n).encode())

    @staticmethod
    def highestmodseq(n: int) -> ResponseCode:
        return ResponseCode("HIGHESTMODSEQ", str(n).encode())  # RFC 7162 §3.1.2.1

    @staticmethod
    def appenduid(uidvalidity: int, uids: int | SequenceSet) -> ResponseCode:
        return ResponseCode("APPENDUID", f"{uidvalidity} {uids}".encode())  # RFC 4315 §3

    @staticmethod
    def badurl(url: str) -> ResponseCode:
        """RFC 4469 §5 (errata 4046): the URL bare, no "]" in it."""
        return ResponseCode("BADURL", url.replace("]", "%5D").encode("ascii", "replace"))

    @staticmethod
    def copyuid(uidvalidity: int, source: SequenceSet, dest: SequenceSet) -> ResponseCode:
        return ResponseCode("COPYUID", f"{uidvalidity} {source} {dest}".encode())  # RFC 4315 §3

    @staticmethod
    def permanentflags(flag_names: Iterable[str]) -> ResponseCode:
        return ResponseCode("PERMANENTFLAGS", _flag_list(flag_names))

    @staticmethod
    def modified(seqset: SequenceSet) -> ResponseCode:
        return ResponseCode("MODIFIED", str(seqset).encode())  # RFC 7162 §3.1.3

    @staticmethod
    def capability(caps: Iterable[str]) -> ResponseCode:
        return ResponseCode("CAPABILITY", " ".join(caps).encode("ascii"))

    @staticmethod
    def badcharset(charsets: Iterable[str] = ("US-ASCII", "UTF-8")) -> ResponseCode:
        return ResponseCode("BADCHARSET", b"(" + " ".join(charsets).encode("ascii") + b")")

    @staticmethod
    def named(atom: str) -> ResponseCode:
        """Any data-less code by name (e.g. from ``ParseError.code``)."""
        return ResponseCode(atom)


# -- status responses ---------------------------------------------------------------------------

def _text(text: str) -> bytes:
    # resp-text must not contain CR/LF (RFC 9051 §9 text = 1*TEXT-CHAR)
    return text.replace("\r", " ").replace("\n", " ").encode("utf-8")


def _status_line(prefix: bytes, status: str, text: str, code: ResponseCode | None) -> bytes:
    out = prefix + b" " + status.encode("ascii")
    if code is not None:
        out += b" " + code.encode()
    return out + b" " + _text(text or status.capitalize()) + CRLF


def tagged(tag: str, status: str, text: str, code: ResponseCode | None = None) -> bytes:
    """``a1 OK [code] text`` (RFC 9051 §7.1). ``status`` is "OK", "NO" or "BAD"."""
    return _status_line(tag.encode("ascii"), status, text, code)


def untagged_status(status: str, text: str, code: ResponseCode | None = None) -> bytes:
    """``* OK|NO|BAD|PREAUTH|BYE [code] text``."""
    return _status_line(b"*", status, text, code)


def bye(text: str, code: ResponseCode | None = None) -> bytes:
    return untagged_status("BYE", text, code)


def continuation(text: str = "Ready") -> bytes:
    """``+ text`` (RFC 9051 §7.5)."""
    return b"+ " + _text(text) + CRLF


def sasl_challenge(data: bytes) -> bytes:
    """``+ base64`` for AUTHENTICATE (RFC 9051 §6.2.2); an empty challenge is ``+ ``."""
    return b"+ " + base64.b64encode(data) + CRLF


def untagged(*parts: bytes | str) -> bytes:
    """``* part part ...`` for any data response not covered below."""
    return b"* " + b" ".join(p.encode("utf-8") if isinstance(p, str) else p for p in parts) + CRLF


# -- data responses -----------------------------------------------------------------------------

def capability(caps: Iterable[str]) -> bytes:
    return untagged(b"CAPABILITY", " ".join(caps))


def enabled(caps: Iterable[str]) -> bytes:
    """``* ENABLED CONDSTORE`` (RFC 5161 §3.2); possibly with no names."""
    return b"* ENABLED" + b"".join(b" " + c.encode("ascii") for c in caps) + CRLF


def exists(n: int) -> bytes:
    return b"* %d EXISTS\r\n" % n


def recent(n: int) -> bytes:
    return b"* %d RECENT\r\n" % n


def expunge(seq: int) -> bytes:
    return b"* %d EXPUNGE\r\n" % seq


def flags(flag_names: Iterable[str]) -> bytes:
    return b"* FLAGS " + _flag_list(flag_names) + CRLF


def vanished(uids: SequenceSet, earlier: bool = False) -> bytes:
    """``* VANISHED [(EARLIER)] set`` (RFC 7162 §3.2.10)."""
    return b"* VANISHED " + (b"(EARLIER) " if earlier else b"") + str(uids).encode() + CRLF


def list_response(
    attributes: Iterable[str],
    delimiter: str | None,
    name: str,
    *,
    utf8: bool = False,
    childinfo: Iterable[str] = (),
    oldname: str | None = None,
    command: str = "LIST",
) -> bytes:
    """``* LIST (\\HasNoChildren) "/" "INBOX"`` with RFC 5258 extended data (CHILDINFO) and
    RFC 9051 §7.3.1 OLDNAME. ``command="LSUB"`` for LSUB replies."""
    delim = b"NIL" if delimiter is None else encode_string(delimiter)
    out = (command.encode("ascii") + b" " + _flag_list(attributes) + b" " + delim + b" "
           + encode_mailbox(name, utf8=utf8))
    extra: list[bytes] = []
    childinfo = tuple(childinfo)
    if childinfo:
        extra.append(b'"CHILDINFO" (' + b" ".join(encode_string(c) for c in childinfo) + b")")
    if oldname is not None:
        extra.append(b'"OLDNAME" (' + encode_mailbox(oldname, utf8=utf8) + b")")
    if extra:
        out += b" (" + b" ".join(extra) + b")"
    return b"* " + out + CRLF


def status(name: str, items: Iterable[tuple[str, int]], *, utf8: bool = False) -> bytes:
    """``* STATUS "box" (MESSAGES 3 UIDNEXT 9)`` (RFC 9051 §7.3.2)."""
    body = b" ".join(f"{k} {v}".encode("ascii") for k, v in items)
    return b"* STATUS " + encode_mailbox(name, utf8=utf8) + b" (" + body + b")" + CRLF


def quota(root: str, resources: Iterable[tuple[str, int, int]]) -> bytes:
    """``* QUOTA "" (STORAGE 10 512 MESSAGE 3 1000)`` (RFC 9208 §5.1): name, usage, limit."""
    body = b" ".join(f"{name} {used} {limit}".encode("ascii") for name, used, limit in resources)
    return b"* QUOTA " + encode_string(root.encode("utf-8")) + b" (" + body + b")" + CRLF


def quotaroot(mailbox: str, roots: Iterable[str], *, utf8: bool = False) -> bytes:
    """``* QUOTAROOT INBOX ""`` (RFC 9208 §5.2): the mailbox and its quota roots (maybe none)."""
    names = b"".join(b" " + encode_string(r.encode("utf-8")) for r in roots)
    return b"* QUOTAROOT " + encode_mailbox(mailbox, utf8=utf8) + names + CRLF


def search(ids: Iterable[int], modseq: int | None = None) -> bytes:
    """``* SEARCH 2 3 6`` (IMAP4rev1; RFC 7162 §3.1.5 adds ``(MODSEQ n)``)."""
    out = b" ".join([b"* SEARCH", *(b"%d" % n for n in ids)])  # one join: 10,000 numbers in linear time
    if modseq is not None:
        out += b" (MODSEQ %d)" % modseq
    return out + CRLF


def esearch(
    tag: str | None,
    *,
    uid: bool = False,
    min: int | None = None,
    max: int | None = None,
    all: SequenceSet | None = None,
    count: int | None = None,
    modseq: int | None = None,
) -> bytes:
    """``* ESEARCH (TAG "a1") UID MIN 2 MAX 9 ALL 2:4,9 COUNT 4`` (RFC 4731 §3.1, RFC 9051 §7.3.4).

    Empty results leave MIN/MAX/ALL out (pass None); COUNT 0 is sent when asked.
    """
    out = b"* ESEARCH"
    if tag is not None:
        out += b" (TAG " + encode_string(tag) + b")"
    if uid:
        out += b" UID"
    if min is not None:
        out += b" MIN %d" % min
    if max is not None:
        out += b" MAX %d" % max
    if all is not None and all:
        out += b" ALL " + str(all).encode()
    if count is not None:
        out += b" COUNT %d" % count
    if modseq is not None:
        out += b" MODSEQ %d" % modseq
    return out + CRLF


def fetch(seq: int, items: Iterable[tuple[str, Value]], *, utf8: bool = False) -> bytes:
    """``* 12 FETCH (UID 7 FLAGS (\\Seen) BODY[] {n}...)`` from (response name, value) pairs.

    Pass flags as a tuple of ``Atom``, INTERNALDATE as ``Raw(format_date_time(...))``, ENVELOPE
    and BODYSTRUCTURE as ``Raw``, section contents as ``Literal`` (or ``Literal8``).
    """
    body = b" ".join(name.encode("ascii") + b" " + encode_value(value, utf8=utf8) for name, value in items)
    return b"* %d FETCH (" % seq + body + b")" + CRLF


def fetch_split[T](seq: int, items: Iterable[tuple[str, object]], outside: type[T], *,
                   utf8: bool = False) -> list[bytes | T]:
    """A ``fetch`` line cut where the value of an item is an `outside` (a literal the caller sends
    itself, ``{n}`` CRLF and the n octets: a large message or a part of it, from its file): the
    line's bytes up to it (the item's name and its space), the value, the bytes up to the next one
    or to the line's end. Every other value is a Value."""
    out: list[bytes | T] = []
    cur = b"* %d FETCH (" % seq
    for i, (name, value) in enumerate(items):
        cur += (b" " if i else b"") + name.encode("ascii") + b" "
        if isinstance(value, outside):
            out += [cur, value]
            cur = b""
        else:
            cur += encode_value(value, utf8=utf8)  # type: ignore[arg-type]  # a Value: not an outside
    out.append(cur + b")" + CRLF)
    return out


def namespace(
    personal: Sequence[tuple[str, str | None]] | None,
    other: Sequence[tuple[str, str | None]] | None = None,
    shared: Sequence[tuple[str, str | None]] | None = None,
    *,
    utf8: bool = False,
) -> bytes:
    """``* NAMESPACE (("" "/")) NIL NIL`` (RFC 9051 §7.3.5, RFC 2342)."""

    def one(spaces: Sequence[tuple[str, str | None]] | None) -> bytes:
        if not spaces:
            return b"NIL"
        return b"(" + b"".join(
            b"(" + encode_mailbox(prefix, utf8=utf8) + b" "
            + (b"NIL" if delim is None else encode_string(delim)) + b")"
            for prefix, delim in spaces
        ) + b")"

    return b"* NAMESPACE " + one(personal) + b" " + one(other) + b" " + one(shared) + CRLF


def id_response(params: Sequence[tuple[str, str | None]] | None) -> bytes:
    """``* ID ("name" "postier")`` or ``* ID NIL`` (RFC 2971 §3.2)."""
    if not params:
        return b"* ID NIL\r\n"
    body = b" ".join(encode_string(k) + b" " + encode_nstring(v) for k, v in params)
    return b"* ID (" + body + b")" + CRLF


# -- SORT, THREAD, ESORT (RFC 5256, RFC 5267) -----------------------------------------------------------

class ThreadTree(Protocol):
    """A THREAD answer node: a message number (None for a dummy parent) and its children."""

    @property
    def id(self) -> int | None: ...
    @property
    def children(self) -> Sequence[ThreadTree]: ...


def sort(ids: Iterable[int], modseq: int | None = None) -> bytes:
    """``* SORT 2 3 6`` in sort order (RFC 5256 §4; RFC 7162 §3.1.5 adds ``(MODSEQ n)``)."""
    return b"* SORT" + search(ids, modseq)[len(b"* SEARCH") :]


def _thread_body(node: ThreadTree) -> bytes:
    """RFC 5256 §4 thread-members without recursion: ``3 6 (4 23)(44 7 96)``; a dummy parent
    is only the parentheses of its children."""
    out = bytearray()
    stack: list[ThreadTree | bytes] = [node]
    while stack:
        x = stack.pop()
        if isinstance(x, bytes):
            out += x
            continue
        kids = x.children
        if x.id is not None:
            out += b"%d" % x.id
            if kids:
                out += b" "
        if len(kids) == 1:
            stack.append(kids[0])
        else:
            for c in reversed(kids):
                stack.extend((b")", c, b"("))
    return bytes(out)


def thread(threads: Iterable[ThreadTree]) -> bytes:
    """``* THREAD (2)(3 6 (4 23)(44 7 96))`` (RFC 5256 §4); no threads: ``* THREAD``."""
    body = b"".join(b"(" + _thread_body(t) + b")" for t in threads)
    return b"* THREAD" + (b" " + body if body else b"") + CRLF


def ordered_set(ids: Sequence[int]) -> bytes:
    """A sequence-set that keeps the order of ``ids`` (ESORT ALL, RFC 5267 §3.2): ascending runs
    of consecutive numbers become ``a:b``, everything else stays in place."""
    out: list[bytes] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(b"%d" % ids[i] if j == i else b"%d:%d" % (ids[i], ids[j]))
        i = j + 1
    return b",".join(out)


def esort(
    tag: str | None,
    ids: Sequence[int],
    returns: Sequence[str],
    *,
    uid: bool = False,
    partial: tuple[int, int] | None = None,
    modseq: int | None = None,
) -> bytes:
    """The ESEARCH answer to SORT RETURN (...) (RFC 5267 §3): ``ids`` in sort order; MIN and MAX are
    the first and last in that order, ALL keeps it, PARTIAL (RFC 5267 §4.4) is the 1-based
    inclusive slice ``partial`` of it (NIL when empty)."""
    out = b"* ESEARCH"
    if tag is not None:
        out += b" (TAG " + encode_string(tag) + b")"
    if uid:
        out += b" UID"
    if ids and "MIN" in returns:
        out += b" MIN %d" % ids[0]
    if ids and "MAX" in returns:
        out += b" MAX %d" % ids[-1]
    if ids and "ALL" in returns:
        out += b" ALL " + ordered_set(ids)
    if "COUNT" in returns:
        out += b" COUNT %d" % len(ids)
    if partial is not None and "PARTIAL" in returns:
        low, high = partial
        chunk = ids[low - 1 : high]
        out += b" PARTIAL (%d:%d %s)" % (low, high, ordered_set(chunk) if chunk else b"NIL")
    if modseq is not None:
        out += b" MODSEQ %d" % modseq
    return out + CRLF


__all__ += ["ThreadTree", "esort", "ordered_set", "sort", "thread"]
__all__ += ["quota", "quotaroot"]
