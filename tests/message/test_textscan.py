"""The searchable text of a message read from a file in pieces (message/textscan.py): whenever it
says exact, it is `search_text` of the whole message; attachments are left out of what it holds."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import Iterator

from hypothesis import given, settings
from hypothesis import strategies as st

from postier.message import textscan
from postier.message.bodystructure import body_structure
from postier.message.mime import parse_message
from postier.message.matching import search_text
from postier.message.textscan import search_text_at, sparse_copy

from . import corpus
from .test_mime_fuzz import FRAGMENTS


def reader(data: bytes) -> textscan.ReadAt:
    return lambda offset, n: data[offset:offset + n]


@contextlib.contextmanager
def small(piece: int, line: int) -> Iterator[None]:
    """Tiny read pieces and kept lines, so that small messages cross every boundary of the scan."""
    old = textscan.PIECE, textscan.SKIP_LINE
    textscan.PIECE, textscan.SKIP_LINE = piece, line
    try:
        yield
    finally:
        textscan.PIECE, textscan.SKIP_LINE = old


def attachment_mail(lines: int, text_after: bytes = b"", inner: bytes = b"") -> bytes:
    """A text part, a base64 attachment of `lines` lines, then optionally a second text part and a
    message/rfc822 part."""
    out = [b"From: Alice <alice@a.example>\r\nTo: bob@b.example\r\nSubject: the report\r\n"
           b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n"
           b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the file, Bj\xc3\xb6rn.\r\n"
           b"--b1\r\nContent-Type: application/pdf; name=r.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"]
    out += [base64.b64encode(hashlib.sha256(str(i).encode()).digest() * 2)[:76] + b"\r\n" for i in range(lines)]
    if text_after:
        out.append(b"--b1\r\nContent-Type: text/plain\r\n\r\n" + text_after + b"\r\n")
    if inner:
        out.append(b"--b1\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n")
    out.append(b"--b1--\r\n")
    return b"".join(out)


def test_corpus_is_extracted_as_whole() -> None:
    for name, raw in corpus.ALL.items():
        for piece, line in ((1 << 18, 1024), (7, 24)):
            with small(piece, line):
                got = search_text_at(reader(raw), len(raw))
            assert got == search_text(raw), name


def test_attachment_left_out_text_after_it_kept() -> None:
    inner = b"Subject: forwarded words\r\nFrom: carol@c.example\r\n\r\ninner body text\r\n"
    raw = attachment_mail(20_000, b"a second text part, quite searchable", inner)
    assert len(raw) > 1_500_000
    copy = sparse_copy(reader(raw), len(raw))
    assert copy is not None
    data, cuts = copy
    assert len(data) < 2000 and len(cuts) == 1  # the attachment's first and last lines only
    got = search_text_at(reader(raw), len(raw))
    assert got.exact and got == search_text(raw)
    assert "björn" in got.leaves and "quite searchable" in got.leaves and "forwarded words" in got.inner


def test_long_lines_of_an_attachment_are_cut() -> None:
    raw = (b"Subject: one long line\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n"
           b"Content-Type: text/plain\r\n\r\nhello\r\n--x\r\nContent-Type: image/png\r\n\r\n"
           + b"A" * 300_000 + b"\r\n" + b"B" * 5000 + b"\r\n--x--\r\n")
    got = search_text_at(reader(raw), len(raw))
    assert got.exact and got == search_text(raw)
    copy = sparse_copy(reader(raw), len(raw))
    assert copy is not None and len(copy[0]) < 3000


def test_whole_message_attachment() -> None:
    raw = b"Subject: just a file\r\nContent-Type: application/zip\r\n\r\n" + b"UEsDBBQAAAAIA\r\n" * 10_000
    got = search_text_at(reader(raw), len(raw))
    assert got.exact and got == search_text(raw) and "just a file" in got.fields["SUBJECT"]


def test_text_beyond_the_limit_is_inexact_and_empty() -> None:
    raw = b"Subject: big text\r\n\r\n" + b"some words in a line\r\n" * 1000
    assert search_text_at(reader(raw), len(raw), limit=30_000).exact
    got = search_text_at(reader(raw), len(raw), limit=10_000)
    assert not got.exact and got.leaves == "" and got.fields["SUBJECT"] == ""
    assert not search_text(raw, limit=10_000).exact  # the whole-message extraction agrees it is cut


def test_a_dash_line_in_text_is_no_license_to_drop_it() -> None:
    """A text part whose own lines look like a delimiter and an attachment header: the scan leaves
    lines out, the parse shows they were text, so the answer is inexact (never wrong)."""
    raw = (b"Subject: tricky\r\nContent-Type: text/plain\r\n\r\nhello\r\n--not-a-boundary\r\n"
           b"Content-Type: image/png\r\n\r\n" + b"secret words\r\n" * 10 + b"end\r\n")
    got = search_text_at(reader(raw), len(raw))
    assert not got.exact
    assert "secret words" in search_text(raw).leaves


def test_many_small_attachments_count_against_the_limit() -> None:
    part = b"--b\r\nContent-Type: image/png\r\n\r\n" + b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n"
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n" + part * 50 + b"--b--\r\n"
    assert search_text_at(reader(raw), len(raw), limit=200_000).exact
    assert sparse_copy(reader(raw), len(raw), limit=50_000) is None
    assert not search_text_at(reader(raw), len(raw), limit=50_000).exact


def test_a_long_dash_line_gives_up() -> None:
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: image/png\r\n\r\nxx\r\n"
           + b"--" + b" " * 5000 + b"\r\n--b--\r\n")
    assert not search_text_at(reader(raw), len(raw)).exact


def test_a_dash_line_cut_to_one_byte_is_still_a_dash_line() -> None:
    """With lines of attachments cut to 1 byte, a delimiter line would lose its second "-": the cut
    is never below 2 bytes, so the later parts are not taken for the attachment's body."""
    raw = (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: image/png\r\n\n"
           b"---x\r\nAAAA\r\n--b\r\n\r\nwords after\r\n--b--\r\n")
    with small(1, 1):
        got = search_text_at(reader(raw), len(raw))
    assert not got.exact or got == search_text(raw)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from([*FRAGMENTS, b"Content-Type: image/png\r\n", b"AAAA\r\n" * 3, b"x" * 40,
                                 b"\n-", b"-\n", b"--", b"B\nC\n" * 4, b"Content-Type: message/rfc822\n\n"]),
                max_size=50),
       st.integers(1, 64), st.integers(1, 16))
