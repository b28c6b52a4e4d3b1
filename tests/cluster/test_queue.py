"""The cluster queue (postier/queue/cluster.py) against a real PostgreSQL and moto's S3: concurrent
claims never hand one recipient to two nodes, a lease that runs out lets another node deliver, the
daily counter is shared, and nothing is queued unless the body is confirmed. The runners are real
(`queue.runner.Queue`), delivering to a scripted MX on loopback; time is a manual clock."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from postier.message.received import queue_id  # noqa: E402
from postier.queue.spool import QUEUED, MessageInfo, Outcome, RecipientSpec  # noqa: E402
from tests.concurrency import together
from tests.queue.conftest import message, queue_env  # noqa: E402
from tests.queue.fakemx import FakeMX  # noqa: E402

from .conftest import PgServer  # noqa: E402

MX_IP = "127.0.0.12"
LEASE = 60.0
T0 = 1_800_000_000.0


@pytest.fixture
def stores(pg: PgServer, bodies_factory: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    """Makes cluster stores (one per simulated node) on one fresh database and bucket."""
    from postier.store.cluster.store import ClusterStore
    dsn = pg.create_db()
    made: list[Any] = []

    def make() -> Any:
        s = ClusterStore(dsn, bodies_factory(), workers=2)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def spool(store: Any, node: str) -> Any:
    from postier.queue.cluster import ClusterSpool
    return ClusterSpool(store, LEASE, node=node, clock=lambda: T0)


def accept(sp: Any, to: list[str], now: float = T0, claim: bool = False, user: str = "") -> str:
    """What `Queue.store` does: body first (confirmed), then the rows."""
    mid = queue_id()
    size = sp.write_file(mid, b"", message("alice@a.test", to[0], subject=mid))
    info = MessageInfo(mid, "alice@a.test", now, size, user=user)
    [result] = sp.run([sp.op_insert(info, [RecipientSpec(a) for a in to], now, claim)])
    assert result is None or result is True, result
    return mid


def test_concurrent_claims_never_share_a_recipient(stores: Callable[[], Any]) -> None:
    a, b = spool(stores(), "node-a"), spool(stores(), "node-b")
    want = set()
    for i in range(60):
        to = [f"r{i}-{j}@b.test" for j in range(3)]
        mid = accept(a if i % 2 else b, to)
        want |= {(mid, r) for r in to}
    got: dict[str, list[tuple[str, str]]] = {"node-a": [], "node-b": []}
    barrier = threading.Barrier(2)

    def claim(sp: Any) -> None:
        barrier.wait(10)
        for _ in range(200):  # bounded: 180 recipients, 7 at a time
            rows = sp.due_full(T0 + 1, 7)
            if not rows:
                return
            got[sp.node].extend((info.id, st.address) for info, st in rows)

    together(lambda: claim(a), lambda: claim(b), timeout=60)
    assert not set(got["node-a"]) & set(got["node-b"])
    assert len(got["node-a"]) + len(got["node-b"]) == len(want)
    assert set(got["node-a"]) | set(got["node-b"]) == want
    assert a.due_full(T0 + 1, 1000) == [] and b.due_full(T0 + 1, 1000) == []  # all leased
    assert b.next_due() == pytest.approx(T0 + 1 + LEASE)


def test_a_lease_runs_out_then_another_node_claims(stores: Callable[[], Any]) -> None:
    a, b = spool(stores(), "node-a"), spool(stores(), "node-b")
    mid = accept(a, ["bob@b.test"], claim=True)  # accepted by A, leased to A in the same commit
    assert b.due_full(T0 + 1, 10) == []
    assert a.renew([(mid, "bob@b.test")], T0 + 30) == []  # A is alive: its lease moves on
    assert b.due_full(T0 + LEASE + 1, 10) == []
    (info, st), = b.due_full(T0 + 30 + LEASE + 1, 10)  # A stopped renewing: B takes it
    assert (info.id, st.address, st.status) == (mid, "bob@b.test", QUEUED)
    assert a.renew([(mid, "bob@b.test")], T0 + 100) == [(mid, "bob@b.test")]  # A learns it lost it
    assert b.read_file(mid) == message("alice@a.test", "bob@b.test", subject=mid)
    # B records the delivery: the lease ends, the message leaves the queue
    done = b.op_complete(mid, [Outcome("bob@b.test", "delivered", "250 ok", "2.0.0")], T0 + 100, True)
    assert b.run([done]) == [True]
    assert a.message(mid) is None and a.count() == 0


def test_release_and_deferral_free_the_recipient(stores: Callable[[], Any]) -> None:
    a, b = spool(stores(), "node-a"), spool(stores(), "node-b")
    m1 = accept(a, ["x@b.test"], claim=True)
    m2 = accept(a, ["y@b.test"], claim=True)
    a.release([(m1, "x@b.test")])  # A stops: what it holds is anyone's
    assert [i.id for i, _ in b.due_full(T0, 10)] == [m1]
    deferred = a.op_complete(m2, [Outcome("y@b.test", QUEUED, "451 later", "4.0.0", next_attempt=T0 + 300)],
                             T0, True)
    assert a.run([deferred]) == [False]
    assert b.due_full(T0 + 59, 10) == []  # m1 is B's now (until T0 + LEASE), m2 not due
    assert [i.id for i, _ in b.due_full(T0 + 300, 10)] == [m1, m2]  # B's own lease ran out too; m2 is due
    assert [(x.address, x.mx) for x in b.attempts(m2)] == [("y@b.test", "")]


def test_daily_counter_is_shared(stores: Callable[[], Any]) -> None:
    a, b = spool(stores(), "node-a"), spool(stores(), "node-b")
    accept(a, ["x@b.test"], user="alice@a.test")
    accept(b, ["y@b.test"], user="alice@a.test")
    accept(b, ["z@b.test"], user="carol@a.test")
    assert a.sends_since("alice@a.test", T0 - 86400) == b.sends_since("alice@a.test", T0 - 86400) == 2
    b.prune_sends(T0 + 1)
    assert a.sends_since("alice@a.test", 0) == 0


def test_object_store_down_means_nothing_queued(stores: Callable[[], Any], pg: PgServer) -> None:
    from postier.queue.cluster import ClusterSpool
    from postier.store.cluster.bodies import BodyStore
    from postier.store.errors import StoreUnavailable
    good = stores()
    good.ensure_schema()
    down = BodyStore("http://127.0.0.1:9", "nowhere", "test", "test", timeout=1.0)  # discard port: refused
    sp = ClusterSpool(type(good)(good.pool.conninfo, down, workers=1), LEASE, node="n")
    try:
        with pytest.raises(StoreUnavailable):
            accept(sp, ["x@b.test"])
        assert sp.count() == 0
    finally:
        sp.store.close()


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 90))


def test_two_runners_deliver_each_recipient_once(tmp_path: Path, stores: Callable[[], Any]) -> None:
    """Two real runners share the queue: messages accepted by a third process (unclaimed), then both
    dispatch at the same time; the MX sees every recipient exactly once."""
    async def main() -> None:
        mx = FakeMX([MX_IP])
        sa, sb = spool(stores(), "node-a"), spool(stores(), "node-b")
        small = {"concurrency_total": 2}  # each scan claims 10 recipients (runner.CLAIM_MIN)
        async with queue_env(tmp_path / "a", mx, spool=sa, queue=small) as a, \
                queue_env(tmp_path / "b", port=mx.port, spool=sb, queue=small) as b:
            for env in (a, b):
                env.dns.add("b.test", "MX", "10 mx.b.test")
                env.dns.add("mx.b.test", "A", MX_IP)
            now = a.clock.time()
            sa.clock = sb.clock = a.clock.time
            ids = [await asyncio.to_thread(accept, sa, [f"u{i}@b.test", f"v{i}@b.test"], now) for i in range(20)]
            for _ in range(10):  # bounded: 40 recipients, 10 a scan
                if sum(await asyncio.gather(a.queue.run_once(), b.queue.run_once())) == 0:
                    break
            rcpts = sorted(r for d in mx.delivered for r in d.rcpts)
            assert len(rcpts) == 40 and len(set(rcpts)) == 40, rcpts
            assert a.queue.stats["sent"] > 0 and b.queue.stats["sent"] > 0  # both worked
            assert a.queue.stats["sent"] + b.queue.stats["sent"] == 40
            assert await asyncio.to_thread(sa.count) == 0  # every message left the queue
            assert [await asyncio.to_thread(sb.message, i) for i in ids] == [None] * len(ids)
    run(main())


def test_a_dead_runners_message_is_delivered_by_the_other_after_its_lease(tmp_path: Path,
                                                                          stores: Callable[[], Any]) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP])
        sa, sb = spool(stores(), "node-a"), spool(stores(), "node-b")
        async with queue_env(tmp_path / "b", mx, spool=sb) as b:
            b.dns.add("b.test", "MX", "10 mx.b.test")
            b.dns.add("mx.b.test", "A", MX_IP)
            sb.clock = b.clock.time
            now = b.clock.time()
            # A accepted (and claimed) the message, then died before delivering it
            mid = await asyncio.to_thread(accept, sa, ["bob@b.test"], now, True)
            assert await b.queue.run_once() == 0 and mx.delivered == []
            b.clock.advance(LEASE + 1)
            assert await b.queue.run_once() == 1
            assert [d.rcpts for d in mx.delivered] == [["RCPT TO:<bob@b.test>"]]
            assert await asyncio.to_thread(sb.message, mid) is None
    run(main())


def test_admin_list_show_retry_delete(stores: Callable[[], Any]) -> None:
    """What `postier queue` and the web admin call, on the shared queue from another node."""
    a, b = spool(stores(), "node-a"), spool(stores(), "node-b")
    m1 = accept(a, ["x@b.test", "y@b.test"])
    m2 = accept(a, ["z@b.test"])
    later = a.op_complete(m1, [Outcome("x@b.test", QUEUED, "451 later", "4.0.0", mx="mx.b.test",
                                       next_attempt=T0 + 900)], T0, False)
    assert a.run([later]) == [None]
    listing = b.list_messages()
    assert [(i.id, [r.address for r in rs]) for i, rs in listing] == [(m1, ["x@b.test", "y@b.test"]),
                                                                      (m2, ["z@b.test"])]
    assert [(x.address, x.mx, x.reply) for x in b.attempts(m1)] == [("x@b.test", "mx.b.test", "451 later")]
    assert b.retry(m1, T0 + 1) == 2 and b.recipients(m1)[0].next_attempt == T0 + 1
    assert b.summary() == (2, T0)
    assert b.delete(m2) and not b.delete(m2)
    assert a.count() == 1 and a.message(m2) is None


def test_two_nodes_finishing_one_message_remove_it(stores: Callable[[], Any]) -> None:
    """A message whose two recipients were claimed by two nodes: the node that records second, while
    the first's transaction is still open, waits for it and then sees both outcomes, so the message
    leaves the queue instead of staying with nothing left to do."""
    import time
    a, b = spool(stores(), "node-a"), spool(stores(), "node-b")
    mid = accept(a, ["r@b.test", "s@b.test"])
    [(_, ra)] = a.due_full(T0, 1)
    [(_, rb)] = b.due_full(T0, 1)
    assert {ra.address, rb.address} == {"r@b.test", "s@b.test"}
    done = [Outcome(ra.address, "delivered", "250 ok", "2.0.0")]
    other = [Outcome(rb.address, "delivered", "250 ok", "2.0.0")]
    results: list[Any] = []
    with a.pool.connection() as conn:
        with conn.transaction():
            assert a.op_complete(mid, done, T0, True)(conn) is False  # the other is still queued
            t = threading.Thread(target=lambda: results.extend(b.run([b.op_complete(mid, other, T0, True)])))
            t.start()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # until B waits for the message's row lock
                with b.pool.connection() as watch:
                    waiting = watch.execute("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                                            " AND datname = current_database()").fetchone()[0]
                if waiting:
                    break
                time.sleep(0.05)
            assert waiting == 1
        t.join(20)
    assert results == [True]
    assert a.count() == 0


def test_a_deadlock_between_two_nodes_batches_is_run_again(stores: Callable[[], Any]) -> None:
    """Two nodes' group commits take two messages' rows in opposite orders: PostgreSQL aborts one
    transaction, which runs again, and both batches end committed with their results."""
    a, b = spool(stores(), "node-a"), spool(stores(), "node-b")
    m1, m2 = accept(a, ["x@b.test"]), accept(a, ["y@b.test"])
    assert b.count() == 2  # B's first call (its schema check) is done before the race
    barrier = threading.Barrier(2)
    passed: set[str] = set()
    crossed: list[str] = []

    def gate(name: str) -> Callable[[Any], None]:
        def op(conn: Any) -> None:
            if name not in passed:  # the first run only: both hold their first row here
                passed.add(name)
                barrier.wait(20)
                crossed.append(name)
        return op

    results: dict[str, list[Any]] = {}

    def batch(sp: Any, first: str, second: str) -> None:
        results[sp.node] = sp.run([sp.op_dsn_done(first, []), gate(sp.node), sp.op_dsn_done(second, [])])

    together(lambda: batch(a, m1, m2), lambda: batch(b, m2, m1), timeout=60)
    assert sorted(crossed) == ["node-a", "node-b"]  # both held their first message's row at once
    assert results == {"node-a": [None, None, None], "node-b": [None, None, None]}


def test_one_node_sends_a_dsn(stores: Callable[[], Any]) -> None:
    a, b = spool(stores(), "node-a"), spool(stores(), "node-b")
    mid = accept(a, ["x@b.test"])
    assert a.claim_dsn(mid, T0) and not b.claim_dsn(mid, T0 + 1)  # A sends it
    a.run([a.op_dsn_done(mid, ["x@b.test"])])
    assert b.claim_dsn(mid, T0 + 2)  # sent: the next DSN of this message is anyone's
    assert a.claim_dsn(mid, T0 + 3 + LEASE)  # not sent by B within the lease: anyone's again


def test_bounces_from_two_runners_each_reported_once(tmp_path: Path, stores: Callable[[], Any]) -> None:
    """Every recipient refused (550): the DSNs, from whichever node finished which recipient, name
    each recipient exactly once, and come back to the sender through the shared queue."""
    async def main() -> None:
        mx = FakeMX([MX_IP], rcpt_reply=lambda line: "550 5.1.1 no such user")
        sa, sb = spool(stores(), "node-a"), spool(stores(), "node-b")
        small = {"concurrency_total": 2}
        async with queue_env(tmp_path / "a", mx, spool=sa, queue=small) as a, \
                queue_env(tmp_path / "b", port=mx.port, spool=sb, queue=small) as b:
            for env in (a, b):
                env.dns.add("b.test", "MX", "10 mx.b.test")
                env.dns.add("mx.b.test", "A", MX_IP)
            sa.clock = sb.clock = a.clock.time
            now = a.clock.time()
            for i in range(12):
                await asyncio.to_thread(accept, sa, [f"u{i}@b.test", f"v{i}@b.test"], now)
            for _ in range(20):  # bounded: 24 recipients and their DSNs, 10 claimed a scan
                if sum(await asyncio.gather(a.queue.run_once(), b.queue.run_once())) == 0:
                    break
            reports = a.maildir("alice@a.test") + b.maildir("alice@a.test")
            named = [line for m in reports for line in m.split(b"\r\n") if line.startswith(b"Final-Recipient:")]
            assert sorted(named) == sorted(f"Final-Recipient: rfc822; {p}{i}@b.test".encode()
                                           for i in range(12) for p in "uv"), named
            assert await asyncio.to_thread(sa.count) == 0
    run(main())


def test_a_large_message_is_sent_from_a_download_that_is_then_removed(tmp_path: Path,
                                                                     stores: Callable[[], Any]) -> None:
    """A message above the runner's in-memory limit (message.types.MEMORY_DATA_LIMIT) is streamed from the
    object store into a file under the spool's `tmp_dir` and sent from it in chunks, as a spool file
    is; the MX gets every byte, and the file is gone once the attempt is over (a leftover of a crash
    goes at the next start, `recover`)."""
    from postier.message.types import MEMORY_DATA_LIMIT
    from postier.queue.cluster import ClusterSpool

    async def main() -> None:
        mx = FakeMX([MX_IP])
        downloads = tmp_path / "cluster-send"
        sent_from: list[Any] = []

        class Recording(ClusterSpool):
            def source(self, msg_id: str) -> Any:
                sent_from.append(super().source(msg_id))
                return sent_from[-1]

        sa = Recording(stores(), LEASE, node="node-a", tmp_dir=downloads)
        async with queue_env(tmp_path / "a", mx, spool=sa) as a:
            a.dns.add("b.test", "MX", "10 mx.b.test")
            a.dns.add("mx.b.test", "A", MX_IP)
            sa.clock = a.clock.time
            line = b"x" * 998 + b"\r\n"
            body = b"From: <alice@a.test>\r\nTo: <bob@b.test>\r\nSubject: large\r\n\r\n" + line * (
                MEMORY_DATA_LIMIT // len(line) + 200)
            mid = queue_id()
            size = await asyncio.to_thread(sa.write_file, mid, b"", body)
            assert size > MEMORY_DATA_LIMIT
            info = MessageInfo(mid, "alice@a.test", a.clock.time(), size)
            await asyncio.to_thread(sa.run, [sa.op_insert(info, [RecipientSpec("bob@b.test")], a.clock.time())])
            got = await asyncio.to_thread(sa.source, mid)  # what the runner sends from
            assert isinstance(got, Path) and got.parent == downloads and got.read_bytes() == body
            await asyncio.to_thread(sa.release_source, got)
            assert list(downloads.iterdir()) == []
            (downloads / "left-by-a-crash").write_bytes(b"x")
            await asyncio.to_thread(sa.recover)
            assert list(downloads.iterdir()) == []
            assert await a.queue.run_once() == 1
            assert [d.data for d in mx.delivered] == [body]
            assert len(sent_from) == 2 and isinstance(sent_from[1], Path)  # the runner's was a download too
            assert list(downloads.iterdir()) == [] and await asyncio.to_thread(sa.count) == 0
    run(main())


def test_a_large_message_goes_to_a_local_mailbox_from_its_download(tmp_path: Path,
                                                                   stores: Callable[[], Any]) -> None:
    """A local recipient of a large queued message: the runner hands the mailbox store a view of
    the message's download (not the bytes), the copy is byte-exact and the download is removed."""
    from postier.message.types import MEMORY_DATA_LIMIT
    from postier.queue.cluster import ClusterSpool

    async def main() -> None:
        downloads = tmp_path / "cluster-send"
        sa = ClusterSpool(stores(), LEASE, node="node-a", tmp_dir=downloads)
        async with queue_env(tmp_path / "a", None, spool=sa) as a:
            sa.clock = a.clock.time
            line = b"y" * 998 + b"\r\n"
            body = b"From: <x@b.test>\r\nTo: <alice@a.test>\r\nSubject: large\r\n\r\n" + line * (
                MEMORY_DATA_LIMIT // len(line) + 200)
            mid = queue_id()
            size = await asyncio.to_thread(sa.write_file, mid, b"", body)
            info = MessageInfo(mid, "x@b.test", a.clock.time(), size)
            await asyncio.to_thread(sa.run, [sa.op_insert(info, [RecipientSpec("alice@a.test")], a.clock.time())])
            assert await a.queue.run_once() == 1
            assert a.maildir("alice@a.test") == [b"Return-Path: <x@b.test>\r\n" + body]
            assert list(downloads.iterdir()) == [] and await asyncio.to_thread(sa.count) == 0
    run(main())


class PausingSpool:
    """Makes a `ClusterSpool` whose DSN sender stops after reading what is owed until the other
    node has recorded its own bounce and lost the claim of the DSN: the interleaving in which a
    node that released the claim without looking again left the other recipient's DSN unsent."""

    def __init__(self) -> None:
        self.lost = threading.Event()  # a node's claim_dsn failed
        self.paused = threading.Event()  # the holder read the owed list once and waited

    def make(self, store: Any, node: str) -> Any:
        from postier.queue.cluster import ClusterSpool
        gate = self

        class Spool(ClusterSpool):
            def claim_dsn(self, msg_id: str, now: float) -> bool:
                won = bool(super().claim_dsn(msg_id, now))
                if not won:
                    gate.lost.set()
                return won

            def recipients(self, msg_id: str) -> list[Any]:
                states = super().recipients(msg_id)
                if not gate.paused.is_set():
                    gate.paused.set()
                    gate.lost.wait(20)  # bounded: the other node's bounce is recorded within seconds
                return states
        return Spool(store, LEASE, node=node, clock=lambda: T0)


def test_a_bounce_recorded_while_the_other_node_sends_the_dsn_is_reported(tmp_path: Path,
                                                                          stores: Callable[[], Any]) -> None:
    """One message, eleven recipients: node A claims ten, node B one (runner.CLAIM_MIN). A takes the
    DSN duty and reads what is owed; B then records its bounce and fails to claim the duty. A must
    see B's recipient when it hands the duty back and report it too (before, that DSN waited for
    the hourly scan of `owing_dsn`)."""
    async def main() -> None:
        mx = FakeMX([MX_IP], rcpt_reply=lambda line: "550 5.1.1 no such user")
        gate = PausingSpool()
        sa, sb = gate.make(stores(), "node-a"), gate.make(stores(), "node-b")
        small = {"concurrency_total": 2}  # each scan claims 10 recipients (runner.CLAIM_MIN)
        async with queue_env(tmp_path / "a", mx, spool=sa, queue=small) as a, \
                queue_env(tmp_path / "b", port=mx.port, spool=sb, queue=small) as b:
            for env in (a, b):
                env.dns.add("b.test", "MX", "10 mx.b.test")
                env.dns.add("mx.b.test", "A", MX_IP)
            sa.clock = sb.clock = a.clock.time
            to = [f"r{i:02d}@b.test" for i in range(11)]
            await asyncio.to_thread(accept, sa, to, a.clock.time())
            assert await a.queue.dispatch() == 1  # ten recipients, one job
            assert await b.queue.dispatch() == 1  # the eleventh
            await asyncio.gather(a.queue.drain(), b.queue.drain())
            assert gate.paused.is_set() and gate.lost.is_set()  # the interleaving happened
            for _ in range(5):  # the DSNs are local deliveries to alice
                if sum(await asyncio.gather(a.queue.run_once(), b.queue.run_once())) == 0:
                    break
            reports = a.maildir("alice@a.test") + b.maildir("alice@a.test")
            named = [line for m in reports for line in m.split(b"\r\n") if line.startswith(b"Final-Recipient:")]
            assert sorted(named) == [f"Final-Recipient: rfc822; {r}".encode() for r in to], named
            assert await asyncio.to_thread(sa.count) == 0
    run(main())


def test_postgresql_down_means_nothing_queued(pg_own: PgServer, bodies_factory: Callable[[], Any]) -> None:
    from postier.queue.cluster import ClusterSpool
    from postier.store.cluster.store import ClusterStore
    from postier.store.errors import StoreUnavailable
    store = ClusterStore(pg_own.create_db(), bodies_factory(), workers=1, timeout=2.0)
    try:
        sp = ClusterSpool(store, LEASE, node="n")
        accept(sp, ["x@b.test"])
        pg_own.stop()
        with pytest.raises(StoreUnavailable):
            accept(sp, ["y@b.test"])
        with pytest.raises(StoreUnavailable):
            sp.due_full(T0, 10)
        pg_own.start()
        for _ in range(3):  # the pool drops its broken connections and reconnects
            try:
                n = sp.count()
                break
            except StoreUnavailable:
                n = -1
        assert n == 1  # only the acknowledged message
    finally:
        store.close()


def spooled_body(root: Path, size: int, seed: str) -> tuple[Any, bytes]:
    """A `MessageBody` spilled to its spool file, as SMTP DATA leaves a large message, and its bytes."""
    from postier.message.types import MessageBody
    line = (seed * 40)[:98].encode() + b"\r\n"
    head = message("alice@a.test", "bob@b.test", subject=f"large {seed}")
    body = MessageBody(root)
    whole = head + line * ((size - len(head)) // len(line))
    for i in range(0, len(whole), 65536):  # as DATA hands it over
        body.write(whole[i:i + 65536])
    assert not body.in_memory
    return body, whole


def test_a_large_spooled_message_is_uploaded_in_parts_and_sent_byte_exact(tmp_path: Path,
                                                                          stores: Callable[[], Any]) -> None:
    """A spilled body above the in-memory limit goes up from its file (a multipart upload above
    8 MiB): the object is the prefix and body, under their SHA-256, and the runner sends exactly that."""
    import hashlib

    from postier.queue.cluster import ClusterSpool
    from postier.store.cluster.bodies import PART_SIZE, body_key

    async def main() -> None:
        mx = FakeMX([MX_IP], caps=["PIPELINING", "SIZE 1000000000", "8BITMIME", "ENHANCEDSTATUSCODES"])
        sa = ClusterSpool(stores(), LEASE, node="node-a", tmp_dir=tmp_path / "cluster-send")
        async with queue_env(tmp_path / "a", mx, spool=sa) as a:
            a.dns.add("b.test", "MX", "10 mx.b.test")
            a.dns.add("mx.b.test", "A", MX_IP)
            sa.clock = a.clock.time
            body, whole = spooled_body(tmp_path, PART_SIZE + (3 << 20), "p")
            prefix = b"Received: from a.test by mail.a.test; Sat, 5 Dec 2026 02:00:00 +0000\r\n"
            mid = queue_id()
            size = await asyncio.to_thread(sa.write_file, mid, prefix, body)
            body.close()
            assert size == len(prefix + whole)
            digest = sa._digests([mid]) or sa._pending[mid]
            assert digest == hashlib.sha256(prefix + whole).hexdigest()
            client = sa.bodies.client
            etag = client.head_object(Bucket=sa.bodies.bucket, Key=body_key(digest))["ETag"]
            assert etag.strip('"').endswith("-2")  # two parts: 8 MiB and the rest
            info = MessageInfo(mid, "alice@a.test", a.clock.time(), size)
            await asyncio.to_thread(sa.run, [sa.op_insert(info, [RecipientSpec("bob@b.test")], a.clock.time())])
            assert await a.queue.run_once() == 1
            assert [d.data for d in mx.delivered] == [prefix + whole]
            assert await asyncio.to_thread(sa.count) == 0
    run(main())


def test_a_failed_part_refuses_the_message_and_leaves_nothing(tmp_path: Path, stores: Callable[[], Any]) -> None:
    """The object store failing a part mid-upload: the acceptance raises StoreUnavailable (the
    pipeline's 451), the multipart upload is aborted (no parts kept), no object and no queue rows."""
    from moto.s3.models import S3Backend

    from postier.store.cluster.bodies import PART_SIZE
    from postier.store.errors import StoreUnavailable
    sp = spool(stores(), "n")
    body, _whole = spooled_body(tmp_path, PART_SIZE * 2 + 100, "f")
    part = S3Backend.upload_part

    def failing(self: Any, bucket_name: str, multipart_id: str, part_id: int, value: bytes) -> Any:
        if int(part_id) == 2:
            raise RuntimeError("the object store failed this part")  # moto answers 500
        return part(self, bucket_name, multipart_id, part_id, value)
    mid = queue_id()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S3Backend, "upload_part", failing)
        with pytest.raises(StoreUnavailable):
            sp.write_file(mid, b"", body)
    client, bucket = sp.bodies.client, sp.bodies.bucket
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount") == 0
    assert sp.count() == 0 and mid not in sp._pending
    size = sp.write_file(mid, b"", body)  # the store is back: the same id is accepted
    info = MessageInfo(mid, "alice@a.test", T0, size)
    assert sp.run([sp.op_insert(info, [RecipientSpec("bob@b.test")], T0)]) == [None]
    assert sp.count() == 1
    body.close()


def test_two_nodes_accept_the_same_large_message_at_once(tmp_path: Path, stores: Callable[[], Any]) -> None:
    """Two sessions (on two nodes) upload the same large body at once from their own spool files:
    both are accepted, both refer to the one object, and each reads back whole."""
    from postier.store.cluster.bodies import PART_SIZE
    a, b = spool(stores(), "node-a"), spool(stores(), "node-b")
    made = [spooled_body(tmp_path / n, PART_SIZE + (1 << 20), "same") for n in ("a", "b")]
    barrier = threading.Barrier(2)

    def accept_large(sp: Any, body: Any) -> str | Exception:
        mid = queue_id()
        barrier.wait(10)
        size = sp.write_file(mid, b"", body)
        info = MessageInfo(mid, "alice@a.test", T0, size)
        [res] = sp.run([sp.op_insert(info, [RecipientSpec("bob@b.test")], T0)])
        return res if isinstance(res, Exception) else mid
    ids = together(lambda: accept_large(a, made[0][0]), lambda: accept_large(b, made[1][0]))
    assert all(isinstance(i, str) for i in ids), ids
    digests = a._digests([str(i) for i in ids])
    assert len(digests) == 2 and len(set(digests.values())) == 1
    whole = made[0][1]
    assert [a.read_file(str(i)) for i in ids] == [whole, whole]
    assert a.bodies.client.list_multipart_uploads(Bucket=a.bodies.bucket).get("Uploads", []) == []
    for body, _ in made:
        body.close()


def test_postgresql_lost_while_a_dsn_is_claimed_does_not_strand_the_next_job(
        tmp_path: Path, pg_own: PgServer, bodies_factory: Callable[[], Any]) -> None:
    """Two bounces to one domain, one connection per domain: PostgreSQL goes away between the first
    job's recorded outcome and its DSN claim. The worker logs it and takes the second job (the
    first DSN stays owed, for `owing_dsn`); before, StoreUnavailable ended the worker task ("Task
    exception was never retrieved", found by an outside cluster run stopping PostgreSQL for 6 s) and
    the second job sat in memory, claimed, with no worker, until a restart or its lease ran out."""
    from postier.queue.cluster import ClusterSpool
    from postier.store.cluster.store import ClusterStore

    class Spool(ClusterSpool):
        def claim_dsn(self, msg_id: str, now: float) -> bool:
            pg_own.stop()  # a real outage, at this point of the interleaving
            return bool(super().claim_dsn(msg_id, now))

    seen: list[str] = []

    async def main() -> None:
        mx = FakeMX([MX_IP], rcpt_reply=lambda line: seen.append(line) or "550 5.1.1 no such user")
        async with queue_env(tmp_path, mx, spool=sp, queue={"concurrency_per_domain": 1}) as a:
            a.dns.add("b.test", "MX", "10 mx.b.test")
            a.dns.add("mx.b.test", "A", MX_IP)
            sp.clock = a.clock.time
            for to in ("one@b.test", "two@b.test"):
                await asyncio.to_thread(accept, sp, [to], a.clock.time())
            assert await a.queue.dispatch() == 2  # two jobs for one destination, one worker
            await a.queue.drain()
        assert sorted(s.split("<")[1].split(">")[0] for s in seen) == ["one@b.test", "two@b.test"]

    store = ClusterStore(pg_own.create_db(), bodies_factory(), workers=1, timeout=2.0)
    sp = Spool(store, LEASE, node="n", clock=lambda: T0)
    try:
        run(main())
    finally:
        store.close()
