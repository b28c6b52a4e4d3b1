"""IMAP NOTIFY across cluster nodes (RFC 5465 §5.4): a mailbox created, renamed or deleted on node A
reaches a NOTIFY session on node B as the LIST a session on A gets, a rename as one LIST with OLDNAME
(RFC 5258 §3.4), not as a deletion and a creation, also for renames in quick succession and racing
creations (the rename log read with the names in one snapshot); between two nodes' notifiers a names
change travels once and a message change not at all (it has its own notification)."""

from __future__ import annotations

import asyncio
import contextlib
import imaplib
import re
import threading
from collections.abc import Callable

import pytest

pytest.importorskip("psycopg")

from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from postier.store.mailbox import NAMES  # noqa: E402
from tests.concurrency import together
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


_LIST = re.compile(rb'^\* LIST \(([^)]*)\) "\." "([^"]*)"(?: \("OLDNAME" \("([^"]*)"\)\))?\r\n$')


def _pipelined(c: imaplib.IMAP4, commands: list[str]) -> None:
    """Send the commands at once, then read their answers: each must be OK."""
    tags = [c._new_tag() for _ in commands]
    c.send(b"".join(tag + b" " + cmd.encode() + b"\r\n" for tag, cmd in zip(tags, commands, strict=True)))
    for tag in tags:
        line = c.readline()
        assert line.startswith(tag + b" OK"), line


def test_renames_racing_on_node_b_reach_node_a_as_oldname(nodes: list[Instance]) -> None:
    """A NOTIFY session on node A follows the names while sessions on node B rename: a chain of
    renames sent at once (with a child), and in each round a rename of P<r>, then a creation of P<r>
    again, racing a creation of Z<r> in another session. Every mailbox reaches the client as one LIST
    with OLDNAME from the name the client knew, never as a deletion and a creation (RFC 5465 §5.4):
    the client's picture, kept from the LISTs alone, ends as node B's list."""
    a, b = nodes
    watcher, w1, w2 = imap(a), imap(b), imap(b)
    rounds = 5
    try:
        for name in ["M0", "M0.K", *(f"P{r}" for r in range(rounds))]:
            assert w1.create(name)[0] == "OK"
        watcher.sock.settimeout(20)
        _ok(watcher, "NOTIFY SET (PERSONAL (MailboxName))")
        typ, data = w1.list()
        assert typ == "OK"
        known = {m.group(2).decode(): m.group(2).decode() for line in data if isinstance(line, bytes)
                 for m in [_LIST.match(b"* LIST " + line + b"\r\n")] if m}  # name -> the name it had first
        _pipelined(w1, [f"RENAME M{i} M{i + 1}" for i in range(6)])  # quick succession
        for r in range(rounds):
            go = threading.Barrier(2)

            def rename_then_create(r: int = r, go: threading.Barrier = go) -> None:
                go.wait()
                _pipelined(w1, [f"RENAME P{r} Q{r}", f"CREATE P{r}"])

            def create(r: int = r, go: threading.Barrier = go) -> None:
                go.wait()
                _pipelined(w2, [f"CREATE Z{r}"])
            together(rename_then_create, create)
        _ok(w2, "CREATE zzEnd")  # after every change above: the last name the client is told of
        created: list[str] = []
        while "zzEnd" not in known:
            line = watcher.readline()
            m = _LIST.match(line)
            assert m is not None, line
            attrs, name, old = m.group(1), m.group(2).decode(), m.group(3)
            assert b"NonExistent" not in attrs, line  # nothing was deleted
            if old is not None:
                assert old.decode() in known and name not in known, line
                known[name] = known.pop(old.decode())
            else:
                assert name not in known, line
                known[name] = name
                created.append(name)
        assert sorted(created) == sorted([*(f"P{r}" for r in range(rounds)), *(f"Z{r}" for r in range(rounds)),
                                          "zzEnd"])
        assert known["M6"] == "M0" and known["M6.K"] == "M0.K"
        assert all(known[f"Q{r}"] == f"P{r}" for r in range(rounds))
        typ, data = w1.list()
        assert typ == "OK"
        assert set(known) == {m.group(2).decode() for line in data if isinstance(line, bytes)
                              for m in [_LIST.match(b"* LIST " + line + b"\r\n")] if m}
        _ok(watcher, "NOOP")
    finally:
        for c in (watcher, w1, w2):
            c.logout()


def test_rename_and_delete_of_the_selected_mailbox_over_two_nodes(nodes: list[Instance]) -> None:
    """The session on node A renaming the mailbox it has selected keeps it selected under the new
    name with the same UIDs (the folder row is renamed in place, UIDVALIDITY kept); the session on
    node B with it selected gets BYE; A deleting it gets OK and leaves the selected state."""
    a, b = nodes
    on_a, on_b = imap(a), imap(b)
    try:
        assert on_a.create("Work")[0] == "OK"
        assert on_a.append("Work", "", None, b"Subject: kept\r\n\r\nbody\r\n")[0] == "OK"
        assert on_a.select("Work")[0] == "OK"
        assert on_b.select("Work")[0] == "OK"
        before = on_a.response("UIDVALIDITY")[1]
        assert on_a.rename("Work", "Play")[0] == "OK"
        typ, data = on_a.uid("FETCH", "1", "(UID BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"kept" in data[0][1], data  # type: ignore[index]
        assert on_a.status("Play", "(UIDVALIDITY)")[1][0].split(b"UIDVALIDITY ")[1].rstrip(b")") == before[0]  # type: ignore[union-attr,index]
        with pytest.raises(imaplib.IMAP4.abort):  # B's mailbox is gone from under it
            on_b.noop()
            on_b.noop()
        assert on_a.delete("Play")[0] == "OK"
        with pytest.raises(imaplib.IMAP4.error, match="select a mailbox first"):  # authenticated state
            on_a.fetch("1", "(UID)")
    finally:
        on_a.logout()
        with contextlib.suppress(Exception):
            on_b.logout()
