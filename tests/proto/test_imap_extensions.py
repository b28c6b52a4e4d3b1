"""Parser, reader and evaluator transcripts (no sockets) for MULTIAPPEND (RFC 3502), CATENATE (RFC 4469),
UTF8=ACCEPT's APPEND form (RFC 6855) and WITHIN (RFC 5032)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest

from postier.message.matching import SearchContext, evaluate

from postier.proto.imap import Append, CommandReader, NeedContinuation, ParseError, Search, parse_command
from postier.proto.imap.commands import AppendMessage, CatPart, Notify, NotifyGroup, Section
from postier.proto.imap.notify import plan as notify_plan
from postier.proto.imap.url import ImapUrl, UrlError, parse_url
from postier.proto.imap.reader import ReaderLimits
from postier.proto.imap.search import AndKey, NotKey, WithinKey
from postier.proto.imap.session import Refusal, SessionCore, SessionSettings


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


# -- CATENATE (RFC 4469) and IMAP URLs (RFC 5092) -------------------------------------------------

def test_catenate_parts() -> None:
    cmd = p(b'a APPEND Drafts (\\Draft) CATENATE (URL "/Drafts;UIDVALIDITY=385759045/;UID=20/;section=HEADER"'
            b" TEXT {4}\r\n\r\nhi URL /INBOX/;UID=3 UTF8 (~{2}\r\n\xc3\xa9))")
    assert cmd.flags == ("\\Draft",) and cmd.message == b""
    assert cmd.catenate == (
        CatPart("URL", url="/Drafts;UIDVALIDITY=385759045/;UID=20/;section=HEADER"),
        CatPart("TEXT", b"\r\nhi"), CatPart("URL", url="/INBOX/;UID=3"), CatPart("TEXT", b"\xc3\xa9"))


def test_catenate_part_count_is_bounded() -> None:
    assert len(p(b"a APPEND INBOX CATENATE (" + b" ".join([b"URL /A/;UID=1"] * 100) + b")").catenate or ()) == 100
    with pytest.raises(ParseError) as e:
        p(b"a APPEND INBOX CATENATE (" + b" ".join([b"URL /A/;UID=1"] * 101) + b")")
    assert e.value.code == "LIMIT" and e.value.status == "NO"


def test_catenate_in_a_multiappend() -> None:
    cmd = p(b"a APPEND INBOX {1}\r\nx CATENATE (TEXT {1}\r\ny)")
    assert cmd.messages[1].catenate == (CatPart("TEXT", b"y"),)


@pytest.mark.parametrize("bad", [
    b"a APPEND INBOX CATENATE ()", b"a APPEND INBOX CATENATE (TEXT \"quoted\")", b"a APPEND INBOX CATENATE (FOO x)",
    b"a APPEND INBOX CATENATE (URL /a/;UID=1", b"a APPEND INBOX CATENATE (URL \"\xc3\xa9\")",
    b"a APPEND INBOX UTF8 ({1}\r\nx)",  # UTF8 needs literal8
])
def test_catenate_malformed(bad: bytes) -> None:
    with pytest.raises(ParseError):
        p(bad)


@pytest.mark.parametrize(("text", "want"), [
    ("/INBOX;UIDVALIDITY=385759045/;UID=20/;section=HEADER",
     ImapUrl(20, "INBOX", 385759045, Section((), "HEADER"))),
    (";UID=3", ImapUrl(3)),
    ("imap://bob;AUTH=*@Mail.Example.org:143/Dr%C3%A4fts/;UID=2/;SECTION=1.MIME/;PARTIAL=5.10",
     ImapUrl(2, "Dräfts", None, Section((1,), "MIME"), (5, 10), "bob", "mail.example.org", 143)),
    ("/A/;UID=1/;SECTION=HEADER.FIELDS%20(To%20From)/;PARTIAL=7",
     ImapUrl(1, "A", None, Section((), "HEADER.FIELDS", ("TO", "FROM")), (7, None))),
])
def test_url_forms(text: str, want: ImapUrl) -> None:
    assert parse_url(text) == want


@pytest.mark.parametrize("bad", [
    "", "/INBOX", "/INBOX/", "/INBOX/;UID=0", "/INBOX/;UID=x", "/INBOX/;SECTION=1/;UID=2", "/INBOX/;UID=1/;UID=2",
    "/INBOX/;UID=1/;URLAUTH=anonymous:internal:abc", "/INBOX/;UID=1/;EXPIRE=2030-01-01T00:00:00Z",
    "/INBOX/;UID=1/;SECTION=1.FOO", "/INBOX/;UID=1/;PARTIAL=1.0", "/INBOX?SUBJECT%20x", "/%FF/;UID=1",
    "/INBOX;UIDVALIDITY=0/;UID=1", "http://host/INBOX/;UID=1", "imap://host", "/IN BOX/;UID=1", ";SECTION=1",
])
def test_url_refused(bad: str) -> None:
    with pytest.raises(UrlError):
        parse_url(bad)


# -- UTF8=ACCEPT (RFC 6855) -----------------------------------------------------------------------

def test_enable_utf8_accept_turns_names_to_utf8() -> None:
    core = SessionCore(SessionSettings(False, True, 1000))
    core.logged_in()
    assert "UTF8=ACCEPT" in core.capabilities() and not core.utf8
    assert core.enable(["UTF8=ACCEPT"]) == b"* ENABLED UTF8=ACCEPT\r\n"
    assert core.utf8 and core.utf8_accept and not core.rev2  # \\Recent and the rest stay IMAP4rev1
    assert core.enable(["UTF8=ACCEPT"]) == b"* ENABLED\r\n"


def test_utf8_names_only_after_enabling() -> None:
    raw = 'a CREATE "Entwürfe"\r\n'.encode()
    r = CommandReader()
    r.feed(raw)
    with pytest.raises(ParseError):  # modified UTF-7 expected: 8-bit is not a valid mUTF-7 name
        r.next_event()
    r.utf8 = True  # what the server sets after ENABLE UTF8=ACCEPT
    r.feed(raw)
    assert r.next_event() == parse_command(raw, utf8=True)
    assert parse_command(raw, utf8=True).mailbox == "Entwürfe"  # type: ignore[attr-defined]


def test_utf8_append_form() -> None:
    msg = "Subject: Grüße\r\n\r\nhi\r\n".encode()
    cmd = p(b"a APPEND INBOX (\\Seen) UTF8 (~{%d}\r\n%s)" % (len(msg), msg))
    assert cmd.message == msg and cmd.utf8 and cmd.binary and cmd.flags == ("\\Seen",)


# -- WITHIN (RFC 5032) ----------------------------------------------------------------------------

def test_older_younger_parse() -> None:
    cmd = parse_command(b"a UID SEARCH OLDER 3600 NOT YOUNGER 60\r\n")
    assert isinstance(cmd, Search)
    assert cmd.criteria == AndKey((WithinKey("OLDER", 3600), NotKey(WithinKey("YOUNGER", 60))))
    for bad in (b"a SEARCH OLDER 0\r\n", b"a SEARCH YOUNGER\r\n", b"a SEARCH OLDER -5\r\n", b"a SEARCH OLDER x\r\n"):
        with pytest.raises(ParseError):
            parse_command(bad)


@dataclass
class _View:
    internal_date: dt.datetime
    seq: int = 1
    uid: int = 1
    flags: frozenset[str] = frozenset()
    size: int = 10
    modseq: int = 1

    def raw(self) -> bytes:
        return b""


@pytest.mark.parametrize(("age", "older", "younger"), [(0, False, True), (99, False, True), (100, True, True),
                                                        (101, True, False), (86400, True, False)])
def test_older_younger_evaluate_to_the_second(age: int, older: bool, younger: bool) -> None:
    now = 1_700_000_000.0
    view = _View(dt.datetime.fromtimestamp(now - age, dt.UTC))
    ctx = SearchContext(max_seq=1, max_uid=1, now=now)
    assert evaluate(WithinKey("OLDER", 100), view, ctx) is older
    assert evaluate(WithinKey("YOUNGER", 100), view, ctx) is younger


# -- APPEND literals spooled to a file (bounded memory) -------------------------------------------

class _Sink:
    """A SpooledLiteral that counts what it is given (the server's is a file in Maildir tmp/)."""

    def __init__(self, size: int) -> None:
        self.announced = size
        self.size = 0
        self.chunks = 0
        self.biggest = 0
        self.discarded = False
        self.head = b""

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.chunks += 1
        self.biggest = max(self.biggest, len(data))
        self.head = (self.head + data)[:64]

    def discard(self) -> None:
        self.discarded = True


def _spooling_reader(append_limit: int = 50 << 20) -> tuple[CommandReader, list[_Sink]]:
    r = CommandReader(ReaderLimits.authenticated(append_limit))
    sinks: list[_Sink] = []

    def spool(size: int) -> _Sink:
        sinks.append(_Sink(size))
        return sinks[-1]

    r.spool = spool
    return r, sinks


def test_large_append_literal_never_held_in_memory() -> None:
    r, sinks = _spooling_reader()
    total, chunk = 20 << 20, 64 * 1024
    r.feed(b"a1 APPEND INBOX (\\Seen) {%d}\r\n" % total)
    assert r.next_event() == NeedContinuation("a1", "APPEND", total, False)
    r.accept_literal()
    most = 0
    block = b"Subject: big\r\n\r\n" + b"x" * (chunk - 16)
    for _ in range(total // chunk):
        r.feed(block)
        assert r.next_event() is None
        most = max(most, r.held)
    r.feed(b"\r\n")
    ev = r.next_event()
    assert isinstance(ev, Append) and ev.message is sinks[0] and ev.flags == ("\\Seen",)
    assert sinks[0].size == total and sinks[0].biggest <= chunk and not sinks[0].discarded
    assert most < 2 * 1024  # the command line only: no octet of the literal stays in the reader


def test_small_literals_stay_in_memory_and_mix_with_spooled() -> None:
    r, sinks = _spooling_reader()
    big = b"y" * (64 * 1024)
    r.feed(b"a1 APPEND INBOX {3+}\r\nabc {%d+}\r\n%s UTF8 (~{%d+}\r\n%s)\r\n" % (len(big), big, len(big), big))
    ev = r.next_event()
    assert isinstance(ev, Append)
    assert ev.messages[0].message == b"abc" and ev.messages[1].message is sinks[0] and ev.messages[2].message is sinks[1]
    assert [s.size for s in sinks] == [len(big)] * 2


def test_only_append_message_literals_are_spooled() -> None:
    r, sinks = _spooling_reader()
    big = b"z" * (64 * 1024)
    r.feed(b"a1 ID (\"x\" {%d+}\r\n%s)\r\n" % (len(big), big))
    ev = r.next_event()
    assert not sinks and ev is not None
    r.feed(b"a2 APPEND {%d+}\r\n%s {1+}\r\nx\r\n" % (len(big), big))  # a (huge) mailbox name is no message
    with pytest.raises(ParseError) as e:
        r.next_event()
    assert e.value.code == "TOOBIG" and sinks[0].discarded


def test_spooled_literals_discarded_on_errors() -> None:
    big = b"w" * (64 * 1024)
    r, sinks = _spooling_reader()
    r.feed(b"a1 APPEND INBOX {%d+}\r\n%s junk\r\n" % (len(big), big))  # parse error after the literal
    with pytest.raises(ParseError):
        r.next_event()
    assert sinks[0].discarded
    r.feed(b"a2 APPEND INBOX {%d+}\r\n%s {%d}\r\n" % (len(big), big, len(big)))
    assert isinstance(r.next_event(), NeedContinuation)
    r.reject_literal()  # e.g. the second message is over APPENDLIMIT: the first one's file goes too
    assert sinks[1].discarded
    r.feed(b"a3 APPEND INBOX {%d+}\r\n%s" % (len(big), big[:1000]))
    assert r.next_event() is None
    r.close()  # the connection ends mid-literal
    assert sinks[2].discarded and sinks[2].size == 1000


def test_spooled_total_is_bounded() -> None:
    r, sinks = _spooling_reader(append_limit=100_000)  # 4 x 100000 octets may be spooled
    msg = b"v" * 90_000
    r.feed(b"a1 APPEND INBOX" + b"".join(b" {%d+}\r\n%s" % (len(msg), msg) for _ in range(5)) + b"\r\n")
    with pytest.raises(ParseError) as e:
        r.next_event()
    assert e.value.code == "TOOBIG" and len(sinks) == 4 and all(s.discarded for s in sinks)
    r.feed(b"a2 NOOP\r\n")  # resynchronised: the refused {n+} literal was skipped
    assert r.next_event() == parse_command(b"a2 NOOP\r\n")


# -- NOTIFY (RFC 5465) ----------------------------------------------------------------------------

def test_notify_parse_and_plan() -> None:
    cmd = parse_command(b"a NOTIFY SET STATUS (SELECTED (MessageNew (UID BODY.PEEK[HEADER]) MessageExpunge FlagChange))"
                        b" (SUBTREE (Lists INBOX) (MessageNew MessageExpunge)) (SUBSCRIBED (MailboxName))"
                        b" (PERSONAL NONE)\r\n")
    assert isinstance(cmd, Notify) and cmd.status and len(cmd.groups) == 4
    assert cmd.groups[1] == NotifyGroup("SUBTREE", ("Lists", "INBOX"), ("MessageNew", "MessageExpunge"))
    plan = notify_plan(cmd)
    assert plan.selected == {"MESSAGENEW", "MESSAGEEXPUNGE", "FLAGCHANGE"} and not plan.delayed
    assert [a.name for a in plan.fetch] == ["UID", "BODY"]
    subs = {"Notes"}
    assert plan.events_for("Lists.ietf", subs, ".") == {"MESSAGENEW", "MESSAGEEXPUNGE"}
    assert plan.events_for("Listsx", subs, ".") == frozenset()  # not under Lists: PERSONAL NONE
    assert plan.events_for("Notes", subs, ".") == {"MAILBOXNAME"}
    assert plan.wants_names
    assert parse_command(b"a NOTIFY NONE\r\n") == Notify(tag="a", none=True)


@pytest.mark.parametrize(("text", "status"), [
    (b"a NOTIFY SET (PERSONAL (MessageNew))", "BAD"),
    (b"a NOTIFY SET (PERSONAL (MessageExpunge FlagChange))", "BAD"),
    (b"a NOTIFY SET (PERSONAL (FlagChange))", "BAD"),
    (b"a NOTIFY SET (INBOXES (MessageNew (UID) MessageExpunge))", "BAD"),
    (b"a NOTIFY SET (SELECTED NONE) (SELECTED-DELAYED NONE)", "BAD"),
    (b"a NOTIFY SET (PERSONAL (Nonsense))", "BAD"),
    (b"a NOTIFY SET (PERSONAL (MailboxMetadataChange))", "NO"),
])
def test_notify_plan_refusals(text: bytes, status: str) -> None:
    cmd = parse_command(text + b"\r\n")
    assert isinstance(cmd, Notify)
    with pytest.raises(Refusal) as e:
        notify_plan(cmd)
    assert e.value.status == status
    if status == "NO":
        assert e.value.code is not None and e.value.code.atom == "BADEVENT"


@pytest.mark.parametrize("bad", [b"a NOTIFY", b"a NOTIFY SET", b"a NOTIFY SET ()", b"a NOTIFY SET (ELSEWHERE NONE)",
                                 b"a NOTIFY SET (MAILBOXES NONE)", b"a NOTIFY SET (PERSONAL ())", b"a NOTIFY OFF"])
def test_notify_malformed(bad: bytes) -> None:
    with pytest.raises(ParseError):
        parse_command(bad + b"\r\n")
