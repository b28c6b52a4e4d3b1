"""Response serialisation: structure -> exact bytes (RFC 9051 §7)."""

from __future__ import annotations

import datetime as dt

from postier.proto.imap import SequenceSet
from postier.proto.imap import response as r
from postier.proto.imap.response import Atom, Code, Literal, Literal8, Raw


def test_status_responses() -> None:
    assert r.tagged("a1", "OK", "LOGIN completed") == b"a1 OK LOGIN completed\r\n"
    assert r.tagged("a2", "NO", "Mailbox exists", Code.ALREADYEXISTS) == b"a2 NO [ALREADYEXISTS] Mailbox exists\r\n"
    assert r.tagged("a3", "OK", "done", Code.appenduid(38505, 3955)) == b"a3 OK [APPENDUID 38505 3955] done\r\n"
    assert (r.tagged("a4", "OK", "Done", Code.copyuid(38505, SequenceSet.parse("304,319:320"),
                                                      SequenceSet.from_ids([3956, 3957, 3958])))
            == b"a4 OK [COPYUID 38505 304,319:320 3956:3958] Done\r\n")
    assert r.untagged_status("OK", "Limited", Code.permanentflags(["\\Deleted", "\\Seen", "\\*"])) == (
        b"* OK [PERMANENTFLAGS (\\Deleted \\Seen \\*)] Limited\r\n")
    assert r.untagged_status("OK", "x", Code.uidnext(5)) == b"* OK [UIDNEXT 5] x\r\n"
    assert r.untagged_status("OK", "x", Code.uidvalidity(3857529045)) == b"* OK [UIDVALIDITY 3857529045] x\r\n"
    assert r.untagged_status("OK", "x", Code.highestmodseq(715194045007)) == b"* OK [HIGHESTMODSEQ 715194045007] x\r\n"
    assert r.untagged_status("OK", "x", Code.CLOSED) == b"* OK [CLOSED] x\r\n"
    assert r.tagged("a", "OK", "Conditional STORE failed", Code.modified(SequenceSet.parse("7,9"))) == (
        b"a OK [MODIFIED 7,9] Conditional STORE failed\r\n")
    assert r.tagged("a", "NO", "no", Code.badcharset()) == b"a NO [BADCHARSET (US-ASCII UTF-8)] no\r\n"
    assert r.tagged("a", "NO", "x", Code.UNKNOWN_CTE) == b"a NO [UNKNOWN-CTE] x\r\n"
    assert r.tagged("a", "BAD", "x\r\ny") == b"a BAD x  y\r\n"
    assert r.untagged_status("OK", "ready", Code.capability(["IMAP4rev1", "IMAP4rev2"])) == (
        b"* OK [CAPABILITY IMAP4rev1 IMAP4rev2] ready\r\n")
    assert r.bye("Logging out") == b"* BYE Logging out\r\n"
    assert r.continuation() == b"+ Ready\r\n"
    assert r.sasl_challenge(b"") == b"+ \r\n"
    assert r.sasl_challenge(b"hi") == b"+ aGk=\r\n"
    for code, text in [(Code.ALERT, "ALERT"), (Code.PRIVACYREQUIRED, "PRIVACYREQUIRED"),
                       (Code.AUTHENTICATIONFAILED, "AUTHENTICATIONFAILED"), (Code.CANNOT, "CANNOT"),
                       (Code.NONEXISTENT, "NONEXISTENT"), (Code.TOOBIG, "TOOBIG"), (Code.LIMIT, "LIMIT"),
                       (Code.INUSE, "INUSE"), (Code.READ_ONLY, "READ-ONLY"), (Code.TRYCREATE, "TRYCREATE")]:
        assert r.tagged("t", "NO", "m", code) == f"t NO [{text}] m\r\n".encode()


def test_strings() -> None:
    assert r.encode_string("hello") == b'"hello"'
    assert r.encode_string('a"b\\c') == b'"a\\"b\\\\c"'
    assert r.encode_string("a\r\nb") == b"{4}\r\na\r\nb"
    assert r.encode_string("é") == b"{2}\r\n\xc3\xa9"
    assert r.encode_string("é", utf8=True) == b'"\xc3\xa9"'
    assert r.encode_string(b"\xff", utf8=True) == b"{1}\r\n\xff"
    assert r.encode_string(b"x\x00") == b"{2}\r\nx\x00"
    assert r.encode_string("x" * 2000).startswith(b"{2000}\r\n")
    assert r.encode_nstring(None) == b"NIL"
    assert r.encode_astring("INBOX") == b"INBOX"
    assert r.encode_astring("NIL") == b'"NIL"'
    assert r.encode_astring("a b") == b'"a b"'
    assert r.encode_mailbox("Entwürfe") == b'"Entw&APw-rfe"'
    assert r.encode_mailbox("Entwürfe", utf8=True) == '"Entwürfe"'.encode()
    assert r.format_date_time(dt.datetime(1996, 7, 17, 2, 44, 25, tzinfo=dt.timezone(dt.timedelta(hours=-7)))) == (
        b'"17-Jul-1996 02:44:25 -0700"')
    assert r.format_date_time(dt.datetime(2024, 2, 1, 9, 0, 0)) == b'" 1-Feb-2024 09:00:00 +0000"'
    assert r.encode_value([None, 1, "x", [Atom("\\Seen")], Raw(b"(NIL)")]) == b'(NIL 1 "x" (\\Seen) (NIL))'
    assert r.encode_value([]) == b"()"


