"""Transcripts: one client command's bytes -> the typed Command (RFC 9051 §6 and extensions)."""

from __future__ import annotations

import datetime as dt

import pytest

from postier.proto.imap import (
    Append,
    Authenticate,
    Capability,
    Check,
    Close,
    Copy,
    Create,
    Delete,
    Enable,
    Examine,
    Expunge,
    Fetch,
    FetchAttr,
    Id,
    Idle,
    List,
    ListReturn,
    Login,
    Logout,
    Lsub,
    Move,
    Namespace,
    Noop,
    ParseError,
    QResync,
    Rename,
    Search,
    Section,
    Select,
    SequenceSet,
    StartTLS,
    Status,
    Store,
    StoreMode,
    Subscribe,
    Unselect,
    Unsubscribe,
    parse_command,
)
from postier.proto.imap.search import (
    AllKey,
    AndKey,
    DateKey,
    FlagKey,
    HeaderKey,
    ModSeqKey,
    NotKey,
    OrKey,
    SeqSetKey,
    SizeKey,
    TextKey,
)


def p(line: bytes, **kw: bool) -> object:
    return parse_command(line + b"\r\n", **kw)


def S(text: str) -> SequenceSet:
    return SequenceSet.parse(text)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"a CAPABILITY", Capability(tag="a")),
        (b"a noop", Noop(tag="a")),
        (b"a LOGOUT", Logout(tag="a")),
        (b"a STARTTLS", StartTLS(tag="a")),
        (b"a NAMESPACE", Namespace(tag="a")),
        (b"a IDLE", Idle(tag="a")),
        (b"a CHECK", Check(tag="a")),
        (b"a CLOSE", Close(tag="a")),
        (b"a UNSELECT", Unselect(tag="a")),
        (b"a EXPUNGE", Expunge(tag="a")),
        (b"a UID EXPUNGE 3:5", Expunge(tag="a", uid=True, sequence_set=S("3:5"))),
        (b"A001 LOGIN fred \"my \\\"secret\\\"\"", Login(tag="A001", userid="fred", password='my "secret"')),
        (b"a LOGIN {4+}\r\nfred {3+}\r\npw\xc3", None),  # invalid UTF-8 password -> BAD
        (b"a AUTHENTICATE PLAIN", Authenticate(tag="a", mechanism="PLAIN")),
        (b"a AUTHENTICATE plain AGZyZWQAcHc=",
         Authenticate(tag="a", mechanism="PLAIN", initial_response=b"\x00fred\x00pw")),
        (b"a AUTHENTICATE EXTERNAL =", Authenticate(tag="a", mechanism="EXTERNAL", initial_response=b"")),
        (b"a AUTHENTICATE PLAIN !!", None),
        (b"a ENABLE CONDSTORE utf8=accept", Enable(tag="a", capabilities=("CONDSTORE", "UTF8=ACCEPT"))),
        (b"a ENABLE", None),
        (b"a SELECT inbox", Select(tag="a", mailbox="INBOX")),
        (b"a EXAMINE \"Entw&APw-rfe\"", Examine(tag="a", mailbox="Entwürfe")),
        (b"a SELECT INBOX (CONDSTORE)", Select(tag="a", mailbox="INBOX", condstore=True)),
        (b"a SELECT INBOX (QRESYNC (67890007 20050715194045000 41,43:211,214:541))",
         Select(tag="a", mailbox="INBOX", qresync=QResync(67890007, 20050715194045000, S("41,43:211,214:541")))),
        (b"a SELECT INBOX (QRESYNC (67890007 90060115194045000 1:29997 (5000,7500,9000,9990:9999 "
         b"15000,22500,27000,29970,29973,29976,29979,29982,29985,29988,29991,29994,29997)))",
         Select(tag="a", mailbox="INBOX", qresync=QResync(
             67890007, 90060115194045000, S("1:29997"), S("5000,7500,9000,9990:9999"),
             S("15000,22500,27000,29970,29973,29976,29979,29982,29985,29988,29991,29994,29997")))),
        (b"a SELECT INBOX (FOO)", None),
        (b"a CREATE owatagusiam/", Create(tag="a", mailbox="owatagusiam/")),
        (b"a CREATE MySpecialArchive (USE (\\Archive))",
         Create(tag="a", mailbox="MySpecialArchive", special_use=("\\Archive",))),
        (b"a CREATE x (USE (\\Drafts \\Sent))", Create(tag="a", mailbox="x", special_use=("\\Drafts", "\\Sent"))),
        (b"a DELETE blurdybloop", Delete(tag="a", mailbox="blurdybloop")),
        (b"a RENAME blurdybloop sarasoop", Rename(tag="a", mailbox="blurdybloop", new_mailbox="sarasoop")),
        (b"a SUBSCRIBE #news.comp.mail.mime", Subscribe(tag="a", mailbox="#news.comp.mail.mime")),
        (b"a UNSUBSCRIBE {4}\r\nabcd", Unsubscribe(tag="a", mailbox="abcd")),
        (b"a LIST \"\" *", List(tag="a", reference="", patterns=("*",))),
        (b"a LIST ~/Mail/ %", List(tag="a", reference="~/Mail/", patterns=("%",))),
        (b"a LIST \"\" \"\"", List(tag="a", reference="", patterns=("",))),
        (b"a LIST (SUBSCRIBED RECURSIVEMATCH) \"\" (\"%\" \"Lists/*\") RETURN (CHILDREN STATUS (MESSAGES UNSEEN))",
         List(tag="a", reference="", patterns=("%", "Lists/*"),
              selection=frozenset({"SUBSCRIBED", "RECURSIVEMATCH"}),
              returns=ListReturn(children=True, status=("MESSAGES", "UNSEEN")), extended=True)),
        (b"a LIST \"\" % RETURN (SPECIAL-USE SUBSCRIBED)",
         List(tag="a", reference="", patterns=("%",), returns=ListReturn(subscribed=True, special_use=True),
              extended=True)),
        (b"a LIST (SPECIAL-USE) \"\" *",
         List(tag="a", reference="", patterns=("*",), selection=frozenset({"SPECIAL-USE"}), extended=True)),
        (b"a LIST (RECURSIVEMATCH) \"\" *", None),
        (b"a LIST \"\" % RETURN (FOO)", None),
        (b"a LSUB \"#news.\" \"comp.mail.*\"", Lsub(tag="a", reference="#news.", pattern="comp.mail.*")),
        (b"a STATUS blurdybloop (UIDNEXT MESSAGES HIGHESTMODSEQ SIZE)",
         Status(tag="a", mailbox="blurdybloop", items=("UIDNEXT", "MESSAGES", "HIGHESTMODSEQ", "SIZE"))),
        (b"a STATUS x (FOO)", None),
        (b"a STATUS x ()", None),
        (b"a COPY 2:4 MEETING", Copy(tag="a", sequence_set=S("2:4"), mailbox="MEETING")),
        (b"a UID COPY 2:4 MEETING", Copy(tag="a", uid=True, sequence_set=S("2:4"), mailbox="MEETING")),
        (b"a MOVE 1:* Trash", Move(tag="a", sequence_set=S("1:*"), mailbox="Trash")),
        (b"a UID MOVE $ Trash", Move(tag="a", uid=True, sequence_set=S("$"), mailbox="Trash")),
        (b"a ID NIL", Id(tag="a", params=None)),
        (b"a ID (\"name\" \"sodr\" \"version\" NIL)", Id(tag="a", params=(("name", "sodr"), ("version", None)))),
        (b"a ID ()", Id(tag="a", params=())),
        (b"a FOO", None),
        (b"a UID LOGIN x y", None),
        (b"a NOOP extra", None),
        (b"* NOOP", None),
        (b"+a NOOP", None),
    ],
)
def test_simple_commands(line: bytes, expected: object) -> None:
    if expected is None:
        with pytest.raises(ParseError):
            p(line)
    else:
        assert p(line) == expected


