"""Cluster benchmarks against a throwaway PostgreSQL 15 (fsync off) and moto's S3 server.

Store mode (the default): APPENDs from two writers on two connection pools (two nodes) into one
folder, then body reads, then the shared outbound queue (messages accepted by two nodes, then
claimed and recorded by both at once: `queue/cluster.py`), with moto in this process (its Python
HTTP server shares the GIL with the writers: a lower bound for the code path, not a cluster figure).

    .venv/bin/python -m bench cluster [--messages 200] [--size 4000]

Node mode (`--nodes 3`): three `postier serve` processes on 127.0.0.2-4 sharing the PostgreSQL and
an S3 bucket (moto in a process of its own). Several client threads send N messages over SMTP,
round-robin over the nodes and over the users, each on persistent connections; every message is
then read back over IMAP (FETCH BODY.PEEK[]) on a node chosen per user, so that two thirds of what
it reads came in through the other nodes, and checked (all there, once, byte counts). Prints the
SMTP acceptance rate (250 after DATA), its p50/p99 latency, the IMAP read rate, and the CPU time per
message of the nodes, PostgreSQL, moto and the clients. Bounded: --messages, and --time-limit stops
sending (the figures then cover what was sent).

    .venv/bin/python -m bench cluster --nodes 3 [--messages 600] [--clients 6] [--users 12] [--size 4000]
        [--s3 moto|seaweedfs]

`--s3 seaweedfs` runs the nodes against SeaweedFS's S3 gateway instead of moto (bench/objectstore.py;
node mode only: store and search modes keep moto in this process).

Search mode (`--search 5000`): N messages in one folder (MULTIAPPENDs of 500: the full-text rows are
written with them, store.cluster.fulltext), then IMAP SEARCH SUBJECT as the server runs it (`narrow`,
then `run_search` over what is left), first and repeated: with the index, without it (the matcher
reads every header from the object store), and with the rows deleted (mail stored before the index:
each search catches up CATCH_UP bodies). Every answer is checked against the expected UIDs. moto
runs in this process, as in store mode: object-store reads are slower than a real S3's.

    .venv/bin/python -m bench cluster --search 5000
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import objectstore  # noqa: E402
from postier.message.received import queue_id  # noqa: E402
from postier.message.types import User  # noqa: E402
from postier.queue.cluster import ClusterSpool  # noqa: E402
from postier.queue.spool import DELIVERED, MessageInfo, Outcome, RecipientSpec  # noqa: E402
from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.mailboxes import ClusterMailboxes  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from tests.cluster.conftest import PgServer, S3Server  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench cluster")
    ap.add_argument("--messages", type=int, default=None,
                    help="per writer in store mode (default 200); in all with --nodes (default 600)")
    ap.add_argument("--size", type=int, default=4000, help="body bytes per message")
    ap.add_argument("--nodes", type=int, default=0, help="run N postier nodes (3: 127.0.0.2-4) instead")
    ap.add_argument("--clients", type=int, default=6, help="node mode: SMTP/IMAP client threads")
    ap.add_argument("--users", type=int, default=12, help="node mode: recipients")
    ap.add_argument("--time-limit", type=float, default=300.0, help="node mode: stop sending after this")
    ap.add_argument("--relay", type=int, default=0, metavar="N",
                    help="node mode: then N messages submitted for a remote domain, delivered by the nodes' "
                         "shared queue to smtp-sink")
    ap.add_argument("--search", type=int, default=0, metavar="N", help="search mode: N messages in one folder")
    objectstore.add_option(ap)
    args = ap.parse_args(argv)
    if args.search:
        return search(args.search)
    if args.nodes:
        from bench.cluster_nodes import run_nodes
        return run_nodes(args.nodes, args.messages or 600, args.clients, args.users, args.size, args.time_limit,
                         args.relay, objectstore.kinds(args.s3)[0])
    args.messages = args.messages or 200
    pg, s3 = PgServer(), S3Server()
    pg.start()
    try:
        dsn = pg.create_db()

        def bodies() -> BodyStore:
            b = BodyStore(s3.endpoint, "bench", "t", "t")
            b.ensure_bucket()
            return b
        stores = [ClusterStore(dsn, bodies()) for _ in range(2)]
        user = User("a@example.org", "a", "example.org", "maildir")
        boxes = [s.acquire(user) for s in stores]
        boxes[0].ensure_defaults()
        body = b"Subject: x\r\n\r\n" + b"y" * args.size + b"\r\n"
        n = args.messages

        def write(i: int) -> None:
            for k in range(n):
                boxes[i].append("INBOX", body + f"{i}-{k}\r\n".encode())
        t = time.perf_counter()
        threads = [threading.Thread(target=write, args=(i,)) for i in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        print(f"{2 * n} appends ({args.size} B, 2 writers): {dt:.2f}s = {2 * n / dt:.0f}/s")
        rows = boxes[0].rows_between("INBOX", 1, 2 * n)
        assert sorted(rows) == list(range(1, 2 * n + 1))
        t = time.perf_counter()
        for r in list(rows.values())[:n]:
            boxes[0].read("INBOX", r)
        dt = time.perf_counter() - t
        print(f"{n} body reads: {dt:.2f}s = {n / dt:.0f}/s")
        queue(stores, n, body)
        for s in stores:
            s.close()
    finally:
        s3.stop()
        pg.remove()
    return 0


def queue(stores: list[ClusterStore], n: int, body: bytes) -> None:
    """Each node accepts n messages (2 recipients each), then both claim and record at once."""
    spools = [ClusterSpool(s, 300.0, node=f"node{i}") for i, s in enumerate(stores)]
    now = time.time()

    def accept(i: int) -> None:
        sp = spools[i]
        for k in range(n):
            mid = queue_id()
            size = sp.write_file(mid, b"", body + f"q{i}-{k}\r\n".encode())
            info = MessageInfo(mid, "a@example.org", now, size, user="a@example.org")
            [err] = sp.run([sp.op_insert(info, [RecipientSpec(f"r{k}@x.test"), RecipientSpec(f"s{k}@x.test")], now)])
            assert err is None, err

    claimed: list[list[tuple[str, str]]] = [[], []]

    def work(i: int) -> None:
        sp = spools[i]
        for _ in range(10 * n):  # bounded
            rows = sp.due_full(time.time(), 50)
            if not rows:
                return
            by_msg: dict[str, list[Outcome]] = {}
            for info, st in rows:
                claimed[i].append((info.id, st.address))
                by_msg.setdefault(info.id, []).append(Outcome(st.address, DELIVERED, "250 ok", "2.0.0"))
            sp.run([sp.op_complete(m, outs, time.time(), True) for m, outs in by_msg.items()])

    for name, fn, count in (("accepted", accept, 2 * n), ("recipients claimed and recorded", work, 4 * n)):
        t = time.perf_counter()
        threads = [threading.Thread(target=fn, args=(i,)) for i in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        dt = time.perf_counter() - t
        print(f"queue: {count} {name} (2 nodes): {dt:.2f}s = {count / dt:.0f}/s")
    both = claimed[0] + claimed[1]
    assert len(both) == len(set(both)) == 4 * n, "a recipient was claimed twice or lost"
    assert spools[0].count() == 0
    print(f"queue: node0 {len(claimed[0])} + node1 {len(claimed[1])} recipients, none twice, queue empty")


def _message(i: int) -> bytes:
    subject = f"quarterly report {i}" if i % 50 == 0 else f"note {i} about things"
    return (f"From: Sender {i % 7} <sender{i % 7}@example.net>\r\nTo: a@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{i}.b@example.net>\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            + f"Line {i} of a message body with some words in it.\r\n" * 30).encode()


def _search(mb: ClusterMailboxes, needle: str, index: bool) -> list[int]:
    """SEARCH SUBJECT needle as the IMAP server runs it (server.imap `_matches`, one batch at a time)."""
    from postier.message.matching import SearchContext
    from postier.proto.imap.search import AllKey, HeaderKey, SearchKey
    from postier.server.imap import SEARCH_BATCH, _in_view
    from postier.server.imapfetch import narrow, run_search

    view = mb.snapshot("INBOX").uids
    key: SearchKey = HeaderKey("SUBJECT", needle)
    targets = list(enumerate(view, 1))
    if index:
        key, cands = narrow(mb, "INBOX", key)
        if cands is not None:
            targets = _in_view(view, cands)
            if isinstance(key, AllKey):
                return [u for _s, u in targets]
    ctx = SearchContext(max_seq=len(view), max_uid=view[-1] if view else 0)
    found: list[int] = []
    for i in range(0, len(targets), SEARCH_BATCH):
        found += [u for _s, u, _m in run_search(mb, "INBOX", targets[i:i + SEARCH_BATCH], key, ctx, 0)[0]]
    return found


def search(n: int) -> int:
    import psycopg

    pg, s3 = PgServer(), S3Server()
    pg.start()
    try:
        dsn = pg.create_db()
        b = BodyStore(s3.endpoint, "bench", "t", "t")
        b.ensure_bucket()
        store = ClusterStore(dsn, b)
        mb = store.acquire(User("a@example.org", "a", "example.org", "maildir"))
        mb.ensure_defaults()
        t = time.perf_counter()
        for lo in range(0, n, 500):
            mb.append_many("INBOX", [(_message(i), (), None) for i in range(lo, min(n, lo + 500))])
        dt = time.perf_counter() - t
        print(f"{n} messages appended (MULTIAPPEND of 500, text rows written): {dt:.2f}s = {n / dt:.0f}/s")
        expect = [i + 1 for i in range(n) if i % 50 == 0]

        def timed(label: str, index: bool, needle: str = "quarterly report") -> None:
            for run in ("first", "repeated"):
                t = time.perf_counter()
                got = _search(mb, needle, index)
                dt = time.perf_counter() - t
                assert got == expect, (label, run, len(got))
                print(f"SEARCH SUBJECT \"{needle}\" ({len(got)} hits) {label}, {run}: {dt * 1000:.0f} ms")

        from postier.store.cluster.fulltext import text_row
        t = time.perf_counter()
        for i in range(200):
            text_row("x", _message(i))
        print(f"text extraction alone (store.fts.row_values): {(time.perf_counter() - t) / 200 * 1000:.2f} ms a message")
        timed("with the index", True)
        # header reads by range are not kept in the body cache: each search reads every header again
        timed("without the index (the matcher reads every header from the object store)", False)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DELETE FROM body_text")
        for k in range(0, n + 1000, 1000):
            t = time.perf_counter()
            got = _search(mb, "quarterly report", True)
            dt = time.perf_counter() - t
            assert got == expect
            print(f"SEARCH with the rows deleted, search {k // 1000 + 1} (catches up 1000): {dt * 1000:.0f} ms")
        timed("with the index, caught up", True)
        store.release(mb)
        store.close()
    finally:
        s3.stop()
        pg.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
