"""Object-store throughput of postier's body store (store/cluster/bodies.py `BodyStore.put`/`get`):
PutObject and GetObject of distinct bodies of 4 KiB and 1 MiB, from 1 and from 8 threads, against
each object store asked for in turn (`--s3 moto,seaweedfs`, bench/objectstore.py: each its own
process on loopback), in the same run. The body store's read cache is off (every get is a GET), and
every body read is checked against its hash. For each case: operations per second, MiB/s, latency
p50/p99 of one call, and the CPU time per call of the server process and of this (client) process.

Bounded: at most `--small`/`--large` bodies per case, and a case stops at `--time-limit` seconds
(its figures then cover the calls made).

    .venv/bin/python -m bench cluster-s3 [--s3 moto,seaweedfs] [--small 2000] [--large 100]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import objectstore  # noqa: E402
from bench.smtp_ingest import cpu_seconds  # noqa: E402


def _pct(values: list[float], p: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))] if v else 0.0


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _case(bodies: object, server_pid: int, label: str, size: int, count: int, threads: int,
          limit: float) -> None:
    """`count` puts of distinct `size`-byte bodies from `threads` threads, then their gets."""
    from postier.store.cluster.bodies import BodyStore
    assert isinstance(bodies, BodyStore)
    salt = os.urandom(8).hex().encode()
    digests: list[str] = []
    lock = threading.Lock()

    def phase(name: str, call: object) -> None:
        todo = iter(range(count))
        lat: list[float] = []
        deadline = time.monotonic() + limit

        def work() -> None:
            while time.monotonic() < deadline:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                t = time.perf_counter()
                call(i)  # type: ignore[operator]
                took = time.perf_counter() - t
                with lock:
                    lat.append(took)
        s0, c0, t0 = cpu_seconds(server_pid, children=True), _self_cpu(), time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as ex:
            for f in [ex.submit(work) for _ in range(threads)]:
                f.result()
        wall = time.perf_counter() - t0
        s1, c1 = cpu_seconds(server_pid, children=True), _self_cpu()
        n = len(lat)
        print(f"  {label:>5} {name} x{threads:<2}: {n:>5} in {wall:6.2f} s = {n / wall:7.1f}/s "
              f"{n * size / wall / 2**20:7.1f} MiB/s; p50 {_pct(lat, 50) * 1e3:7.2f} ms, p99 "
              f"{_pct(lat, 99) * 1e3:7.2f} ms; CPU a call: server {(s1 - s0) / max(1, n) * 1e3:.2f} ms, "
              f"client {(c1 - c0) / max(1, n) * 1e3:.2f} ms", flush=True)

    def put(i: int) -> None:
        body = (b"%s %d\r\n" % (salt, i)).ljust(size, b"x")
        digest = bodies.put(body)
        with lock:
            digests.append(digest)

    def get(i: int) -> None:
        digest = digests[i]
        data = bodies.get(digest)
        if bodies.digest(data) != digest or len(data) != size:
            raise RuntimeError(f"body {digest[:12]} read back wrong")
    phase("put", put)
    count = len(digests)
    phase("get", get)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench cluster-s3")
    objectstore.add_option(ap, many=True)
    ap.set_defaults(s3="moto,seaweedfs")
    ap.add_argument("--small", type=int, default=2000, help="4 KiB bodies per case")
    ap.add_argument("--large", type=int, default=100, help="1 MiB bodies per case")
    ap.add_argument("--threads", default="1,8", help="comma-separated thread counts")
    ap.add_argument("--time-limit", type=float, default=60.0, help="seconds per phase at most")
    args = ap.parse_args(argv)
    stores = objectstore.kinds(args.s3)
    from postier.store.cluster.bodies import BodyStore
    print(f"BodyStore put/get, read cache off; {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    for kind in stores:
        s3 = objectstore.start_store(kind)
        try:
            print(f"{kind}:", flush=True)
            for threads in (int(t) for t in args.threads.split(",")):
                bodies = BodyStore(s3.endpoint, f"bench-{kind}-{threads}", objectstore.ACCESS_KEY,
                                   objectstore.SECRET_KEY, timeout=30.0, cache_item=-1)
                bodies.ensure_bucket()
                _case(bodies, s3.proc.pid, "4KiB", 4096, args.small, threads, args.time_limit)
                _case(bodies, s3.proc.pid, "1MiB", 1 << 20, args.large, threads, args.time_limit)
        finally:
            s3.stop()
        print(f"  load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