def test_error_carries_tag() -> None:
    with pytest.raises(ParseError) as exc:
        p(b"t1 FROB x")
    assert exc.value.tag == "t1" and exc.value.status == "BAD"
    with pytest.raises(ParseError) as exc:
        p(b"(bad) NOOP")
    assert exc.value.tag is None


def test_mailbox_names_utf8_and_mutf7() -> None:
    assert p(b'a SELECT "Entw&APw-rfe"').mailbox == "Entwürfe"  # type: ignore[attr-defined]
    assert p("a SELECT \"Entwürfe\"".encode(), utf8=True).mailbox == "Entwürfe"  # type: ignore[attr-defined]
    assert p(b'a SELECT "Entw&APw-rfe"', utf8=True).mailbox == "Entw&APw-rfe"  # type: ignore[attr-defined]
    with pytest.raises(ParseError):
        p("a SELECT \"Entwürfe\"".encode())  # 8-bit in rev1
    with pytest.raises(ParseError):
        p(b'a SELECT "a&b"')  # bad mUTF-7
    with pytest.raises(ParseError):
        p(b"a SELECT {3}\r\na\nb")  # control character
    assert p(b"a LIST \"\" \"&ZeVnLIqe-/*\"").patterns == ("日本語/*",)  # type: ignore[attr-defined]


