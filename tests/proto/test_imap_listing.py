"""LIST and LSUB answers as pure functions (proto/imap/listing.py): RFC 9051 §6.3.9, RFC 5258."""

from __future__ import annotations

from postier.proto.imap.commands import List, ListReturn
from postier.proto.imap.listing import ListEntry, list_entries, lsub_entries, pattern_matcher

FOLDERS = {"INBOX": "", "Sent": "\\Sent", "Work": "", "Work.Reports": "", "Archive.2024": ""}


def names(entries: list[ListEntry]) -> list[str]:
    return [e.name for e in entries]


def test_pattern_matching() -> None:
    m = pattern_matcher("", "Work.%", ".")
    assert m("Work.Reports") and not m("Work.Reports.Q1") and not m("Work")
    assert pattern_matcher("", "*", ".")("a.b.c")
    assert pattern_matcher("", "inbox", ".")("INBOX")  # RFC 9051 §5.1: INBOX is case-insensitive
    assert pattern_matcher("Work.", "%", ".")("Work.Reports")


def test_plain_list() -> None:
    out = list_entries(List(tag="a", patterns=("%",)), FOLDERS, [], ".")
    assert names(out) == ["INBOX", "Archive", "Sent", "Work"]
    by = {e.name: e for e in out}
    assert by["Archive"].attributes == ("\\Noselect", "\\HasChildren")  # implied parent
    assert by["Sent"].attributes == ("\\HasNoChildren", "\\Sent")
    assert by["Work"].attributes == ("\\HasChildren",)
    assert list_entries(List(tag="a", patterns=("",)), FOLDERS, [], ".") == [ListEntry("", ("\\Noselect",))]


def test_list_extended_subscribed_and_special_use() -> None:
    cmd = List(tag="a", patterns=("*",), selection=frozenset({"SUBSCRIBED"}), extended=True)
    out = list_entries(cmd, FOLDERS, ["Sent", "Gone"], ".")
    assert names(out) == ["Gone", "Sent"]
    assert out[0].attributes == ("\\NonExistent", "\\HasNoChildren", "\\Subscribed")  # RFC 5258 §3
    cmd = List(tag="a", patterns=("*",), selection=frozenset({"SPECIAL-USE"}), extended=True)
    assert names(list_entries(cmd, FOLDERS, [], ".")) == ["Sent"]
    cmd = List(tag="a", patterns=("%",), returns=ListReturn(subscribed=True), extended=True)
    assert "\\Subscribed" in {e.name: e for e in list_entries(cmd, FOLDERS, ["Work"], ".")}["Work"].attributes


def test_recursivematch_childinfo_only_for_descendants_not_listed() -> None:
    sel = frozenset({"SUBSCRIBED", "RECURSIVEMATCH"})
    out = list_entries(List(tag="a", patterns=("%",), selection=sel, extended=True), FOLDERS, ["Work.Reports"], ".")
    assert out == [ListEntry("Work", ("\\HasChildren",), ("SUBSCRIBED",))]  # RFC 5258 §3.5
    out = list_entries(List(tag="a", patterns=("*",), selection=sel, extended=True), FOLDERS, ["Work.Reports"], ".")
    assert names(out) == ["Work.Reports"] and out[0].childinfo == ()  # the child is listed itself


def test_lsub() -> None:
    subs = ["INBOX", "Work.Reports", "Old"]
    out = lsub_entries("", "%", subs, FOLDERS, ".")
    assert out == [ListEntry("INBOX", ()), ListEntry("Old", ("\\Noselect",)), ListEntry("Work", ("\\Noselect",))]
    assert lsub_entries("", "*", subs, FOLDERS, ".")[-1] == ListEntry("Work.Reports", ())
    assert lsub_entries("", "", subs, FOLDERS, ".") == [ListEntry("", ("\\Noselect",))]
