"""FETCH 1:* (BODYSTRUCTURE ENVELOPE) through cluster nodes, first and second time: what the shared
parsed-view cache (postier/store/cluster/cache.py) saves.

Two `postier serve` nodes on 127.0.0.2-3 share a throwaway PostgreSQL 15 (fsync off) and one S3
bucket (moto in a process of its own). N distinct MIME messages (the tests' message-view corpus,
each made unique by a header, with a text body of --size bytes) are appended into one user's INBOX
by a ClusterStore in this process (as a third node). Then, over IMAP:

1. node A, first FETCH: every body is fetched from S3 and parsed, the views are stored;
2. node A, second FETCH: views from PostgreSQL (the bodies are also in A's in-process cache now);
3. node B, first FETCH on that node: views from PostgreSQL, no body read (B never saw one).

Each step prints its wall time and the CPU time of the node, PostgreSQL and moto, and checks that
all three answers are the same bytes. Bounded by --messages.

    .venv/bin/python -m bench cluster-views [--messages 2000] [--size 2000]
"""

from __future__ import annotations

import argparse
import imaplib
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cluster_nodes import _pg_cpu, loopback_free  # noqa: E402
from bench.objectstore import MotoProcess  # noqa: E402
from bench.smtp_ingest import children, cpu_seconds  # noqa: E402
from postier.message.types import User  # noqa: E402
from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from tests.cluster.conftest import PgServer  # noqa: E402
from tests.harness import Instance  # noqa: E402
from tests.message import corpus  # noqa: E402

DOMAIN = "cluster.test"
USER = f"views@{DOMAIN}"
PASSWORD = "password123"
_TEXT = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdef\r\n"  # 80 bytes


def _message(i: int, size: int) -> bytes:
    """Corpus message i % len(corpus), unique (a Message-ID line on top), with `size` more text bytes
    before the end of its first body: distinct bodies, so neither cache can share them."""
    raws = list(corpus.ALL.values())
    raw = raws[i % len(raws)].replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, sep, body = raw.partition(b"\r\n\r\n")
    filler = (_TEXT * (size // len(_TEXT) + 1))[:size] if sep else b""  # a header-only one stays so
    return f"Message-ID: <views-{i}@example.net>\r\n".encode() + head + sep + filler + body


def _node_cpu(inst: Instance) -> float:
    assert inst.proc is not None
    return sum(cpu_seconds(p, children=True) for p in children(inst.proc.pid))


def _fetch(inst: Instance, cpu: Callable[[], tuple[float, ...]]) -> tuple[float, list[float], int, bytes]:
    """(wall time, CPU times spent, messages answered, answer bytes) of one FETCH, login excluded."""
    c = imaplib.IMAP4(*inst.addr("imap"), timeout=300)
    c.starttls(inst.client_ssl_context())
    c.login(USER, PASSWORD)
    c.select("INBOX", readonly=True)
    c0 = cpu()
    t = time.perf_counter()
    typ, data = c.fetch("1:*", "(BODYSTRUCTURE ENVELOPE)")
    dt = time.perf_counter() - t
    spent = [b - a for a, b in zip(c0, cpu(), strict=True)]
    c.logout()
    if typ != "OK":
        raise RuntimeError(f"FETCH failed: {data!r}")
    heads = [d[0] if isinstance(d, tuple) else d for d in data if d is not None]
    n = sum(1 for h in heads if re.match(rb"\d+ \(", h))
    out = b"".join(d if isinstance(d, bytes) else b"".join(d) for d in data if d is not None)
    return dt, spent, n, out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench cluster-views")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=2000, help="text bytes added to each message")
    args = ap.parse_args(argv)
    if not loopback_free(2, "this benchmark"):
        return 2
    pg, s3 = PgServer(), MotoProcess()
    nodes: list[Instance] = []
    tmp = Path(tempfile.mkdtemp(prefix="postier-views-bench-"))
    store: ClusterStore | None = None
    try:
        pg.start()
        dsn = pg.create_db()
        for i in range(2):
            d = tmp / f"node{i}"
            d.mkdir()
            (d / "s3.secret").write_text("test\n")
            nodes.append(Instance(d, DOMAIN, address=f"127.0.0.{i + 2}", extra_config=(
                f'[cluster]\ndsn = "{dsn}"\ns3_endpoint = "{s3.endpoint}"\ns3_bucket = "bench"\n'
                f's3_access_key = "test"\ns3_secret_key_file = "s3.secret"\ntimeout = 10.0\n')))
        nodes[0].cli("cluster", "init")
        nodes[0].cli("domain", "add", DOMAIN)
        nodes[0].add_user(USER, PASSWORD)
        store = ClusterStore(dsn, BodyStore(s3.endpoint, "bench", "test", "test", timeout=10.0), timeout=10.0)
        mb = store.acquire(User(USER, "views", DOMAIN, "maildir"))
        mb.ensure_defaults()
        t = time.perf_counter()
        batch = 100
        for lo in range(0, args.messages, batch):
            mb.append_many("INBOX", [(_message(i, args.size), (), None)
                                     for i in range(lo, min(args.messages, lo + batch))])
        print(f"{args.messages} distinct messages ({len(corpus.ALL)} MIME shapes, +{args.size} B of text each) "
              f"appended in {time.perf_counter() - t:.1f} s; two nodes on 127.0.0.2-3, PostgreSQL 15 "
              f"(fsync off) and moto S3 in their own processes; machine: {os.cpu_count()} CPUs", flush=True)
        for inst in nodes:
            inst.start()
        answers, counts = [], []
        for label, inst in (("node A, first FETCH (bodies from S3, parsed, cached)", nodes[0]),
                            ("node A, second FETCH (views from PostgreSQL)", nodes[0]),
                            ("node B, first FETCH there (views from PostgreSQL)", nodes[1])):
            def cpu(inst: Instance = inst) -> tuple[float, ...]:
                return _node_cpu(inst), _pg_cpu(pg), cpu_seconds(s3.proc.pid)
            dt, spent, n, out = _fetch(inst, cpu)
            answers.append(out)
            counts.append(n)
            print(f"{label}: {n} messages in {dt:.2f} s = {n / dt:.0f} msg/s; CPU node {spent[0]:.2f} s, "
                  f"PostgreSQL {spent[1]:.2f} s, moto {spent[2]:.2f} s", flush=True)
        same = answers[0] == answers[1] == answers[2] and counts == [args.messages] * 3
        print("answers: the same bytes all three times" if same else "answers DIFFER or messages missing")
        return 0 if same else 1
    finally:
        if store is not None:
            store.close()
        for inst in nodes:
            inst.stop()
        s3.stop()
        pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