def test_append() -> None:
    cmd = p(b'a APPEND saved-messages (\\Seen $Forwarded) " 7-Feb-1994 21:52:25 -0800" {5}\r\nhello')
    assert cmd == Append(
        tag="a", mailbox="saved-messages", flags=("\\Seen", "$Forwarded"),
        internal_date=dt.datetime(1994, 2, 7, 21, 52, 25, tzinfo=dt.timezone(dt.timedelta(hours=-8))),
        message=b"hello",
    )
    assert p(b"a APPEND INBOX ~{3}\r\na\x00b") == Append(tag="a", mailbox="INBOX", message=b"a\x00b", binary=True)
    assert p(b'a APPEND INBOX () "17-Jul-1996 02:44:25 +0000" {0}\r\n').flags == ()  # type: ignore[attr-defined]
    for bad in (b'a APPEND INBOX "hello"', b"a APPEND INBOX (\\Recent) {1}\r\nx",
                b'a APPEND INBOX "31-Feb-1994 21:52:25 -0800" {1}\r\nx', b"a APPEND INBOX {1}\r\nx extra"):
        with pytest.raises(ParseError):
            p(bad)


def B(section: Section | None = None, partial: tuple[int, int] | None = None, peek: bool = False) -> FetchAttr:
    return FetchAttr("BODY", section, partial, peek)


