"""Cluster mode's rename log (store/cluster/mailboxes.py `names_since`, schema.py `renames`): written in
the transaction that renames, read with the folders in one snapshot, pruned to the last RENAMES_KEPT
with a full difference for a reader behind that, and added to an existing database by `ensure_schema`
(`postier cluster init`). NOTIFY between nodes over it: test_nodes_notify.py."""

from __future__ import annotations


import psycopg
import pytest

pytest.importorskip("psycopg")

from postier.message.types import User  # noqa: E402
from postier.server.imap import _name_changes  # noqa: E402
from postier.store.api import RENAMES_KEPT  # noqa: E402
from postier.store.cluster.mailboxes import ClusterMailboxes  # noqa: E402
from postier.store.cluster.schema import ensure_schema  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from postier.store.errors import MailboxExists  # noqa: E402
from tests.concurrency import together
from tests.imap.test_names_log import reads_racing_renames  # noqa: E402

ALICE = User("alice@example.org", "alice", "example.org", "maildir")  # conftest.py's `mb` is hers


def test_log_cursor_and_prune(mb: ClusterMailboxes) -> None:
    first = mb.names_since(None)
    assert first.renames is None and first.cursor == 0 and first.folders[0] == "INBOX"
    assert first.folders == [f.name for f in mb.list_folders()]
    assert first.subscriptions == mb.subscriptions()
    mb.create("A")
    mb.create("A.K")
    mb.subscribe("A.K")
    mb.rename("A", "B")
    with pytest.raises(MailboxExists):  # a refused rename takes no number
        mb.rename("B", "Sent")
    mb.rename("B", "C")
    v = mb.names_since(first.cursor)
    assert v.renames == [("A", "B"), ("B", "C")] and v.cursor == 2
    assert "C.K" in v.folders and "C.K" in v.subscriptions and "A" not in v.folders
    for i in range(RENAMES_KEPT):
        mb.rename("C" if i == 0 else f"R{i - 1}", f"R{i}")
    old = mb.names_since(v.cursor - 1)  # the rename after it was pruned: only the difference
    assert old.renames is None and old.cursor == v.cursor + RENAMES_KEPT
    recent = mb.names_since(v.cursor)
    assert recent.renames is not None and len(recent.renames) == RENAMES_KEPT and recent.renames[0] == ("C", "R0")
    gone, moved, new = _name_changes([], set(v.folders), set(old.folders))
    last = f"R{RENAMES_KEPT - 1}"
    assert (gone, moved, new) == ({"C", "C.K"}, {}, {last, f"{last}.K"})
    assert _name_changes(recent.renames, set(v.folders), set(recent.folders)) == (set(), {last: "C", f"{last}.K": "C.K"},
                                                                                  set())
    assert mb.names_since(recent.cursor + 5).renames is None  # a cursor past the log (a database restored)


def test_schema_added_to_an_existing_database(store: ClusterStore, mb: ClusterMailboxes) -> None:
    """A database made before the log: `ensure_schema` (cluster init, a node's start) adds it, and
    renames made before it are simply not logged."""
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE renames")
        conn.execute("DROP TABLE rename_heads")
        mb.create("Before")
        ensure_schema(conn)
        ensure_schema(conn)  # again: nothing to do
    start = mb.names_since(None)
    mb.rename("Before", "After")
    assert mb.names_since(start.cursor).renames == [("Before", "After")]


def test_two_connections_reads_never_see_half_a_rename(store: ClusterStore, mb: ClusterMailboxes) -> None:
    """A writer renames (with a child) on its own ClusterMailboxes, as another node would, while a
    reader reads the names: between any two reads the renames read explain every change."""
    reads_racing_renames(mb, ClusterMailboxes(ALICE, store.pool, store.bodies))


def test_concurrent_renames_of_one_user_are_numbered_in_commit_order(store: ClusterStore, mb: ClusterMailboxes) -> None:
    """Renames of different mailboxes of one user from two connections at once: numbers without a
    gap or a repeat, and the log replays to the final names."""
    others = [ClusterMailboxes(ALICE, store.pool, store.bodies) for _ in range(2)]
    for k in range(2):
        mb.create(f"T{k}_0")
    start = mb.names_since(None)

    def renamer(k: int) -> None:
        for i in range(20):
            others[k].rename(f"T{k}_{i}", f"T{k}_{i + 1}")
    together(lambda: renamer(0), lambda: renamer(1))
    end = mb.names_since(start.cursor)
    assert end.cursor == start.cursor + 40 and end.renames is not None and len(end.renames) == 40
    assert _name_changes(end.renames, set(start.folders), set(end.folders)) == (set(), {"T0_20": "T0_0",
                                                                                        "T1_20": "T1_0"}, set())


def test_user_remove_keeps_the_mailbox_and_its_rename_log(store: ClusterStore, mb: ClusterMailboxes) -> None:
    """`postier user remove` ends the account, not the mailbox (as on one machine: "the mailbox stays"):
    the folders stay and so does their rename log, whose numbers go on if the address is added again.
    A log purged while the folders stay would number again from 1, so a session still holding a
    cursor from before would be handed renames it never saw as the ones after its cursor."""
    from postier.accounts import Accounts
    from postier.store.cluster.accounts import PGAccountStorage

    acc = Accounts(PGAccountStorage(store.dsn, 3.0))
    try:
        acc.add_domain("example.org")
        acc.add_user(ALICE.address, "password123")
        mb.create("A")
        mb.rename("A", "B")
        before = mb.names_since(None)
        acc.remove_user(ALICE.address)
        with psycopg.connect(store.dsn, autocommit=True) as conn:
            kept = conn.execute("SELECT (SELECT count(*) FROM folders WHERE owner=%(o)s), (SELECT seq FROM "
                                "rename_heads WHERE owner=%(o)s), (SELECT count(*) FROM renames WHERE owner=%(o)s)",
                                {"o": ALICE.address}).fetchone()
        assert kept == (len(before.folders), before.cursor, 1)
        acc.add_user(ALICE.address, "password123")
        mb.rename("B", "C")
        assert mb.names_since(before.cursor).renames == [("B", "C")]
    finally:
        acc.close()
