"""A header SEARCH and a header FETCH over one folder in cluster mode, on nodes with a cold process
cache: what the kept header blocks (`body_heads`, postier/store/cluster/cache.py) save.

A throwaway PostgreSQL 15 (fsync off) and moto's S3 server (a process of its own) hold N distinct
messages in one user's INBOX (appended by a ClusterStore in this process, 100 per MULTIAPPEND). Each
step then opens a new ClusterStore (a node just started: empty body cache, no folder state) and
runs, as the IMAP driver does (server/imapfetch.py, in batches of SEARCH_BATCH):

1. SEARCH HEADER X-Bench-Id "<one message's id>" with the header rows deleted first (bodies stored
   before the table, or a build without it): one GET per message, each block kept again;
2. the same SEARCH on another cold node: from the rows;
3. FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]) on another cold node.

Each step prints its wall time, the number of S3 GetObject calls (counted by a botocore event hook
on the node's client) and the answer, which must be the same every time. Bounded by --messages.
It runs against whichever postier is imported (no `body_heads` table: step 1 deletes nothing).

    .venv/bin/python -m bench cluster-heads [--messages 2000] [--size 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from bench.objectstore import MotoProcess  # noqa: E402
from postier.message.matching import SearchContext  # noqa: E402
from postier.message.types import User  # noqa: E402
from postier.proto.imap import Fetch, parse_command  # noqa: E402
from postier.proto.imap.search import HeaderKey  # noqa: E402
from postier.server.imap import SEARCH_BATCH  # noqa: E402
from postier.server.imapfetch import FetchOptions, FetchPace, render_fetch, run_search  # noqa: E402
from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.schema import ensure_schema  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from tests.cluster.conftest import PgServer  # noqa: E402

USER = User("heads@cluster.test", "heads", "cluster.test", "maildir")
_TEXT = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdef\r\n"  # 80 bytes


def _message(i: int, size: int) -> bytes:
    """A distinct message with a typical header block (about 600 bytes) and `size` bytes of text."""
    return (f"Return-Path: <sender{i % 50}@example.net>\r\n"
            f"Received: from mx{i % 7}.example.net (mx{i % 7}.example.net [192.0.2.{i % 250}])\r\n"
            f"\tby mail.cluster.test with ESMTPS id {i:08x}; Mon, 1 Jan 2024 10:00:00 +0000\r\n"
            f"From: Sender {i % 50} <sender{i % 50}@example.net>\r\nTo: {USER.address}\r\n"
            f"Subject: message number {i} about the quarterly report\r\n"
            f"Date: Mon, 1 Jan 2024 10:{i % 60:02d}:00 +0000\r\nMessage-ID: <bench-{i}@example.net>\r\n"
            f"X-Bench-Id: id-{i:06d}\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 7bit\r\n\r\n").encode() + (_TEXT * (size // len(_TEXT) + 1))[:size]


class _Node:
    """A node just started: its own pool and an empty body cache; counts its GetObject calls."""

    def __init__(self, dsn: str, endpoint: str) -> None:
        self.bodies = BodyStore(endpoint, "bench", "test", "test", timeout=10.0)
        self.gets = 0
        self.bodies.client.meta.events.register("before-call.s3.GetObject", self._seen)
        self.store = ClusterStore(dsn, self.bodies, timeout=10.0)
        self.mb: Any = self.store.acquire(USER)

    def _seen(self, **_kw: object) -> None:
        self.gets += 1

    def close(self) -> None:
        self.store.close()


def _search(mb: Any, key: HeaderKey) -> list[int]:
    uids = mb.snapshot("INBOX").uids
    ctx = SearchContext(max_seq=len(uids), max_uid=uids[-1] if uids else 0)
    targets = list(enumerate(uids, 1))
    out: list[int] = []
    for i in range(0, len(targets), SEARCH_BATCH):
        found, _n = run_search(mb, "INBOX", targets[i:i + SEARCH_BATCH], key, ctx, 1 << 32)
        out += [u for _s, u, _m in found]
    return out


def _fetch(mb: Any) -> list[bytes]:
    cmd = parse_command(b"a FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])\r\n")
    assert isinstance(cmd, Fetch)
    targets = list(enumerate(mb.snapshot("INBOX").uids, 1))
    out: list[bytes] = []
    pace = FetchPace()
    while targets:
        batch = render_fetch(mb, "INBOX", targets, cmd.attributes, FetchOptions(set_seen=False), pace)
        out += batch.data
        targets = targets[batch.done:]
    return out


def _step(label: str, dsn: str, endpoint: str, run: Callable[[Any], object]) -> object:
    node = _Node(dsn, endpoint)
    try:
        t = time.perf_counter()
        got = run(node.mb)
        dt = time.perf_counter() - t
    finally:
        node.close()
    n = len(got) if isinstance(got, list) else 0
    print(f"{label}: {dt:.2f} s, {node.gets} S3 GETs, {n} answer lines", flush=True)
    return got


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench cluster-heads")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--size", type=int, default=2000, help="text bytes of each message's body")
    args = ap.parse_args(argv)
    pg, s3 = PgServer(), MotoProcess()
    tmp = Path(tempfile.mkdtemp(prefix="postier-heads-bench-"))
    try:
        pg.start()
        dsn = pg.create_db()
        with psycopg.connect(dsn) as conn:
            ensure_schema(conn)
        loader = _Node(dsn, s3.endpoint)
        loader.bodies.ensure_bucket()
        loader.mb.ensure_defaults()
        t = time.perf_counter()
        for lo in range(0, args.messages, 100):
            loader.mb.append_many("INBOX", [(_message(i, args.size), (), None)
                                            for i in range(lo, min(args.messages, lo + 100))])
        loader.close()
        print(f"{args.messages} messages (+{args.size} B of text each) appended in {time.perf_counter() - t:.1f} s; "
              f"PostgreSQL 15 (fsync off), moto S3 in its own process; {os.cpu_count()} CPUs", flush=True)
        with psycopg.connect(dsn, autocommit=True) as conn:
            if conn.execute("SELECT to_regclass('body_heads')").fetchone() != (None,):
                conn.execute("DELETE FROM body_heads")
        key = HeaderKey("X-Bench-Id", f"id-{args.messages // 2:06d}")
        first = _step("SEARCH HEADER X-Bench-Id, header rows deleted, cold node", dsn, s3.endpoint,
                      lambda mb: _search(mb, key))
        second = _step("SEARCH HEADER X-Bench-Id again, another cold node", dsn, s3.endpoint,
                       lambda mb: _search(mb, key))
        fetched = _step("FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]), another cold node", dsn, s3.endpoint,
                        _fetch)
        uids = list(range(1, args.messages + 1))
        same = first == second == [uids[args.messages // 2]] and isinstance(fetched, list) \
            and len(fetched) == args.messages
        print("answers: as expected, the same each time" if same else f"answers DIFFER: {first} {second}")
        return 0 if same else 1
    finally:
        s3.stop()
        pg.remove()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
