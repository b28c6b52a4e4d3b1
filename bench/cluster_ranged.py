"""FETCH of parts of one large message in cluster mode: octets and GETs from the object store, and
wall time, per FETCH (what `RangedBody` and the kept layout save, postier/store/cluster/bodies.py).

A throwaway PostgreSQL 15 (fsync off) and moto's S3 server (a process of its own); one message of
--size MiB (a text part, a base64 attachment, a text part) delivered to one user's INBOX through
the cluster delivery (spooled, as SMTP does), its delivery timed. Then each FETCH runs --runs times
as the IMAP driver does (`render_fetch`, then the answer's literals read from `open_message` as
`IMAPSession._send_streamed` reads them): the GetObject calls and the octets they answered are
counted by a botocore event hook on the node's client, and each answer's SHA-256 printed (the same
before and after). It runs against the postier found first on the path: `--postier DIR` puts DIR
first (the tree before the change, for the "before" figures).

    .venv/bin/python -m bench cluster-ranged [--size 20] [--runs 3] [--postier /work/main]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ITEMS = ["BODY.PEEK[2]<0.1000>", "BODY.PEEK[1]", "BODY.PEEK[]<0.1000>", "BINARY.PEEK[2]<100.1000>",
         "BODY.PEEK[3]", "BODY.PEEK[2]"]


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench cluster-ranged")
    ap.add_argument("--size", type=int, default=20, help="MiB")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--postier", default="", help="import postier from this tree")
    args = ap.parse_args(argv)
    if args.postier:
        sys.path.insert(0, args.postier)
    sys.path.insert(1 if args.postier else 0, str(ROOT))
    import postier
    from bench.objectstore import MotoProcess
    from postier.message.types import User
    from postier.proto.imap import Fetch, parse_command
    from postier.server.imapfetch import FetchOptions, FetchPace, StreamedAnswer, render_fetch
    from postier.store.cluster.bodies import BodyStore
    from postier.store.cluster.store import ClusterStore
    from tests.cluster.conftest import PgServer
    from tests.cluster.test_store_large_text import deliver_to_alice, with_attachment

    print(f"postier from {Path(postier.__file__).parent}")
    user = User("alice@example.org", "alice", "example.org", "maildir")
    pg, s3 = PgServer(), MotoProcess()
    pg.start()
    counted = {"gets": 0, "octets": 0}

    def on_get(http_response: Any = None, **_kw: Any) -> None:
        counted["gets"] += 1
        counted["octets"] += int(http_response.headers.get("content-length", 0))

    try:
        bodies = BodyStore(s3.endpoint, "ranged", "test", "test", timeout=5.0)
        bodies.ensure_bucket()
        bodies.client.meta.events.register("after-call.s3.GetObject", on_get)
        store = ClusterStore(pg.create_db(), bodies, timeout=5.0)
        data = with_attachment(args.size << 20, "before the file", "after it")
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            deliver_to_alice(store, Path(tmp), data)
            print(f"delivery of {len(data) / (1 << 20):.1f} MiB: {time.perf_counter() - t:.2f} s")
        mb = store.acquire(user)
        uid = mb.snapshot("INBOX").uids[0]
        print(f"{'FETCH':<28} {'GETs':>5} {'octets':>12} {'time':>8}  answer")
        for items in ITEMS:
            cmd = parse_command(b"a FETCH 1 (" + items.encode() + b")\r\n")
            assert isinstance(cmd, Fetch)
            for _ in range(args.runs):
                counted.update(gets=0, octets=0)
                t = time.perf_counter()
                batch = render_fetch(mb, "INBOX", [(1, uid)], cmd.attributes,
                                     FetchOptions(set_seen=False, stream=True), FetchPace())
                sha = hashlib.sha256()
                for answer in batch.data:
                    if not isinstance(answer, StreamedAnswer):
                        sha.update(answer)
                        continue
                    kw = {"partial": answer.partial} if hasattr(answer, "partial") else {}
                    f = answer.file if answer.file is not None else mb.open_message("INBOX", answer.uid, **kw)
                    assert f is not None
                    with f:
                        size = f.seek(0, 2)
                        for p in answer.parts:
                            if isinstance(p, bytes):
                                sha.update(p)
                                continue
                            sha.update(p.prefix(size))
                            for piece in p.pieces(f, size):
                                sha.update(piece)
                took = time.perf_counter() - t
                print(f"{items:<28} {counted['gets']:>5} {counted['octets']:>12} {took * 1000:>6.0f} ms  "
                      f"{sha.hexdigest()[:16]}")
        store.release(mb)
        store.close()
    finally:
        s3.stop()
        pg.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
