"""`postier cluster gc` against a real PostgreSQL and a real S3 server (moto): the listing pass (objects
no `bodies` row names: adopted when a message or a queued message refers to them, deleted otherwise,
bounded per run and resumed), and the race of both passes with a concurrent upload, forced: one side
is held at a hook of the real body store (after its PUT, before its DELETE, after its listing) or on
a second connection's uncommitted row, and the other side is observed waiting on PostgreSQL's lock
(pg_stat_activity), never by sleeping."""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

psycopg = pytest.importorskip("psycopg")

from postier.message.types import User  # noqa: E402
from postier.store.cluster.bodies import BodyStore, body_key  # noqa: E402
from postier.store.cluster.gc import collect, collect_orphans, mark, run  # noqa: E402
from postier.store.cluster.mailboxes import ClusterMailboxes  # noqa: E402
from postier.store.cluster.schema import ensure_schema  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402

ALICE = User("alice@example.org", "alice", "example.org", "maildir")
#: A negative grace makes every object "old" whatever the clocks of S3 and PostgreSQL: the listing
#: pass's safety must then come from the row discipline alone.
ANY_AGE = -60.0


def msg(n: str) -> bytes:
    return f"From: a@example.org\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()


def sha(n: str) -> str:
    return hashlib.sha256(msg(n)).hexdigest()


class Gate:
    """Holds the thread that calls it until `open()`; `reached` tells the test it got there."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self._go = threading.Event()

    def __call__(self, *_args: object) -> None:
        self.reached.set()
        assert self._go.wait(60), "the test never opened the gate"

    def open(self) -> None:
        self._go.set()


class HookedBodies(BodyStore):
    """The real body store, with a hook after each PUT, before each DELETE and after each listing:
    where a test holds one side of an interleaving."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.after_put: Callable[[str], None] | None = None
        self.before_delete: Callable[[str], None] | None = None
        self.after_list: Callable[[], None] | None = None

    def put(self, data: bytes, digest: str | None = None) -> str:
        got = super().put(data, digest)
        if self.after_put is not None:
            self.after_put(got)
        return got

    def delete(self, digest: str) -> None:
        if self.before_delete is not None:
            self.before_delete(digest)
        super().delete(digest)

    def list_page(self, start_after: str, limit: int = 1000) -> tuple[list[tuple[str, datetime]], bool]:
        got = super().list_page(start_after, limit)
        if self.after_list is not None:
            self.after_list()
        return got


class Cluster:
    def __init__(self, dsn: str, s3: S3Server) -> None:
        self.dsn = dsn
        self.endpoint = s3.endpoint
        self.bucket = s3.bucket()
        self.bodies = HookedBodies(s3.endpoint, self.bucket, "test", "test", timeout=2.0)
        self.bodies.ensure_bucket()
        self.store = ClusterStore(dsn, self.bodies, timeout=5.0)
        self.mb: ClusterMailboxes = self.store.acquire(ALICE)
        self.mb.ensure_defaults()

    def fresh(self) -> BodyStore:
        """Another client of the bucket, with an empty cache: what it reads is in the object store."""
        return BodyStore(self.endpoint, self.bucket, "test", "test", timeout=2.0)

    def objects(self) -> set[str]:
        return {k for k, _m in self.bodies.list_page("", 1000)[0]}

    def all_keys(self) -> set[str]:
        return {o["Key"] for o in self.bodies.client.list_objects_v2(Bucket=self.bucket).get("Contents", [])}

    def sql(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query.encode(), args)
            return cur.fetchall() if cur.description else []

    def rows(self) -> set[str]:
        return {h for (h,) in self.sql("SELECT hash FROM bodies")}

    def expunged_body(self, name: str, age: str = "") -> str:
        """Append `name`, expunge it: an unreferenced body with its row (last uploaded `age` ago)."""
        _v, uid = self.mb.append("INBOX", msg(name))
        self.mb.store("INBOX", [uid], "+FLAGS", ["\\Deleted"])
        assert self.mb.expunge("INBOX") == [uid]
        if age:
            self.sql("UPDATE bodies SET last_put = now() - %s::interval WHERE hash = %s", (age, sha(name)))
        return sha(name)

    def read_back(self, uid: int, name: str) -> None:
        """The message is there, and its body is in the object store (not only in a cache)."""
        row = self.mb.rows("INBOX", [uid])[uid]
        assert row.base == sha(name)
        assert self.mb.read("INBOX", row) == msg(name)
        assert self.fresh().get(sha(name)) == msg(name)

    def close(self) -> None:
        self.store.release(self.mb)
        self.store.close()


