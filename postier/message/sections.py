"""FETCH BODY[section]<partial> and BINARY[section] contents (RFC 9051 §6.4.5, RFC 3516 §4.2).

Part numbers follow RFC 9051 §6.4.5: a non-multipart message has only part 1 (its body); a
message/rfc822 part's subparts are those of the encapsulated message (or part 1 = its body when
that message is not multipart); like Dovecot, "n.1" of a leaf part is the leaf itself. HEADER,
HEADER.FIELDS[.NOT] and TEXT apply to the whole message or to an encapsulated message/rfc822; on any
other part they are empty. MIME is the part's own header.
Anything that does not exist is the empty string, never an error. All offsets are on the CRLF form.
"""

from __future__ import annotations

from collections.abc import Iterator

from postier.proto.imap.commands import Section

from .mime import Part, UnknownCTE, decode_transfer_encoding, no_nul

__all__ = ["UnknownCTE", "binary_section", "body_section", "find_part", "partial", "section_span"]


def find_part(root: Part, path: tuple[int, ...]) -> Part | None:
    """The part at ``path`` (``()`` is the message itself), or None if there is none."""
    cur = root
    is_root = True
    via_self = False
    for n in path:
        if cur.children:
            kids = cur.children
        elif cur.message is not None and not is_root:
            m = cur.message
            kids = m.children if m.children else [m]
        elif not via_self:
            # A single-part message has only part 1, its body. Dovecot (and so the clients tested
            # against it) also answers "n.1" of a leaf part with the leaf itself: once, not "n.1.1".
            kids = [cur]
        else:
            return None
        if not 1 <= n <= len(kids):
            return None
        nxt = kids[n - 1]
        via_self = nxt is cur
        cur = nxt
        is_root = False
    return cur


def _header_fields(part: Part, names: tuple[str, ...], negate: bool) -> bytes:
    wanted = {n.lower() for n in names}
    out = bytearray()
    msg = part.msg
    for f in part.fields:
        if (f.name.lower() in wanted) != negate:
            out += msg[f.start : f.end]
            if not msg.startswith(b"\r\n", f.end - 2):
                out += b"\r\n"  # a header field line always ends in CRLF (RFC 5322 §2.2), as from Dovecot
    if part.has_blank:
        # RFC 3501/9051 §6.4.5: the blank line is included in all header fetches "except in the
        # case of a message which has no body and no blank line" (Dovecot adds one there anyway)
        out += b"\r\n"
    return bytes(out)


def body_section(root: Part, section: Section) -> bytes:
    """The octets of BODY[section] (before any <partial>), NUL octets replaced (see ``no_nul``)."""
    return no_nul(_body_section(root, section))


def section_octets(root: Part, section: Section) -> bytes:
    """The octets of BODY[section] as stored, NUL included (RFC 4469 CATENATE copies them)."""
    return _body_section(root, section)


def _body_section(root: Part, section: Section) -> bytes:
    got = section_span(root, section)
    return root.msg[got[0]:got[1]] if isinstance(got, tuple) else got


def section_span(root: Part, section: Section) -> tuple[int, int] | bytes:
    """Where BODY[section] lies in ``root.msg`` (start, end), or its octets when it is made of
    header fields (HEADER.FIELDS[.NOT], whose lines are picked) or is empty."""
    part = find_part(root, section.part)
    if part is None:
        return b""
    text = section.text
    if text is None:
        if not section.part:
            return root.start, root.end  # BODY[]: the whole message
        return part.body_start, part.end
    if text == "MIME":
        return part.start, part.body_start
    # HEADER, HEADER.FIELDS[.NOT], TEXT: of the message, or of the encapsulated message
    if section.part:
        if part.message is None:
            return b""
        part = part.message
    if text == "HEADER":
        return part.start, part.body_start
    if text == "TEXT":
        return part.body_start, part.end
    return _header_fields(part, section.fields, negate=text == "HEADER.FIELDS.NOT")


def binary_section(root: Part, path: tuple[int, ...]) -> bytes:
    """BINARY[path]: content with every Content-Transfer-Encoding undone (RFC 3516 §4.2).

    A leaf part gives its decoded body. BINARY[] and multipart or message/rfc822 parts give the
    entity with each leaf decoded and its Content-Transfer-Encoding header rewritten to "binary"
    (what Dovecot sends). Raises UnknownCTE for an encoding other than 7bit/8bit/binary/base64/
    quoted-printable (the server answers ``NO [UNKNOWN-CTE]``). Send the result as literal8.
    """
    part = find_part(root, path)
    if part is None:
        return b""
    if not path:
        return b"".join(_binary_entity(root))
    if part.children or part.message is not None:
        return b"".join(_binary_body(part))
    return decode_transfer_encoding(part.body, part.encoding)


def _binary_entity(part: Part) -> Iterator[bytes]:
    msg = part.msg
    if part.children or part.message is not None or part.encoding in ("7bit", "8bit", "binary"):
        yield msg[part.start : part.body_start]
        yield from _binary_body(part)
        return
    body = decode_transfer_encoding(part.body, part.encoding)
    pos = part.start
    for f in part.headers(b"content-transfer-encoding"):
        yield msg[pos : f.start]
        yield f.name.encode("ascii", "replace") + b": binary\r\n"
        pos = f.end
    yield msg[pos : part.body_start]
    yield body


def _binary_body(part: Part) -> Iterator[bytes]:
    msg = part.msg
    if part.message is not None:
        if part.message.end > part.message.start:
            yield from _binary_entity(part.message)
        else:  # an opaque (encoded) message/rfc822: undo its own encoding
            yield decode_transfer_encoding(part.body, part.encoding)
        return
    if not part.children:
        yield decode_transfer_encoding(part.body, part.encoding)
        return
    pos = part.body_start
    for child in part.children:
        yield msg[pos : child.start]  # preamble / delimiter lines
        yield from _binary_entity(child)
        pos = child.end  # a CRLF shared with the next delimiter (see mime._parse_entity) went with the child
    yield msg[pos : part.end]


def partial(data: bytes, spec: tuple[int, int] | None) -> bytes:
    """Apply ``<offset.length>``: an offset past the end gives the empty string (RFC 9051 §6.4.5)."""
    if spec is None:
        return data
    offset, length = spec
    return data[offset : offset + length]
