"""Parser and reader transcripts (no sockets) for MULTIAPPEND (RFC 3502), CATENATE (RFC 4469),
UTF8=ACCEPT's APPEND form (RFC 6855) and WITHIN (RFC 5032)."""

from __future__ import annotations

import pytest

from postier.proto.imap import Append, CommandReader, NeedContinuation, ParseError, parse_command
from postier.proto.imap.commands import AppendMessage
from postier.proto.imap.reader import ReaderLimits


def p(data: bytes) -> Append:
    cmd = parse_command(data if data.endswith(b"\r\n") else data + b"\r\n")
    assert isinstance(cmd, Append)
    return cmd


# -- MULTIAPPEND (RFC 3502) ----------------------------------------------------------------------

def test_multiappend_messages_each_with_options() -> None:
    cmd = p(b'a APPEND Sent (\\Seen) {3}\r\nabc (\\Flagged $X) " 7-Feb-1994 21:52:25 -0800" {2}\r\nde ~{2}\r\nf\x00')
    msgs = cmd.messages
    assert [m.message for m in msgs] == [b"abc", b"de", b"f\x00"]
    assert msgs[0].flags == ("\\Seen",) and msgs[1].flags == ("\\Flagged", "$X") and msgs[2].flags == ()
    assert msgs[1].internal_date is not None and msgs[0].internal_date is None
    assert msgs[2].binary and not msgs[0].binary
    assert cmd.message == b"abc" and len(cmd.more) == 2  # the first message stays in the usual fields


def test_single_append_has_one_message() -> None:
    assert p(b"a APPEND INBOX {1}\r\nx").messages == (AppendMessage(message=b"x"),)


@pytest.mark.parametrize("bad", [
    b"a APPEND INBOX {1}\r\nx ",  # SP and nothing
    b"a APPEND INBOX {1}\r\nx  {1}\r\ny",  # two spaces
    b"a APPEND INBOX {1}\r\nx (\\Seen)",  # options without a message
    b"a APPEND INBOX {1}\r\nx junk",
])
def test_multiappend_malformed(bad: bytes) -> None:
    with pytest.raises(ParseError):
        p(bad)


def test_reader_asks_for_each_multiappend_literal() -> None:
    r = CommandReader(ReaderLimits.authenticated(1000))
    r.feed(b"a1 APPEND INBOX {3}\r\n")
    assert r.next_event() == NeedContinuation("a1", "APPEND", 3, False)
    r.accept_literal()
    r.feed(b"abc {4}\r\n")
    assert r.next_event() == NeedContinuation("a1", "APPEND", 4, False)
    r.accept_literal()
    r.feed(b"defg\r\n")
    ev = r.next_event()
    assert isinstance(ev, Append) and [m.message for m in ev.messages] == [b"abc", b"defg"]
