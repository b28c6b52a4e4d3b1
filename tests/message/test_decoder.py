"""Content-Transfer-Encoding undone in pieces (message/mime.py `Decoder`, BINARY[n] of a large
message sent from its file): the same octets as decoding the body whole, wherever the pieces cut."""

from __future__ import annotations

import base64
import binascii
import hashlib
import quopri
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.message import mime
from postier.message.mime import QP_WSP_MAX, Decoder, UnknownCTE, decode_qp, decode_transfer_encoding


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


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def in_pieces(data: bytes, enc: str, cuts: list[int]) -> bytes:
    d = Decoder(enc)
    out, at = [], 0
    for c in sorted(cuts):
        out.append(d.feed(data[at:c]))
        at = max(at, c)
    out.append(d.feed(data[at:]))
    return b"".join(out) + d.end()


ENCODED = st.lists(st.sampled_from([b"QUJD", b"QQ==", b"=", b"==", b"A", b"\r\n", b"\n", b" ", b"\t", b"=41", b"=4",
                                    b"=\r\n", b"= \r\n", b"\x00", b"\xff", b"_", b"x" * 9, b"=0a", b"\r", b"-",
                                    b" " * 997, b"\t" * 999, b"=\r", b"=" * 5]),
                   max_size=60).map(b"".join)


@settings(max_examples=800, deadline=None)
@given(ENCODED, st.sampled_from(["base64", "quoted-printable", "7bit", "BASE64"]),
       st.lists(st.integers(0, 4000), max_size=12))
def test_pieces_decode_as_whole(data: bytes, enc: str, cuts: list[int]) -> None:
    got = digest(in_pieces(data, enc, cuts))
    assert got == digest(whole(data, enc.lower())) == digest(decode_transfer_encoding(data, enc))


def fed(data: bytes, size: int) -> tuple[bytes, int]:
    """``data`` fed to a quoted-printable Decoder in pieces of ``size``: the octets and the most it held."""
    d, out, held = Decoder("quoted-printable"), [], 0
    for at in range(0, len(data), size):
        out.append(d.feed(data[at : at + size]))
        held = max(held, len(d._rest))
    out.append(d.end())
    return b"".join(out), held


