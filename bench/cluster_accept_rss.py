"""Peak memory of a cluster node accepting one large message into the shared queue (docs/scaling.md, "The queue").

The driver starts a throwaway PostgreSQL 15 and moto's S3 server in this process; a child process
(the node) writes a message of --size MiB into a `MessageBody` in 64 KiB pieces, as SMTP DATA does
(it spills to a spool file past 256 KiB), then accepts it as `Queue.store` does: `ClusterSpool.
write_file` (body uploaded and confirmed) and the rows committed. The child resets its peak RSS
counter just before the acceptance (/proc/self/clear_refs) and prints its RSS then and its peak
during it (VmHWM), with tracemalloc's peak of Python allocations during it. The driver then checks
the stored body's SHA-256 against the message. `--mailbox` measures a local delivery instead
(`ClusterDelivery.deliver_one`: the copy of one user's INBOX, with its full-text row; with `--users N`,
`ClusterDelivery.deliver` to N users at once, as one message to N local recipients, and the time it
took). `--tree DIR`
runs the child on another checkout of postier (e.g. `git archive` of an earlier commit), to compare
before and after a change. `--s3 seaweedfs` stores into SeaweedFS's S3 gateway instead of moto
(bench/objectstore.py).

    .venv/bin/python -m bench cluster-accept [--size 30] [--mailbox [--users N]] [--attachment] [--tree DIR]
        [--s3 moto|seaweedfs]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREFIX = b"Received: from a.test by node.test; Sat, 5 Dec 2026 02:00:00 +0000\r\n"


def _pieces(size_mib: int, attachment: bool = False) -> list[bytes]:
    """The message in lines: a header, then varied text lines (or with `attachment`, a short text
    part and a base64 attachment of 76-character lines, the usual shape of a large message)."""
    head = b"From: <alice@a.test>\r\nTo: <bob@b.test>\r\nSubject: large\r\n"
    if attachment:
        head += (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n--b1\r\n"
                 b"Content-Type: text/plain\r\n\r\nSee the file.\r\n--b1\r\nContent-Type: application/pdf\r\n"
                 b"Content-Transfer-Encoding: base64\r\n")
    total, out, i = size_mib << 20, [head + b"\r\n"], 0
    size = len(out[0])
    while size < total:
        digest = hashlib.sha256(str(i).encode()).digest()
        line = (base64.b64encode(digest * 2)[:76] if attachment else digest.hex().encode() * 15) + b"\r\n"
        out.append(line)
        size += len(line)
        i += 1
    if attachment:
        out.append(b"--b1--\r\n")
    return out


def child(dsn: str, endpoint: str, bucket: str, size_mib: int, work: Path, mailbox: bool, attachment: bool,
          users: int = 1) -> None:
    """The node: accepts one message; prints {"before", "after", "traced", "digest", "size", "module", "seconds"}."""
    import asyncio
    import time
    import tracemalloc

    import postier
    import postier.queue.runner  # noqa: F401 - loaded in a node before any message arrives
    from bench.cluster_send_rss import _reset_peak, _status_mib
    from postier.message.received import queue_id
    from postier.message.types import MessageBody, User
    from postier.queue.cluster import ClusterSpool
    from postier.queue.spool import MessageInfo, RecipientSpec
    from postier.store.cluster.bodies import BodyStore
    from postier.store.cluster.store import ClusterDelivery, ClusterStore

    store = ClusterStore(dsn, BodyStore(endpoint, bucket, "test", "test", timeout=10.0), workers=2)
    spool = ClusterSpool(store, 300.0, node="measured")
    store.ensure_schema()
    body = MessageBody(work)
    buf = b""
    for line in _pieces(size_mib, attachment):  # as SMTP DATA hands them over: pieces of 64 KiB
        buf += line
        if len(buf) >= 65536:
            body.write(buf)
            buf = b""
    body.write(buf)
    mid = queue_id()
    user = User("bob@b.test", "bob", "b.test", "maildir")
    others = [User(f"u{i}@b.test", f"u{i}", "b.test", "maildir") for i in range(1, users)]
    if mailbox:  # the users' folders exist already
        for u in (user, *others):
            mb = store.acquire(u)
            mb.ensure_defaults()
            store.release(mb)
    _reset_peak()
    before = _status_mib("VmRSS")
    tracemalloc.start()
    started = time.monotonic()
    if mailbox and others:
        mda = ClusterDelivery(store, work)
        results = asyncio.run(mda.deliver([(u, None) for u in (user, *others)], PREFIX, body, "alice@a.test"))
        mda.close()
        n, res = len(PREFIX) + body.size, [r.detail for r in results]
    elif mailbox:
        got = ClusterDelivery(store, work).deliver_one(user, PREFIX, body, "alice@a.test")
        n, res = len(PREFIX) + body.size, got.detail
    else:
        n = spool.write_file(mid, PREFIX, body)
        [res] = spool.run([spool.op_insert(MessageInfo(mid, "alice@a.test", 1_800_000_000.0, n),
                                           [RecipientSpec("bob@b.test")], 1_800_000_000.0)])
    seconds = time.monotonic() - started
    traced = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    after = _status_mib("VmHWM")
    if mailbox:
        mb = store.acquire(user)
        digest = next(iter(mb.rows_between("INBOX", 1, 1).values())).base
        store.release(mb)
    else:
        digest = spool._digests([mid])[mid]
    body.close()
    store.close()
    print(json.dumps({"before": before, "after": after, "traced": traced, "digest": digest, "size": n,
                      "result": repr(res), "module": postier.__file__,
                      "seconds": seconds}))


def driver(size_mib: int, tree: Path, mailbox: bool, attachment: bool, users: int = 1,
           s3_kind: str = "moto") -> None:
    sys.path.insert(0, str(ROOT))
    from bench.objectstore import ObjectStore, start_store
    from postier.store.cluster.bodies import BodyStore
    from tests.cluster.conftest import PgServer, S3Server

    pg = PgServer()
    pg.start()
    s3: S3Server | ObjectStore = S3Server() if s3_kind == "moto" else start_store(s3_kind)
    try:
        dsn, bucket = pg.create_db(), s3.bucket() if isinstance(s3, S3Server) else "bench-accept"
        bodies = BodyStore(s3.endpoint, bucket, "test", "test", timeout=10.0)
        bodies.ensure_bucket()
        sha = hashlib.sha256(PREFIX)
        for piece in _pieces(size_mib, attachment):
            sha.update(piece)
        with tempfile.TemporaryDirectory(prefix="postier-rss-") as work:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", dsn, s3.endpoint,
                                bucket, str(size_mib), work, "mailbox" if mailbox else "queue",
                                "attachment" if attachment else "text", str(users)], env=env, cwd=work, capture_output=True, text=True,
                               timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"child failed: {p.stderr[-3000:]}")
            got = json.loads(p.stdout.strip().splitlines()[-1])
            stored = Path(work) / "stored"
            bodies.download(got["digest"], stored)  # checks the bytes against the key on the way
        ok = got["digest"] == sha.hexdigest()
        print(f"message {got['size'] / 2**20:.1f} MiB, postier from {got['module']}, S3: {s3_kind}")
        what = f"local delivery to {users} users" if mailbox and users > 1 else (
            "local delivery" if mailbox else "queue acceptance")
        print(f"{what} ({got['seconds']:.2f} s): "
              f"node RSS {got['before']:.1f} MiB before the acceptance, peak during it {got['after']:.1f} MiB "
              f"(+{got['after'] - got['before']:.1f} MiB); tracemalloc peak {got['traced']:.1f} MiB; "
              f"stored body {'matches' if ok else 'DOES NOT MATCH'} the message's SHA-256")
        if not ok:
            raise SystemExit(1)
    finally:
        s3.stop()
        pg.remove()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], argv[3], int(argv[4]), Path(argv[5]), argv[6] == "mailbox", argv[7] == "attachment",
              int(argv[8]))
        return 0
    sys.path.insert(0, str(ROOT))  # not in the child: it imports postier from --tree
    from bench import objectstore
    ap = argparse.ArgumentParser(prog="cluster_accept_rss")
    ap.add_argument("--size", type=int, default=30, help="message size in MiB")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the postier checkout the node runs from")
    ap.add_argument("--mailbox", action="store_true", help="a local delivery instead of the queue's acceptance")
    ap.add_argument("--attachment", action="store_true", help="a message with a base64 attachment, not text")
    ap.add_argument("--users", type=int, default=1, help="with --mailbox: deliver to this many users at once")
    objectstore.add_option(ap)
    args = ap.parse_args(argv)
    objectstore.kinds(args.s3)
    driver(args.size, args.tree.resolve(), args.mailbox, args.attachment, max(1, args.users), args.s3)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
