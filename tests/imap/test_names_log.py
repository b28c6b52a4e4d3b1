"""The rename log behind NOTIFY's MailboxName events (RFC 5465 §5.4, RFC 5258 §3.4 OLDNAME): the
cursor and its fallback when the log was pruned (`store.api.renames_after`), how two reads of the
names and the renames between them become events (`server.imap._name_changes`), and the Maildir
store's log (`UserMailbox.names_since`). Cluster mode's is in tests/cluster/test_renames.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.message.types import User
from postier.server.imap import _name_changes
from postier.store.api import RENAMES_KEPT, Mailboxes, NamesView, renames_after
from postier.store.mailbox import MailStore, UserMailbox
from tests.concurrency import together

USER = User("bob@example.org", "bob", "example.org", "maildir")


def test_cursor_in_the_log_gives_the_renames_after_it() -> None:
    rows = [(5, "A", "B"), (6, "B", "C")]
    assert renames_after(4, 6, rows) == [("A", "B"), ("B", "C")]
    assert renames_after(6, 6, []) == []  # nothing since
    assert renames_after(None, 6, []) is None  # no earlier read: nothing to explain


def test_cursor_before_the_pruned_range_or_past_the_log_gives_none() -> None:
    assert renames_after(2, 6, [(5, "A", "B"), (6, "B", "C")]) is None  # 3 and 4 were pruned
    assert renames_after(3, 6, []) is None
    assert renames_after(9, 6, []) is None  # the log was rebuilt: its numbers name other renames
    assert renames_after(4, 7, [(5, "A", "B"), (6, "B", "C")]) is None  # one missing at the end


def test_changes_follow_each_mailbox_through_the_renames() -> None:
    before = {"INBOX", "A", "A.K", "X"}
    # several renames in a row: one move each, from the name the client knows
    gone, moved, new = _name_changes([("A", "B"), ("B", "C")], before, {"INBOX", "C", "C.K", "X"})
    assert (gone, moved, new) == (set(), {"C": "A", "C.K": "A.K"}, set())
    # a rename, then a creation under the old name
    gone, moved, new = _name_changes([("A", "B")], before, {"INBOX", "A", "B", "B.K", "X"})
    assert (gone, moved, new) == (set(), {"B": "A", "B.K": "A.K"}, {"A"})
    # a name freed by a deletion (not in the log) and taken by a rename: X deleted, then A renamed to X
    gone, moved, new = _name_changes([("A", "X")], before, {"INBOX", "X", "X.K"})
    assert (gone, moved, new) == ({"X"}, {"X": "A", "X.K": "A.K"}, set())
    # a mailbox created and renamed since the last read is a creation; INBOX's rename moves messages
    gone, moved, new = _name_changes([("N", "M"), ("INBOX", "Old")], before, before | {"M", "Old"})
    assert (gone, moved, new) == (set(), {}, {"M", "Old"})
    # renamed, then deleted
    gone, moved, new = _name_changes([("X", "Y")], before, {"INBOX", "A", "A.K"})
    assert (gone, moved, new) == ({"X"}, {}, set())


def test_without_the_renames_only_the_difference_is_known() -> None:
    gone, moved, new = _name_changes([], {"INBOX", "A"}, {"INBOX", "B"})
    assert (gone, moved, new) == ({"A"}, {}, {"B"})


@pytest.fixture
def mb(tmp_path: Path) -> Iterator[UserMailbox]:
    store = MailStore(tmp_path / "mail")
    m = store.acquire(USER)
    m.ensure_defaults()
    yield m
    store.release(m)
    store.close()


def test_maildir_log_and_its_prune(mb: UserMailbox) -> None:
    first = mb.names_since(None)
    assert first.renames is None and "INBOX" in first.folders
    mb.create("A")
    mb.create("A.K")
    mb.rename("A", "B")
    mb.rename("B", "C")
    v = mb.names_since(first.cursor)
    assert v.renames == [("A", "B"), ("B", "C")] and v.cursor == first.cursor + 2
    assert {"C", "C.K"} <= set(v.folders) and "A" not in v.folders
    assert _name_changes(v.renames, set(first.folders) | {"A", "A.K"}, set(v.folders))[1] == {"C": "A", "C.K": "A.K"}
    for i in range(RENAMES_KEPT):  # the log keeps the last RENAMES_KEPT
        mb.rename("C" if i == 0 else f"R{i - 1}", f"R{i}")
    old = mb.names_since(v.cursor - 1)  # its next rename was pruned: only the difference
    assert old.renames is None and old.cursor == v.cursor + RENAMES_KEPT
    recent = mb.names_since(v.cursor)  # the oldest kept is the next after this cursor
    assert recent.renames is not None and len(recent.renames) == RENAMES_KEPT
    assert recent.renames[0] == ("C", "R0") and recent.renames[-1] == (f"R{RENAMES_KEPT - 2}", f"R{RENAMES_KEPT - 1}")
    gone, moved, new = _name_changes([], set(v.folders), set(old.folders))  # the fallback: a full diff
    assert gone == {"C", "C.K"} and new == {f"R{RENAMES_KEPT - 1}", f"R{RENAMES_KEPT - 1}.K"} and not moved


def test_maildir_reads_never_see_half_a_rename(mb: UserMailbox) -> None:
    """Two sessions: one renames a mailbox (with a child) round and round, the other reads the names:
    between any two reads, the renames read explain every change (no deletion, no creation)."""
    reads_racing_renames(mb, mb)


def reads_racing_renames(reader: Mailboxes, writer: Mailboxes) -> None:
    """`writer` renames M0 (with a child) to M1, M2... in a thread while `reader` reads the names
    over and over: the renames read between two reads must explain every change (no deletion, no
    creation). Used by the cluster tests too (two connections, as two nodes)."""
    reader.create("M0")
    reader.create("M0.K")
    done = threading.Event()
    n = RENAMES_KEPT - 4  # fewer than the log keeps: the reader is never behind it

    def renamer() -> None:
        try:
            for i in range(n):
                writer.rename(f"M{i}", f"M{i + 1}")
        finally:
            done.set()

    def read(last: NamesView) -> None:
        reads = 0
        while not done.is_set() or reads == 0:
            v = reader.names_since(last.cursor)
            assert v.renames is not None
            gone, _moved, new = _name_changes(v.renames, set(last.folders), set(v.folders))
            assert not gone and not new, (v.renames, gone, new)
            last, reads = v, reads + 1

    first = reader.names_since(None)
    together(renamer, lambda: read(first))
    assert {f"M{n}", f"M{n}.K"} <= set(reader.names_since(None).folders)
