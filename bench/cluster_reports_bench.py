"""Report stores benchmark, SQLite against cluster mode's PostgreSQL: TLS outcomes (RFC 8460) and DMARC
results (RFC 7489 §7.2) recorded by two stores at once (two nodes, or two workers on one file), from
two threads, with the sums checked exact at the end; then the import of a single machine's report
files into PostgreSQL (`import_from`, as `postier cluster import-accounts` runs it): --import
distinct DMARC results and as many distinct TLS outcomes, each counted 3 times, copied, then copied
again (nothing to add). A throwaway
PostgreSQL 15 (fsync off) on loopback.

    .venv/bin/python -m bench cluster-reports [--records 2000] [--rounds 3] [--import 10000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postier.mailauth.reports import DAY, Evaluation, PolicyPublished, ReportStore  # noqa: E402
from postier.mailauth.tlsrpt import STS, SessionResult, TLSPolicy, TLSReportStore  # noqa: E402
from postier.store.cluster.reports import PGReportStorage  # noqa: E402
from tests.cluster.conftest import PgServer  # noqa: E402

DAY0 = 20_000 * DAY


def _tls(store: TLSReportStore, i: int) -> None:
    store.record(SessionResult(TLSPolicy(STS, "b.test"), "" if i % 4 else "validation-failure",
                               receiving_ip=f"198.51.100.{i % 8}"), DAY0 + i % 100)


def _dmarc(store: ReportStore, i: int) -> None:
    store.record(Evaluation(DAY0 + i % 100, f"192.0.2.{i % 16}", "a.test", "a.test",
                            PolicyPublished("a.test", "reject"), ("mailto:d@a.test",), "none", True, i % 3 != 0))


def rate(stores: list[Any], record: Callable[[Any, int], None], n: int) -> float:
    """Records per second, `n` by each store in a thread of its own, all at once."""
    start = threading.Barrier(len(stores))

    def work(store: Any) -> None:
        start.wait()
        for i in range(n):
            record(store, i)
    threads = [threading.Thread(target=work, args=(s,)) for s in stores]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return len(stores) * n / (time.perf_counter() - t)


def measure(make_tls: Callable[[], TLSReportStore], make_dmarc: Callable[[], ReportStore], n: int, rounds: int
            ) -> dict[str, float]:
    out = {"TLS outcomes/s": 0.0, "DMARC results/s": 0.0}
    for r in range(rounds):
        tls = [make_tls(), make_tls()]
        dmarc = [make_dmarc(), make_dmarc()]
        out["TLS outcomes/s"] = max(out["TLS outcomes/s"], rate(tls, _tls, n))
        out["DMARC results/s"] = max(out["DMARC results/s"], rate(dmarc, _dmarc, n))
        counted = sum(c for *_, c in tls[1].pending(DAY0 + DAY))
        assert counted == 2 * n * (r + 1), f"TLS sums: {counted} != {2 * n * (r + 1)}"
        counted = sum(ev.count for _, ev in dmarc[1].pending(DAY0 + DAY))
        assert counted == 2 * n * (r + 1), f"DMARC sums: {counted} != {2 * n * (r + 1)}"
        for s in (*tls, *dmarc):
            s.close()
    return out


def measure_import(dsn: str, n: int) -> list[tuple[str, float, float]]:
    """(kind, seconds of the first import, seconds of the second) of `n` rows of each kind."""
    now = time.time()
    out = []
    with tempfile.TemporaryDirectory(prefix="postier-bench-") as tmp:
        root = Path(tmp)
        src_tls, src_dmarc = TLSReportStore(root / "tlsrpt.sqlite"), ReportStore(root / "dmarc.sqlite")
        for i in range(n):  # distinct outcomes of yesterday, each counted 3 times
            r = SessionResult(TLSPolicy(STS, f"d{i % 50}.test"), "validation-failure", receiving_ip=f"10.0.{i // 250}.{i % 250}")
            for _ in range(3):
                src_tls.record(r, now - DAY)
        with src_dmarc._write():  # one transaction: the source's making is not measured
            for i in range(n):  # distinct results of yesterday, each counted 3 times
                ev = Evaluation(now - DAY, f"10.0.{i // 250}.{i % 250}", "a.test", "a.test",
                                PolicyPublished(f"d{i % 50}.test", "reject"), ("mailto:d@a.test",), "none", True, False)
                for _ in range(3):
                    src_dmarc.record(ev)
        for kind, src, dst in (("TLS outcome rows", src_tls, TLSReportStore(PGReportStorage(dsn, "tlsrpt"))),
                               ("DMARC result rows", src_dmarc, ReportStore(PGReportStorage(dsn, "dmarc")))):
            times = []
            for _ in range(2):
                t = time.perf_counter()
                tally, _received = dst.import_from(src, now)  # type: ignore[arg-type]
                times.append(time.perf_counter() - t)
                assert tally.copied + tally.unchanged == 3 * n, tally
            out.append((kind, times[0], times[1]))
            dst.close()
            src.close()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench cluster-reports")
    ap.add_argument("--records", type=int, default=2000, help="records per store and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--import", dest="imports", type=int, default=10000, help="rows of each kind imported")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="postier-bench-") as tmp:
        root = Path(tmp)
        sqlite = measure(lambda: TLSReportStore(root / "tlsrpt.sqlite"), lambda: ReportStore(root / "dmarc.sqlite"),
                         args.records, args.rounds)
    pg = PgServer()
    pg.start()
    try:
        dsn = pg.create_db()
        cluster = measure(lambda: TLSReportStore(PGReportStorage(dsn, "tlsrpt")),
                          lambda: ReportStore(PGReportStorage(dsn, "dmarc")), args.records, args.rounds)
        imports = measure_import(pg.create_db(), args.imports)
    finally:
        pg.remove()
    print(f"{'two stores at once, best of ' + str(args.rounds):<32} {'SQLite':>10} {'PostgreSQL':>12}")
    for key in sqlite:
        print(f"{key:<32} {sqlite[key]:>10.0f} {cluster[key]:>12.0f}")
    print("sums exact in every round")
    for kind, first, again in imports:
        print(f"import of {args.imports} {kind}: {first:.2f} s ({args.imports / first:.0f}/s), again {again:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
