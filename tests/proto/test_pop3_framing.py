"""RETR/TOP bodies (RFC 1939 §3, §7): CRLF lines, byte-stuffing, terminator, chunking."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.proto.pop3.framing import MessageEncoder, encode_lines, encode_message

TRICKY = b"Subject: dots\n.hidden: header\r\n\r\n.\r\n..\r\n.leading\nmiddle . dot\r\n...\rlast line"


def unstuff(wire: bytes) -> bytes:
    """What a client reads back: lines up to the lone ".", one leading "." removed."""
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    out = []
    for line in lines[:-2]:
        assert line != b"."
        out.append(line[1:] if line.startswith(b".") else line)
    return b"".join(line + b"\r\n" for line in out)


def crlf_form(data: bytes) -> bytes:
    text = re.sub(rb"\r\n|\r|\n", b"\r\n", data)
    return text if text.endswith(b"\r\n") or not text else text + b"\r\n"


def encode_chunked(data: bytes, cuts: list[int], top: int | None = None) -> bytes:
    encoder = MessageEncoder(top)
    out = b""
    start = 0
    for cut in [*cuts, len(data)]:
        out += encoder.feed(data[start:cut])
        start = cut
    return out + encoder.finish()


def test_whole_message_is_stuffed_and_terminated() -> None:
    wire = encode_message(TRICKY)
    assert wire == (
        b"Subject: dots\r\n..hidden: header\r\n\r\n..\r\n...\r\n..leading\r\nmiddle . dot\r\n"
        b"....\r\nlast line\r\n.\r\n"
    )
    assert unstuff(wire) == crlf_form(TRICKY)


def test_every_single_split_point() -> None:
    whole = encode_message(TRICKY)
    for cut in range(len(TRICKY) + 1):
        assert encode_chunked(TRICKY, [cut]) == whole, cut


def test_every_pair_of_split_points() -> None:
    whole = encode_message(TRICKY)
    for a in range(len(TRICKY) + 1):
        for b in range(a, len(TRICKY) + 1, 3):
            assert encode_chunked(TRICKY, [a, b]) == whole, (a, b)


def test_byte_by_byte() -> None:
    assert encode_chunked(TRICKY, list(range(1, len(TRICKY)))) == encode_message(TRICKY)


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (b"", b".\r\n"),
        (b"x", b"x\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"a\r", b"a\r\n.\r\n"),
        (b"a\r\n", b"a\r\n.\r\n"),
        (b"\n.\n", b"\r\n..\r\n.\r\n"),
    ],
)
def test_edge_cases(message: bytes, wire: bytes) -> None:
    assert encode_message(message) == wire


MSG = b"From: a\r\nSubject: b\r\n\r\nline 1\r\n.line 2\r\nline 3\r\n"


def test_top_zero_sends_headers_and_blank_line() -> None:
    assert encode_message(MSG, 0) == b"From: a\r\nSubject: b\r\n\r\n.\r\n"


def test_top_n_lines_with_stuffing() -> None:
    assert encode_message(MSG, 2) == b"From: a\r\nSubject: b\r\n\r\nline 1\r\n..line 2\r\n.\r\n"


def test_top_more_lines_than_body_sends_everything() -> None:
    assert encode_message(MSG, 99) == encode_message(MSG)


def test_top_without_header_end_sends_everything() -> None:
    assert encode_message(b"Subject: x\nNo: body", 0) == b"Subject: x\r\nNo: body\r\n.\r\n"


def test_top_last_line_without_crlf() -> None:
    assert encode_message(b"A: b\n\nonly", 5) == b"A: b\r\n\r\nonly\r\n.\r\n"


def test_top_chunked_at_every_split_point_and_stops_early() -> None:
    for top in (0, 1, 2, 3):
        whole = encode_message(MSG, top)
        for cut in range(len(MSG) + 1):
            assert encode_chunked(MSG, [cut], top) == whole, (top, cut)
    encoder = MessageEncoder(0)
    encoder.feed(b"A: b\r\n\r\nbody")
    assert not encoder.needs_more
    assert encoder.feed(b"more") == b""


def test_top_blank_line_split_across_cr() -> None:
    data = b"A: b\r\n\r\nbody\r\n"
    assert encode_chunked(data, [5, 7], 0) == b"A: b\r\n\r\n.\r\n"


def test_listing_lines_are_stuffed() -> None:
    assert encode_lines(["TOP", ".odd"]) == b"TOP\r\n..odd\r\n.\r\n"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.lists(st.integers(0, 200), max_size=6))
def test_round_trip_random(data: bytes, cuts: list[int]) -> None:
    cuts = sorted(min(c, len(data)) for c in cuts)
    wire = encode_chunked(data, cuts)
    assert wire == encode_message(data)
    assert unstuff(wire) == crlf_form(data)
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None  # only CRLF ends a line on the wire


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120).map(lambda b: b.replace(b"\r", b"")), st.integers(0, 5), st.integers(0, 120))
def test_top_random_is_a_prefix_of_retr(data: bytes, top: int, cut: int) -> None:
    cut = min(cut, len(data))
    top_wire = encode_chunked(data, [cut], top)
    full = unstuff(encode_message(data))
    assert full.startswith(unstuff(top_wire))
