"""IMAP NOTIFY across cluster nodes (RFC 5465 §5.4): a mailbox created, renamed or deleted on node A
reaches a NOTIFY session on node B as the LIST a session on A gets, a rename as one LIST with OLDNAME
(RFC 5258 §3.4), not as a deletion and a creation; between two nodes' notifiers a names change
travels once and a message change not at all (it has its own notification)."""

from __future__ import annotations

import asyncio
import imaplib
from collections.abc import Callable

import pytest

pytest.importorskip("psycopg")

from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from postier.store.mailbox import NAMES  # noqa: E402
from tests.harness import Instance  # noqa: E402

from .conftest import PgServer  # noqa: E402
from .test_nodes import imap  # noqa: E402


def _ok(c: imaplib.IMAP4, command: str) -> None:
    """Run one command by hand (imaplib knows no NOTIFY): its untagged responses must be none."""
    tag = c._new_tag()
    c.send(tag + b" " + command.encode() + b"\r\n")
    line = c.readline()
    assert line.startswith(tag + b" OK"), line


def test_rename_on_node_a_is_one_list_with_oldname_on_node_b(nodes: list[Instance]) -> None:
    a, b = nodes
    writer, watcher = imap(a), imap(b)
    try:
        watcher.sock.settimeout(20)
        _ok(watcher, "NOTIFY SET (PERSONAL (MailboxName))")
        _ok(writer, "CREATE Alt")
        _ok(writer, "CREATE Alt.Kind")
        assert watcher.readline() == b'* LIST () "." "Alt"\r\n'
        assert watcher.readline() == b'* LIST () "." "Alt.Kind"\r\n'
        _ok(writer, "RENAME Alt Neu")
        assert watcher.readline() == b'* LIST () "." "Neu" ("OLDNAME" ("Alt"))\r\n'
        assert watcher.readline() == b'* LIST () "." "Neu.Kind" ("OLDNAME" ("Alt.Kind"))\r\n'
        _ok(writer, "DELETE Neu.Kind")
        assert watcher.readline() == b'* LIST (\\NonExistent) "." "Neu.Kind"\r\n'
        _ok(watcher, "NOOP")
    finally:
        writer.logout()
        watcher.logout()


def test_names_changes_travel_between_notifiers_once(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    """The notifiers of two nodes: a names change told to A wakes B's NAMES watchers; A's own comes
    back from PostgreSQL and is skipped (A's watchers woken once, by A); a folder's message change
    is not sent again by the notifier (mailboxes.py sends it in its transaction)."""
    dsn = pg.create_db()
    user = "alice@example.org"

    async def run() -> None:
        a, b = ClusterStore(dsn, bodies_factory()), ClusterStore(dsn, bodies_factory())
        try:
            woke = {"a": asyncio.Event(), "b": asyncio.Event()}
            wakes = {"a": 0, "b": 0}

            def on(node: str) -> None:
                wakes[node] += 1
                woke[node].set()
            a.notifier.watch(user, NAMES, None, lambda: on("a"))
            b.notifier.watch(user, NAMES, None, lambda: on("b"))
            b.notifier.watch(user, "INBOX", None, lambda: pytest.fail("a message change was forwarded"))
            await asyncio.wait_for(a.notifier.listening.wait(), 20)
            await asyncio.wait_for(b.notifier.listening.wait(), 20)
            a.notifier.notify(user, "INBOX")  # only this node's watchers
            a.notifier.notify(user, NAMES)
            await asyncio.wait_for(woke["b"].wait(), 20)
            assert wakes == {"a": 1, "b": 1}
            woke["a"].clear()
            b.notifier.notify(user, NAMES)  # sent after A's: when A has it, A had its own back
            await asyncio.wait_for(woke["a"].wait(), 20)
            assert wakes == {"a": 2, "b": 2}  # A's own change woke A once
        finally:
            a.close()
            b.close()
    asyncio.run(run())
