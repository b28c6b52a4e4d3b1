"""Body collection benchmark: the listing pass of `postier cluster gc` (store/cluster/gc.py
`collect_orphans`) over a bucket of N objects, half of them named by a `bodies` row and half orphans,
then again over the rows' half alone (listing and checking only), then the table pass (`collect`)
over those rows, which no message refers to. A throwaway PostgreSQL 15 (fsync off) and moto's S3
server in this process, on loopback.

    .venv/bin/python -m bench cluster-gc [--objects 2000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg  # noqa: E402

from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.gc import collect, collect_orphans, mark  # noqa: E402
from postier.store.cluster.schema import ensure_schema  # noqa: E402
from tests.cluster.conftest import PgServer, S3Server  # noqa: E402


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench cluster-gc")
    ap.add_argument("--objects", type=int, default=2000)
    args = ap.parse_args(argv)
    pg, s3 = PgServer(), S3Server()
    pg.start()
    try:
        bodies = BodyStore(s3.endpoint, s3.bucket(), "test", "test")
        bodies.ensure_bucket()
        with psycopg.connect(pg.create_db(), autocommit=True) as conn:
            ensure_schema(conn)
            for i in range(args.objects):
                digest = bodies.put(b"body %d\r\n" % i)
                if i % 2:
                    mark(conn, digest)
            for what in ("half orphans", "rows only"):
                t = time.perf_counter()
                run = collect_orphans(conn, bodies, grace=-60, limit=args.objects)
                took = time.perf_counter() - t
                print(f"{what:<13} listed {run.listed:>7}, deleted {run.deleted:>7}: {took:6.2f} s "
                      f"({took / max(1, run.listed) * 1e3:.2f} ms per object listed)")
            t = time.perf_counter()
            gone = collect(conn, bodies, grace=-60)
            took = time.perf_counter() - t
            print(f"{'table pass':<13} deleted {gone:>7}: {took:6.2f} s ({took / max(1, gone) * 1e3:.2f} ms per body)")
    finally:
        pg.remove()
        s3.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
