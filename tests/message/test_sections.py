"""BODY[section]<partial> and BINARY[section] (RFC 9051 §6.4.5, RFC 3516); outputs checked against
Dovecot 2.3 unless noted."""

from __future__ import annotations

import pytest

from postier.message.mime import UnknownCTE, parse_message
from postier.proto.crlf import to_crlf
from postier.message.sections import binary_section, body_section, find_part, partial
from postier.proto.imap import Fetch, Section, parse_command

from . import corpus


def fetch(raw: bytes, spec: str) -> bytes:
    """Run one BODY.PEEK[...]<...> through the real parser and the section code."""
    cmd = parse_command(f"a FETCH 1 ({spec})\r\n".encode())
    assert isinstance(cmd, Fetch)
    att = cmd.attributes[0]
    assert att.section is not None
    root = parse_message(raw)
    if att.name == "BINARY":
        return partial(binary_section(root, att.section.part), att.partial)
    return partial(body_section(root, att.section), att.partial)


def test_lf_file_is_served_as_crlf() -> None:
    crlf = corpus.SIMPLE.replace(b"\n", b"\r\n")
    assert to_crlf(corpus.SIMPLE) == crlf
    assert to_crlf(crlf) is crlf
    assert fetch(corpus.SIMPLE, "BODY.PEEK[]") == crlf
    head, _, text = crlf.partition(b"\r\n\r\n")
    assert fetch(corpus.SIMPLE, "BODY.PEEK[HEADER]") == head + b"\r\n\r\n"
    assert fetch(corpus.SIMPLE, "BODY.PEEK[TEXT]") == text
    assert fetch(corpus.SIMPLE, "BODY.PEEK[1]") == text  # a single-part message has part 1 = body
    assert fetch(corpus.SIMPLE, "BODY.PEEK[1.MIME]") == head + b"\r\n\r\n"
    assert fetch(corpus.SIMPLE, "BODY.PEEK[2]") == b""
    assert fetch(corpus.SIMPLE, "BODY.PEEK[1.1]") == b""  # Dovecot: "1.1" of a top-level leaf is nothing
    assert fetch(corpus.SIMPLE, "BODY.PEEK[TEXT]<6.3>") == b"Joe"
    assert fetch(corpus.SIMPLE, "BODY.PEEK[TEXT]<1000.3>") == b""


def test_nested_message_parts() -> None:
    raw = corpus.NESTED
    inner_head, _, inner_text = corpus.INNER.partition(b"\r\n\r\n")
    assert fetch(raw, "BODY.PEEK[1]") == b"see attached"  # the CRLF before a boundary is the boundary's
    assert fetch(raw, "BODY.PEEK[1.MIME]") == b"Content-Type: text/plain\r\n\r\n"
    assert fetch(raw, "BODY.PEEK[1.1]") == b"see attached"  # Dovecot: "n.1" of a leaf part is the leaf
    assert fetch(raw, "BODY.PEEK[1.1.1]") == b""
    assert fetch(raw, "BODY.PEEK[2]") == corpus.INNER
    assert fetch(raw, "BODY.PEEK[2.MIME]") == (
        b"Content-Type: message/rfc822\r\nContent-Description: forwarded message\r\n\r\n")
    assert fetch(raw, "BODY.PEEK[2.HEADER]") == inner_head + b"\r\n\r\n"
    assert fetch(raw, "BODY.PEEK[2.TEXT]") == inner_text
    assert fetch(raw, "BODY.PEEK[2.1]") == b"inner text part\r\ntwo lines"
    assert fetch(raw, "BODY.PEEK[2.1.MIME]") == b"\r\n"  # a part with an empty header
    assert fetch(raw, "BODY.PEEK[2.2]") == b"AAECAwQF"
    assert fetch(raw, "BODY.PEEK[2.2.MIME]") == (
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n")
    assert fetch(raw, "BODY.PEEK[2.HEADER.FIELDS (Subject)]") == b"Subject: the forwarded one\r\n\r\n"
    assert fetch(raw, "BODY.PEEK[1.HEADER]") == b""  # HEADER of a non-message part: nonexistent
    assert fetch(raw, "BODY.PEEK[3]") == b""
    assert fetch(raw, "BODY.PEEK[2.3]") == b""
    assert fetch(raw, "BINARY.PEEK[2.2]") == b"\x00\x01\x02\x03\x04\x05"


def test_part_numbering_of_rfc9051_example_shape() -> None:
    root = parse_message(corpus.NESTED)
    assert find_part(root, ()) is root
    two = find_part(root, (2,))
    assert two is not None and two.message is not None
    assert find_part(root, (2, 1)) is two.message.children[0]
    assert find_part(root, (0,)) is None
    top = parse_message(corpus.TOPLEVEL_RFC822)
    assert fetch(corpus.TOPLEVEL_RFC822, "BODY.PEEK[1]") == (
        b"From: wrapped@example.com\r\nSubject: wrapped\r\n\r\nwrapped body\r\n")
    assert fetch(corpus.TOPLEVEL_RFC822, "BODY.PEEK[1.1]") == b"wrapped body\r\n"
    assert fetch(corpus.TOPLEVEL_RFC822, "BODY.PEEK[1.HEADER]") == (
        b"From: wrapped@example.com\r\nSubject: wrapped\r\n\r\n")
    assert top.message is not None


HEADERS = (
    b"Received: from a\r\n"
    b"\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
    b"From: x@example.com\r\n"
    b"subject: first\r\n"
    b"Received: from c by d\r\n"
    b"X-Empty:\r\n"
    b"Subject : obsolete spacing\r\n"
    b"\r\n"
    b"body\r\n"
)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("BODY.PEEK[HEADER.FIELDS (SUBJECT)]", b"subject: first\r\nSubject : obsolete spacing\r\n\r\n"),
        ("BODY.PEEK[HEADER.FIELDS (received x-empty)]",
         b"Received: from a\r\n\tby b; Mon, 1 Jan 2024 00:00:00 +0000\r\nReceived: from c by d\r\nX-Empty:\r\n\r\n"),
        ("BODY.PEEK[HEADER.FIELDS (X-Nothing)]", b"\r\n"),  # the blank line is always included
        ("BODY.PEEK[HEADER.FIELDS.NOT (Received Subject)]", b"From: x@example.com\r\nX-Empty:\r\n\r\n"),
        ("BODY.PEEK[HEADER.FIELDS (From)]<2.5>", b"om: x"),
        ("BODY.PEEK[HEADER.FIELDS (From)]<21.5>", b"\r\n"),
        ("BODY.PEEK[HEADER.FIELDS (From)]<100.5>", b""),
    ],
)
def test_header_fields(spec: str, expected: bytes) -> None:
    assert fetch(HEADERS, spec) == expected


