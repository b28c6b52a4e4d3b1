"""SEARCH evaluation table (RFC 9051 §6.4.4): criteria text -> match or not, for one message."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pytest

from postier.message.matching import SearchContext, evaluate
from postier.proto.imap import Search, parse_command

from . import corpus

CET = dt.timezone(dt.timedelta(hours=1))


@dataclass
class View:
    raw_bytes: bytes
    seq: int = 3
    uid: int = 42
    flags: frozenset[str] = frozenset({"\\Seen", "\\Recent", "$Forwarded"})
    internal_date: dt.datetime = dt.datetime(2024, 1, 2, 23, 30, tzinfo=CET)
    size: int = 1000
    modseq: int = 7
    reads: list[int] = field(default_factory=list)

    def raw(self) -> bytes:
        self.reads.append(1)
        return self.raw_bytes


CTX = SearchContext(max_seq=10, max_uid=50, saved_uids=frozenset({42, 44}))


def matches(criteria: str, view: View, ctx: SearchContext = CTX) -> bool:
    cmd = parse_command(f"a SEARCH {criteria}\r\n".encode())
    assert isinstance(cmd, Search)
    return evaluate(cmd.criteria, view, ctx)


@pytest.mark.parametrize(
    ("criteria", "expected"),
    [
        ("ALL", True),
        ("SEEN", True), ("UNSEEN", False), ("RECENT", True), ("OLD", False), ("NEW", False),
        ("DELETED", False), ("UNDELETED", True), ("FLAGGED", False), ("ANSWERED", False), ("DRAFT", False),
        ("KEYWORD $forwarded", True), ("UNKEYWORD $Forwarded", False), ("KEYWORD $Junk", False),
        ("3", True), ("1:2,4:*", False), ("*", False), ("2:*", True), ("UID 42", True), ("UID 43:*", False),
        ("UID 1:41,43", False), ("$", True), ("NOT $", False),
        ("LARGER 999", True), ("LARGER 1000", False), ("SMALLER 1001", True), ("SMALLER 1000", False),
        ("MODSEQ 7", True), ("MODSEQ 8", False),
        # INTERNALDATE by its own calendar date (2 Jan in +0100, although 1 Jan 22:30 UTC)
        ("ON 2-Jan-2024", True), ("BEFORE 2-Jan-2024", False), ("BEFORE 3-Jan-2024", True),
        ("SINCE 2-Jan-2024", True), ("SINCE 3-Jan-2024", False),
        # Date header: Tue, 2 Jan 2024 10:00:00 +0100
        ("SENTON 2-Jan-2024", True), ("SENTBEFORE 2-Jan-2024", False), ("SENTSINCE 1-Jan-2024", True),
        ("SENTSINCE 3-Jan-2024", False),
        # headers: RFC 2047 decoded, case-insensitive substring
        ('FROM "jörg"', True), ('FROM "MÜLLER"', True), ("FROM joerg@example", True), ("FROM nobody", False),
        ('SUBJECT "grüße and"', True), ("SUBJECT folded", True), ("TO carol", True), ('TO "Bob B."', True),
        ("CC x", False), ("BCC x", False), ('HEADER Message-ID "<alt@"', True), ('HEADER X-Missing ""', False),
        ('HEADER In-Reply-To ""', True), ('HEADER cc ""', True),
        # bodies: transfer encoding and charset undone
        ('BODY "köln, café"', True), ('BODY "<p>grüße"', True), ("BODY =C3", False), ("BODY MIME", False), ("BODY TIME", True),
        ('BODY "joerg@example.org"', False), ('TEXT "joerg@example.org"', True), ('TEXT "köln"', True),
        ("TEXT nothing-like-this", False),
        # combinations
        ("OR DELETED SEEN", True), ("OR DELETED FLAGGED", False), ("NOT (SEEN UNSEEN)", True),
        ('SEEN NOT DELETED FROM "jörg" SINCE 1-Jan-2024', True), ("(SEEN (RECENT (DRAFT)))", False),
    ],
)
def test_table(criteria: str, expected: bool) -> None:
    assert matches(criteria, View(corpus.ALTERNATIVE)) is expected


def test_raw_only_read_when_needed_and_once() -> None:
    view = View(corpus.ALTERNATIVE)
    assert matches("SEEN UID 42 LARGER 10", view)
    assert view.reads == []
    assert matches('FROM "jörg" BODY "köln" TEXT "café" SUBJECT "grüße"', view)
    assert len(view.reads) == 1


def test_saved_result_absent_matches_nothing() -> None:
    assert not matches("$", View(corpus.SIMPLE), SearchContext(10, 50, None))


def test_nested_message_text_is_searched() -> None:
    view = View(corpus.NESTED)
    assert matches("BODY \"two lines\"", view)
    assert matches("BODY \"the forwarded one\"", view)  # header of the encapsulated message
    assert not matches("BODY AAECAwQF", view)  # non-text parts are not searched
    assert matches("SUBJECT Fwd:", view)


def test_missing_or_broken_date_header() -> None:
    assert not matches("SENTSINCE 1-Jan-1970", View(corpus.MALFORMED_GARBAGE))
    assert not matches("SENTBEFORE 1-Jan-2100", View(b"Date: not a date\r\n\r\n"))
    assert matches("SENTON 7-Feb-1994", View(corpus.SIMPLE))


def test_charset_search() -> None:
    cmd = parse_command(b"a SEARCH CHARSET ISO-8859-1 BODY \"caf\xe9\"\r\n")
    assert isinstance(cmd, Search)
    assert evaluate(cmd.criteria, View(corpus.ALTERNATIVE), CTX)
