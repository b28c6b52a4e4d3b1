"""Body collection benchmark: both passes of `postier cluster gc` (store/cluster/gc.py) over a
bucket grown in steps, against moto's or SeaweedFS's S3 server (bench/objectstore.py), with a
throwaway PostgreSQL 15 (fsync off), all on loopback.

The bucket is filled with raw boto3 PutObjects of tiny bodies (`body N`) under postier's key layout
(`bodies/<2 hex>/<sha256>`, `bodies.body_key`), from several processes of several threads each, or
with `--fill filer` (SeaweedFS) with PUTs of the same keys to its filer's HTTP API, whose namespace
the S3 bucket is (/buckets/NAME/): about 2.5 times as fast here, a boto3 call costing about 1.5 ms
of client CPU; the rows go in with COPY. Object i is, by i % 10: 0-6 a body with its `bodies` row and a message
referring to it (both passes leave it), 7 a row and no message (the table pass deletes it), 8 no
row and a message (the listing pass adopts it: adds its row), 9 neither (the listing pass deletes
it). At each step (`--steps`, the bucket's target sizes) the new objects are added and then a child
process runs what `postier cluster gc` runs (`_collect`, the table pass; then `collect_orphans`
over the whole bucket, the listing pass) with a grace of -60 s, timing each pass, its ListObjectsV2
and DeleteObjects requests (botocore's events), and reading its RSS (VmRSS, and VmHWM reset before
each pass). Objects deleted at one step are not put back, so the next step's bucket holds the
survivors and the new objects; the per-key rates are per key listed or deleted. `--cli` then runs
the real `postier cluster gc` on the final bucket (nothing left to delete: a nightly run's steady
state, the whole bucket listed) and reports its wall time and peak RSS (wait4).

Bounded: filling stops at `--fill-limit` seconds (the step is then the objects made so far, in
whole chunks), and each gc child at `--gc-limit` seconds.

    .venv/bin/python -m bench cluster-gc [--objects 4000] [--s3 moto|seaweedfs]
    .venv/bin/python -m bench cluster-gc --s3 seaweedfs --fill filer --procs 2 --threads 8 \
        --steps 100000,300000,1000000 --cli
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import objectstore  # noqa: E402

CHUNK = 2000  # objects per seeding task
BUCKET = "bench-gc"


def _digest(i: int) -> str:
    return hashlib.sha256(b"body %d\r\n" % i).hexdigest()


def _client(endpoint: str, pool: int) -> object:
    import boto3
    import botocore.config
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=objectstore.ACCESS_KEY,
        aws_secret_access_key=objectstore.SECRET_KEY,
        config=botocore.config.Config(max_pool_connections=pool, retries={"max_attempts": 5, "mode": "standard"},
                                      s3={"addressing_style": "path"}))


def _put_chunk(endpoint: str, filer: tuple[str, int] | None, start: int, end: int, threads: int,
               deadline: float) -> int:
    """Put objects [start, end) from `threads` threads (one process's share): S3 PutObjects through
    boto3, or with `filer` (SeaweedFS), PUTs of the same keys to its filer's HTTP API, a third of the
    CPU a put. Returns `start` when all are stored, -1 when the deadline came first."""
    import http.client

    from postier.store.cluster.bodies import body_key
    client: object = _client(endpoint, threads)
    if time.time() > deadline:
        return -1
    todo = iter(range(start, end))
    lock = threading.Lock()

    def work() -> None:
        conn = http.client.HTTPConnection(*filer, timeout=60) if filer else None
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            body = b"body %d\r\n" % i
            key = body_key(hashlib.sha256(body).hexdigest())
            if conn is None:
                client.put_object(Bucket=BUCKET, Key=key, Body=body,  # type: ignore[attr-defined]
                                  ContentType="message/rfc822")
                continue
            conn.request("PUT", f"/buckets/{BUCKET}/{key}", body=body, headers={"Content-Type": "message/rfc822"})
            answer = conn.getresponse()
            answer.read()
            if answer.status >= 300:
                raise RuntimeError(f"filer PUT {key}: {answer.status}")
    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        for f in [ex.submit(work) for _ in range(threads)]:
            f.result()
    return start


def fill(endpoint: str, filer: tuple[str, int] | None, start: int, end: int, procs: int, threads: int, limit: float) -> list[int]:
    """Objects [start, end) in chunks of CHUNK; returns the starts of the chunks stored (all, unless
    `limit` seconds passed first: the chunks still running finish, the others are not begun)."""
    deadline = time.time() + limit
    done: list[int] = []
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx) as ex:
        futures = [ex.submit(_put_chunk, endpoint, filer, s, min(end, s + CHUNK), threads, deadline)
                   for s in range(start, end, CHUNK)]
        for f in concurrent.futures.as_completed(futures):
            got = f.result()
            if got >= 0:
                done.append(got)
    return sorted(done)


def rows(dsn: str, starts: list[int], end: int, folder: int) -> tuple[int, int]:
    """The PostgreSQL side of the chunks: `bodies` rows for classes 0-7, a message for 0-6 and 8
    (COPY); returns (rows, messages)."""
    import psycopg
    nb = nm = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.cursor() as cur:
            with cur.copy("COPY bodies (hash, last_put) FROM STDIN") as cp:
                for s in starts:
                    for i in range(s, min(end, s + CHUNK)):
                        if i % 10 <= 7:
                            cp.write_row((_digest(i), "2000-01-01 00:00:00+00"))
                            nb += 1
            with cur.copy("COPY messages (folder, uid, body, size, modseq, idate) FROM STDIN") as cp:
                for s in starts:
                    for i in range(s, min(end, s + CHUNK)):
                        if i % 10 <= 6 or i % 10 == 8:
                            cp.write_row((folder, i + 1, _digest(i), 12, 1, 0))
                            nm += 1
        conn.execute("ANALYZE bodies")
        conn.execute("ANALYZE messages")
    return nb, nm


def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(dsn: str, endpoint: str, limit: float) -> None:
    """What `postier cluster gc` runs, pass by pass, timed; prints one JSON line."""
    import psycopg

    from postier.store.cluster.bodies import BodyStore
    from postier.store.cluster.gc import _collect, collect_orphans

    bodies = BodyStore(endpoint, BUCKET, objectstore.ACCESS_KEY, objectstore.SECRET_KEY, timeout=30.0)
    calls: dict[str, list[float]] = {"ListObjectsV2": [0, 0.0], "DeleteObjects": [0, 0.0]}
    started: dict[int, float] = {}

    def before(model: object, **_: object) -> None:
        started[threading.get_ident()] = time.perf_counter()

    def after(model: object, **_: object) -> None:
        name = getattr(model, "name", "")
        if name in calls:
            calls[name][0] += 1
            calls[name][1] += time.perf_counter() - started.pop(threading.get_ident(), time.perf_counter())
    bodies.client.meta.events.register("before-call.s3", before)
    bodies.client.meta.events.register("after-call.s3", after)
    out: dict[str, object] = {"rss_start": _status("VmRSS")}
    with psycopg.connect(dsn, autocommit=True) as conn:
        Path("/proc/self/clear_refs").write_text("5")
        t = time.perf_counter()
        collected, refused = _collect(conn, bodies, grace=-60)
        out["table"] = {"seconds": time.perf_counter() - t, "deleted": collected, "refused": refused,
                        "peak_mib": _status("VmHWM"), "delete_calls": list(calls["DeleteObjects"])}
        calls["DeleteObjects"] = [0, 0.0]
        Path("/proc/self/clear_refs").write_text("5")
        before_rss = _status("VmRSS")
        t = time.perf_counter()
        run = collect_orphans(conn, bodies, grace=-60, limit=10**9)
        out["listing"] = {"seconds": time.perf_counter() - t, "listed": run.listed, "adopted": run.adopted,
                          "deleted": run.deleted, "refused": run.refused, "end": run.end,
                          "rss_before": before_rss, "peak_mib": _status("VmHWM"),
                          "list_calls": calls["ListObjectsV2"], "delete_calls": calls["DeleteObjects"]}
    print(json.dumps(out), flush=True)


def _gc_child(dsn: str, endpoint: str, limit: float) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "bench.cluster_gc", "--child", dsn, endpoint, str(limit)],
                       cwd=ROOT, capture_output=True, text=True, timeout=limit)
    if p.returncode != 0:
        raise RuntimeError(f"gc child failed: {p.stderr[-2000:]}")
    out: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return out


def _report(got: dict[str, Any]) -> None:
    tb, ls = got["table"], got["listing"]
    dcalls, dsecs = tb["delete_calls"]
    print(f"  table pass:   deleted {int(tb['deleted']):>8} in {tb['seconds']:8.2f} s "
          f"({tb['seconds'] / max(1, tb['deleted']) * 1e3:.3f} ms a body; {int(dcalls)} DeleteObjects, "
          f"{dsecs / max(1, tb['deleted']) * 1e3:.3f} ms a key in them, the rest {tb['seconds'] - dsecs:.2f} s); peak RSS {tb['peak_mib']:.1f} MiB")
    lcalls, lsecs = ls["list_calls"]
    dcalls, dsecs = ls["delete_calls"]
    print(f"  listing pass: listed {int(ls['listed']):>8} in {ls['seconds']:8.2f} s "
          f"({ls['listed'] / max(1e-9, ls['seconds']):.0f} keys/s; {int(lcalls)} ListObjectsV2, "
          f"{lsecs:.2f} s in them, {lsecs / max(1, lcalls) * 1e3:.1f} ms a page); adopted {int(ls['adopted'])}, "
          f"deleted {int(ls['deleted'])} ({int(dcalls)} DeleteObjects, "
          f"{dsecs / max(1, ls['deleted']) * 1e3:.3f} ms a key); RSS {ls['rss_before']:.1f} MiB before, "
          f"peak {ls['peak_mib']:.1f} MiB", flush=True)


def _cli(dsn: str, endpoint: str, limit: float) -> None:
    """The real `postier cluster gc` on the bucket as it is: wall time, peak RSS (wait4), output."""
    with tempfile.TemporaryDirectory(prefix="postier-gc-cli-") as tmp:
        data = Path(tmp) / "data"
        q = subprocess.run([sys.executable, "-m", "postier", "quickstart", "--domain", "gc.test", "--data-dir",
                            str(data), "--listen", "127.0.0.1", "--port-offset", "19700", "--quiet",
                            "--allow-root"], capture_output=True, text=True, timeout=120)
        if q.returncode != 0:
            raise RuntimeError(q.stderr)
        (data / "s3.secret").write_text(objectstore.SECRET_KEY + "\n")
        cfg = data / "postier.toml"
        cfg.write_text(cfg.read_text() + f'\n[cluster]\ndsn = "{dsn}"\ns3_endpoint = "{endpoint}"\n'
                       f's3_bucket = "{BUCKET}"\ns3_access_key = "{objectstore.ACCESS_KEY}"\n'
                       's3_secret_key_file = "s3.secret"\ntimeout = 30.0\n')
        t = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "postier", "--config", str(cfg), "cluster", "gc",
                                 "--list-limit", str(10**9)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        timer = threading.Timer(limit, proc.kill)
        timer.start()
        _pid, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        took = time.perf_counter() - t
        assert proc.stdout is not None and proc.stderr is not None
        out = proc.stdout.read().decode() + proc.stderr.read().decode()
        proc.returncode = os.waitstatus_to_exitcode(status)
        print(f"postier cluster gc --list-limit {10**9}: exit {proc.returncode}, {took:.2f} s, peak RSS "
              f"{usage.ru_maxrss / 1024:.1f} MiB, CPU {usage.ru_utime + usage.ru_stime:.2f} s")
        for line in io.StringIO(out):
            print("  " + line.rstrip())


def main(argv: list[str]) -> int:
    if argv[:1] == ["--child"]:
        child(argv[1], argv[2], float(argv[3]))
        return 0
    ap = argparse.ArgumentParser(prog="bench cluster-gc")
    ap.add_argument("--objects", type=int, default=4000, help="the bucket's size (one step)")
    ap.add_argument("--steps", default="", help="comma-separated sizes to grow the bucket to, gc at each")
    objectstore.add_option(ap)
    ap.add_argument("--procs", type=int, default=4, help="processes putting the objects")
    ap.add_argument("--threads", type=int, default=16, help="threads per process putting the objects")
    ap.add_argument("--fill-limit", type=float, default=3600.0, help="stop filling after this many seconds")
    ap.add_argument("--gc-limit", type=float, default=3600.0, help="stop a gc run after this many seconds")
    ap.add_argument("--fill", choices=("s3", "filer"), default="s3",
                    help="put the objects through S3 (boto3), or (SeaweedFS) its filer's HTTP API, faster")
    ap.add_argument("--cli", action="store_true", help="then run the real `postier cluster gc` once more")
    args = ap.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s] or [args.objects]
    import psycopg

    from postier.store.cluster.schema import ensure_schema
    from tests.cluster.conftest import PgServer
    objectstore.kinds(args.s3)
    pg = PgServer()
    pg.start()
    s3 = objectstore.start_store(args.s3)
    try:
        client: object = _client(s3.endpoint, 4)
        client.create_bucket(Bucket=BUCKET)  # type: ignore[attr-defined]
        dsn = pg.create_db()
        with psycopg.connect(dsn, autocommit=True) as conn:
            ensure_schema(conn)
            folder = conn.execute("INSERT INTO folders (owner, name) VALUES ('bench@gc.test', 'INBOX') "
                                  "RETURNING id").fetchone()[0]  # type: ignore[index]
        print(f"{s3.name} S3 and PostgreSQL 15 (fsync off) on loopback; {os.cpu_count()} CPUs, load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        filer = s3.filer if args.fill == "filer" and isinstance(s3, objectstore.SeaweedS3) else None
        made = 0
        fill_left = args.fill_limit
        for size in steps:
            if size <= made:
                continue
            previous = made
            t = time.perf_counter()
            starts = fill(s3.endpoint, filer, made, size, args.procs, args.threads, fill_left)
            took = time.perf_counter() - t
            fill_left -= took
            count = sum(min(size, s + CHUNK) - s for s in starts)
            t2 = time.perf_counter()
            nb, nm = rows(dsn, starts, size, folder)
            print(f"step to {size}: put {count} objects in {took:.1f} s ({count / max(took, 1e-9):.0f}/s, "
                  f"{args.procs}x{args.threads} threads, {'filer' if filer else 'S3'}); {nb} bodies rows, {nm} messages in "
                  f"{time.perf_counter() - t2:.1f} s; load average {os.getloadavg()[0]:.2f}", flush=True)
            made = size
            _report(_gc_child(dsn, s3.endpoint, args.gc_limit))
            if count < size - previous:
                print("  (filling stopped at --fill-limit: no further step)")
                break
        if args.cli:
            _cli(dsn, s3.endpoint, args.gc_limit)
        if isinstance(s3, objectstore.SeaweedS3):
            print(f"SeaweedFS data directory: {s3.data_bytes() / 2**20:.1f} MiB")
    finally:
        s3.stop()
        pg.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