@pytest.fixture
def cl(pg: PgServer, s3: S3Server) -> Iterator[Cluster]:
    c = Cluster(pg.create_db(), s3)
    yield c
    c.close()


def gc_conn(cl: Cluster) -> Any:
    return psycopg.connect(cl.dsn, autocommit=True)


def in_thread[T](target: Callable[[], T]) -> tuple[threading.Thread, list[T | BaseException]]:
    """Run `target` in a thread; its result or exception lands in the returned list."""
    out: list[T | BaseException] = []

    def body() -> None:
        try:
            out.append(target())
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            out.append(exc)
    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t, out


def wait_on_lock(dsn: str, query: str, thread: threading.Thread) -> None:
    """Until a statement starting with `query` waits on a PostgreSQL lock (bounded: 30 s)."""
    with psycopg.connect(dsn, autocommit=True) as watch:
        for _ in range(600):
            if watch.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
                             (query + "%",)).fetchone():
                return
            assert thread.is_alive(), "the thread finished instead of waiting"
            thread.join(0.05)
    pytest.fail(f"no {query!r} waited on a lock")


def finish[T](thread: threading.Thread, out: list[T | BaseException]) -> T:
    thread.join(60)
    assert not thread.is_alive() and len(out) == 1
    got = out[0]
    if isinstance(got, BaseException):
        raise got
    return got


# -- the listing pass ------------------------------------------------------------------------------

def test_listing_adopts_referenced_bodies_and_deletes_the_rest(cl: Cluster) -> None:
    _v, kept = cl.mb.append("INBOX", msg("kept"))  # a row and a message: not the listing's business
    _v, legacy = cl.mb.append("INBOX", msg("legacy"))
    cl.sql("DELETE FROM bodies WHERE hash = %s", (sha("legacy"),))  # as uploaded before the table existed
    cl.bodies.put(msg("queued"))  # a queued message's body without a row
    cl.sql("INSERT INTO queue_messages (id, body, sender, created, size) VALUES ('q1', %s, '', 0, 1)",
           (sha("queued"),))
    lost = cl.expunged_body("lost")  # its row lost: an orphan; its full-text row went with the row
    assert cl.sql("SELECT 1 FROM body_text WHERE hash = %s", (lost,))
    cl.sql("DELETE FROM bodies WHERE hash = %s", (lost,))
    assert not cl.sql("SELECT 1 FROM body_text WHERE hash = %s", (lost,))  # ON DELETE CASCADE
    cl.bodies.put(msg("orphan"))  # uploaded, its row never committed
    other = hashlib.sha256(b"x").hexdigest()
    foreign = {"bodies/zz/not-a-hash", f"bodies/00/{other}", "elsewhere/x"}  # not body keys: never touched
    for key in foreign:
        cl.bodies.client.put_object(Bucket=cl.bucket, Key=key, Body=b"x")

    with gc_conn(cl) as conn:
        assert collect_orphans(conn, cl.bodies, grace=3600).deleted == 0  # all too recent
        done = collect_orphans(conn, cl.bodies, grace=ANY_AGE)
    assert (done.listed, done.adopted, done.deleted, done.end) == (7, 2, 2, True)
    assert cl.all_keys() == {body_key(sha(n)) for n in ("kept", "legacy", "queued")} | foreign
    assert cl.rows() == {sha(n) for n in ("kept", "legacy", "queued")}
    assert not cl.sql("SELECT 1 FROM body_text WHERE hash = %s", (lost,))
    with gc_conn(cl) as conn:  # adopted: the table's collector sees them referenced
        assert collect(conn, cl.bodies, grace=ANY_AGE) == 0
        assert collect_orphans(conn, cl.bodies, grace=ANY_AGE).deleted == 0
    cl.read_back(kept, "kept")
    cl.read_back(legacy, "legacy")
    assert cl.fresh().get(sha("queued")) == msg("queued")