def test_exact_means_equal(parts: list[bytes], piece: int, line: int) -> None:
    raw = b"".join(parts)
    with small(piece, line):
        got = search_text_at(reader(raw), len(raw), limit=400)
    if got.exact:
        assert got == search_text(raw, limit=400)


# -- layout_at: the MIME tree of a large message with its offsets in the file (FETCH of a section)

def same_layout(raw: bytes, lay: textscan.Layout) -> None:
    """The layout's tree is the whole parse's: every part's offsets, body size and lines, and the
    BODYSTRUCTURE and BODY made from it."""
    whole = parse_message(raw)
    mine, theirs = list(whole.walk()), list(lay.part.walk())
    assert len(mine) == len(theirs)
    for p, q in zip(mine, theirs, strict=True):
        assert (p.start, p.header_end, p.body_start, p.end) == tuple(
            lay.at(x) for x in (q.start, q.header_end, q.body_start, q.end))
        assert (p.body_size, p.body_lines) == lay.measure(q)
        assert p.header_bytes == q.header_bytes
    for ext in (True, False):
        assert body_structure(whole, extensible=ext) == body_structure(lay.part, extensible=ext, measure=lay.measure)


def test_layout_of_a_large_message_holds_its_headers_only() -> None:
    inner = b"Subject: forwarded words\r\nFrom: carol@c.example\r\n\r\ninner body text\r\n" * 3
    raw = attachment_mail(40_000, b"a second text part\r\n" * 5000, inner)
    assert len(raw) > 3_000_000
    lay = textscan.layout_at(reader(raw), len(raw))
    assert lay is not None and len(lay.part.msg) < 3000  # the leaf bodies' first and last lines
    same_layout(raw, lay)
    with small(7, 24):
        lay = textscan.layout_at(reader(raw), len(raw))
    assert lay is not None
    same_layout(raw, lay)


def test_layout_of_the_corpus() -> None:
    for name, raw in corpus.ALL.items():
        for piece, line in ((1 << 18, 1024), (7, 24), (1, 2)):
            with small(piece, line):
                lay = textscan.layout_at(reader(raw), len(raw))
            if b"\n" in raw.replace(b"\r\n", b""):
                assert lay is None, name  # a bare LF: the offsets of the served form are not the file's
                continue
            if lay is not None:
                same_layout(raw, lay)


@settings(max_examples=600, deadline=None)
@given(st.lists(st.sampled_from([*FRAGMENTS, b"Content-Type: image/png\r\n", b"AAAA\r\n" * 3, b"x" * 40,
                                 b"\r\n-", b"-\r\n", b"--", b"B\r\nC\r\n" * 4, b"Content-Type: message/rfc822\r\n\r\n",
                                 b"Content-Type: text/plain\r\n\r\n", b"\r\n\r\n", b"\r", b"\n"]),
                max_size=50),
       st.integers(1, 64), st.integers(1, 16))
def test_layout_means_equal(parts: list[bytes], piece: int, line: int) -> None:
    raw = b"".join(parts)
    with small(piece, line):
        lay = textscan.layout_at(reader(raw), len(raw), limit=400)
    if lay is not None:
        same_layout(raw, lay)
        assert b"\n" not in raw.replace(b"\r\n", b"")
