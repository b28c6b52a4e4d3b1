"""proto.crlf: the one line-end conversion (bare LF, and on the SMTP wire bare CR, to CRLF)."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from postier.proto.crlf import bare_lf, to_crlf

LINES = st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n", b" "]), max_size=40).map(b"".join)


def test_examples() -> None:
    assert to_crlf(b"a\nb\r\nc\rd\n") == b"a\r\nb\r\nc\rd\r\n"  # a lone CR stays in stored mail
    assert to_crlf(b"a\nb\r\nc\rd\n", bare_cr=True) == b"a\r\nb\r\nc\r\nd\r\n"
    assert to_crlf(b"\r\r\n") == b"\r\r\n"
    assert to_crlf(b"\r\r\n", bare_cr=True) == b"\r\n\r\n"
    clean = b"A: 1\r\n\r\nbody\r\n"
    assert to_crlf(clean) is clean and to_crlf(clean, bare_cr=True) is clean  # no copy
    assert bare_lf(b"a\nb\r\n\n") == 2
    assert bare_lf(b"\nx\n", prev_cr=True) == 1  # the first LF ends a CRLF split between two reads


@given(LINES)
def test_lf_only_matches_the_definition(data: bytes) -> None:
    assert to_crlf(data) == re.sub(rb"(?<!\r)\n", b"\r\n", data)
    assert len(to_crlf(data)) == len(data) + bare_lf(data)


@given(LINES)
def test_bare_cr_leaves_only_crlf(data: bytes) -> None:
    out = to_crlf(data, bare_cr=True)
    assert out.count(b"\r") == out.count(b"\n") == out.count(b"\r\n")
    assert out == re.sub(rb"\r\n|\r|\n", b"\r\n", data)


@given(LINES, st.integers(min_value=0, max_value=40))
def test_bare_lf_over_pieces(data: bytes, cut: int) -> None:
    a, b = data[:cut], data[cut:]
    assert bare_lf(a) + bare_lf(b, prev_cr=a.endswith(b"\r")) == bare_lf(data)
