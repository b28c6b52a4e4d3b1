"""Run benchmarks: `python -m bench` lists them, `python -m bench NAME [args]` runs one."""

from __future__ import annotations

import importlib
import sys

#: name -> module (each has main(argv) -> int)
BENCHMARKS = {
    "smtp": "bench.smtp_ingest",
    "outbound": "bench.outbound_bench",
    "imap": "bench.imap_bench",
    "login": "bench.login_bench",
    "pop3": "bench.pop3_bench",
    "load": "bench.load",
    "webmail": "bench.webmail_bench",
    "cluster": "bench.cluster_bench",
    "cluster-accounts": "bench.cluster_accounts_bench",
    "cluster-reports": "bench.cluster_reports_bench",
    "cluster-views": "bench.cluster_views",
    "cluster-heads": "bench.cluster_heads",
    "cluster-send": "bench.cluster_send_rss",
    "cluster-gc": "bench.cluster_gc",
    "cluster-s3": "bench.cluster_s3",
    "cluster-accept": "bench.cluster_accept_rss",
    "cluster-fetch": "bench.cluster_fetch",
    "cluster-ranged": "bench.cluster_ranged",
    "fts-large": "bench.fts_large",
    "sieve-large": "bench.sieve_large",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bench NAME [options]   (NAME --help for its options)")
        for name, mod in BENCHMARKS.items():
            print(f"  {name:<10} {mod}")
        return 0
    name = argv[0]
    if name not in BENCHMARKS:
        print(f"unknown benchmark {name!r}", file=sys.stderr)
        return 2
    module = importlib.import_module(BENCHMARKS[name])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
