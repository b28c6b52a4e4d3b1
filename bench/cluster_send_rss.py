"""Peak memory of a cluster node's queue runner sending one large message (docs/scaling.md, "The queue").

The driver starts a throwaway PostgreSQL 15 and moto's S3 server, queues one message of --size MiB
in the shared queue (body in the bucket, rows in PostgreSQL) and runs a scripted MX (tests/queue/
fakemx.py), all in this process; a child process then runs one real runner (`queue.runner.Queue`
over `queue.cluster.ClusterSpool`) that claims the message and sends it to the MX. The child prints
its RSS just before the send (everything imported and connected; the peak counter is reset there,
/proc/self/clear_refs) and its peak RSS during the send (VmHWM): the difference is what sending the
message cost. `--tree DIR` runs the child on another checkout of
postier (e.g. `git archive` of an earlier commit), to compare before and after a change.

    .venv/bin/python -m bench cluster-send [--size 20] [--tree DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MX_IP = "127.0.0.12"


def _status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (kB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Linux (since 4.0): writing 5 to clear_refs resets VmHWM to the current RSS, so that the peak
    read afterwards is the send's, not the start-up's."""
    Path("/proc/self/clear_refs").write_text("5")


def child(dsn: str, endpoint: str, bucket: str, port: int, work: Path) -> None:
    """The node: one runner sends what is due; prints {"before": MiB, "after": MiB, "module": path}."""
    import inspect

    import postier
    from postier.queue.cluster import ClusterSpool
    from postier.store.cluster.bodies import BodyStore
    from postier.store.cluster.store import ClusterStore
    from tests.queue.conftest import queue_env

    store = ClusterStore(dsn, BodyStore(endpoint, bucket, "test", "test", timeout=10.0), workers=2)
    kwargs = {"tmp_dir": work / "cluster-send"} if "tmp_dir" in inspect.signature(ClusterSpool).parameters else {}
    spool = ClusterSpool(store, 300.0, node="measured", **kwargs)

    async def main() -> dict[str, object]:
        async with queue_env(work / "node", port=port, spool=spool) as env:
            env.dns.add("b.test", "MX", "10 mx.b.test")
            env.dns.add("mx.b.test", "A", MX_IP)
            spool.clock = env.clock.time
            _reset_peak()
            before = _status_mib("VmRSS")
            sent = await env.queue.run_once()
            return {"before": before, "after": _status_mib("VmHWM"), "sent": sent, "stats": dict(env.queue.stats),
                    "module": postier.__file__, "startup_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    out = asyncio.run(main())
    store.close()
    print(json.dumps(out))


def driver(size_mib: int, tree: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from postier.message.received import queue_id
    from postier.queue.cluster import ClusterSpool
    from postier.queue.spool import MessageInfo, RecipientSpec
    from postier.store.cluster.bodies import BodyStore
    from postier.store.cluster.store import ClusterStore
    from tests.cluster.conftest import PgServer, S3Server
    from tests.queue.fakemx import FakeMX

    pg = PgServer()
    pg.start()
    s3 = S3Server()
    loop = asyncio.new_event_loop()
    mx = FakeMX([MX_IP], caps=["PIPELINING", "SIZE 1000000000", "8BITMIME", "ENHANCEDSTATUSCODES"])
    threading.Thread(target=loop.run_forever, daemon=True).start()
    try:
        port = asyncio.run_coroutine_threadsafe(mx.start(), loop).result(30)
        dsn, bucket = pg.create_db(), s3.bucket()
        bodies = BodyStore(s3.endpoint, bucket, "test", "test", timeout=10.0)
        bodies.ensure_bucket()
        store = ClusterStore(dsn, bodies, workers=1)
        spool = ClusterSpool(store, 300.0, node="driver")
        line = b"x" * 998 + b"\r\n"
        body = b"From: <alice@a.test>\r\nTo: <bob@b.test>\r\nSubject: large\r\n\r\n" + line * (size_mib * 1024 * 1024
                                                                                             // len(line))
        mid = queue_id()
        n = spool.write_file(mid, b"", body)
        spool.run([spool.op_insert(MessageInfo(mid, "alice@a.test", 1_800_000_000.0, n),
                                   [RecipientSpec("bob@b.test")], 1_800_000_000.0)])
        store.close()
        with tempfile.TemporaryDirectory(prefix="postier-rss-") as work:
            env = {**os.environ, "PYTHONPATH": str(tree)}
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", dsn, s3.endpoint, bucket,
                                str(port), work], env=env, cwd=work, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"child failed: {p.stderr[-3000:]}")
        got = json.loads(p.stdout.strip().splitlines()[-1])
        delivered = [len(d.data) for d in mx.delivered]
        print(f"message {n / 2**20:.1f} MiB, postier from {got['module']}")
        print(f"runner RSS {got['before']:.1f} MiB before the send, peak during it {got['after']:.1f} MiB "
              f"(+{got['after'] - got['before']:.1f} MiB); sent {got['sent']} job(s), {got['stats']}, "
              f"MX received {delivered} bytes")
    finally:
        asyncio.run_coroutine_threadsafe(mx.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        s3.stop()
        pg.stop()
        pg.remove()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], argv[3], int(argv[4]), Path(argv[5]))
        return 0
    ap = argparse.ArgumentParser(prog="cluster_send_rss")
    ap.add_argument("--size", type=int, default=20, help="message size in MiB")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the postier checkout the runner runs from")
    args = ap.parse_args(argv)
    driver(args.size, args.tree.resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