@pytest.mark.parametrize(
    ("line", "attrs"),
    [
        (b"a FETCH 1 ALL", ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE")),
        (b"a FETCH 1 fast", ("FLAGS", "INTERNALDATE", "RFC822.SIZE")),
        (b"a FETCH 1 FULL", ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY")),
        (b"a FETCH 1 (UID RFC822.SIZE FLAGS BODYSTRUCTURE MODSEQ RFC822 RFC822.HEADER RFC822.TEXT)",
         ("UID", "RFC822.SIZE", "FLAGS", "BODYSTRUCTURE", "MODSEQ", "RFC822", "RFC822.HEADER", "RFC822.TEXT")),
        (b"a FETCH 1 envelope", ("ENVELOPE",)),
    ],
)
def test_fetch_simple(line: bytes, attrs: tuple[str, ...]) -> None:
    cmd = p(line)
    assert isinstance(cmd, Fetch)
    assert tuple(a.name for a in cmd.attributes) == attrs


def test_fetch_sections() -> None:
    cmd = p(b"a UID FETCH 1:*,5 (BODY[] BODY.PEEK[HEADER.FIELDS (From \"To\" {2+}\r\nCc)]<0.2048> "
            b"BODY[1.2.MIME] BODY[2.HEADER.FIELDS.NOT (X-Foo)] BODY[3.TEXT] BODY[4] BODY[TEXT]<5.10> "
            b"BINARY.PEEK[1]<0.100> BINARY[] BINARY.SIZE[2.1]) (CHANGEDSINCE 12345 VANISHED)")
    assert isinstance(cmd, Fetch)
    assert cmd.uid and cmd.changedsince == 12345 and cmd.vanished
    assert cmd.sequence_set == S("1:*,5")
    assert cmd.attributes == (
        B(Section()),
        B(Section((), "HEADER.FIELDS", ("FROM", "TO", "CC")), (0, 2048), peek=True),
        B(Section((1, 2), "MIME")),
        B(Section((2,), "HEADER.FIELDS.NOT", ("X-FOO",))),
        B(Section((3,), "TEXT")),
        B(Section((4,))),
        B(Section((), "TEXT"), (5, 10)),
        FetchAttr("BINARY", Section((1,)), (0, 100), peek=True),
        FetchAttr("BINARY", Section()),
        FetchAttr("BINARY.SIZE", Section((2, 1))),
    )
    names = [a.response_name for a in cmd.attributes]
    assert names == ["BODY[]", "BODY[HEADER.FIELDS (FROM TO CC)]<0>", "BODY[1.2.MIME]",
                     "BODY[2.HEADER.FIELDS.NOT (X-FOO)]", "BODY[3.TEXT]", "BODY[4]", "BODY[TEXT]<5>",
                     "BINARY[1]<0>", "BINARY[]", "BINARY.SIZE[2.1]"]
    assert [a.sets_seen for a in cmd.attributes] == [True, False, True, True, True, True, True, False, True, False]


@pytest.mark.parametrize(
    "line",
    [
        b"a FETCH 1 (BODY[MIME])", b"a FETCH 1 BODY[1.]", b"a FETCH 1 BODY[0]", b"a FETCH 1 BODY[HEADER.FIELDS]",
        b"a FETCH 1 BODY[HEADER.FIELDS ()]", b"a FETCH 1 BINARY[1.TEXT]", b"a FETCH 1 BODY[1]<0.0>",
        b"a FETCH 1 BODY.PEEK", b"a FETCH 1 (ALL)", b"a FETCH 1 FOO", b"a FETCH 0 FLAGS", b"a FETCH 1:x FLAGS",
        b"a FETCH 1 (FLAGS) (VANISHED)", b"a UID FETCH 1 (FLAGS) (VANISHED)", b"a FETCH 1 (FLAGS",
        b"a FETCH 1 BODY[HEADER.FIELDS (a:b)]", b"a FETCH 4294967296 FLAGS", b"a FETCH 1 (FLAGS) (FOO 1)",
    ],
)
def test_fetch_errors(line: bytes) -> None:
    with pytest.raises(ParseError) as exc:
        p(line)
    assert exc.value.tag == "a"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"a STORE 2:4 +FLAGS (\\Deleted)",
         Store(tag="a", sequence_set=S("2:4"), mode=StoreMode.ADD, flags=("\\Deleted",))),
        (b"a UID STORE 1 -FLAGS.SILENT \\seen $Junk",
         Store(tag="a", uid=True, sequence_set=S("1"), mode=StoreMode.REMOVE, silent=True,
               flags=("\\Seen", "$Junk"))),
        (b"a STORE 1:* flags ()", Store(tag="a", sequence_set=S("1:*"))),
        (b"a STORE 7,5,9 (UNCHANGEDSINCE 320162338) +FLAGS.SILENT (\\Deleted)",
         Store(tag="a", sequence_set=S("7,5,9"), mode=StoreMode.ADD, silent=True, flags=("\\Deleted",),
               unchangedsince=320162338)),
        (b"a STORE 1 +FLAGS (\\Recent)", None),
        (b"a STORE 1 FLAGGED (\\Seen)", None),
        (b"a STORE 1 +FLAGS", None),
    ],
)
def test_store(line: bytes, expected: object) -> None:
    if expected is None:
        with pytest.raises(ParseError):
            p(line)
    else:
        assert p(line) == expected


def search(line: bytes, **kw: bool) -> Search:
    cmd = p(line, **kw)
    assert isinstance(cmd, Search)
    return cmd