def test_listing_is_bounded_per_run_and_goes_on_from_the_last_key(cl: Cluster) -> None:
    names = [f"o{i}" for i in range(7)]
    for n in names:
        cl.bodies.put(msg(n))
    _v, uid = cl.mb.append("INBOX", msg("kept"))
    order = sorted(sha(n) for n in [*names, "kept"])
    runs = []
    with gc_conn(cl) as conn:
        for _ in range(4):  # 3 keys a run, 2 a request, 1 a transaction
            r = collect_orphans(conn, cl.bodies, grace=ANY_AGE, limit=3, page=2, batch=1)
            runs.append((r.listed, r.deleted, r.end))
            cursor = cl.sql("SELECT cursor FROM gc_state")[0][0]
            if not r.end:
                assert cursor == body_key(order[len(runs) * 3 - 1])
            else:
                assert cursor == ""
    slices = [order[0:3], order[3:6], order[6:8], [sha("kept")]]  # the fourth run starts over
    assert runs == [(len(k), len([h for h in k if h != sha("kept")]), i >= 2) for i, k in enumerate(slices)]
    assert cl.objects() == {body_key(sha("kept"))}
    cl.read_back(uid, "kept")



def test_a_database_made_before_the_full_text_cascade_gets_it_once(cl: Cluster) -> None:
    """`body_text` rows were once deleted by gc by hand, with no foreign key: `ensure_schema` drops the
    rows of bodies without a `bodies` row, adds the key (ON DELETE CASCADE), and finds it the next time."""
    digest = cl.expunged_body("old")
    stray = hashlib.sha256(b"stray").hexdigest()
    fk = "SELECT conname FROM pg_constraint WHERE conrelid = 'body_text'::regclass AND contype = 'f'"
    [(name,)] = cl.sql(fk)
    cl.sql(f'ALTER TABLE body_text DROP CONSTRAINT "{name}"')  # as an older postier made the table
    cl.sql("INSERT INTO body_text SELECT %s, version, exact, subject, hfrom, hto, hcc, hbcc, leaves, headers, "
           '"inner" FROM body_text WHERE hash = %s', (stray, digest))
    with gc_conn(cl) as conn:
        ensure_schema(conn)
        ensure_schema(conn)  # the second start: nothing left to do
    assert len(cl.sql(fk)) == 1
    assert {h for (h,) in cl.sql("SELECT hash FROM body_text WHERE hash IN (%s, %s)", (digest, stray))} == {digest}
    with gc_conn(cl) as conn:
        assert collect(conn, cl.bodies, grace=ANY_AGE) == 1
    assert not cl.sql("SELECT 1 FROM body_text WHERE hash = %s", (digest,))  # went with its bodies row

# -- the table pass raced by an upload ---------------------------------------------------------------

def test_an_upload_waits_on_the_collectors_row_then_uploads_again(cl: Cluster) -> None:
    """collect holds the old body's row (before its DELETE); an APPEND of the same body waits in
    `mark`; the collector deletes object and row and commits; the APPEND then marks, uploads, commits."""
    digest = cl.expunged_body("raced", age="2 days")
    gate = Gate()
    cl.bodies.before_delete = gate
    with gc_conn(cl) as conn:
        collector, collected = in_thread(lambda: collect(conn, cl.bodies, grace=3600))
        assert gate.reached.wait(30)
        cl.bodies.before_delete = None
        appender, appended = in_thread(lambda: cl.mb.append("INBOX", msg("raced")))
        wait_on_lock(cl.dsn, "INSERT INTO bodies", appender)
        assert body_key(digest) in cl.objects()  # not yet deleted
        gate.open()
        assert finish(collector, collected) == 1
    _v, uid = finish(appender, appended)
    cl.read_back(uid, "raced")
    assert digest in cl.rows()


