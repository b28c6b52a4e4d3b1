"""THREAD=ORDEREDSUBJECT and THREAD=REFERENCES (RFC 5256 §3), with the answer's syntax (§4)."""

from __future__ import annotations

import datetime as dt

from postier.message.mime import parse_message
from postier.message.sorting import SortItem, sort_fields
from postier.message.threading import thread_orderedsubject, thread_references
from postier.proto.imap.response import thread


def msg(n: int, subject: str, day: int, mid: str | None = None, refs: str = "", irt: str = "") -> SortItem:
    head = f"Subject: {subject}\r\nDate: {day} Jan 2024 12:00:00 +0000\r\n"
    if mid:
        head += f"Message-ID: <{mid}>\r\n"
    if refs:
        head += f"References: {refs}\r\n"
    if irt:
        head += f"In-Reply-To: {irt}\r\n"
    return SortItem(n, n, dt.datetime(2024, 2, 1, tzinfo=dt.UTC), 10, sort_fields(parse_message(head.encode() + b"\r\n")))


def test_orderedsubject() -> None:
    items = [msg(1, "b", 5), msg(2, "Re: a", 3), msg(3, "a", 2), msg(4, "Re: b", 6), msg(5, "c", 1), msg(6, "a", 4)]
    # a: 3 (day 2) parent of 2 and 6; b: 1 parent of 4; c alone; threads by their parent's date
    assert thread(thread_orderedsubject(items)) == b"* THREAD (5)(3 (2)(6))(1 4)\r\n"


def test_references_chain_and_branches() -> None:
    items = [
        msg(1, "root", 1, "a@x"),
        msg(2, "Re: root", 2, "b@x", "<a@x>"),
        msg(3, "Re: root", 3, "c@x", "<a@x> <b@x>"),
        msg(4, "Re: root", 4, "d@x", "<a@x>"),
        msg(5, "other", 5, "e@x"),
        msg(6, "Re: root", 6, "f@x", irt="<c@x> <zz@x>"),  # In-Reply-To's first id when no References
    ]
    assert thread(thread_references(items)) == b"* THREAD (1 (2 3 6)(4))(5)\r\n"


def test_references_missing_parent_makes_a_dummy() -> None:
    items = [msg(1, "x", 1, "b@x", "<missing@x>"), msg(2, "y", 2, "c@x", "<missing@x>"), msg(3, "z", 3, "d@x")]
    # two replies to a message we do not have: a dummy root keeps them together (step 3)
    assert thread(thread_references(items)) == b"* THREAD ((1)(2))(3)\r\n"
    # one reply to a missing message: the dummy is dropped (its only child promoted)
    assert thread(thread_references(items[:1])) == b"* THREAD (1)\r\n"


def test_references_subject_merge() -> None:
    items = [msg(1, "topic", 1, "a@x"), msg(2, "Re: topic", 2, "b@x"), msg(3, "topic", 3, "c@x")]
    # 2 has no references but is a reply with the same base subject: it goes under 1 (step 5C);
    # 3 is not a reply: 1 and 3 become children of a dummy
    assert thread(thread_references(items)) == b"* THREAD ((1 2)(3))\r\n"


def test_references_loops_and_duplicates_are_harmless() -> None:
    items = [
        msg(1, "a", 1, "a@x", "<b@x>"),
        msg(2, "b", 2, "b@x", "<a@x>"),  # would make a loop
        msg(3, "c", 3, "a@x"),  # duplicate Message-ID: treated as its own message
        msg(4, "d", 4, "d@x", "<d@x>"),  # references itself
    ]
    out = thread(thread_references(items))
    assert sorted(int(x) for x in out[9:].replace(b"(", b" ").replace(b")", b" ").split()) == [1, 2, 3, 4]
    assert out == b"* THREAD (2 1)(3)(4)\r\n"


def test_deep_chain_needs_no_recursion() -> None:
    n = 5000
    items = [msg(1, "deep", 1, "m1@x")] + [
        msg(i, "Re: deep", 1, f"m{i}@x", f"<m{i - 1}@x>") for i in range(2, n + 1)]
    out = thread(thread_references(items))
    assert out == b"* THREAD (" + b" ".join(b"%d" % i for i in range(1, n + 1)) + b")\r\n"


def test_empty() -> None:
    assert thread(thread_references([])) == b"* THREAD\r\n"
    assert thread(thread_orderedsubject([])) == b"* THREAD\r\n"
