"""MIME tree of a stored message (RFC 5322 header, RFC 2045/2046 parts), as offsets into one buffer.

Written here rather than with the stdlib ``email`` parser because IMAP needs exact octet offsets of
every header, body and MIME header (for BODY[1.2.MIME] and sizes), never-raising degradation on
broken mail, and hard bounds on depth and part count; ``email`` rewrites, allocates per part and
raises or "defects" in ways that do not map onto those needs.

Line endings: everything is computed on the CRLF form. ``parse_message`` converts bare LF (as in
Maildir files written by other tools) to CRLF first, so sizes, line counts and sections match what
the server sends, which is that CRLF form. Broken MIME degrades like Dovecot: a bad Content-Type is
text/plain (RFC 2045 §5.2), a multipart without boundary parameter or whose boundary never occurs
gets one empty text/plain part, an encoded message/rfc822 gets an empty encapsulated message, and
past the depth/part caps parts are left unsplit the same way.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..proto.crlf import to_crlf

__all__ = [
    "MAX_DEPTH", "MAX_HEADER_FIELDS", "MAX_PARTS", "Decoder", "HeaderField", "Part", "UnknownCTE", "decode_body",
    "decode_header_text", "decode_qp", "decode_transfer_encoding", "header_end", "header_section", "no_nul",
    "parse_message", "parse_params",
]

MAX_DEPTH = 50
MAX_PARTS = 10_000
MAX_HEADER_FIELDS = 5_000  # per part; further lines stay in the raw header only


def no_nul(data: bytes) -> bytes:
    """``data`` with NUL octets replaced by 0x80, for BODY[...] and RFC822 answers: an IMAP literal
    may not carry NUL (RFC 9051 §4.3, CHAR8), only BINARY's literal8 may (RFC 3516 §4.2). 0x80 is
    what Dovecot sends in their place."""
    return data.replace(b"\x00", b"\x80") if b"\x00" in data else data


@dataclass(slots=True)
class HeaderField:
    name: str  # as written, ASCII (undecodable octets replaced)
    start: int  # offset of the field's first octet
    end: int  # offset after its final CRLF
    value: bytes  # after the colon, folding kept, final CRLF removed

    def unfolded(self) -> bytes:
        """RFC 5322 §2.2.3: unfold (drop CRLF before WSP); outer whitespace stripped."""
        return self.value.replace(b"\r\n", b"").strip(b" \t")


@dataclass(slots=True)
class Part:
    """One entity: a header then a body, ``msg[start:body_start]`` and ``msg[body_start:end]``.

    ``header_end`` is where the header fields end (before the blank line); ``has_blank`` says whether
    the blank line exists. ``children`` are the subparts of a multipart; ``message`` is the
    encapsulated message of a message/rfc822 (or message/global) part.
    """

    msg: bytes
    start: int
    header_end: int
    body_start: int
    end: int
    has_blank: bool
    fields: list[HeaderField]
    ctype: tuple[str, str] = ("text", "plain")  # as written (or the default), for BODYSTRUCTURE
    params: list[tuple[bytes, bytes]] = field(default_factory=list)
    default_type: bool = True  # no valid Content-Type: the default (text/plain or message/rfc822)
    children: list[Part] = field(default_factory=list)
    message: Part | None = None
    close_end: int = -1  # a multipart: where its close-delimiter line ends (before its CRLF), or -1

    # -- content type ----------------------------------------------------------------------

    @property
    def maintype(self) -> str:
        return self.ctype[0].lower()

    @property
    def subtype(self) -> str:
        return self.ctype[1].lower()

    @property
    def is_multipart(self) -> bool:
        return bool(self.children)

    def param(self, name: str) -> bytes | None:
        lname = name.lower().encode("ascii")
        return next((v for k, v in self.params if k.lower() == lname), None)

    @property
    def encoding(self) -> str:
        """Content-Transfer-Encoding, lower-cased; "7bit" when absent."""
        raw = self.first(b"content-transfer-encoding")
        if raw is None:
            return "7bit"
        return raw.split(b"(")[0].strip().decode("ascii", "replace").lower() or "7bit"

    # -- header access ---------------------------------------------------------------------

    def headers(self, name: bytes | str) -> Iterator[HeaderField]:
        lname = (name.encode("ascii") if isinstance(name, str) else name).lower().decode("ascii")
        return (f for f in self.fields if f.name and f.name.lower() == lname)

    def first(self, name: bytes | str) -> bytes | None:
        """The unfolded value of the first field called ``name``, or None."""
        return next((f.unfolded() for f in self.headers(name)), None)

    @property
    def header_bytes(self) -> bytes:
        """The header including the blank line (when there is one)."""
        return self.msg[self.start : self.body_start]

    @property
    def body(self) -> bytes:
        return self.msg[self.body_start : self.end]

    @property
    def body_size(self) -> int:
        return self.end - self.body_start

    @property
    def body_lines(self) -> int:
        """Text lines in the body: the number of line ends (a final unterminated line is not
        counted, as in Dovecot; a part's last line ends at the CRLF owned by the boundary)."""
        return self.msg.count(b"\n", self.body_start, self.end)

    def walk(self) -> Iterator[Part]:
        """This part and every part below it, depth first (encapsulated messages included)."""
        stack: list[Part] = [self]
        while stack:
            p = stack.pop()
            yield p
            if p.message is not None:
                stack.append(p.message)
            stack.extend(reversed(p.children))


# -- header parsing ----------------------------------------------------------------------------

def header_end(data: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
    """Where the body of the message at ``start`` begins: the offset just past the empty line that
    ends its header section (RFC 5322 §2.1), or -1 when ``data[start:end]`` holds none (a header cut
    short, or a message without body). A message that starts with the empty line has an empty
    header section. The one search for that line: the parser's, the stores' header blocks
    (`read_header`, the cluster's kept `body_heads`), DSNs, DKIM signing, loop detection, mbox."""
    stop = len(data) if end is None else end
    if data.startswith(b"\r\n", start, stop):
        return start + 2
    i = data.find(b"\r\n\r\n", start, stop)
    return i + 4 if i >= 0 else -1


def header_section(data: bytes, empty_line: bool = True) -> bytes:
    """The header section at the start of ``data`` (RFC 5322 §2.1), with the empty line that ends it
    or (``empty_line`` False) without it, so ending with its last field's CRLF or empty; all of
    ``data`` when it holds no empty line (`header_end`)."""
    end = header_end(data)
    if end < 0:
        return data
    return data[: end if empty_line else end - 2]


def _parse_header(msg: bytes, start: int, end: int) -> tuple[list[HeaderField], int, int, bool]:
    """Fields from ``start``; returns (fields, head_end, body_start, has_blank)."""
    stop = header_end(msg, start, end)
    if stop < 0:
        head_end, body_start, has_blank = end, end, False
    else:
        head_end, body_start, has_blank = stop - 2, stop, True
    fields: list[HeaderField] = []
    pos = start
    current: HeaderField | None = None
    while pos < head_end:
        eol = msg.find(b"\r\n", pos, head_end)
        line_end = head_end if eol < 0 else eol + 2
        first = msg[pos]
        if first in (0x20, 0x09) and current is not None:
            current.end = line_end  # RFC 5322 §2.2.3 continuation line
        else:
            if len(fields) >= MAX_HEADER_FIELDS:
                current = None  # over the cap: kept in the raw header only
            else:
                colon = msg.find(b":", pos, line_end)
                name = msg[pos:colon].rstrip(b" \t") if colon > pos else b""  # obs: "Subject :"
                if not name or re.search(rb"[\x00-\x20\x7f]", name):
                    name = b""  # not a header line: a nameless field nothing asks for by name
                current = HeaderField(name.decode("ascii", "replace"), pos, line_end, b"")
                fields.append(current)
        pos = line_end
    for f in fields:
        colon = msg.find(b":", f.start, f.end) if f.name else f.start - 1
        value_end = f.end - 2 if msg[f.end - 2 : f.end] == b"\r\n" else f.end
        f.value = msg[colon + 1 : value_end]
    return fields, head_end, body_start, has_blank


# -- parameters (RFC 2045 §5.1) ------------------------------------------------------------------

_TOKEN = re.compile(rb"[^\x00-\x20\x7f()<>@,;:\\\"/\[\]?=]+")


def _skip_cfws(s: bytes, i: int) -> int:
    n = len(s)
    while i < n:
        c = s[i]
        if c in b" \t\r\n":
            i += 1
        elif c == 0x28:  # comment, nested
            depth = 0
            while i < n:
                if s[i] == 0x5C:
                    i += 2
                    continue
                if s[i] == 0x28:
                    depth += 1
                elif s[i] == 0x29:
                    depth -= 1
                    if depth == 0:
                        i += 1
                        break
                i += 1
        else:
            break
    return i


def _quoted(s: bytes, i: int) -> tuple[bytes, int]:
    """Unquote the quoted-string at s[i] == '"'; an unterminated one runs to the end."""
    out = bytearray()
    i += 1
    while i < len(s):
        c = s[i]
        if c == 0x5C and i + 1 < len(s):
            out.append(s[i + 1])
            i += 2
        elif c == 0x22:
            return bytes(out), i + 1
        else:
            out.append(c)
            i += 1
    return bytes(out), i


def parse_params(s: bytes, i: int) -> list[tuple[bytes, bytes]]:
    """``; name=value; name="quoted"`` from offset ``i``; malformed pieces are skipped, never raised."""
    params: list[tuple[bytes, bytes]] = []
    n = len(s)
    while i < n and len(params) < 100:
        i = _skip_cfws(s, i)
        if i >= n:
            break
        if s[i] != 0x3B:  # ";"
            nxt = s.find(b";", i)
            if nxt < 0:
                break
            i = nxt
        i = _skip_cfws(s, i + 1)
        m = _TOKEN.match(s, i)
        if m is None:
            continue
        name = m.group()
        i = _skip_cfws(s, m.end())
        if i >= n or s[i] != 0x3D:  # "="
            continue
        i = _skip_cfws(s, i + 1)
        if i < n and s[i] == 0x22:
            value, i = _quoted(s, i)
        else:
            m = _TOKEN.match(s, i)
            if m is None:
                # lenient: an unquoted value with specials up to ";" (common in real mail)
                end = s.find(b";", i)
                end = n if end < 0 else end
                value, i = s[i:end].strip(), end
            else:
                value, i = m.group(), m.end()
        params.append((name, value))
    return params


def _content_type(value: bytes | None) -> tuple[tuple[str, str], list[tuple[bytes, bytes]]] | None:
    if value is None:
        return None
    i = _skip_cfws(value, 0)
    m = _TOKEN.match(value, i)
    if m is None:
        return None
    i = _skip_cfws(value, m.end())
    if i >= len(value) or value[i] != 0x2F:  # "/"
        return None
    i = _skip_cfws(value, i + 1)
    m2 = _TOKEN.match(value, i)
    if m2 is None:
        return None
    ctype = (m.group().decode("ascii"), m2.group().decode("ascii"))
    return ctype, parse_params(value, m2.end())


# -- tree ---------------------------------------------------------------------------------------

class _Budget:
    def __init__(self) -> None:
        self.parts = 0


def parse_message(raw: bytes) -> Part:
    """Parse a whole message (LF or CRLF line ends) into its MIME tree. Never raises."""
    msg = to_crlf(raw)
    return _parse_entity(msg, 0, len(msg), _Budget(), 0, digest_child=False)


def _parse_entity(msg: bytes, start: int, end: int, budget: _Budget, depth: int, digest_child: bool) -> Part:
    budget.parts += 1
    fields, header_end, body_start, has_blank = _parse_header(msg, start, end)
    part = Part(msg, start, header_end, body_start, end, has_blank, fields)
    parsed = _content_type(part.first(b"content-type"))
    if parsed is not None:
        part.ctype, part.params = parsed
        part.default_type = False
    elif digest_child:
        part.ctype = ("message", "rfc822")  # RFC 2046 §5.1.5
    if part.maintype == "text" and part.param("charset") is None:
        part.params.append((b"charset", b"us-ascii"))  # RFC 2045 §5.2 default, shown like Dovecot
    capped = depth >= MAX_DEPTH or budget.parts >= MAX_PARTS
    if part.maintype == "multipart":
        boundary = part.param("boundary")
        spans, part.close_end = _split(msg, body_start, end, boundary) if boundary and not capped else ([], -1)
        digest = part.subtype == "digest"
        for cs, ce in spans:
            if budget.parts >= MAX_PARTS:
                break
            child = _parse_entity(msg, cs, ce, budget, depth + 1, digest)
            inner = child if child.children else child.message
            if inner is not None and inner.close_end == ce and msg.startswith(b"\r\n", ce) and ce + 2 <= end:
                # A nested multipart (or a message/rfc822 holding one) closed right before our
                # delimiter: the CRLF ends its close-delimiter line and also begins our delimiter
                # (RFC 2046 §5.1.1). Dovecot counts it in the nested part (its size and lines,
                # BODY[n], BINARY.SIZE[n]); so do we.
                child.end += 2
                if inner is not child:
                    inner.end += 2
            part.children.append(child)
        if not part.children:
            # RFC 9051 §9 needs 1*body in a multipart: one empty text/plain part, like Dovecot
            part.children.append(_empty(msg, body_start))
    elif part.maintype == "message" and part.subtype in ("rfc822", "global"):
        # RFC 9051 §9 body-type-msg always carries an envelope and a body; an encoded (or capped)
        # message/rfc822 stays opaque and gets an empty one.
        if not capped and part.encoding in ("7bit", "8bit", "binary"):
            part.message = _parse_entity(msg, body_start, end, budget, depth + 1, False)
        else:
            part.message = _empty(msg, body_start)
    return part


def _empty(msg: bytes, at: int) -> Part:
    return Part(msg, at, at, at, at, False, [], params=[(b"charset", b"us-ascii")])


def _split(msg: bytes, start: int, end: int, boundary: bytes) -> tuple[list[tuple[int, int]], int]:
    """Part spans between ``--boundary`` lines (RFC 2046 §5.1.1); the CRLF before a delimiter
    belongs to the delimiter. Stops at the close delimiter or ``end``; also returns where the close
    delimiter's line ends (before its CRLF), or -1 without one."""
    delim = b"--" + boundary
    spans: list[tuple[int, int]] = []
    part_start: int | None = None
    pos = start
    while pos < end:
        i = msg.find(delim, pos, end)
        if i < 0:
            break
        pos = i + 1
        if i != start and msg[i - 2 : i] != b"\r\n":
            continue
        after = i + len(delim)
        closing = msg.startswith(b"--", after) and after + 2 <= end
        eol = msg.find(b"\r\n", after, end)
        line_end = end if eol < 0 else eol + 2
        rest = msg[after + (2 if closing else 0) : line_end if eol < 0 else eol]
        if rest.strip(b" \t"):
            continue  # "--boundaryXYZ" is another boundary, not ours
        if part_start is not None:
            spans.append((part_start, max(part_start, i - 2) if i != start else i))
        if closing:
            return spans, (end if eol < 0 else eol)
        part_start = line_end
        pos = line_end
    if part_start is not None:
        spans.append((part_start, end))
    return spans, -1


# -- decoding -----------------------------------------------------------------------------------

class UnknownCTE(ValueError):
    """A Content-Transfer-Encoding the server cannot decode (RFC 3516 §4.3 ``NO [UNKNOWN-CTE]``)."""


#: the octets that are not base64's alphabet (RFC 2045 §6.8: ignored when decoding)
_NOT_BASE64 = bytes(c for c in range(256)
                    if not (0x41 <= c <= 0x5A or 0x61 <= c <= 0x7A or 0x30 <= c <= 0x39 or c in b"+/"))


def decode_transfer_encoding(data: bytes, encoding: str) -> bytes:
    """Undo a Content-Transfer-Encoding, leniently (garbage characters skipped, never raising on
    broken data); raise UnknownCTE for an encoding that is not RFC 2045's."""
    d = Decoder(encoding)
    if d.identity:
        return data
    return d.feed(data) + d.end()


#: RFC 2045 §6.7 rule 3: a decoder deletes the white space ending an encoded line (transport may
#: add it); rule 5: an encoded line holds at most 76 octets (any line 998, RFC 5322 §2.1.1). A run
#: longer than this cannot be such padding: it is kept as it is whatever follows, decided once
#: QP_WSP_MAX + 1 octets of it are seen, so no decoder holds more of it (dropping it instead would
#: lose the text of an over-long line; Dovecot stops at 76 and refuses the part when text follows).
QP_WSP_MAX = 998


class Decoder:
    """`decode_transfer_encoding` of a body given in pieces (`feed` each, then `end`): the same
    octets, holding one piece and at most a few octets of the next (base64: the characters after
    the last group of four; quoted-printable: what may still change with the octets that follow:
    ``=`` or ``=X`` that may begin an escape, or white space (at most QP_WSP_MAX octets, with the
    ``=`` before it and a CR after it) that may end its line). UnknownCTE for an encoding that is
    not RFC 2045's."""

    __slots__ = ("_enc", "_rest", "_wsp")

    def __init__(self, encoding: str) -> None:
        enc = encoding.lower()
        if enc not in ("7bit", "8bit", "binary", "", "base64", "quoted-printable"):
            raise UnknownCTE(encoding)
        self._enc = enc
        self._rest = b""
        self._wsp = False  # quoted-printable: inside a white space run longer than QP_WSP_MAX

    @property
    def identity(self) -> bool:
        """7bit, 8bit, binary: nothing to undo."""
        return self._enc not in ("base64", "quoted-printable")

    def feed(self, data: bytes) -> bytes:
        if self._enc == "base64":  # groups of four characters of the alphabet decode independently
            clean = self._rest + data.translate(None, _NOT_BASE64)  # RFC 2045 §6.8: the others ignored
            k = len(clean) - len(clean) % 4
            self._rest = clean[k:]
            return binascii.a2b_base64(clean[:k]) if k else b""
        if self._enc == "quoted-printable":  # RFC 2045 §6.7
            lead = b""
            if self._wsp:  # the rest of a run too long to be trailing white space: kept (QP_WSP_MAX)
                rest = data.lstrip(b" \t")
                lead, data = data[: len(data) - len(rest)], rest
                if not data:
                    return lead
                self._wsp = False
            data = self._rest + data
            k, self._wsp = _qp_cut(data)
            self._rest = data[k:]
            return lead + _qp(data[:k], False) if k else lead
        return data

    def end(self) -> bytes:
        rest, self._rest, self._wsp = self._rest, b"", False
        if self._enc == "base64":
            # a lone last character is dropped; two or three are padded (lenient, as Dovecot)
            return base64.b64decode(rest + b"=" * (-len(rest) % 4)) if len(rest) > 1 else b""
        if self._enc == "quoted-printable":
            return _qp(rest, True)
        return b""


_HEX_DIGITS = b"0123456789ABCDEFabcdef"


def _opens_escape(data: bytes, end: int) -> bool:
    """Whether the ``=`` ending ``data[:end]`` begins an escape: it ends a run of odd length, as
    ``==`` decodes to ``=`` (binascii's reading, kept) and ``data`` begins where nothing is pending."""
    return end > 0 and data[end - 1] == 0x3D and (end - len(data[:end].rstrip(b"="))) % 2 == 1


def _qp_cut(data: bytes) -> tuple[int, bool]:
    """Where quoted-printable ``data`` (from a point where nothing is pending) can be cut so that
    what precedes it decodes alike whatever follows, and whether it ends in a white space run too
    long to be trailing (QP_WSP_MAX), which goes on in the next piece. What follows the cut is at
    most QP_WSP_MAX + 2 octets, so a piece costs time linear in its length plus at most that."""
    n = len(data)
    if n >= 2 and data[-1] in _HEX_DIGITS and _opens_escape(data, n - 1):
        return n - 2, False  # "=X": RFC 2045 §6.7 rule 1 "=XY" when a hex digit follows
    end = n - 1 if n and data[-1] == 0x0D else n  # a CR: the line's CRLF may follow
    lo = max(end - QP_WSP_MAX - 1, 0)
    j = lo + len(data[lo:end].rstrip(b" \t"))  # data[j:end]: the white space before it
    if end - j > QP_WSP_MAX:  # RFC 2045 §6.7 rule 5: too long to end an encoded line, kept
        return end, end == n
    if _opens_escape(data, j):  # "=" + white space + line end: a soft line break (rule 5)
        j -= 1
    return j, False


#: RFC 2045 §6.7 rule 3: white space ending a line (or the body) is deleted; a run of at most
#: QP_WSP_MAX octets, matched from its start (the lookbehind keeps it linear on long runs)
_QP_TRAILING_WSP = re.compile(rb"[ \t](?<![ \t][ \t])[ \t]{0,%d}+(?=\r?\n|\Z)" % (QP_WSP_MAX - 1))
_QP_LINE_END_WSP = re.compile(rb"[ \t](?<![ \t][ \t])[ \t]{0,%d}+(?=\r?\n)" % (QP_WSP_MAX - 1))


def _qp(data: bytes, final: bool) -> bytes:
    """Quoted-printable ``data``, the end of the body when ``final`` (trailing white space then
    deleted at the end too), else cut where `_qp_cut` cuts."""
    # "==" is "=" (binascii's reading, kept), spelt "=3D" here so that every "=" left begins an
    # escape; RFC 2045 §6.7 note 2: "=" before a CR that begins no CRLF is kept with the CR
    # (binascii drops all up to the next LF), before white space is deleted: "=" CR blank LF is
    # no soft line break
    data = data.replace(b"==", b"=3D").replace(b"=\r\n", b"=\n").replace(b"=\r", b"=3D\r")
    return binascii.a2b_qp((_QP_TRAILING_WSP if final else _QP_LINE_END_WSP).sub(b"", data))


def decode_qp(data: bytes) -> bytes:
    """RFC 2045 §6.7 quoted-printable, leniently: whitespace at the end of an encoded line is
    dropped (rule 3: it was added in transport), so ``=`` followed by spaces then the line end is a
    soft line break (rule 5); ``=XX`` decodes in either case; a malformed ``=`` stays as it is
    (the robust reading of note 2), where Dovecot refuses the whole part. A white space run longer
    than QP_WSP_MAX is kept (it cannot be trailing), so `Decoder` holds at most that much of it.
    Linear time in ``len(data)``."""
    return _qp(data, True)


def _codec(charset: str | None) -> str:
    if not charset:
        return "utf-8"
    name = charset.strip().strip('"').lower()
    if name in ("us-ascii", "ascii", "unknown-8bit", "x-unknown"):
        return "utf-8"  # 8-bit text labelled ASCII is usually UTF-8 in practice
    try:
        info = codecs.lookup(name)
    except LookupError:
        return "utf-8"
    return info.name if getattr(info, "_is_text_encoding", True) else "utf-8"


def decode_body(part: Part) -> str:
    """A text part's body as text: transfer encoding then charset undone (best effort)."""
    try:
        data = decode_transfer_encoding(part.body, part.encoding)
    except UnknownCTE:
        data = part.body
    charset = part.param("charset")
    return data.decode(_codec(charset.decode("ascii", "replace") if charset else None), "replace")


_ENCODED_WORD = re.compile(rb"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")


def decode_header_text(raw: bytes) -> str:
    """Unfolded header value with RFC 2047 encoded words decoded (whitespace between adjacent
    encoded words dropped, §6.2); undecodable pieces are kept as they are."""
    raw = raw.replace(b"\r\n", b"")
    out: list[str] = []
    pos = 0
    last_was_word = False
    for m in _ENCODED_WORD.finditer(raw):
        between = raw[pos : m.start()]
        if not (last_was_word and not between.strip(b" \t")):
            out.append(_text(between))
        charset, kind, text = m.group(1), m.group(2).upper(), m.group(3)
        try:
            if kind == b"B":
                text += b"=" * (-len(text) % 4)
                data = base64.b64decode(text)
            else:
                data = binascii.a2b_qp(text.replace(b"_", b" "))
            out.append(data.decode(_codec(charset.decode("ascii", "replace")), "replace"))
            last_was_word = True
        except (binascii.Error, ValueError):
            out.append(_text(m.group()))
            last_was_word = False
        pos = m.end()
    out.append(_text(raw[pos:]))
    return "".join(out)


def _text(b: bytes) -> str:
    try:
        return b.decode("utf-8")  # RFC 6532 raw UTF-8 headers
    except UnicodeDecodeError:
        return b.decode("latin-1")
