"""SORT / UID SORT / THREAD / UID THREAD parsing (RFC 5256 §4, RFC 5957, RFC 5267 ESORT and
CONTEXT return options) and their answers' serialization (``* SORT``, ``* THREAD``, ESEARCH)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from postier.proto.imap import ParseError, Search, Sort, SortCriterion, State, Thread, allowed, parse_command
from postier.proto.imap.response import esort, ordered_set, sort, thread
from postier.proto.imap.search import AllKey, AndKey, FlagKey, HeaderKey, NotKey


def p(line: str) -> object:
    return parse_command(line.encode() + b"\r\n")


def test_sort() -> None:
    cmd = p("a1 SORT (SUBJECT REVERSE DATE) UTF-8 ALL")
    assert cmd == Sort(tag="a1", sort=(SortCriterion("SUBJECT"), SortCriterion("DATE", True)), charset="UTF-8",
                       criteria=AllKey())
    cmd = p("a2 uid sort (reverse arrival cc from size to displayfrom displayto) us-ascii UNDELETED SUBJECT x")
    assert isinstance(cmd, Sort) and cmd.uid and cmd.charset == "US-ASCII"
    assert [c.key for c in cmd.sort] == ["ARRIVAL", "CC", "FROM", "SIZE", "TO", "DISPLAYFROM", "DISPLAYTO"]
    assert cmd.sort[0].reverse and not cmd.sort[1].reverse
    assert cmd.criteria == AndKey((FlagKey("\\Deleted", False), HeaderKey("SUBJECT", "x")))
    assert cmd.returns is None and cmd.partial is None


def test_esort_return_options() -> None:
    cmd = p("a SORT RETURN (MIN MAX COUNT ALL) (DATE) UTF-8 NOT SEEN")
    assert isinstance(cmd, Sort)
    assert cmd.returns == ("MIN", "MAX", "COUNT", "ALL") and cmd.criteria == NotKey(FlagKey("\\Seen", True))
    cmd = p("a UID SORT RETURN () (SIZE) UTF-8 ALL")
    assert isinstance(cmd, Sort) and cmd.returns == ("ALL",)
    cmd = p("a SORT RETURN (PARTIAL 1:10 COUNT) (ARRIVAL) UTF-8 ALL")  # RFC 5267 §4.4
    assert isinstance(cmd, Sort) and cmd.returns == ("PARTIAL", "COUNT") and cmd.partial == (1, 10)
    cmd = p("a SORT RETURN (CONTEXT UPDATE SAVE) (ARRIVAL) UTF-8 ALL")
    assert isinstance(cmd, Sort) and cmd.returns == ("CONTEXT", "UPDATE", "SAVE")


def test_thread() -> None:
    assert p("t THREAD REFERENCES UTF-8 ALL") == Thread(tag="t", algorithm="REFERENCES", charset="UTF-8")
    cmd = p("t UID THREAD orderedsubject US-ASCII FROM bob SINCE 1-Feb-1994")
    assert isinstance(cmd, Thread) and cmd.uid and cmd.algorithm == "ORDEREDSUBJECT"


def test_charset_decodes_strings() -> None:
    raw = b"a SORT (SUBJECT) ISO-8859-1 SUBJECT {4+}\r\ncaf\xe9\r\n"
    cmd = parse_command(raw)
    assert isinstance(cmd, Sort) and cmd.criteria == HeaderKey("SUBJECT", "café")


@pytest.mark.parametrize("line", [
    "a SORT UTF-8 ALL",  # no criteria list
    "a SORT () UTF-8 ALL",  # empty criteria
    "a SORT (COLOUR) UTF-8 ALL",
    "a SORT (REVERSE) UTF-8 ALL",
    "a SORT (DATE) ALL",  # the charset is mandatory
    "a SORT (DATE) UTF-8",  # and so is a search key
    "a SORT RETURN (BOGUS) (DATE) UTF-8 ALL",
    "a SORT RETURN (PARTIAL 0:5) (DATE) UTF-8 ALL",
    "a THREAD UTF-8 ALL",
    "a THREAD JWZ UTF-8 ALL",
    "a THREAD REFERENCES",
    "a UID THREAD REFERENCES UTF-8",
])
def test_bad(line: str) -> None:
    with pytest.raises(ParseError) as exc:
        p(line)
    assert exc.value.status == "BAD"


def test_unknown_charset_is_no_badcharset() -> None:
    for line in ("a SORT (DATE) X-NOPE ALL", "a THREAD REFERENCES X-NOPE ALL"):
        with pytest.raises(ParseError) as exc:
            p(line)
        assert (exc.value.status, exc.value.code) == ("NO", "BADCHARSET")


def test_search_return_unchanged() -> None:
    cmd = p("a SEARCH RETURN (MIN COUNT) CHARSET UTF-8 ALL")
    assert isinstance(cmd, Search) and cmd.returns == ("MIN", "COUNT") and cmd.charset == "UTF-8"
    with pytest.raises(ParseError):
        p("a SEARCH RETURN (PARTIAL 1:5) ALL")  # CONTEXT=SEARCH is not offered


def test_selected_state_only() -> None:
    assert allowed(State.SELECTED, "SORT") and allowed(State.SELECTED, "THREAD")
    assert not allowed(State.AUTHENTICATED, "SORT") and not allowed(State.AUTHENTICATED, "THREAD")


# -- answers --------------------------------------------------------------------------------------------

@dataclass
class Node:
    id: int | None
    children: list[Node] = field(default_factory=list)


def test_sort_and_thread_answers() -> None:
    assert sort([5, 3, 9]) == b"* SORT 5 3 9\r\n"
    assert sort([]) == b"* SORT\r\n"
    assert sort([2], modseq=7) == b"* SORT 2 (MODSEQ 7)\r\n"
    # RFC 5256 §4's example: (2)(3 6 (4 23)(44 7 96))
    tree = [Node(2), Node(3, [Node(6, [Node(4, [Node(23)]), Node(44, [Node(7, [Node(96)])])])])]
    assert thread(tree) == b"* THREAD (2)(3 6 (4 23)(44 7 96))\r\n"
    assert thread([Node(None, [Node(3), Node(5)])]) == b"* THREAD ((3)(5))\r\n"  # a dummy parent


def test_esort_answer() -> None:
    assert ordered_set([5, 6, 7, 2, 9, 10, 1]) == b"5:7,2,9:10,1"
    assert esort("a1", [5, 6, 7, 2], ("MIN", "MAX", "ALL", "COUNT")) == (
        b'* ESEARCH (TAG "a1") MIN 5 MAX 2 ALL 5:7,2 COUNT 4\r\n')
    assert esort("a2", [], ("MIN", "MAX", "ALL", "COUNT"), uid=True) == b'* ESEARCH (TAG "a2") UID COUNT 0\r\n'
    assert esort("a3", [9, 8, 7, 6], ("PARTIAL",), partial=(2, 3)) == b'* ESEARCH (TAG "a3") PARTIAL (2:3 8,7)\r\n'
    assert esort("a4", [9], ("PARTIAL",), partial=(5, 10)) == b'* ESEARCH (TAG "a4") PARTIAL (5:10 NIL)\r\n'