#: inputs that a decoder holding the line begun or a trailing white space regex take quadratic
#: time or memory on (n: about their length), with the decoding when it is simple to state
PATHOLOGICAL: dict[str, tuple[Callable[[int], bytes], Callable[[int], bytes] | None]] = {
    "spaces": (lambda n: b" " * n, lambda n: b" " * n),  # too long to be trailing: kept (QP_WSP_MAX)
    "spaces CRLF": (lambda n: b" " * n + b"\r\n", lambda n: b" " * n + b"\r\n"),
    "spaces x": (lambda n: b" " * n + b"x", lambda n: b" " * n + b"x"),
    "tabs spaces LF text": (lambda n: b" \t" * (n // 2) + b"\nab", lambda n: b" \t" * (n // 2) + b"\nab"),
    "= spaces CRLF": (lambda n: b"a=" + b" " * n + b"\r\nb", lambda n: b"a=" + b" " * n + b"\r\nb"),
    "= run": (lambda n: b"=" * (n // 2 * 2), lambda n: b"=" * (n // 2)),
    "odd = run 41": (lambda n: b"=" * (n // 2 * 2 + 1) + b"41", lambda n: b"=" * (n // 2) + b"A"),
    "=41 line": (lambda n: b"=41" * (n // 3), lambda n: b"A" * (n // 3)),
    "soft breaks": (lambda n: b"=  \r\n" * (n // 5) + b"x", lambda n: b"x"),
    "= space": (lambda n: b"= " * (n // 2), lambda n: b"= " * (n // 2 - 1)),  # the last: a soft line break
    "=CR": (lambda n: b"=\r" * (n // 2), lambda n: b"=\r" * (n // 2)),
    "CR run": (lambda n: b"\r" * n + b"\n", lambda n: b"\r" * n + b"\n"),
    "998 and 999 blanks": (lambda n: (b"a" + b" " * 998 + b"\r\nb" + b"\t" * 999 + b"\r\n") * (n // 2004),
                           lambda n: (b"a\r\nb" + b"\t" * 999 + b"\r\n") * (n // 2004)),
    "mixed": (lambda n: (b"===" + b" " * 997 + b"\r\n=" + b" " * 999 + b"\r" + b"\t" * 1500 + b"=4=\r \n=  ")
              * (n // 4000), None),
}


@pytest.mark.parametrize("name", PATHOLOGICAL)
def test_qp_pathological_inputs_in_pieces_of_every_size(name: str) -> None:
    """RFC 2045 §6.7: fed in pieces of any size, the octets of `decode_qp` (of the whole input)."""
    make, decoded = PATHOLOGICAL[name]
    for n, sizes in ((1 << 20, (64, 4096, 1 << 20, 1 << 21)), (1 << 16, (1, 2, 3, 7))):
        data = make(n)
        want = digest(decode_qp(data))
        if decoded is not None:
            assert want == digest(decoded(n)), name
        for size in sizes:
            got, held = fed(data, size)
            assert digest(got) == want, (name, size)
            assert held <= QP_WSP_MAX + 2, (name, size, held)


@settings(max_examples=300, deadline=None)
@given(ENCODED, st.sampled_from([1, 2, 3, 7, 64, 4096, 1 << 20]))
def test_qp_pieces_of_any_size(data: bytes, size: int) -> None:
    assert digest(fed(data, size)[0]) == digest(decode_qp(data))


def test_qp_holds_a_bounded_tail() -> None:
    """4 MiB of spaces in 4 KiB pieces, with and without a line end: what the decoder holds stays
    under QP_WSP_MAX + 2 octets after every piece (it held the whole line, growing, before)."""
    for data in (b" " * (4 << 20), b"=" + b" \t" * (2 << 20) + b"\r\n", b"=" * (4 << 20) + b"=4"):
        d, out = Decoder("quoted-printable"), 0
        for at in range(0, len(data), 4096):
            out += len(d.feed(data[at : at + 4096]))
            assert len(d._rest) <= QP_WSP_MAX + 2
        out += len(d.end())
        assert out == len(decode_qp(data))


def test_qp_white_space_and_soft_breaks() -> None:
    # RFC 2045 §6.7 rule 3: trailing white space deleted, up to QP_WSP_MAX octets; a longer run is kept
    assert decode_qp(b"a" + b" " * QP_WSP_MAX + b"\r\nb \t") == b"a\r\nb"
    assert decode_qp(b"a" + b" " * (QP_WSP_MAX + 1) + b"\r\n") == b"a" + b" " * (QP_WSP_MAX + 1) + b"\r\n"
    # rule 5: "=" then white space then the line end is a soft line break, within the same bound
    assert decode_qp(b"a=" + b"\t" * QP_WSP_MAX + b"\r\nb=" + b" " * QP_WSP_MAX + b"\nc=") == b"abc"
    assert decode_qp(b"a=" + b" " * (QP_WSP_MAX + 1) + b"\r\n") == b"a=" + b" " * (QP_WSP_MAX + 1) + b"\r\n"
    # "==" is "=" (binascii's reading), so only the "=" ending an odd run begins an escape
    assert decode_qp(b"==41===41====\r\n") == b"=41=A==\r\n"
    # note 2: "=" before a CR that begins no CRLF is kept with it (binascii dropped up to the next LF)
    assert decode_qp(b"a=\rb=\r \nc==\r=\r\nd=\r") == b"a=\rb=\r\nc=\rd=\r"


def test_a_large_body_in_pieces() -> None:
    raw = bytes(range(256)) * 4000
    for enc, data in (("base64", base64.encodebytes(raw)), ("quoted-printable", quopri.encodestring(raw)),
                      ("quoted-printable", quopri.encodestring(raw).replace(b"=\n", b""))):  # one long line
        got = in_pieces(data, enc, list(range(0, len(data), 65536 + 7)))
        assert got == whole(data, enc) and got == raw


def test_unknown_encoding() -> None:
    with pytest.raises(UnknownCTE):
        Decoder("x-uuencode")