def test_an_upload_not_yet_committed_survives_both_passes(cl: Cluster) -> None:
    """The APPEND is held after its PUT, its message row not committed: its mark renewed the old
    row, so neither the table pass nor the listing pass deletes the object."""
    digest = cl.expunged_body("raced", age="2 days")
    gate = Gate()
    cl.bodies.after_put = gate
    appender, appended = in_thread(lambda: cl.mb.append("INBOX", msg("raced")))
    assert gate.reached.wait(30)
    cl.bodies.after_put = None
    with gc_conn(cl) as conn:
        assert collect(conn, cl.bodies, grace=3600) == 0
        done = collect_orphans(conn, cl.bodies, grace=ANY_AGE)
    assert (done.listed, done.adopted, done.deleted) == (1, 0, 0)
    assert body_key(digest) in cl.objects()
    gate.open()
    _v, uid = finish(appender, appended)
    cl.read_back(uid, "raced")


# -- the listing pass raced by an upload -------------------------------------------------------------

def test_an_upload_between_the_listing_and_the_row_insert_is_left_alone(cl: Cluster) -> None:
    """The listing saw the object without a row; before the pass inserts its own row, an APPEND of
    the same body marks and uploads (held before its commit): the pass then finds the row and leaves
    the object."""
    digest = cl.expunged_body("raced")
    cl.sql("DELETE FROM bodies WHERE hash = %s", (digest,))
    listed = Gate()
    cl.bodies.after_list = listed
    with gc_conn(cl) as conn:
        collector, collected = in_thread(lambda: collect_orphans(conn, cl.bodies, grace=ANY_AGE))
        assert listed.reached.wait(30)
        cl.bodies.after_list = None
        uploaded = Gate()
        cl.bodies.after_put = uploaded
        appender, appended = in_thread(lambda: cl.mb.append("INBOX", msg("raced")))
        assert uploaded.reached.wait(30)
        cl.bodies.after_put = None
        listed.open()
        done = finish(collector, collected)
    assert (done.listed, done.adopted, done.deleted) == (1, 0, 0)
    uploaded.open()
    _v, uid = finish(appender, appended)
    cl.read_back(uid, "raced")


def test_the_row_insert_waits_on_a_mark_not_yet_committed(cl: Cluster) -> None:
    """Two connections, explicit lock order: an uploader's `mark` is inserted, not committed; the
    pass found no row and its own INSERT waits on the uploader's; the uploader PUTs and commits; the
    pass's INSERT then does nothing, and the object stays."""
    digest = cl.expunged_body("raced")
    cl.sql("DELETE FROM bodies WHERE hash = %s", (digest,))
    with psycopg.connect(cl.dsn) as uploader, gc_conn(cl) as conn:
        mark(uploader, digest)  # uncommitted
        collector, collected = in_thread(lambda: collect_orphans(conn, cl.bodies, grace=ANY_AGE))
        wait_on_lock(cl.dsn, "INSERT INTO bodies (hash) SELECT", collector)
        cl.bodies.put(msg("raced"))
        uploader.commit()
        done = finish(collector, collected)
    assert (done.listed, done.adopted, done.deleted) == (1, 0, 0)
    _v, uid = cl.mb.append("INBOX", msg("raced"))
    cl.read_back(uid, "raced")


def test_an_upload_waits_on_the_listing_pass_row_then_uploads_again(cl: Cluster) -> None:
    """The pass holds its own uncommitted row for an orphan (before its DELETE); an APPEND of the same
    body waits in `mark`; the pass deletes object and row and commits; the APPEND then uploads."""
    digest = cl.expunged_body("raced")
    cl.sql("DELETE FROM bodies WHERE hash = %s", (digest,))
    gate = Gate()
    cl.bodies.before_delete = gate
    with gc_conn(cl) as conn:
        collector, collected = in_thread(lambda: collect_orphans(conn, cl.bodies, grace=ANY_AGE))
        assert gate.reached.wait(30)
        cl.bodies.before_delete = None
        appender, appended = in_thread(lambda: cl.mb.append("INBOX", msg("raced")))
        wait_on_lock(cl.dsn, "INSERT INTO bodies", appender)
        gate.open()
        done = finish(collector, collected)
    assert (done.listed, done.adopted, done.deleted) == (1, 0, 1)
    _v, uid = finish(appender, appended)
    cl.read_back(uid, "raced")
    assert digest in cl.rows()


