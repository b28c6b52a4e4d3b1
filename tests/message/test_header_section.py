"""message.mime header_end / header_section: the one split of a message at its empty line (RFC 5322 §2.1)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from postier.message.mime import header_end, header_section, parse_message
from postier.proto.crlf import to_crlf

PIECES = st.lists(st.sampled_from([b"A: 1", b"\r\n", b" x", b"B:", b"\r", b"\n"]), max_size=20).map(b"".join)


def test_examples() -> None:
    msg = b"A: 1\r\nB: 2\r\n\r\nbody\r\n\r\nmore"
    assert header_end(msg) == 14
    assert header_section(msg) == b"A: 1\r\nB: 2\r\n\r\n"
    assert header_section(msg, empty_line=False) == b"A: 1\r\nB: 2\r\n"
    cut = b"A: 1\r\nB: 2\r\n"  # a header cut short: all of it
    assert header_end(cut) == -1 and header_section(cut) is cut and header_section(cut, empty_line=False) is cut
    # a message starting with the empty line has no header fields; a blank line in its body is no header end
    empty = b"\r\nFrom: in the body\r\n\r\nx"
    assert header_end(empty) == 2
    assert header_section(empty) == b"\r\n" and header_section(empty, empty_line=False) == b""
    assert header_end(b"xx" + msg, 2) == 16 and header_end(msg, 0, 13) == -1  # a window of a buffer


@given(PIECES)
def test_agrees_with_the_parser(data: bytes) -> None:
    data = to_crlf(data)  # what the parser works on
    root = parse_message(data)
    end = header_end(data)
    if end >= 0:
        assert (root.header_end, root.body_start) == (end - 2, end)
        assert header_section(data) + data[end:] == data
        assert header_section(data, empty_line=False) == data[:root.header_end]
    else:
        assert header_section(data) == data
