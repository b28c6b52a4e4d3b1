"""Property tests: the reader parses or raises ParseError, nothing else; mUTF-7 and sets round-trip."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from postier.proto.imap import (
    Command,
    CommandReader,
    Mutf7Error,
    NeedContinuation,
    ParseError,
    RawLine,
    ReaderLimits,
    SequenceSet,
    mutf7_decode,
    mutf7_encode,
)

FRAGMENTS = [
    b"a1 ", b"UID ", b"FETCH ", b"SEARCH ", b"STORE ", b"APPEND ", b"LOGIN ", b"LIST ", b"SELECT ",
    b"1:*", b"$", b"*", b"(", b")", b"[", b"]", b"<0.5>", b"BODY.PEEK[HEADER.FIELDS (A B)]", b"BINARY[1]",
    b"{3}\r\n", b"{3+}\r\n", b"~{2}\r\n", b"{99999999999999999999}\r\n", b"\"q\\\"x\"", b"\r\n", b"\n",
    b" ", b"NIL", b"OR ", b"NOT ", b"CHARSET UTF-8 ", b"RETURN (MIN) ", b"(QRESYNC (1 2 1:3 (1 2)))",
    b"\\Seen", b"+FLAGS.SILENT ", b"&AOQ-", b"\xc3\xa9", b"\x00", b"IDLE", b"DONE", b"1-Feb-2020",
    b"\" 7-Feb-1994 21:52:25 -0800\"", b"INBOX", b"%", b"abc",
    b"CATENATE (", b"TEXT ", b"URL \"/INBOX/;UID=1\"", b"UTF8 (", b"NOTIFY SET STATUS ", b"NOTIFY NONE",
    b"(SELECTED (MessageNew (UID) MessageExpunge))", b"(SUBTREE (A B) NONE)", b"OLDER 5 ", b"YOUNGER ",
]

LIMITS = ReaderLimits(max_line=200, max_literal=100, max_command=1000, max_literals=8, max_nonsync=50)


def run(reader: CommandReader, chunks: list[bytes], accept: list[bool]) -> list[str]:
    """Feed chunks, answer every NeedContinuation from ``accept``; return event kinds."""
    kinds: list[str] = []
    decisions = iter(accept * 1000)
    deadline = time.monotonic() + 5
    for chunk in chunks:
        reader.feed(chunk)
        for _ in range(10_000):
            assert time.monotonic() < deadline
            try:
                ev = reader.next_event()
            except ParseError as exc:
                assert isinstance(exc.message, str)
                kinds.append("error")
                continue
            if ev is None:
                break
            assert isinstance(ev, (Command, NeedContinuation, RawLine))
            kinds.append(type(ev).__name__)
            if isinstance(ev, NeedContinuation):
                if next(decisions, True):
                    reader.accept_literal()
                else:
                    reader.reject_literal()
            elif isinstance(ev, Command) and ev.name in ("IDLE", "AUTHENTICATE"):
                reader.expect_line()
        else:
            raise AssertionError("reader did not settle")
        assert len(reader._cmd) <= LIMITS.max_command + LIMITS.max_line + 2  # bounded assembly
    return kinds


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), accept=st.lists(st.booleans(), min_size=1, max_size=5))
def test_random_bytes(data: bytes, accept: list[bool]) -> None:
    whole = run(CommandReader(LIMITS), [data], accept)
    bytewise = run(CommandReader(LIMITS), [data[i : i + 1] for i in range(len(data))], accept)
    assert whole == bytewise


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(FRAGMENTS), max_size=40), utf8=st.booleans(),
       accept=st.lists(st.booleans(), min_size=1, max_size=5))
def test_grammar_fragments(parts: list[bytes], utf8: bool, accept: list[bool]) -> None:
    data = b"".join(parts) + b"\r\n"
    whole = run(CommandReader(LIMITS, utf8=utf8), [data], accept)
    bytewise = run(CommandReader(LIMITS, utf8=utf8), [data[i : i + 1] for i in range(len(data))], accept)
    assert whole == bytewise


@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=50))
def test_mutf7_round_trip(name: str) -> None:
    encoded = mutf7_encode(name)
    assert encoded.isascii()
    assert mutf7_decode(encoded) == name


@given(st.binary(max_size=40))
def test_mutf7_decode_is_canonical_or_fails(raw: bytes) -> None:
    try:
        text = mutf7_decode(raw)
    except Mutf7Error:
        return
    assert mutf7_encode(text).encode() == raw


ranges = st.lists(
    st.tuples(st.one_of(st.none(), st.integers(1, 2**32 - 1)), st.one_of(st.none(), st.integers(1, 2**32 - 1))),
    min_size=1, max_size=20,
)


@given(ranges)
def test_seqset_text_round_trip(rs: list[tuple[int | None, int | None]]) -> None:
    s = SequenceSet(tuple(rs))
    assert SequenceSet.parse(str(s)) == SequenceSet(tuple((a, b) for a, b in rs))


@given(st.sets(st.integers(1, 500), max_size=60), st.integers(0, 600))
def test_seqset_from_ids(ids: set[int], max_value: int) -> None:
    s = SequenceSet.from_ids(ids)
    assert set(s.iter(500)) == ids
    assert SequenceSet.parse(str(s)) == s if ids else str(s) == ""
    for n in range(1, 40):
        assert s.contains(n, max_value) == (n in ids)


def test_seqset_star_semantics() -> None:
    s = SequenceSet.parse("5:*")
    assert s.resolve(3) == [(3, 5)]  # RFC 9051 §9: includes the last message even if 5 > max
    assert list(s.iter(3)) == [3]
    assert SequenceSet.parse("4:2,*").resolve(10) == [(2, 4), (10, 10)]
    assert str(SequenceSet.from_ids([1, 2, 3, 5, 7, 8])) == "1:3,5,7:8"
    assert SequenceSet.parse("$").saved