# -- a COPY raced by an EXPUNGE of its source ---------------------------------------------------------

def test_a_copy_whose_source_is_expunged_meanwhile_keeps_its_body(cl: Cluster) -> None:
    """COPY adds rows for an old body without marking it. It holds the source folder's row until it
    commits, and an EXPUNGE takes that row first, so a collector sees the source or the copy, never
    neither. Forced: the COPY, past its read of the source, is held on the user's quota lock by a
    second connection; the EXPUNGE of the source, from another node, waits on the folder row; both
    passes run then."""
    from postier.store.cluster.mailboxes import _quota_key

    bob = User("bob@example.org", "bob", "example.org", "maildir", quota=1 << 30)
    mb = cl.store.acquire(bob)
    other = ClusterStore(cl.dsn, cl.fresh(), timeout=5.0)
    mb2 = other.acquire(bob)
    try:
        mb.ensure_defaults()
        mb.create("Work")
        _v, uid = mb.append("INBOX", msg("copied"))
        cl.sql("UPDATE bodies SET last_put = now() - interval '2 days'")
        mb.store("INBOX", [uid], "+FLAGS", ["\\Deleted"])
        with psycopg.connect(cl.dsn) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (_quota_key(bob.address),))  # until commit
            copier, copied = in_thread(lambda: mb.copy("INBOX", [uid], "Work"))
            wait_on_lock(cl.dsn, "SELECT pg_advisory_xact_lock", copier)
            expunger, expunged = in_thread(lambda: mb2.expunge("INBOX"))
            wait_on_lock(cl.dsn, "SELECT id, uidvalidity, keywords FROM folders", expunger)
            with gc_conn(cl) as conn:
                assert collect(conn, cl.bodies, grace=3600) == 0
                assert collect_orphans(conn, cl.bodies, grace=ANY_AGE).deleted == 0
            holder.commit()
        new = finish(copier, copied).dest_uids
        assert finish(expunger, expunged) == [uid]
        with gc_conn(cl) as conn:
            assert collect(conn, cl.bodies, grace=3600) == 0
        row = mb.rows("Work", new)[new[0]]
        assert mb.read("Work", row) == msg("copied") and cl.fresh().get(row.base) == msg("copied")
    finally:
        cl.store.release(mb)
        other.release(mb2)
        other.close()


# -- the command ---------------------------------------------------------------------------------------

def test_cluster_gc_command_prints_and_status_shows_the_counts(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    from .test_nodes import make_nodes

    dsn = pg.create_db()
    node = make_nodes(tmp_path, dsn, s3, count=1)[0]
    with psycopg.connect(dsn, autocommit=True) as conn:  # as a cluster made before the table
        conn.execute("DROP TABLE gc_state")
    bucket = re.search(r's3_bucket = "([^"]+)"', node.config.read_text())
    assert bucket is not None
    b = BodyStore(s3.endpoint, bucket.group(1), "test", "test")
    b.put(msg("orphan"))
    assert "last gc: never" in node.cli("cluster", "status").stdout
    out = node.cli("cluster", "gc", "--no-orphans", "--grace", "0").stdout
    assert "deleted 0 unreferenced bodies" in out and "listed" not in out
    out = node.cli("cluster", "gc", "--grace", "0").stdout
    assert "deleted 0 unreferenced bodies" in out
    assert "listed 1 objects of the bucket (to its end): 0 without a row but referenced (row added), " \
           "1 without a row or a reference (deleted)" in out
    assert "0 bodies collected; 1 objects listed, 0 adopted, 1 deleted; next listing from the start" \
           in node.cli("cluster", "status").stdout
    assert b.list_page("")[0] == []


# -- batched deletes (DeleteObjects) ---------------------------------------------------------------

@pytest.fixture
def delete_requests() -> Iterator[tuple[list[int], set[str]]]:
    """moto's DeleteObjects, counted (keys per request), refusing the keys put in the set as S3 does
    a key it may not delete (an AccessDenied in the answer's Errors, the others deleted)."""
    from moto.s3.models import S3Backend
    real = S3Backend.delete_objects
    sizes: list[int] = []
    refuse: set[str] = set()

    def counted(self: Any, bucket_name: str, objects: list[dict[str, Any]], *a: Any, **kw: Any) -> Any:
        sizes.append(len(objects))
        deleted, errors = real(self, bucket_name, [o for o in objects if o["Key"] not in refuse], *a, **kw)
        return deleted, [*errors, *(o["Key"] for o in objects if o["Key"] in refuse)]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S3Backend, "delete_objects", counted)
        yield sizes, refuse


