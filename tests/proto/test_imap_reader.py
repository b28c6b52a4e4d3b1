"""Framing: literals signalled not read, limits, resynchronisation (RFC 9051 §4.3, RFC 7888)."""

from __future__ import annotations

import pytest

from postier.proto.imap import (
    Append,
    CommandReader,
    Fetch,
    Idle,
    Login,
    NeedContinuation,
    Noop,
    ParseError,
    RawLine,
    ReaderLimits,
)


def drain(reader: CommandReader) -> list[object]:
    """All events until NEED_DATA; ParseErrors are collected as events; literals accepted."""
    out: list[object] = []
    for _ in range(10_000):
        try:
            ev = reader.next_event()
        except ParseError as exc:
            out.append(exc)
            continue
        if ev is None:
            return out
        out.append(ev)
        if isinstance(ev, NeedContinuation):
            reader.accept_literal()
    raise AssertionError("reader did not settle")


def test_sync_literal_accept() -> None:
    r = CommandReader()
    r.feed(b"a1 LOGIN {4}\r\n")
    ev = r.next_event()
    assert ev == NeedContinuation("a1", "LOGIN", 4, False)
    assert r.next_event() == ev  # idempotent until the server decides
    r.accept_literal()
    assert r.next_event() is None
    r.feed(b"fred {2}\r\n")
    assert r.next_event() == NeedContinuation("a1", "LOGIN", 2, False)
    r.accept_literal()
    r.feed(b"pw\r\na2 NOOP\r\n")
    assert r.next_event() == Login(tag="a1", userid="fred", password="pw")
    assert r.next_event() == Noop(tag="a2")
    assert r.next_event() is None


def test_sync_literal_reject_resyncs() -> None:
    r = CommandReader()
    r.feed(b"a1 APPEND INBOX {500}\r\n")
    assert r.next_event() == NeedContinuation("a1", "APPEND", 500, False)
    r.reject_literal()  # server says "a1 NO [TOOBIG]"; the client will not send the literal
    r.feed(b"a2 NOOP\r\n")
    assert r.next_event() == Noop(tag="a2")
    with pytest.raises(RuntimeError):
        r.accept_literal()


def test_huge_literal_before_login_gets_bad_without_continuation() -> None:
    r = CommandReader()
    r.feed(b"a1 LOGIN {999999999}\r\na2 NOOP\r\n")
    with pytest.raises(ParseError) as exc:
        r.next_event()
    assert exc.value.tag == "a1" and exc.value.code == "TOOBIG"
    assert r.next_event() == Noop(tag="a2")


def test_nonsync_literal_too_big_is_skipped() -> None:
    r = CommandReader(ReaderLimits(max_literal=10))
    r.feed(b"a1 LOGIN {20+}\r\n" + b"x" * 20 + b" {3+}\r\nabc\r\na2 NOOP\r\n")
    with pytest.raises(ParseError) as exc:
        r.next_event()
    assert exc.value.tag == "a1"
    assert r.next_event() == Noop(tag="a2")


def test_literal_minus_limit() -> None:
    r = CommandReader(ReaderLimits.authenticated(10_000_000, max_nonsync=4096))
    r.feed(b"a1 APPEND INBOX {4097+}\r\n" + b"x" * 4097 + b"\r\na2 APPEND INBOX {4096+}\r\n" + b"y" * 4096 + b"\r\n")
    with pytest.raises(ParseError) as exc:
        r.next_event()
    assert exc.value.code == "TOOBIG"
    ev = r.next_event()
    assert isinstance(ev, Append) and ev.message == b"y" * 4096
    r.feed(b"a3 APPEND INBOX {5000}\r\n")  # a synchronising one may be larger
    assert r.next_event() == NeedContinuation("a3", "APPEND", 5000, False)


