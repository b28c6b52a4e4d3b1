"""Broken and hostile mail: the views never raise (but UnknownCTE for BINARY), stay within the caps,
and always produce output an independent IMAP parser (imapclient's) accepts."""

from __future__ import annotations

import re
import time

from hypothesis import given, settings
from hypothesis import strategies as st
from imapclient.response_parser import parse_fetch_response

from postier.message import mime
from postier.message.bodystructure import body_structure
from postier.message.envelope import envelope_bytes
from postier.message.matching import SearchContext, evaluate
from postier.message.mime import UnknownCTE, parse_message
from postier.message.sections import binary_section, body_section, find_part
from postier.proto.imap import Search, Section, parse_command

_LITERAL = re.compile(rb"\{(\d+)\}\r\n")


def imapclient_chunks(data: bytes) -> list[bytes | tuple[bytes, bytes]]:
    """Split serialised data the way imaplib hands literals to imapclient."""
    out: list[bytes | tuple[bytes, bytes]] = []
    i = 0
    while (m := _LITERAL.search(data, i)) is not None:
        n = int(m.group(1))
        out.append((data[i : m.start()] + m.group()[:-2], data[m.end() : m.end() + n]))
        i = m.end() + n
    out.append(data[i:])
    return out


def check_serialisable(part: mime.Part) -> None:
    data = (b"1 (BODYSTRUCTURE " + body_structure(part) + b" BODY " + body_structure(part, extensible=False)
            + b" ENVELOPE " + envelope_bytes(part) + b")")
    parsed = parse_fetch_response(imapclient_chunks(data))
    assert set(parsed[1]) >= {b"BODYSTRUCTURE", b"BODY", b"ENVELOPE"}


FRAGMENTS = [
    b"From: a@b\r\n", b"To: x:;\r\n", b"Subject: =?utf-8?b?w7w=?=\r\n", b"Content-Type: multipart/mixed; boundary=b\r\n",
    b"Content-Type: multipart/alternative; boundary=\"b\"\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Type: text/plain; charset=\"utf-8\r\n", b"Content-Type: multipart/digest; boundary=b\r\n",
    b"Content-Transfer-Encoding: base64\r\n", b"Content-Transfer-Encoding: quoted-printable\r\n",
    b"Content-Disposition: attachment; filename=\"a\r\n", b"Content-Language: en,,\r\n", b"\r\n", b"\n",
    b"--b\r\n", b"--b--\r\n", b"--b", b"=C3=", b"AAEC", b"\xff\xfe", b"\x00", b" folded\r\n", b"junk line\r\n",
    b"(comment", b"<a@b>", b";;;", b"\"", b"\r",
]

SEARCH = parse_command(b"a SEARCH OR BODY x (TEXT y FROM z HEADER Subject \"\" SENTSINCE 1-Jan-2000)\r\n")
assert isinstance(SEARCH, Search)


class _View:
    seq = uid = modseq = 1
    size = 10
    flags = frozenset({"\\Seen"})
    internal_date = __import__("datetime").datetime(2024, 1, 1, tzinfo=__import__("datetime").UTC)

    def __init__(self, raw: bytes) -> None:
        self._raw = raw

    def raw(self) -> bytes:
        return self._raw


def exercise(raw: bytes) -> None:
    root = parse_message(raw)
    check_serialisable(root)
    for part in root.walk():
        assert root.start <= part.start <= part.body_start <= part.end <= len(root.msg)
    for path in [(), (1,), (2,), (1, 1), (1, 2), (2, 1), (1, 1, 1), (3, 2, 1)]:
        for text in (None, "HEADER", "TEXT", "MIME", "HEADER.FIELDS", "HEADER.FIELDS.NOT"):
            if text == "MIME" and not path:
                continue
            body_section(root, Section(path, text, ("FROM", "SUBJECT")))
        try:
            binary_section(root, path)
        except UnknownCTE:
            pass
        find_part(root, path)
    evaluate(SEARCH.criteria, _View(raw), SearchContext(1, 1))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=40))
def test_fragment_soup(parts: list[bytes]) -> None:
    exercise(b"".join(parts))


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes(raw: bytes) -> None:
    exercise(raw)


def test_depth_is_capped() -> None:
    deep = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(300))
    deep += b"\r\nleaf\r\n"
    start = time.monotonic()
    root = parse_message(deep)
    depth, part = 0, root
    while part.children:
        part, depth = part.children[0], depth + 1
    assert depth <= mime.MAX_DEPTH + 1
    check_serialisable(root)
    nested = b"Content-Type: message/rfc822\r\n\r\n" * 300 + b"Subject: bottom\r\n\r\nx\r\n"
    root = parse_message(nested)
    assert sum(1 for _ in root.walk()) <= mime.MAX_DEPTH + 2
    check_serialisable(root)
    assert time.monotonic() - start < 5


def test_part_count_is_capped() -> None:
    many = b"Content-Type: multipart/mixed; boundary=x\r\n\r\n" + b"--x\r\n\r\np\r\n" * 12_000 + b"--x--\r\n"
    start = time.monotonic()
    root = parse_message(many)
    assert len(root.children) <= mime.MAX_PARTS
    assert sum(1 for _ in root.walk()) <= mime.MAX_PARTS + 1
    assert body_section(root, Section((9_999,))) == b"p"
    assert time.monotonic() - start < 10


def test_huge_header_field_count() -> None:
    raw = b"X-A: 1\r\n" * 20_000 + b"Subject: late\r\n\r\nbody\r\n"
    root = parse_message(raw)
    assert len(root.fields) == mime.MAX_HEADER_FIELDS
    assert body_section(root, Section((), "TEXT")) == b"body\r\n"
    assert b"Subject: late" in body_section(root, Section((), "HEADER"))
