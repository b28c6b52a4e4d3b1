"""DotReader (RFC 5321 §4.5.2 framing) against a line-by-line reference, over every way to cut the input."""

from __future__ import annotations

import hashlib
import random

import pytest

from postier.proto.smtp.data import DotReader, Fault


def reference(stream: bytes) -> tuple[bytes, int] | None:
    """The content and the octets used, read one line at a time; None when no end marker is complete."""
    lines, pos = [], 0
    while (eol := stream.find(b"\r\n", pos)) >= 0:
        line = stream[pos:eol]
        pos = eol + 2
        if line == b".":
            return b"".join(lines), pos
        lines.append((line[1:] if line.startswith(b".") else line) + b"\r\n")
    return None


def read(stream: bytes, cuts: list[int]) -> tuple[bytes, int, bool, Fault | None]:
    r = DotReader(10**9, 10**6)
    out, used, start = [], 0, 0
    for cut in [*cuts, len(stream)]:
        piece = stream[start:cut]
        start = cut
        content, n, done = r.feed(piece)
        out.append(content)
        used += n
        if done:
            return b"".join(out), used, True, r.fault
        assert n == len(piece)
    return b"".join(out), used, False, r.fault


SAMPLES = [
    b".\r\n",
    b"..\r\n.\r\n",
    b"a\r\n.\r\n",
    b"a\r\n..b\r\n...\r\n.\r\n",
    b"\r\n.\r\n",
    b".x\r\n.\r\nafter",
    b"a\r\n.\r\n.\r\n",
    b"..\r\n..\r\n..\r\n.\r\n",
    b"line\r\n.\r",
    b"line\r\n.",
    b"line\r\n",
    b"x" * 50 + b"\r\n." + b"y" * 5 + b"\r\n.\r\n",
]


@pytest.mark.parametrize("stream", SAMPLES)
def test_every_two_and_three_way_cut_gives_the_reference(stream: bytes) -> None:
    want = reference(stream)
    n = len(stream)
    for i in range(n + 1):
        for j in range(i, n + 1):
            content, used, done, fault = read(stream, [i, j])
            assert fault is None
            if want is None:
                assert not done
            else:
                assert done and (content, used) == want, (i, j)


def test_random_streams_in_random_pieces_give_the_reference() -> None:
    rng = random.Random(5321)
    alphabet = [b".", b"..", b"\r\n", b"a", b"bc", b"\r\n.", b"\r\n..", b"\r\n.\r\n"]
    for _ in range(3000):
        stream = b"".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 30)))
        want = reference(stream)
        cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.randrange(4)))
        content, used, done, fault = read(stream, cuts)
        assert fault is None
        assert done == (want is not None)
        if want is not None:
            assert (content, used) == want


def test_a_large_message_with_many_stuffed_lines_in_pieces() -> None:
    rng = random.Random(7)
    lines = [(b"." if rng.random() < 0.3 else b"") + b"x" * rng.randrange(0, 200) for _ in range(20000)]
    stream = b"\r\n".join(lines) + b"\r\n.\r\nnext command"
    want = reference(stream)
    assert want is not None
    cuts = list(range(0, len(stream), 4093))
    content, used, done, fault = read(stream, cuts)
    assert done and fault is None and used == want[1]
    assert hashlib.sha256(content).digest() == hashlib.sha256(want[0]).digest()


@pytest.mark.parametrize(
    ("stream", "fault"),
    [
        (b"a\rb\r\n.\r\n", Fault.BARE_NEWLINE),
        (b"a\nb\r\n.\r\n", Fault.BARE_NEWLINE),
        (b".\rx\r\n.\r\n", Fault.BARE_NEWLINE),
        (b"..\n\r\n.\r\n", Fault.BARE_NEWLINE),
        (b"a\n\rb\r\n.\r\n", Fault.BARE_NEWLINE),
        (b"a\r\r\n\nb\r\n.\r\n", Fault.BARE_NEWLINE),
        (b"a\r\n\r\r\n.\r\n", Fault.BARE_NEWLINE),
    ],
)
def test_faults_are_found_and_the_end_still_read(stream: bytes, fault: Fault) -> None:
    for cut in range(len(stream) + 1):
        _, used, done, got = read(stream, [cut])  # content before the fault is dropped by the server
        assert (used, done, got) == (len(stream), True, fault), cut


@pytest.mark.parametrize("misses", [0, 3, 7, 8, 9, 40])
def test_dots_inside_lines_before_stuffed_lines_and_the_end(misses: int) -> None:
    """Dots that begin no line (the reader looks for dots alone until it has seen a few of them,
    then for CRLF "."), then stuffed lines and the end, in every two-way cut."""
    stream = b"a.b" * misses + b"\r\n..x.\r\n.y\r\n" + b"c." * misses + b"\r\n..\r\n.\r\nrest"
    want = reference(stream)
    assert want is not None
    for cut in range(len(stream) + 1):
        content, used, done, fault = read(stream, [cut])
        assert done and fault is None and (content, used) == want, cut