def test_header_fields_without_blank_line() -> None:
    # RFC 9051 §6.4.5: no blank line "in the case of a message that has no body and no blank line"
    # (Dovecot adds one anyway; we follow the RFC)
    assert fetch(corpus.HEADER_ONLY, "BODY.PEEK[HEADER.FIELDS (Subject)]") == b"Subject: no body\r\n"
    assert fetch(b"To: x\r\nSubject: cut", "BODY.PEEK[HEADER.FIELDS (Subject)]") == b"Subject: cut\r\n"
    assert fetch(corpus.HEADER_ONLY, "BODY.PEEK[HEADER]") == corpus.HEADER_ONLY
    assert fetch(corpus.HEADER_ONLY, "BODY.PEEK[TEXT]") == b""
    assert fetch(b"", "BODY.PEEK[HEADER.FIELDS (Subject)]") == b""
    assert fetch(b"\r\nbody only\r\n", "BODY.PEEK[HEADER]") == b"\r\n"
    assert fetch(b"\r\nbody only\r\n", "BODY.PEEK[TEXT]") == b"body only\r\n"


def test_malformed_header_line_only_in_not_and_raw() -> None:
    raw = corpus.MALFORMED_GARBAGE
    assert b"no colon" in fetch(raw, "BODY.PEEK[HEADER]")
    assert b"no colon" in fetch(raw, "BODY.PEEK[HEADER.FIELDS.NOT (From)]")  # as Dovecot
    assert fetch(raw, "BODY.PEEK[HEADER.FIELDS (Subject)]") == b"Subject: garbage content type\r\n\r\n"


def test_binary_decoding() -> None:
    raw = corpus.ALTERNATIVE
    assert fetch(raw, "BINARY.PEEK[1]") == "Grüße aus Köln, café time.".encode()
    assert fetch(raw, "BINARY.PEEK[2]") == "<p>Grüße aus Köln</p>".encode()
    assert fetch(raw, "BINARY.PEEK[1]<0.2>") == b"Gr"
    whole = fetch(raw, "BINARY.PEEK[]")  # every leaf decoded, its CTE header rewritten (as Dovecot)
    assert len(whole) == 682
    assert whole.count(b"Content-Transfer-Encoding: binary\r\n") == 2
    assert b"=C3" not in whole.split(b"\r\n\r\n", 1)[1]
    assert fetch(corpus.ATTACHMENT, "BINARY.PEEK[2]") == b"%PDF-1"
    assert len(fetch(corpus.NESTED, "BINARY.PEEK[2]")) == 284  # nested message decoded inside
    assert fetch(corpus.SIMPLE, "BINARY.PEEK[1]") == corpus.SIMPLE.split(b"\n\n", 1)[1].replace(b"\n", b"\r\n")
    with pytest.raises(UnknownCTE):
        fetch(corpus.MALFORMED_GARBAGE, "BINARY.PEEK[1]")
    with pytest.raises(UnknownCTE):
        fetch(corpus.MALFORMED_GARBAGE, "BINARY.PEEK[]")
    encoded_message = (b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                       b"RnJvbTogYUBiDQoNCmJvZHk=\r\n")
    assert fetch(encoded_message, "BINARY.PEEK[1]") == b"From: a@b\r\n\r\nbody"


def test_lenient_transfer_decoding() -> None:
    raw = (b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           b"aGVs!!bG8\r\n--x\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\na=3Db=\r\nc=ZZ\r\n--x--\r\n")
    assert fetch(raw, "BINARY.PEEK[1]") == b"hello"
    assert fetch(raw, "BINARY.PEEK[2]") == b"a=bc=ZZ"


def test_section_str() -> None:
    assert str(Section((1, 2), "HEADER.FIELDS", ("A", "B"))) == "1.2.HEADER.FIELDS (A B)"
    assert str(Section()) == ""