def test_search_keys() -> None:
    cmd = search(b"a SEARCH FLAGGED SINCE 1-Feb-1994 NOT FROM \"Smith\"")
    assert cmd.returns is None and cmd.charset is None
    assert cmd.criteria == AndKey((
        FlagKey("\\Flagged"),
        DateKey("INTERNAL", "SINCE", dt.date(1994, 2, 1)),
        NotKey(HeaderKey("FROM", "Smith")),
    ))
    assert search(b"a SEARCH ALL").criteria == AllKey()
    assert search(b"a UID SEARCH 1:*").criteria == SeqSetKey(S("1:*"))
    assert search(b"a SEARCH OR SEEN (UNSEEN NEW) UID $").criteria == AndKey((
        OrKey(FlagKey("\\Seen"), AndKey((FlagKey("\\Seen", False), AndKey((FlagKey("\\Recent"),
                                                                           FlagKey("\\Seen", False)))))),
        SeqSetKey(S("$"), uid=True),
    ))
    assert search(b"a SEARCH HEADER Message-ID \"<x@y>\" LARGER 100 SMALLER 2000 KEYWORD $Junk "
                  b"UNKEYWORD foo SENTON \"2-Mar-2020\" SENTBEFORE 1-Jan-2021 BEFORE 3-Mar-2020 ON 4-Apr-2020 "
                  b"TO a CC b BCC c SUBJECT d BODY e TEXT f OLD RECENT ANSWERED UNANSWERED DELETED UNDELETED "
                  b"DRAFT UNDRAFT UNFLAGGED MODSEQ 5 MODSEQ \"/flags/\\\\draft\" all 620162338").criteria == AndKey((
        HeaderKey("MESSAGE-ID", "<x@y>"), SizeKey("LARGER", 100), SizeKey("SMALLER", 2000),
        FlagKey("$Junk"), FlagKey("foo", False), DateKey("SENT", "ON", dt.date(2020, 3, 2)),
        DateKey("SENT", "BEFORE", dt.date(2021, 1, 1)), DateKey("INTERNAL", "BEFORE", dt.date(2020, 3, 3)),
        DateKey("INTERNAL", "ON", dt.date(2020, 4, 4)), HeaderKey("TO", "a"), HeaderKey("CC", "b"),
        HeaderKey("BCC", "c"), HeaderKey("SUBJECT", "d"), TextKey("BODY", "e"), TextKey("TEXT", "f"),
        FlagKey("\\Recent", False), FlagKey("\\Recent"), FlagKey("\\Answered"), FlagKey("\\Answered", False),
        FlagKey("\\Deleted"), FlagKey("\\Deleted", False), FlagKey("\\Draft"), FlagKey("\\Draft", False),
        FlagKey("\\Flagged", False), ModSeqKey(5), ModSeqKey(620162338, "/flags/\\draft", "all"),
    ))


def test_search_return_and_charset() -> None:
    cmd = search(b"a UID SEARCH RETURN (MIN MAX COUNT SAVE) CHARSET utf-8 SUBJECT {4}\r\n\xc3\xa9t\xc3")
    assert cmd.uid and cmd.returns == ("MIN", "MAX", "COUNT", "SAVE") and cmd.charset == "UTF-8"
    assert cmd.criteria == HeaderKey("SUBJECT", "ét\ufffd")
    assert search(b"a SEARCH RETURN () ALL").returns == ("ALL",)
    assert search(b"a SEARCH CHARSET ISO-8859-1 BODY \"\xe9\"").criteria == TextKey("BODY", "é")
    with pytest.raises(ParseError) as exc:
        search(b"a SEARCH CHARSET X-NOPE ALL")
    assert exc.value.code == "BADCHARSET" and exc.value.status == "NO"
    with pytest.raises(ParseError):
        search(b"a SEARCH CHARSET rot13 ALL")
    with pytest.raises(ParseError):
        search(b"a SEARCH RETURN (PARTIAL) ALL")


@pytest.mark.parametrize(
    "line",
    [b"a SEARCH", b"a SEARCH FOO", b"a SEARCH OR SEEN", b"a SEARCH (SEEN", b"a SEARCH SINCE 32-Jan-2020",
     b"a SEARCH SINCE 1-Foo-2020", b"a SEARCH  SEEN", b"a SEARCH SEEN ", b"a SEARCH HEADER a:b c",
     b"a SEARCH MODSEQ \"/flags/x\" bogus 5", b"a SEARCH LARGER x", b"a SEARCH 1:x"],
)
def test_search_errors(line: bytes) -> None:
    with pytest.raises(ParseError):
        p(line)