def test_a_body_the_store_refuses_to_delete_keeps_its_row_in_both_passes(
        cl: Cluster, delete_requests: tuple[list[int], set[str]]) -> None:
    sizes, refuse = delete_requests
    names = ["t0", "t1", "t2"]
    for n in names:
        cl.expunged_body(n, age="2 days")
    refuse.add(body_key(sha("t1")))
    with gc_conn(cl) as conn:
        assert collect(conn, cl.bodies, grace=3600) == 2  # one request; t1 is not tried again this run
    assert sizes == [3]
    assert cl.rows() == {sha("t1")} and cl.objects() == {body_key(sha("t1"))}
    for n in ("o0", "o1", "o2"):  # orphans: no row
        cl.bodies.put(msg(n))
    refuse.add(body_key(sha("o2")))
    with gc_conn(cl) as conn:
        done = collect_orphans(conn, cl.bodies, grace=ANY_AGE)
    assert (done.listed, done.adopted, done.deleted) == (4, 0, 2)
    assert sizes == [3, 3]  # t1 has its row: not the listing's
    assert cl.rows() == {sha("t1"), sha("o2")}  # the refused orphan keeps the row the pass gave it
    assert cl.objects() == {body_key(sha("t1")), body_key(sha("o2"))}
    refuse.clear()
    with gc_conn(cl) as conn:  # the store is back: the next run deletes them
        assert collect(conn, cl.bodies, grace=ANY_AGE) == 2
    assert cl.rows() == set() and cl.objects() == set()


def test_a_run_counts_the_bodies_the_store_refused_for_status(
        cl: Cluster, delete_requests: tuple[list[int], set[str]]) -> None:
    """`run` (the command) counts what either pass could not delete, and keeps it in gc_state for
    `postier cluster status`; a run after the store accepts counts none."""
    _sizes, refuse = delete_requests
    cl.expunged_body("t0", age="2 days")
    cl.expunged_body("t1", age="2 days")
    cl.bodies.put(msg("o0"))  # an orphan: no row
    refuse.update({body_key(sha("t1")), body_key(sha("o0"))})
    with gc_conn(cl) as conn:
        done = run(conn, cl.bodies, grace=ANY_AGE)
        assert (done.collected, done.deleted, done.refused) == (1, 0, 2)
        assert conn.execute("SELECT refused FROM gc_state").fetchone() == (2,)
        refuse.clear()
        done = run(conn, cl.bodies, grace=ANY_AGE)
        assert (done.collected, done.refused) == (2, 0)
        assert conn.execute("SELECT refused FROM gc_state").fetchone() == (0,)
    assert cl.rows() == set() and cl.objects() == set()


def test_a_failed_delete_request_keeps_every_row_of_its_batch(cl: Cluster) -> None:
    from moto.s3.models import S3Backend
    from postier.store.errors import StoreUnavailable
    for n in ("a", "b"):
        cl.expunged_body(n, age="2 days")

    def failing(self: Any, *a: Any, **kw: Any) -> Any:
        raise RuntimeError("the object store failed this request")  # moto answers 500
    with pytest.MonkeyPatch.context() as mp, gc_conn(cl) as conn:
        mp.setattr(S3Backend, "delete_objects", failing)
        with pytest.raises(StoreUnavailable):
            collect(conn, cl.bodies, grace=3600)
    assert cl.rows() == {sha("a"), sha("b")} and len(cl.objects()) == 2
    with gc_conn(cl) as conn:
        assert collect(conn, cl.bodies, grace=3600) == 2
    assert cl.rows() == set() and cl.objects() == set()


