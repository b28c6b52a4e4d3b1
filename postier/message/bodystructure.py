"""IMAP BODYSTRUCTURE and BODY (RFC 9051 §7.5.2, RFC 3501 §7.4.2) from a parsed MIME tree.

Sizes and line counts are of the CRLF form (see ``mime``). Type, subtype and parameters are sent as
written in the message; defaults are lower-case ("text" "plain" ("charset" "us-ascii") "7bit"), and
a text part without charset gets ("charset" "us-ascii") appended, as Dovecot does. Plain RFC 2231
continuations are joined; charset-encoded parameters are passed through for the client to decode.
"""

from __future__ import annotations

import re

from postier.proto.imap.response import Raw, encode_nstring, encode_string

from .envelope import encode_envelope, envelope
from .mime import Part, parse_params

__all__ = ["body_structure"]


def body_structure(part: Part, *, extensible: bool = True, utf8: bool = False) -> Raw:
    """Serialised BODYSTRUCTURE (or BODY with ``extensible=False``) of a message or part."""
    return Raw(_body(part, extensible, utf8))


def _body(part: Part, ext: bool, utf8: bool) -> bytes:
    def s(v: bytes | str) -> bytes:
        return encode_string(v, utf8=utf8)

    def ns(v: bytes | None) -> bytes:
        return encode_nstring(v, utf8=utf8)

    if part.children:
        # body-type-mpart = 1*body SP media-subtype [SP body-ext-mpart]: no SP between bodies
        out = b"".join(_body(c, ext, utf8) for c in part.children) + b" " + s(part.ctype[1])
        if ext:
            out += b" " + b" ".join([_params(part.params, utf8), *_extension(part, utf8)])
        return b"(" + out + b")"
    fields = [
        s(part.ctype[0]),
        s(part.ctype[1]),
        _params(part.params, utf8),
        ns(part.first(b"content-id")),
        ns(part.first(b"content-description")),
        s(_encoding_as_written(part)),
        str(part.body_size).encode(),
    ]
    if part.message is not None:  # body-type-msg: envelope, body, lines
        fields.append(encode_envelope(envelope(part.message), utf8=utf8))
        fields.append(_body(part.message, ext, utf8))
        fields.append(str(part.body_lines).encode())
    elif part.maintype == "text":  # body-type-text: lines
        fields.append(str(part.body_lines).encode())
    if ext:  # body-ext-1part: md5, then disposition, language, location
        fields.append(ns(part.first(b"content-md5")))
        fields.extend(_extension(part, utf8))
    return b"(" + b" ".join(fields) + b")"


def _params(params: list[tuple[bytes, bytes]], utf8: bool) -> bytes:
    params = _join_continuations(params)
    if not params:
        return b"NIL"
    return b"(" + b" ".join(encode_string(x, utf8=utf8) for pair in params for x in pair) + b")"


_SECTION = re.compile(rb"(.+)\*(\d{1,3})")


def _join_continuations(params: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """RFC 2231 §3: plain ``name*0="a"; name*1="b"`` becomes ``name "ab"`` (as Dovecot shows it);
    charset-encoded sections (``name*0*``) are left as they are for the client to decode."""
    sections: dict[bytes, dict[int, bytes]] = {}
    for name, value in params:
        m = _SECTION.fullmatch(name)
        if m:
            sections.setdefault(m.group(1).lower(), {})[int(m.group(2))] = value
    if not sections:
        return params
    out: list[tuple[bytes, bytes]] = []
    for name, value in params:
        m = _SECTION.fullmatch(name)
        if m is None:
            out.append((name, value))
            continue
        base = m.group(1)
        parts = sections.pop(base.lower(), None)
        if parts is not None:
            out.append((base, b"".join(parts[i] for i in sorted(parts))))
    return out


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
