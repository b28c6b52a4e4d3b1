"""SORT (RFC 5256 §3, RFC 5957) and base subject extraction (RFC 5256 §2.1)."""

from __future__ import annotations

import datetime as dt

import pytest

from postier.message.mime import parse_message
from postier.message.sorting import SortCriterion, SortItem, base_subject, sort_fields, sort_messages

UTC = dt.UTC


@pytest.mark.parametrize(("subject", "base", "reply"), [
    ("Hello", "Hello", False),
    ("Re: Hello", "Hello", True),
    ("RE: re: Fwd: Hello", "Hello", True),
    ("Re[2]: Hello", "Hello", True),
    ("re [PATCH] : Hello", "Hello", True),
    ("[list] Re: Hello", "Hello", True),
    ("[list] [another] Hello", "Hello", False),
    ("[only a blob]", "[only a blob]", False),  # step 4: the blob stays when nothing else would
    ("Hello (fwd)", "Hello", True),
    ("Hello (FWD) (fwd)  ", "Hello", True),
    ("[Fwd: Re: Hello]", "Hello", True),
    ("[fwd: [list] Hello]", "Hello", True),
    ("  Hello\t  world  ", "Hello world", False),
    ("Re:", "", True),
    ("", "", False),
    ("Fw: Hello", "Hello", True),
    ("Reply: Hello", "Reply: Hello", False),  # only re/fw/fwd are reply markers
])
def test_base_subject(subject: str, base: str, reply: bool) -> None:
    assert base_subject(subject) == (base, reply)


def _item(n: int, header: bytes, *, arrival: int = 0, size: int = 100) -> SortItem:
    part = parse_message(header + b"\r\n")
    return SortItem(n, n, dt.datetime(2024, 1, 1, tzinfo=UTC) + dt.timedelta(days=arrival), size, sort_fields(part))


ITEMS = [
    _item(1, b"From: Zed <zed@x>\r\nTo: b@x\r\nCc: c@x\r\nSubject: Re: beta\r\nDate: Wed, 3 Jan 2024 10:00:00 +0000\r\n",
          arrival=5, size=300),
    _item(2, b"From: =?utf-8?q?Anna?= <yy@x>\r\nTo: \"Bob\" <a@x>\r\nSubject: alpha\r\n"
             b"Date: Thu, 4 Jan 2024 01:00:00 +0900\r\n", arrival=1, size=100),
    _item(3, b"From: mm@x\r\nTo: c@x\r\nSubject: [list] Beta\r\nDate: not a date\r\n", arrival=2, size=200),
    _item(4, b"From: AA@x\r\nSubject: gamma\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n", arrival=9, size=100),
]


@pytest.mark.parametrize(("criteria", "expected"), [
    ([SortCriterion("ARRIVAL")], [2, 3, 1, 4]),
    ([SortCriterion("ARRIVAL", reverse=True)], [4, 1, 3, 2]),
    # DATE: 4 (Jan 1), 3 (no valid Date: its arrival, Jan 3 00:00), 1 (Jan 3 10:00), 2 (Jan 3 16:00 UTC)
    ([SortCriterion("DATE")], [4, 3, 1, 2]),
    ([SortCriterion("SIZE")], [2, 4, 3, 1]),  # ties in mailbox order
    ([SortCriterion("SIZE", reverse=True)], [1, 3, 2, 4]),  # REVERSE applies to its key only
    ([SortCriterion("SUBJECT")], [2, 1, 3, 4]),  # alpha, beta (1 before 3: tie), gamma
    ([SortCriterion("SUBJECT"), SortCriterion("DATE", reverse=True)], [2, 1, 3, 4]),
    ([SortCriterion("SUBJECT", reverse=True), SortCriterion("ARRIVAL")], [4, 3, 1, 2]),
    ([SortCriterion("FROM")], [4, 3, 2, 1]),  # addr-mailbox: AA, mm, yy, zed (case-insensitive)
    ([SortCriterion("TO")], [4, 2, 1, 3]),  # "" (none), a, b, c
    ([SortCriterion("CC")], [2, 3, 4, 1]),
    ([SortCriterion("DISPLAYFROM")], [4, 2, 3, 1]),  # AA@x, Anna (decoded), mm@x, Zed
    ([SortCriterion("DISPLAYTO")], [4, 1, 2, 3]),  # "", b@x, Bob, c@x
])
def test_sort_keys(criteria: list[SortCriterion], expected: list[int]) -> None:
    assert [i.id for i in sort_messages(ITEMS, criteria)] == expected


def test_unknown_key_refused() -> None:
    with pytest.raises(ValueError, match="unknown sort key"):
        sort_messages(ITEMS, [SortCriterion("COLOUR")])


def test_fields_from_header() -> None:
    f = sort_fields(parse_message(
        b"Subject: Re: [x] =?utf-8?q?caf=C3=A9?=\r\nMessage-ID: < a@b >\r\nIn-Reply-To: <p@b> <q@b>\r\n\r\n"))
    assert (f.subject, f.is_reply, f.message_id, f.references) == ("café", True, "a@b", ("p@b",))
    f = sort_fields(parse_message(b"References: <r1@x>\r\n <r2@x>\r\nIn-Reply-To: <p@b>\r\n\r\n"))
    assert f.references == ("r1@x", "r2@x") and f.date is None and f.from_ == ""


def test_fields_round_trip_for_the_cache() -> None:
    from postier.message.sorting import decode_fields, encode_fields, sort_item

    for item in ITEMS:
        assert decode_fields(encode_fields(item.fields)) == item.fields
    odd = sort_item(7, 3, 1_700_000_000.5, 42, b"Subject: \xff\xfe =?utf-8?q?=ED=A0=80?=\r\nReferences: <a@b>\r\n\r\n")
    assert decode_fields(encode_fields(odd.fields)) == odd.fields
    assert (odd.id, odd.seq, odd.size, odd.internal_date.timestamp()) == (7, 3, 42, 1_700_000_000.5)
    for junk in (b"", b"[]", b"not json", b"[2,null,\"\",false,\"\",\"\",\"\",\"\",\"\",null,[]]"):
        assert decode_fields(junk) is None