def test_search_depth_bounded() -> None:
    deep = b"a SEARCH " + b"(" * 40 + b"SEEN" + b")" * 40
    with pytest.raises(ParseError):
        p(deep)
    nots = b"a SEARCH " + b"NOT " * 1000 + b"SEEN"
    with pytest.raises(ParseError):
        p(nots)
    ok = b"a SEARCH " + b"(" * 10 + b"SEEN" + b")" * 10
    assert search(ok).criteria == FlagKey("\\Seen")


REAL_CLIENT_LINES = [
    # Thunderbird
    b'1 capability', b'2 ID ("name" "Thunderbird" "version" "128.5.0")', b"3 authenticate PLAIN",
    b'4 select "INBOX" (CONDSTORE)', b"5 UID fetch 1:* (FLAGS)",
    b"6 UID fetch 5:7 (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS (From To Cc Bcc Subject Date Message-ID "
    b"Priority X-Priority References Newsgroups In-Reply-To Content-Type Reply-To)])",
    b'7 STATUS "Sent" (UIDNEXT MESSAGES UNSEEN RECENT HIGHESTMODSEQ)', b'8 list (SUBSCRIBED) "" "*" RETURN (SPECIAL-USE)',
    b"9 UID store 5 +FLAGS (\\Seen)", b'10 UID MOVE 5 "Trash"', b"11 IDLE", b"12 UID fetch 5 (UID RFC822.SIZE BODY.PEEK[])",
    b"13 UID fetch 5 (UID RFC822.SIZE BODY.PEEK[1.2.MIME] BODY.PEEK[1.2]<0.16384>)", b"14 namespace",
    b'15 UID fetch 1:* (FLAGS) (CHANGEDSINCE 1234)', b"16 UID EXPUNGE 5:7", b'17 LIST "" "%" RETURN (CHILDREN)',
    # mutt
    b"a0001 UID FETCH 1:* (UID FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[HEADER.FIELDS (DATE FROM SENDER SUBJECT "
    b"TO CC MESSAGE-ID REFERENCES CONTENT-TYPE CONTENT-DESCRIPTION IN-REPLY-TO REPLY-TO LINES LIST-POST "
    b"X-LABEL X-ORIGINAL-TO)])",
    b'a0002 LSUB "" "*"', b"a0003 UID STORE 1:3,7 +FLAGS.SILENT (\\Deleted)", b"a0004 CLOSE",
    b'a0005 APPEND "Sent" (\\Seen) " 1-Feb-2024 09:00:00 +0100" {5+}\r\nhello',
    # mbsync (isync)
    b'5 UID FETCH 1:1000000000 (UID FLAGS BODY.PEEK[HEADER.FIELDS (X-TUID)])', b"6 UID FETCH 42 (BODY.PEEK[])",
    b'7 APPEND "INBOX" (\\Seen) {3+}\r\nabc', b'8 CREATE "Archive/2024"', b"9 UID STORE 42 -FLAGS.SILENT (\\Flagged)",
    # imaplib / imapclient
    b"IMPK1 SEARCH ALL", b"IMPK2 UID SEARCH CHARSET UTF-8 SUBJECT {6}\r\nGr\xc3\xbc\xc3\x9f", b"IMPK3 UID SEARCH UNSEEN",
    b"IMPK4 FETCH 1 (RFC822)", b"IMPK5 ENABLE UTF8=ACCEPT", b"IMPK6 UNSELECT",
    b'IMPK7 SEARCH SINCE 01-Feb-2024 NOT FROM "bob"',
    # Apple Mail, K-9, Outlook
    b"A1 UID SEARCH 1:* NOT DELETED", b'A2 EXAMINE "INBOX" (QRESYNC (1 2 1:10))',
    b"A3 UID FETCH 1:* (FLAGS) (CHANGEDSINCE 5 VANISHED)", b"A4 LOGIN user@example.com \"p@ss w0rd\"",
    b'A5 LIST "" "*"', b"A6 UID COPY 1:5 Archive", b'A7 SEARCH RETURN (SAVE) SEEN', b"A8 UID SEARCH RETURN (ALL) UID $",
]


@pytest.mark.parametrize("line", REAL_CLIENT_LINES)
def test_real_client_lines(line: bytes) -> None:
    cmd = p(line)
    assert cmd.tag == line.split(b" ", 1)[0].decode()
