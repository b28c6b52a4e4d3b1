"""The cluster mail store against a real PostgreSQL and a real S3 server (moto): UIDs and MODSEQs from
the folder row, flags, expunge, copy/move, folders, LISTEN/NOTIFY and the unavailable cases."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Callable

import pytest

pytest.importorskip("psycopg")

from postier.message.types import User  # noqa: E402
from postier.store.cluster.bodies import BodyStore, body_key  # noqa: E402
from postier.store.cluster.mailboxes import ClusterMailboxes  # noqa: E402
from postier.store.cluster.store import ClusterDelivery, ClusterStore  # noqa: E402
from postier.store.errors import MailboxExists, MailboxNotFound, NotPermitted, StoreUnavailable  # noqa: E402

from tests.concurrency import together

from .conftest import PgServer  # noqa: E402

ALICE = User("alice@example.org", "alice", "example.org", "maildir")


def msg(n: int | str) -> bytes:
    return f"From: a@example.org\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()


def test_append_read_and_one_object_per_body(mb: ClusterMailboxes) -> None:
    v1, u1 = mb.append("INBOX", msg(1), ["\\Seen", "$Label"])
    v2, u2 = mb.append("INBOX", msg(1))  # same bytes: same object
    assert (u1, u2) == (1, 2) and v1 == v2
    rows = mb.rows("INBOX", [1, 2])
    assert rows[1].base == rows[2].base == hashlib.sha256(msg(1)).hexdigest()
    assert rows[1].flag_names == ["\\Seen", "$Label"] and rows[2].flags == 0
    assert mb.read("INBOX", rows[1]) == msg(1)
    assert mb.read_header("INBOX", rows[1]) == b"From: a@example.org\r\nSubject: 1\r\n\r\n"
    got = mb.bodies.client.list_objects_v2(Bucket=mb.bodies.bucket)
    assert [o["Key"] for o in got["Contents"]] == [body_key(rows[1].base)]
    snap = mb.snapshot("INBOX")
    assert list(snap.uids) == [1, 2] and snap.uidnext == 3 and snap.highestmodseq == 3
    # bare LF bodies are stored with CRLF, as the Maildir store serves them
    _v, u3 = mb.append("INBOX", b"Subject: lf\n\nx\n")
    assert mb.read("INBOX", mb.rows("INBOX", [u3])[u3]) == b"Subject: lf\r\n\r\nx\r\n"


def test_two_appenders_on_two_connections_commit_uids_in_order(
        pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    """Two stores (two pools: two nodes) append at once; a third watches. Every UID list it sees is
    1..k without holes (commits in UID order), and UIDs and MODSEQs rise together."""
    dsn = pg.create_db()
    stores = [ClusterStore(dsn, bodies_factory(), timeout=5.0) for _ in range(3)]
    try:
        boxes = [s.acquire(ALICE) for s in stores]
        boxes[0].ensure_defaults()
        per_writer = 25
        got: list[list[int]] = [[], []]
        seen: list[list[int]] = []
        done = threading.Event()

        def write(i: int) -> None:
            for n in range(per_writer):
                got[i].append(boxes[i].append("INBOX", msg(f"{i}-{n}"))[1])

        def watch() -> None:
            for _ in range(2000):
                seen.append(list(boxes[2].snapshot("INBOX").uids))
                if done.is_set():
                    break

        def writers() -> None:
            try:
                together(lambda: write(0), lambda: write(1))
            finally:
                done.set()

        together(watch, writers, timeout=240)
        for g in got:
            assert g == sorted(g) and len(g) == per_writer
        assert sorted(got[0] + got[1]) == list(range(1, 2 * per_writer + 1))
        for uids in seen:
            assert uids == list(range(1, len(uids) + 1))
        rows = boxes[2].rows_between("INBOX", 1, 2 * per_writer)
        modseqs = [rows[u].modseq for u in sorted(rows)]
        assert modseqs == sorted(modseqs) and len(set(modseqs)) == len(modseqs)
    finally:
        for s in stores:
            s.close()


def test_flags_modseq_and_unchangedsince(mb: ClusterMailboxes) -> None:
    for n in range(3):
        mb.append("INBOX", msg(n))
    before = mb.snapshot("INBOX").highestmodseq
    r = mb.store("INBOX", [1, 2], "+FLAGS", ["\\Flagged", "Work"])
    assert r.modseq == before + 1 and sorted(r.changed) == [1, 2]
    assert r.changed[1].flag_names == ["\\Flagged", "Work"] and "Work" in r.keywords
    again = mb.store("INBOX", [1], "+FLAGS", ["\\Flagged", "work"])  # already so (keywords ignore case)
    assert not again.changed and list(again.unchanged) == [1] and again.modseq == r.modseq
    assert [c[0] for c in mb.changed_since("INBOX", before)] == [1, 2]
    conflict = mb.store("INBOX", [1, 3], "-FLAGS", ["\\Flagged"], unchangedsince=before)
    assert conflict.conflicts == [1] and list(conflict.changed) == [] and list(conflict.unchanged) == [3]
    r2 = mb.store("INBOX", [2], "FLAGS", ["\\Seen"])
    assert r2.changed[2].flag_names == ["\\Seen"] and mb.snapshot("INBOX").highestmodseq == r2.modseq
    assert mb.status("INBOX").unseen == 2


def test_expunge_tombstones_and_uids_never_reused(mb: ClusterMailboxes) -> None:
    for n in range(4):
        mb.append("INBOX", msg(n))
    ms = mb.snapshot("INBOX").highestmodseq
    mb.store("INBOX", [2, 3], "+FLAGS", ["\\Deleted"])
    assert mb.expunge("INBOX", [3, 4]) == [3]  # UID EXPUNGE: only the listed \Deleted ones
    assert mb.expunge("INBOX") == [2]
    assert mb.vanished_since("INBOX", ms) == [2, 3]
    assert list(mb.snapshot("INBOX").uids) == [1, 4]
    assert mb.append("INBOX", msg(9))[1] == 5
    assert mb.delete_uids("INBOX", [1, 77]) == [1]


def test_a_node_catches_up_on_changes_instead_of_reloading_the_uid_list(
        pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    """Node A holds a folder's UID list; node B appends, expunges and stores flags. A's next snapshot
    applies the changes since its MODSEQ (tombstones out, higher UIDs in) and equals a fresh node's
    full load; a flags-only change keeps the very same list. Then B writes while A snapshots over and
    over: every list A sees is strictly ascending, and the last one equals the full load."""
    dsn = pg.create_db()
    stores = [ClusterStore(dsn, bodies_factory(), timeout=5.0) for _ in range(2)]
    try:
        a, b = (s.acquire(ALICE) for s in stores)
        a.ensure_defaults()
        for n in range(6):
            b.append("INBOX", msg(n))
        first = a.snapshot("INBOX")
        assert list(first.uids) == [1, 2, 3, 4, 5, 6]
        b.store("INBOX", [2], "+FLAGS", ["\\Seen"])
        flags_only = a.snapshot("INBOX")
        assert flags_only.uids is first.uids and flags_only.version == first.version
        assert flags_only.highestmodseq > first.highestmodseq
        b.append("INBOX", msg(7))
        b.append("INBOX", msg(8))
        assert b.delete_uids("INBOX", [1, 4, 8]) == [1, 4, 8]
        b.append("INBOX", msg(9))
        got = a.snapshot("INBOX")
        assert list(got.uids) == [2, 3, 5, 6, 7, 9] and got.version == first.version + 1
        assert list(first.uids) == [1, 2, 3, 4, 5, 6]  # what sessions announced is never changed in place

        stop = threading.Event()

        def write() -> None:
            try:
                for n in range(40):
                    _v, uid = b.append("INBOX", msg(f"w{n}"))
                    if n % 3 == 0:
                        b.delete_uids("INBOX", [uid - 1])
            finally:
                stop.set()

        def read() -> None:
            seen = 0
            while not stop.is_set() or seen == 0:
                uids = list(a.snapshot("INBOX").uids)
                assert uids == sorted(set(uids))
                seen += 1

        together(write, read)
        fresh = ClusterStore(dsn, bodies_factory(), timeout=5.0)
        try:
            c = fresh.acquire(ALICE)
            assert list(a.snapshot("INBOX").uids) == list(c.snapshot("INBOX").uids)
            fresh.release(c)
        finally:
            fresh.close()
        for s, m in zip(stores, (a, b), strict=True):
            s.release(m)
    finally:
        for s in stores:
            s.close()


def test_copy_move_share_bodies(mb: ClusterMailboxes) -> None:
    for n in range(3):
        mb.append("INBOX", msg(n), ["kw1"] if n == 0 else [])
    mb.create("Work")
    c = mb.copy("INBOX", [1, 2], "Work")
    assert (c.source_uids, c.dest_uids) == ([1, 2], [1, 2])
    m = mb.move("INBOX", [1, 3], "Work")
    assert (m.source_uids, m.dest_uids) == ([1, 3], [3, 4])
    assert list(mb.snapshot("INBOX").uids) == [2]
    work = mb.rows_between("Work", 1, 10)
    assert work[3].keywords == "kw1" and mb.read("Work", work[4]) == msg(2)
    with pytest.raises(MailboxNotFound):
        mb.copy("INBOX", [2], "Nowhere")


def test_folders_create_rename_delete(mb: ClusterMailboxes) -> None:
    names = [f.name for f in mb.list_folders()]
    assert names[0] == "INBOX" and {"Sent", "Trash", "Junk", "Drafts", "Archive"} <= set(names)
    assert dict((f.name, f.special_use) for f in mb.list_folders())["Sent"] == "\\Sent"
    mb.create("A")
    mb.create("A.B")
    with pytest.raises(MailboxExists):
        mb.create("A")
    mb.subscribe("A.B")
    old = mb.snapshot("A.B").uidvalidity
    mb.create("X.B")
    with pytest.raises(MailboxExists):  # a sub-folder's new name is taken
        mb.rename("A", "X")
    mb.rename("A", "C")
    assert {"C", "C.B"} <= {f.name for f in mb.list_folders()} and "A" not in {f.name for f in mb.list_folders()}
    assert "C.B" in mb.subscriptions() and "A.B" not in mb.subscriptions()
    with pytest.raises(NotPermitted):
        mb.rename("C", "C.B.D")
    mb.delete("C.B")
    mb.create("C.B")
    assert mb.snapshot("C.B").uidvalidity > old  # a new mailbox under an old name (RFC 9051 §2.3.1.1)
    mb.append("INBOX", msg(1))
    mb.rename("INBOX", "Old")  # RFC 9051 §6.3.6: INBOX's messages move, INBOX stays
    assert list(mb.snapshot("INBOX").uids) == [] and list(mb.snapshot("Old").uids) == [1]
    with pytest.raises(NotPermitted):
        mb.delete("INBOX")


def test_delivery_appends_and_falls_back_to_inbox(store: ClusterStore, tmp_path: object) -> None:
    """A folder that cannot be one (a bad name) means INBOX; a missing one is created (below)."""
    from pathlib import Path
    mda = ClusterDelivery(store, Path(str(tmp_path)))
    try:
        ok = mda.deliver_one(ALICE, b"Return-Path: <b@example.net>\r\n", msg("d"), "b@example.net", "a..b")
        assert ok.ok, ok.detail
        mb = store.acquire(ALICE)
        rows = mb.rows_between("INBOX", 1, 10)
        assert mb.read("INBOX", rows[1]).startswith(b"Return-Path: <b@example.net>\r\nFrom:")
        store.release(mb)
    finally:
        mda.close()


def test_notify_reaches_another_node(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    dsn = pg.create_db()

    async def run() -> None:
        a = ClusterStore(dsn, bodies_factory())
        b = ClusterStore(dsn, bodies_factory())
        try:
            woke = asyncio.Event()
            b.notifier.watch(ALICE.address, "INBOX", None, woke.set)
            await asyncio.wait_for(b.notifier.listening.wait(), 20)
            mb = await a.call(a.acquire, ALICE)
            await a.call(mb.ensure_defaults)
            await a.call(mb.append, "INBOX", msg(1))
            await asyncio.wait_for(woke.wait(), 20)
        finally:
            a.close()
            b.close()
    asyncio.run(run())


def test_postgresql_down_is_unavailable_and_nothing_is_stored(
        pg_own: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    s = ClusterStore(pg_own.create_db(), bodies_factory(), timeout=2.0)
    try:
        mb = s.acquire(ALICE)
        mb.ensure_defaults()
        mb.append("INBOX", msg(1))
        pg_own.stop()
        with pytest.raises(StoreUnavailable):
            mb.append("INBOX", msg(2))
        with pytest.raises(StoreUnavailable):
            mb.snapshot("INBOX")
        pg_own.start()
        for _ in range(3):  # the pool notices the restart on its own: a broken connection is dropped
            try:
                snap = mb.snapshot("INBOX")
                break
            except StoreUnavailable:
                continue
        assert list(snap.uids) == [1]
    finally:
        s.close()


def test_object_store_down_is_unavailable_and_no_row_is_committed(pg: PgServer) -> None:
    from .conftest import S3Server
    s3 = S3Server()
    b = BodyStore(s3.endpoint, "down", "test", "test", timeout=1.0)
    b.ensure_bucket()
    s = ClusterStore(pg.create_db(), b, timeout=2.0)
    try:
        mb = s.acquire(ALICE)
        mb.ensure_defaults()
        mb.append("INBOX", msg(0))
        mb.append("INBOX", msg(1))
        rows = mb.rows("INBOX", [1, 2])
        assert mb.read("INBOX", rows[1]) == msg(0)
        s3.stop()
        with pytest.raises(StoreUnavailable):
            mb.append("INBOX", msg(2))
        snap = mb.snapshot("INBOX")
        assert list(snap.uids) == [1, 2] and snap.uidnext == 3
        assert mb.read("INBOX", rows[1]) == msg(0)  # read before: from the cache (a key names its content)
        with pytest.raises(StoreUnavailable):
            mb.read("INBOX", rows[2])
    finally:
        s.close()


def test_gc_deletes_only_unreferenced_bodies_past_the_grace(mb: ClusterMailboxes, store: ClusterStore) -> None:
    from postier.store.cluster.gc import collect
    mb.append("INBOX", msg("gone"))
    mb.append("INBOX", msg("kept"))
    mb.create("Work")
    mb.append("INBOX", msg("copied"))
    mb.copy("INBOX", [3], "Work")
    mb.store("INBOX", [1, 3], "+FLAGS", ["\\Deleted"])
    assert mb.expunge("INBOX") == [1, 3]

    def keys() -> set[str]:
        return {o["Key"] for o in mb.bodies.client.list_objects_v2(Bucket=mb.bodies.bucket).get("Contents", [])}
    import psycopg
    with psycopg.connect(store.pool.conninfo, autocommit=True) as conn:
        assert collect(conn, mb.bodies, grace=3600) == 0  # too recent
        assert collect(conn, mb.bodies, grace=0) == 1
    h = {n: hashlib.sha256(msg(n)).hexdigest() for n in ("gone", "kept", "copied")}
    assert keys() == {body_key(h["kept"]), body_key(h["copied"])}
    _v, uid = mb.append("INBOX", msg("gone"))  # the same body again: uploaded again
    assert mb.read("INBOX", mb.rows("INBOX", [uid])[uid]) == msg("gone")


def test_two_nodes_storing_flags_at_once_lose_nothing(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    dsn = pg.create_db()
    stores = [ClusterStore(dsn, bodies_factory(), timeout=5.0) for _ in range(2)]
    try:
        boxes = [s.acquire(ALICE) for s in stores]
        boxes[0].ensure_defaults()
        boxes[0].append("INBOX", msg(1))
        boxes[0].append("INBOX", msg(2))
        rounds = 15
        modseqs: list[list[int]] = [[], []]

        def write(i: int) -> None:
            for n in range(rounds):
                modseqs[i].append(boxes[i].store("INBOX", [1], "+FLAGS", [f"k{i}x{n}"]).modseq)
                if i == 1 and n == rounds // 2:
                    boxes[i].store("INBOX", [2], "+FLAGS", ["\\Deleted"])
                    boxes[i].expunge("INBOX")
        together(lambda: write(0), lambda: write(1))
        row = boxes[0].rows("INBOX", [1])[1]
        assert set(row.keywords.split(" ")) == {f"k{i}x{n}" for i in (0, 1) for n in range(rounds)}
        every = modseqs[0] + modseqs[1]
        assert len(set(every)) == len(every) and row.modseq == max(every)
        assert list(boxes[1].snapshot("INBOX").uids) == [1]
    finally:
        for s in stores:
            s.close()


def test_multiappend_is_one_step_and_quota_counts_every_folder(mb: ClusterMailboxes) -> None:
    spooled = mb.spool()
    spooled.write(b"Subject: spooled\n\nbody\n")  # bare LF: stored with CRLF, as written
    v, uids = mb.append_many("INBOX", [(msg(1), ["\\Seen"], None), (spooled, [], 1_700_000_000.0), (msg(3), [], None)])
    assert uids == [1, 2, 3] and v == mb.snapshot("INBOX").uidvalidity
    rows = mb.rows("INBOX", uids)
    assert len({r.modseq for r in rows.values()}) == 1 and rows[2].idate == 1_700_000_000
    assert mb.read("INBOX", rows[2]) == b"Subject: spooled\r\n\r\nbody\r\n"
    with pytest.raises(MailboxNotFound):
        mb.append_many("Nowhere", [(msg(4), [], None)])
    assert mb.exists("INBOX") and not mb.exists("Nowhere")
    mb.copy("INBOX", [1], "Trash")
    usage = mb.quota_usage()
    assert usage.messages == 4 and usage.bytes == sum(r.size for r in rows.values()) + rows[1].size
    mb.store("INBOX", [1], "+FLAGS", ["\\Deleted"])
    assert mb.status("INBOX").deleted_size == rows[1].size


def test_pop3_maildrop_lock_spans_nodes(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    """RFC 1939 §8 across nodes: one holder per user, whichever node; another user is not blocked; a
    release (or the holder's connection ending) frees it."""
    dsn = pg.create_db()
    a, b = ClusterStore(dsn, bodies_factory()), ClusterStore(dsn, bodies_factory())
    bob = User("bob@example.org", "bob", "example.org", "maildir")
    try:
        unlock = a.lock_maildrop(ALICE)
        assert unlock is not None
        assert b.lock_maildrop(ALICE) is None  # another node
        assert a.lock_maildrop(ALICE) is None  # another session on the same node
        other = b.lock_maildrop(bob)
        assert other is not None
        other()
        unlock()
        again = b.lock_maildrop(ALICE)
        assert again is not None
        assert a.lock_maildrop(ALICE) is None
        again()
        # two sessions racing for it from two threads on two nodes: exactly one wins
        got: list[Callable[[], None] | None] = [None, None]
        go = threading.Barrier(2)

        def take(i: int, s: ClusterStore) -> None:
            go.wait()
            got[i] = s.lock_maildrop(ALICE)
        together(lambda: take(0, a), lambda: take(1, b), timeout=30)
        held = [g for g in got if g is not None]
        assert len(held) == 1
        held[0]()
    finally:
        a.close()
        b.close()


def test_sieve_scripts_are_shared_by_the_nodes(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    """RFC 5804 semantics over PostgreSQL: a script put and activated through one node is the active
    script on the other; quotas, RENAMESCRIPT of the active script, DELETESCRIPT of it refused."""
    from postier.store.sieve import ScriptError
    dsn = pg.create_db()
    a, b = ClusterStore(dsn, bodies_factory()), ClusterStore(dsn, bodies_factory())
    try:
        sa = a.sieve_storage(2, 100).scripts(ALICE)
        sb = b.sieve_storage(2, 100).scripts(ALICE)
        assert sb.active_script() is None and sb.list() == []
        sa.put("one", b"keep;")
        sa.set_active("one")
        assert sb.active_script() == ("one", b"keep;")
        sb.put("one", b"discard;")  # replaced, still active
        assert sa.active_script() == ("one", b"discard;")
        sa.put("two", b"keep;")
        with pytest.raises(ScriptError) as e:
            sb.put("three", b"keep;")
        assert e.value.code == "QUOTA/MAXSCRIPTS"
        with pytest.raises(ScriptError) as e:
            sb.have_space("two", 101)
        assert e.value.code == "QUOTA/MAXSIZE"
        with pytest.raises(ScriptError) as e:
            sb.delete("one")
        assert e.value.code == "ACTIVE"
        sb.rename("one", "first")
        assert sa.list() == [("first", True), ("two", False)]
        with pytest.raises(ScriptError) as e:
            sa.rename("two", "first")
        assert e.value.code == "ALREADYEXISTS"
        sa.set_active("two")
        assert sb.list() == [("first", False), ("two", True)]
        with pytest.raises(ScriptError) as e:
            sb.set_active("nope")
        assert e.value.code == "NONEXISTENT"
        sb.set_active("")
        assert sa.active() is None
        sa.delete("first")
        with pytest.raises(ScriptError):
            sa.get("../x")
        bob = User("bob@example.org", "bob", "example.org", "maildir")
        assert b.sieve_storage(2, 100).scripts(bob).list() == []  # per user
        # vacation / duplicate tracking, seen from the other node
        ta, tb = a.sieve_storage(2, 100).tracking(ALICE), b.sieve_storage(2, 100).tracking(ALICE)
        ta.record("vacation\0x@example.net", 2e9)
        assert tb.seen("vacation\0x@example.net", 1e9) and not tb.seen("other", 1e9)
        assert not tb.seen("vacation\0x@example.net", 3e9)
        # two nodes deciding at once: inside `exclusive` the check and the mark are one step
        winners: list[str] = []
        start = threading.Barrier(2)

        def decide(node: str, store: ClusterStore) -> None:
            t = store.sieve_storage(2, 100).tracking(ALICE)
            start.wait(10)
            with t.exclusive():
                if not t.seen("vacation\0race@example.net", 1e9):
                    time.sleep(0.2)  # the other node tries meanwhile, and must wait
                    t.record("vacation\0race@example.net", 2e9)
                    winners.append(node)
        together(lambda: decide("a", a), lambda: decide("b", b), timeout=30)
        assert len(winners) == 1, winners
    finally:
        a.close()
        b.close()


def test_sieve_flags_and_a_missing_folder_at_delivery(store: ClusterStore, tmp_path: object) -> None:
    """RFC 5232 imap4flags on a delivered copy: system flags and keywords; RFC 5228 §4.1 fileinto of
    a missing folder creates it."""
    from pathlib import Path
    mda = ClusterDelivery(store, Path(str(tmp_path)))
    mb = store.acquire(ALICE)
    try:
        mb.ensure_defaults()
        info = mb.delivery_suffix("Lists.Work", ["\\Flagged", "$Important", "bad keyword(", "\\Recent"])
        assert mb.exists("Lists.Work")
        res = mda.deliver_one(ALICE, b"", msg("k"), "b@example.net", "Lists.Work", info)
        assert res.ok, res.detail
        row = mb.rows_between("Lists.Work", 1, 10)[1]
        assert set(row.flag_names) == {"\\Flagged", "$Important"}
        res = mda.deliver_one(ALICE, b"", msg("n"), "b@example.net", "Other", "")  # no flags, no folder yet
        assert res.ok and mb.exists("Other") and list(mb.snapshot("Other").uids) == [1]
    finally:
        store.release(mb)
        mda.close()


def test_quota_refuses_append_copy_and_delivery_across_nodes(
        pg: PgServer, bodies_factory: Callable[[], BodyStore], tmp_path: object) -> None:
    """RFC 9208 §4.1 in cluster mode: an APPEND, a COPY or a delivery that would pass the limit stores
    nothing (MOVE is allowed); writers on two nodes at once never pass it together."""
    from pathlib import Path

    from postier.store.errors import OverQuota
    from postier.store.quota import OVER_QUOTA
    dsn = pg.create_db()
    size = len(msg("0-00"))
    limited = User("carol@example.org", "carol", "example.org", "maildir", quota=size * 10)
    a, b = ClusterStore(dsn, bodies_factory()), ClusterStore(dsn, bodies_factory())
    mda = ClusterDelivery(b, Path(str(tmp_path)))
    try:
        ma, mb_ = a.acquire(limited), b.acquire(limited)
        ma.ensure_defaults()
        ma.create("Work")
        got: list[list[int]] = [[], []]
        refused = [0, 0]

        def fill(i: int, box: ClusterMailboxes) -> None:
            for n in range(10):
                try:
                    got[i].append(box.append("INBOX", msg(f"{i}-{n:02d}"))[1])
                except OverQuota:
                    refused[i] += 1
        together(lambda: fill(0, ma), lambda: fill(1, mb_), timeout=60)
        assert len(got[0]) + len(got[1]) == 10 and sum(refused) == 10
        usage = mb_.quota_usage()
        assert usage.bytes == size * 10 and usage.limit == size * 10
        with pytest.raises(OverQuota):
            ma.copy("INBOX", [1], "Work")
        assert ma.status("Work").messages == 0
        assert ma.move("INBOX", [1], "Work").dest_uids == [1]  # a move adds nothing
        res = mda.deliver_one(limited, b"", msg("late"), "x@example.net")
        assert not res.ok and res.detail == OVER_QUOTA
        assert mda.quota_used(limited) == size * 10
        ma.store("INBOX", [2], "+FLAGS", ["\\Deleted"])
        ma.expunge("INBOX")
        assert mda.deliver_one(limited, b"", msg("9-99"), "x@example.net").ok  # room again
        a.release(ma)
        b.release(mb_)
    finally:
        mda.close()
        a.close()
        b.close()


def test_export_then_import_keeps_uidvalidity_and_uids(store: ClusterStore, mb: ClusterMailboxes,
                                                       tmp_path: object) -> None:
    """Cluster -> Maildir (dovecot-uidlist) -> another user's new folders: the same UIDVALIDITY, UIDs
    (gaps included), UIDNEXT, flags, keywords, dates and bytes; twice the same body in one folder is
    two messages. A second import changes nothing; into a folder that held mail, UIDs are new."""
    from pathlib import Path

    from postier.store.transfer import ImportState, export_maildir, import_maildir
    root = Path(str(tmp_path))
    for n in range(5):
        mb.append("INBOX", msg(n), ["\\Seen", "$Work"] if n == 1 else [], 1_600_000_000 + n)
    mb.append("INBOX", msg(1))  # the same body again (uid 6)
    mb.store("INBOX", [2, 4], "+FLAGS", ["\\Deleted"])
    mb.expunge("INBOX")
    mb.create("Work")
    mb.copy("INBOX", [1, 3], "Work")
    export_maildir(mb, root / "out")
    bob = User("bob@example.org", "bob", "example.org", "maildir")
    other = store.acquire(bob)
    try:
        other.ensure_defaults()
        state = ImportState(root / "state.sqlite")
        try:
            stats = import_maildir(other, root / "out", state)
            assert stats.copied == 6  # 4 in INBOX, 2 in Work
            for name in ("INBOX", "Work"):
                want, got = mb.snapshot(name), other.snapshot(name)
                assert (got.uidvalidity, list(got.uids), got.uidnext) == (want.uidvalidity, list(want.uids),
                                                                         want.uidnext), name
                w, g = mb.rows(name, want.uids), other.rows(name, got.uids)
                for uid in want.uids:
                    assert (g[uid].flag_names, g[uid].idate, g[uid].size) == (w[uid].flag_names, w[uid].idate,
                                                                              w[uid].size)
                    assert other.read(name, g[uid]) == mb.read(name, w[uid])
            assert list(other.snapshot("INBOX").uids) == [1, 3, 5, 6]
            again = import_maildir(other, root / "out", state)
            assert (again.copied, again.skipped) == (0, 6)
        finally:
            state.close()
        # into a folder that already held mail: appended, new UIDs
        carol = store.acquire(User("carol@example.org", "carol", "example.org", "maildir"))
        try:
            carol.ensure_defaults()
            carol.append("INBOX", msg("x"))
            carol.delete_uids("INBOX", [1])
            state = ImportState(root / "state2.sqlite")
            try:
                import_maildir(carol, root / "out", state)
            finally:
                state.close()
            snap = carol.snapshot("INBOX")
            assert list(snap.uids) == [2, 3, 4, 5] and snap.uidvalidity != mb.snapshot("INBOX").uidvalidity
            assert list(carol.snapshot("Work").uids) == [1, 2] == list(mb.snapshot("Work").uids)
        finally:
            store.release(carol)
    finally:
        store.release(other)


def test_quota_warnings_once_per_crossing(store: ClusterStore, tmp_path: object) -> None:
    """80 % and 95 % warnings (pipeline/quota.py) in cluster mode: once per crossing, re-armed when a
    later check finds the usage below the level; a user without a quota never gets one."""
    from pathlib import Path
    size = len(msg("00"))
    dave = User("dave@example.org", "dave", "example.org", "maildir", quota=size * 20)
    mda = ClusterDelivery(store, Path(str(tmp_path)))
    try:
        levels = []
        for n in range(20):
            assert mda.deliver_one(dave, b"", msg(f"{n:02d}"), "x@example.net").ok
            levels.append(mda.quota_warning_due(dave))
        assert levels[15] == 80 and levels[18] == 95  # 16 and 19 of 20 messages
        assert [lv for lv in levels if lv is not None] == [80, 95]
        mb = store.acquire(dave)
        try:
            mb.delete_uids("INBOX", list(range(1, 11)))  # down to 50 %
        finally:
            store.release(mb)
        assert mda.quota_warning_due(dave) is None  # the check after the deletion re-arms
        got = []
        for n in range(6):  # up to 80 % again
            assert mda.deliver_one(dave, b"", msg(f"b{n}"), "x@example.net").ok
            got.append(mda.quota_warning_due(dave))
        assert got == [None] * 5 + [80]
        assert mda.quota_warning_due(ALICE) is None
    finally:
        mda.close()


def test_export_then_import_into_the_maildir_store_keeps_uids(mb: ClusterMailboxes, tmp_path: object) -> None:
    """Cluster -> Maildir (dovecot-uidlist) -> the single-machine store (a user moved out of the
    cluster): the same UIDVALIDITY, UIDs (gaps included), UIDNEXT, flags, keywords, dates and bytes,
    and the next APPEND continues after them."""
    from pathlib import Path

    from postier.store.mailbox import MailStore
    from postier.store.transfer import ImportState, export_maildir, import_maildir
    root = Path(str(tmp_path))
    for n in range(5):
        mb.append("INBOX", msg(n), ["\\Seen", "$Work"] if n == 1 else [], 1_600_000_000 + n)
    mb.append("INBOX", msg(1), ["\\Flagged"])  # the same body again (uid 6): two files in the export
    mb.store("INBOX", [2, 4], "+FLAGS", ["\\Deleted"])
    mb.expunge("INBOX")
    mb.create("Work")
    mb.copy("INBOX", [1, 3], "Work")
    export_maildir(mb, root / "out")
    single = MailStore(root / "mail")
    other = single.acquire(ALICE)
    try:
        other.ensure_defaults()
        state = ImportState(root / "state.sqlite")
        try:
            assert import_maildir(other, root / "out", state).copied == 6
        finally:
            state.close()
        for name in ("INBOX", "Work"):
            want, got = mb.snapshot(name), other.snapshot(name)
            assert (got.uidvalidity, list(got.uids), got.uidnext) == (want.uidvalidity, list(want.uids),
                                                                     want.uidnext), name
            w, g = mb.rows(name, want.uids), other.rows(name, got.uids)
            for uid in want.uids:
                assert (g[uid].flag_names, other.internal_date(name, g[uid]), g[uid].size) == (
                    w[uid].flag_names, w[uid].idate, w[uid].size)
                assert other.read(name, g[uid]) == mb.read(name, w[uid])
        assert list(other.snapshot("INBOX").uids) == [1, 3, 5, 6]
        assert other.append("INBOX", msg("next"))[1] == 7
    finally:
        single.release(other)
        single.close()
