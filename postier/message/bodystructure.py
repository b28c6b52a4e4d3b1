"""IMAP BODYSTRUCTURE and BODY (RFC 9051 §7.5.2, RFC 3501 §7.4.2) from a parsed MIME tree.

Sizes and line counts are of the CRLF form (see ``mime``). Type, subtype and parameters are sent as
written in the message; defaults are lower-case ("text" "plain" ("charset" "us-ascii") "7bit"), and
a text part without charset gets ("charset" "us-ascii") appended, as Dovecot does. RFC 2231
parameters are merged and decoded (see ``_join_continuations``).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable

from postier.proto.imap.response import Raw, encode_nstring, encode_string

from .envelope import encode_envelope, envelope
from .mime import Part, parse_params

__all__ = ["body_structure"]


#: a part's (body size, body lines): `Part.body_size` and `Part.body_lines`, or for a tree parsed
#: from a copy of a large message, its `textscan.Layout.measure`
type Measure = Callable[[Part], tuple[int, int]]


def _own(part: Part) -> tuple[int, int]:
    return part.body_size, part.body_lines


def body_structure(part: Part, *, extensible: bool = True, utf8: bool = False, measure: Measure = _own) -> Raw:
    """Serialised BODYSTRUCTURE (or BODY with ``extensible=False``) of a message or part."""
    return Raw(_body(part, extensible, utf8, measure))


def _body(part: Part, ext: bool, utf8: bool, measure: Measure) -> bytes:
    def s(v: bytes | str) -> bytes:
        return encode_string(v, utf8=utf8)

    def ns(v: bytes | None) -> bytes:
        return encode_nstring(v, utf8=utf8)

    if part.children:
        # body-type-mpart = 1*body SP media-subtype [SP body-ext-mpart]: no SP between bodies
        out = b"".join(_body(c, ext, utf8, measure) for c in part.children) + b" " + s(part.ctype[1])
        if ext:
            out += b" " + b" ".join([_params(part.params, utf8), *_extension(part, utf8)])
        return b"(" + out + b")"
    size, lines = measure(part)
    fields = [
        s(part.ctype[0]),
        s(part.ctype[1]),
        _params(part.params, utf8),
        ns(part.first(b"content-id")),
        ns(part.first(b"content-description")),
        s(_encoding_as_written(part)),
        str(size).encode(),
    ]
    if part.message is not None:  # body-type-msg: envelope, body, lines
        fields.append(encode_envelope(envelope(part.message), utf8=utf8))
        fields.append(_body(part.message, ext, utf8, measure))
        fields.append(str(lines).encode())
    elif part.maintype == "text":  # body-type-text: lines
        fields.append(str(lines).encode())
    if ext:  # body-ext-1part: md5, then disposition, language, location
        fields.append(ns(part.first(b"content-md5")))
        fields.extend(_extension(part, utf8))
    return b"(" + b" ".join(fields) + b")"


def _params(params: list[tuple[bytes, bytes]], utf8: bool) -> bytes:
    params = _join_continuations(params)
    if not params:
        return b"NIL"
    return b"(" + b" ".join(encode_string(x, utf8=utf8) for pair in params for x in pair) + b")"


_SECTION = re.compile(rb"(.+?)\*(?:(\d{1,3})(\*)?|(\*)?)")  # name*N, name*N*, name*
_ATTR_CHAR = re.compile(rb"[^A-Za-z0-9!#$&+.^_`|~-]")  # RFC 2231 §7 attribute-char complement


def _join_continuations(params: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """RFC 2231 §3/§4 parameters as one value each, in the place of their first section.

    Plain continuations (``name*0="a"; name*1="b"``) are joined as ``name "ab"`` (as Dovecot does).
    A charset-encoded value (``name*=``, ``name*0*=``...) is charset-decoded (§4) and sent as
    ``name`` when the result is plain ASCII; otherwise it stays one RFC 2231 extended value
    ``name*`` "charset'lang'%XX..." (its sections merged, as Dovecot sends it) so that an
    IMAP4rev1 client still gets 7-bit and decodes it as it does a header.
    """
    groups: dict[bytes, dict[int, tuple[bytes, bool]]] = {}
    for name, value in params:
        m = _SECTION.fullmatch(name)
        if m is None:
            continue
        index = int(m.group(2)) if m.group(2) is not None else 0
        encoded = bool(m.group(3) or m.group(4)) or (m.group(2) is None)
        groups.setdefault(m.group(1).lower(), {})[index] = (value, encoded)
    if not groups:
        return params
    out: list[tuple[bytes, bytes]] = []
    for name, value in params:
        m = _SECTION.fullmatch(name)
        if m is None:
            out.append((name, value))
            continue
        sections = groups.pop(m.group(1).lower(), None)
        if sections is not None:
            out.append(_merge(m.group(1), [sections[i] for i in sorted(sections)]))
    return out


def _merge(base: bytes, sections: list[tuple[bytes, bool]]) -> tuple[bytes, bytes]:
    if not any(enc for _v, enc in sections):
        return base, b"".join(v for v, _e in sections)
    first, first_encoded = sections[0]
    charset, lang = b"", b""
    if first_encoded and first.count(b"'") >= 2:
        charset, lang, rest = first.split(b"'", 2)
        sections = [(rest, True), *sections[1:]]
    raw = b"".join(urllib.parse.unquote_to_bytes(v) if enc else v for v, enc in sections)
    try:
        text = raw.decode(charset.decode("ascii") or "us-ascii")
    except (LookupError, UnicodeDecodeError, ValueError):
        text = None
    if text is not None and text.isascii():
        return base, text.encode("ascii")
    encoded = b"".join(v if enc else _ATTR_CHAR.sub(lambda c: b"%%%02X" % c.group()[0], v) for v, enc in sections)
    return base + b"*", charset + b"'" + lang + b"'" + encoded


def _extension(part: Part, utf8: bool) -> list[bytes]:
    return [_disposition(part, utf8), _language(part, utf8), encode_nstring(part.first(b"content-location"), utf8=utf8)]


def _disposition(part: Part, utf8: bool) -> bytes:
    # RFC 2183 Content-Disposition: ("attachment" ("filename" "x.pdf")) or NIL
    raw = part.first(b"content-disposition")
    if raw is None:
        return b"NIL"
    kind = raw.split(b";", 1)[0].strip()
    if not kind:
        return b"NIL"
    return b"(" + encode_string(kind, utf8=utf8) + b" " + _params(parse_params(raw, len(kind)), utf8) + b")"


def _language(part: Part, utf8: bool) -> bytes:
    # RFC 3282 Content-Language, always as a list (like Dovecot)
    raw = part.first(b"content-language")
    tags = [t.strip() for t in raw.split(b",") if t.strip()] if raw is not None else []
    if not tags:
        return b"NIL"
    return b"(" + b" ".join(encode_string(t, utf8=utf8) for t in tags) + b")"


def _encoding_as_written(part: Part) -> bytes:
    raw = part.first(b"content-transfer-encoding")
    if raw is None:
        return b"7bit"
    return raw.split(b"(")[0].strip() or b"7bit"
