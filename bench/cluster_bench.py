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
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postier.message.received import queue_id  # noqa: E402
from postier.message.types import User  # noqa: E402
from postier.queue.cluster import ClusterSpool  # noqa: E402
from postier.queue.spool import DELIVERED, MessageInfo, Outcome, RecipientSpec  # noqa: E402
from postier.store.cluster.bodies import BodyStore  # noqa: E402
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
    args = ap.parse_args(argv)
    if args.nodes:
        from bench.cluster_nodes import run_nodes
        return run_nodes(args.nodes, args.messages or 600, args.clients, args.users, args.size, args.time_limit)
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