def test_data_responses() -> None:
    assert r.capability(["IMAP4rev1", "IDLE"]) == b"* CAPABILITY IMAP4rev1 IDLE\r\n"
    assert r.enabled(["CONDSTORE"]) == b"* ENABLED CONDSTORE\r\n"
    assert r.enabled([]) == b"* ENABLED\r\n"
    assert r.exists(23) == b"* 23 EXISTS\r\n"
    assert r.recent(0) == b"* 0 RECENT\r\n"
    assert r.expunge(3) == b"* 3 EXPUNGE\r\n"
    assert r.flags(["\\Answered", "$Forwarded"]) == b"* FLAGS (\\Answered $Forwarded)\r\n"
    assert r.vanished(SequenceSet.parse("41,43:116"), earlier=True) == b"* VANISHED (EARLIER) 41,43:116\r\n"
    assert r.vanished(SequenceSet.parse("405")) == b"* VANISHED 405\r\n"
    assert r.list_response(["\\HasNoChildren", "\\Drafts"], "/", "Entwürfe") == (
        b'* LIST (\\HasNoChildren \\Drafts) "/" "Entw&APw-rfe"\r\n')
    assert r.list_response(["\\Noselect"], None, "") == b'* LIST (\\Noselect) NIL ""\r\n'
    assert r.list_response([], ".", "Foo", childinfo=["SUBSCRIBED"]) == (
        b'* LIST () "." "Foo" ("CHILDINFO" ("SUBSCRIBED"))\r\n')
    assert r.list_response([], "/", "New", oldname="Old", utf8=True) == b'* LIST () "/" "New" ("OLDNAME" ("Old"))\r\n'
    assert r.list_response([], "/", "INBOX", command="LSUB") == b'* LSUB () "/" "INBOX"\r\n'
    assert r.status("blurdybloop", [("MESSAGES", 231), ("UIDNEXT", 44292)]) == (
        b'* STATUS "blurdybloop" (MESSAGES 231 UIDNEXT 44292)\r\n')
    assert r.search([2, 3, 6]) == b"* SEARCH 2 3 6\r\n"
    assert r.search([]) == b"* SEARCH\r\n"
    assert r.search([2], modseq=917162500) == b"* SEARCH 2 (MODSEQ 917162500)\r\n"
    assert r.esearch("A282", min=2, count=3) == b'* ESEARCH (TAG "A282") MIN 2 COUNT 3\r\n'
    assert r.esearch("A283", uid=True, all=SequenceSet.from_ids([2, 10, 11])) == (
        b'* ESEARCH (TAG "A283") UID ALL 2,10:11\r\n')
    assert r.esearch("a", count=0) == b'* ESEARCH (TAG "a") COUNT 0\r\n'
    assert r.esearch("a", all=SequenceSet()) == b'* ESEARCH (TAG "a")\r\n'
    assert r.namespace([("", "/")]) == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
    assert r.namespace([("", "/")], [("~", "/")], [("#shared/", "/"), ("#public/", "/")]) == (
        b'* NAMESPACE (("" "/")) (("~" "/")) (("#shared/" "/")("#public/" "/"))\r\n')
    assert r.id_response([("name", "postier"), ("version", None)]) == b'* ID ("name" "postier" "version" NIL)\r\n'
    assert r.id_response(None) == b"* ID NIL\r\n"
    assert r.untagged(b"OK", "hi") == b"* OK hi\r\n"


def test_fetch_response() -> None:
    when = dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    out = r.fetch(12, [
        ("UID", 7),
        ("FLAGS", (Atom("\\Seen"), Atom("$Junk"))),
        ("INTERNALDATE", Raw(r.format_date_time(when))),
        ("RFC822.SIZE", 44827),
        ("BODY[HEADER.FIELDS (FROM)]", Literal(b"From: a@b\r\n\r\n")),
        ("BINARY[1]", Literal8(b"\x00\x01")),
        ("MODSEQ", (624140003,)),
    ])
    assert out == (b'* 12 FETCH (UID 7 FLAGS (\\Seen $Junk) INTERNALDATE " 2-Jan-2024 03:04:05 +0000" '
                   b"RFC822.SIZE 44827 BODY[HEADER.FIELDS (FROM)] {13}\r\nFrom: a@b\r\n\r\n "
                   b"BINARY[1] ~{2}\r\n\x00\x01 MODSEQ (624140003))\r\n")
    assert r.fetch(1, [("FLAGS", ())]) == b"* 1 FETCH (FLAGS ())\r\n"


class _Outside:
    """A literal the caller sends itself (a range of a message's file)."""


def test_fetch_split_is_fetch_cut_at_the_callers_literals() -> None:
    a, b = _Outside(), _Outside()
    items: list[tuple[str, object]] = [("UID", 7), ("BODY[2]", a), ("BODY[1]", Literal(b"hi")), ("BODY[3]", b),
                                       ("FLAGS", (Atom("\\Seen"),))]
    got = r.fetch_split(3, items, _Outside)
    assert got == [b"* 3 FETCH (UID 7 BODY[2] ", a, b" BODY[1] {2}\r\nhi BODY[3] ", b, b" FLAGS (\\Seen))\r\n"]
    sent = b"".join(p if isinstance(p, bytes) else b"{1}\r\nx" for p in got)
    assert sent == r.fetch(3, [(k, Literal(b"x") if isinstance(v, _Outside) else v) for k, v in items])  # type: ignore[misc]
    assert r.fetch_split(1, [("BODY[]", a)], _Outside) == [b"* 1 FETCH (BODY[] ", a, b")\r\n"]
