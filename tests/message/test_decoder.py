"""Content-Transfer-Encoding undone in pieces (message/mime.py `Decoder`, BINARY[n] of a large
message sent from its file): the same octets as decoding the body whole, wherever the pieces cut."""

from __future__ import annotations

import base64
import binascii
import quopri

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.message import mime
from postier.message.mime import Decoder, UnknownCTE, decode_qp, decode_transfer_encoding


def whole(data: bytes, enc: str) -> bytes:
    """The decoding of a whole body as it was written before Decoder (the reference)."""
    if enc == "base64":
        clean = data.translate(None, mime._NOT_BASE64)
        clean = clean[: len(clean) - len(clean) % 4] if len(clean) % 4 == 1 else clean
        try:
            return base64.b64decode(clean + b"=" * (-len(clean) % 4))
        except (binascii.Error, ValueError):
            return b""
    if enc == "quoted-printable":
        return decode_qp(data)
    return data


def in_pieces(data: bytes, enc: str, cuts: list[int]) -> bytes:
    d = Decoder(enc)
    out, at = [], 0
    for c in sorted(cuts):
        out.append(d.feed(data[at:c]))
        at = max(at, c)
    out.append(d.feed(data[at:]))
    return b"".join(out) + d.end()


ENCODED = st.lists(st.sampled_from([b"QUJD", b"QQ==", b"=", b"==", b"A", b"\r\n", b"\n", b" ", b"\t", b"=41", b"=4",
                                    b"=\r\n", b"= \r\n", b"\x00", b"\xff", b"_", b"x" * 9, b"=0a", b"\r", b"-"]),
                   max_size=60).map(b"".join)


@settings(max_examples=800, deadline=None)
@given(ENCODED, st.sampled_from(["base64", "quoted-printable", "7bit", "BASE64"]),
       st.lists(st.integers(0, 200), max_size=12), st.integers(1, 40))
def test_pieces_decode_as_whole(data: bytes, enc: str, cuts: list[int], hold: int) -> None:
    old = mime.QP_HOLD
    mime.QP_HOLD = hold  # long lines cut in pieces too
    try:
        assert in_pieces(data, enc, cuts) == whole(data, enc.lower()) == decode_transfer_encoding(data, enc)
    finally:
        mime.QP_HOLD = old


def test_a_large_body_in_pieces() -> None:
    raw = bytes(range(256)) * 4000
    for enc, data in (("base64", base64.encodebytes(raw)), ("quoted-printable", quopri.encodestring(raw)),
                      ("quoted-printable", quopri.encodestring(raw).replace(b"=\n", b""))):  # one long line
        got = in_pieces(data, enc, list(range(0, len(data), 65536 + 7)))
        assert got == whole(data, enc) and got == raw


def test_unknown_encoding() -> None:
    with pytest.raises(UnknownCTE):
        Decoder("x-uuencode")