def test_line_too_long_resyncs_and_skips_trailing_nonsync_literal() -> None:
    r = CommandReader(ReaderLimits(max_line=100))
    r.feed(b"a1 NOOP " + b"x" * 200)
    with pytest.raises(ParseError) as exc:
        r.next_event()
    assert exc.value.tag == "a1"
    r.feed(b"y" * 300 + b" {5+}\r\n12345\r\na2 NOOP\r\n")
    assert r.next_event() == Noop(tag="a2")
    r.feed(b"a3 NOOP " + b"z" * 150 + b"\r\na4 NOOP\r\n")
    assert [type(e) for e in drain(r)] == [ParseError, Noop]


def test_command_total_and_literal_count_bounded() -> None:
    r = CommandReader(ReaderLimits(max_command=100, max_literal=80))
    r.feed(b"a1 LOGIN {60+}\r\n" + b"u" * 60 + b" {60+}\r\n" + b"p" * 60 + b"\r\na2 NOOP\r\n")
    events = drain(r)
    assert isinstance(events[0], ParseError) and events[0].code == "TOOBIG"
    assert events[1:] == [Noop(tag="a2")]
    r = CommandReader(ReaderLimits(max_literals=2))
    r.feed(b"a1 ID ({1+}\r\na {1+}\r\nb {1+}\r\nc NIL)\r\na2 NOOP\r\n")
    events = drain(r)
    assert isinstance(events[0], ParseError) and events[-1] == Noop(tag="a2")


def test_byte_by_byte_equals_whole() -> None:
    data = (b"a1 LOGIN {4+}\r\nfred \"pw\"\r\na2 UID FETCH 1:* (FLAGS BODY.PEEK[HEADER])\r\n"
            b"a3 APPEND INBOX (\\Seen) {3}\r\nabc\r\nbad\r\na4 IDLE\r\n")
    whole = CommandReader()
    whole.feed(data)
    expected = drain(whole)
    r = CommandReader()
    got: list[object] = []
    for b in data:
        r.feed(bytes([b]))
        got.extend(drain(r))
    assert [repr(e) for e in got] == [repr(e) for e in expected]
    assert isinstance(expected[-1], Idle) and isinstance(expected[-2], ParseError)


def test_idle_done_raw_line_and_lf_only() -> None:
    r = CommandReader()
    r.feed(b"a1 IDLE\nDONE\na2 NOOP\n")
    assert r.next_event() == Idle(tag="a1")
    r.expect_line()
    assert r.next_event() == RawLine(b"DONE")
    assert r.next_event() == Noop(tag="a2")


def test_raw_line_too_long() -> None:
    r = CommandReader(ReaderLimits(max_line=10))
    r.expect_line()
    r.feed(b"x" * 50 + b"\r\na NOOP\r\n")
    with pytest.raises(ParseError) as exc:
        r.next_event()
    assert exc.value.tag is None
    assert r.next_event() == Noop(tag="a")


def test_starttls_discards_injected_commands() -> None:
    r = CommandReader()
    r.feed(b"a STARTTLS\r\nb LOGIN evil evil\r\n")
    assert r.next_event() is not None
    assert r.discard_buffered() == len(b"b LOGIN evil evil\r\n")
    assert r.next_event() is None


def test_empty_line_and_literal_content_with_crlf() -> None:
    r = CommandReader()
    r.feed(b"\r\n")
    with pytest.raises(ParseError) as exc:
        r.next_event()
    assert exc.value.tag is None
    r.feed(b"a FETCH 1 BODY[HEADER.FIELDS ({7+}\r\nSubject)]\r\n")
    ev = r.next_event()
    assert isinstance(ev, Fetch)
    r.feed(b"a LOGIN {5+}\r\na\r\nb\n \"x\"\r\n")  # CR/LF inside a literal user name: control chars ok there
    ev = r.next_event()
    assert isinstance(ev, Login) and ev.userid == "a\r\nb\n"


def test_binary_literal_signalled() -> None:
    r = CommandReader()
    r.feed(b"a UID FOO ~{3}\r\n")
    assert r.next_event() == NeedContinuation("a", "UID FOO", 3, True)
    r.accept_literal()
    r.feed(b"\x00\x01\x02\r\n")
    with pytest.raises(ParseError):
        r.next_event()