def test_many_bodies_go_in_batches_of_one_request_each(
        cl: Cluster, delete_requests: tuple[list[int], set[str]]) -> None:
    import postier.store.cluster.bodies as bodies_module
    sizes, _refuse = delete_requests
    for i in range(5):
        cl.expunged_body(f"t{i}", age="2 days")
    for i in range(5):
        cl.bodies.put(msg(f"o{i}"))
    _v, uid = cl.mb.append("INBOX", msg("kept"))
    with gc_conn(cl) as conn:
        assert collect(conn, cl.bodies, grace=3600, batch=2) == 5
        assert sizes == [2, 2, 1]  # a transaction (its rows held) per request
        done = collect_orphans(conn, cl.bodies, grace=ANY_AGE, batch=3)
    assert (done.listed, done.adopted, done.deleted) == (6, 0, 5)
    assert sizes[:3] == [2, 2, 1] and sorted(sizes[3:]) == [2, 3]  # "kept" is in one of the listing's
    assert cl.rows() == {sha("kept")} and cl.objects() == {body_key(sha("kept"))}
    cl.read_back(uid, "kept")
    with pytest.MonkeyPatch.context() as mp:  # one call of more keys than a request takes (S3: 1,000)
        mp.setattr(bodies_module, "DELETE_BATCH", 2)
        digests = [cl.bodies.put(msg(f"d{i}")) for i in range(5)]
        cl.bodies.delete(digests)
    assert sizes[5:] == [2, 2, 1]
    assert cl.objects() == {body_key(sha("kept"))}


def test_an_upload_of_one_body_of_a_batch_waits_for_the_batch_then_uploads_again(cl: Cluster) -> None:
    """The collector holds a batch of three rows (before its one DeleteObjects); an APPEND of the
    middle body waits in `mark`; the batch goes whole, then the APPEND uploads and commits."""
    digests = [cl.expunged_body(n, age="2 days") for n in ("b0", "b1", "b2")]
    middle = sorted(zip(digests, ("b0", "b1", "b2"), strict=True))[1][1]
    gate = Gate()
    cl.bodies.before_delete = gate
    with gc_conn(cl) as conn:
        collector, collected = in_thread(lambda: collect(conn, cl.bodies, grace=3600))
        assert gate.reached.wait(30)
        cl.bodies.before_delete = None
        appender, appended = in_thread(lambda: cl.mb.append("INBOX", msg(middle)))
        wait_on_lock(cl.dsn, "INSERT INTO bodies", appender)
        assert cl.objects() == {body_key(d) for d in digests}  # not yet deleted
        gate.open()
        assert finish(collector, collected) == 3
    _v, uid = finish(appender, appended)
    cl.read_back(uid, middle)
    assert cl.rows() == {sha(middle)} and cl.objects() == {body_key(sha(middle))}


def test_a_candidate_used_again_before_its_batch_is_left_alone(cl: Cluster) -> None:
    """The table pass finds its candidates with one query, then locks each batch with every condition
    checked again: a body of a later batch appended again (its mark renewed, a message referring to
    it) while the first batch is held is not deleted, and the rest of the run goes on."""
    names = ("c0", "c1", "c2", "c3")
    digests = sorted((cl.expunged_body(n, age="2 days"), n) for n in names)
    last = digests[-1][1]  # in the second batch of two
    gate = Gate()
    cl.bodies.before_delete = gate
    with gc_conn(cl) as conn:
        collector, collected = in_thread(lambda: collect(conn, cl.bodies, grace=3600, batch=2))
        assert gate.reached.wait(30)
        cl.bodies.before_delete = None
        _v, uid = cl.mb.append("INBOX", msg(last))  # not held: its row is not in the first batch
        gate.open()
        assert finish(collector, collected) == 3
    assert cl.rows() == {sha(last)} and cl.objects() == {body_key(sha(last))}
    cl.read_back(uid, last)
