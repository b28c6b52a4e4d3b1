"""Accounts benchmark, SQLite against cluster mode's PostgreSQL: recipient resolution (cached and not),
a login answered by the login cache (one read of the stored hash), and how long an alias added
through one `Accounts` (node A) takes to route on another (node B). A throwaway PostgreSQL 15
(fsync off) on loopback.

    .venv/bin/python -m bench cluster-accounts [--users 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postier import accounts as accounts_mod  # noqa: E402
from postier.accounts import Accounts, Lookup  # noqa: E402
from postier.store.cluster.accounts import PGAccountStorage  # noqa: E402
from tests.cluster.conftest import PgServer  # noqa: E402

PW = "password123"


def per_call(fn: Callable[[int], object], n: int, rounds: int) -> float:
    """Best of `rounds` of n calls, in microseconds per call."""
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(n):
            fn(i)
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def measure(make: Callable[[], Accounts], users: int, rounds: int) -> dict[str, float]:
    a, b = make(), make()
    a.rehash = b.rehash = False
    a.add_domain("example.org")
    for i in range(users):
        a.add_user(f"u{i}@example.org", PW)
    out: dict[str, float] = {}
    b.resolve("u0@example.org")
    out["resolve, cached"] = per_call(lambda i: b.resolve(f"u{i % users}@example.org"), users * 10, rounds)
    accounts_mod.CACHE_CHECK = 0.0  # every call asks for the change counter ...
    out["resolve, counter checked"] = per_call(lambda i: b.resolve(f"u{i % users}@example.org"), users, rounds)
    out["resolve, uncached"] = per_call(lambda i: b._resolve(f"u{i % users}@example.org"), users, rounds)
    accounts_mod.CACHE_CHECK = 0.1
    b.verify_password("u0@example.org", PW)
    out["login, cache hit"] = per_call(lambda i: b.verify_password("u0@example.org", PW), 200, rounds)
    waits = []
    for r in range(rounds):
        alias = f"team{r}@example.org"
        assert b.resolve(alias).status is Lookup.UNKNOWN_USER
        t = time.perf_counter()
        a.add_alias(alias, ["u1@example.org"])
        while b.resolve(alias).status is not Lookup.FOUND and time.perf_counter() - t < 5:
            time.sleep(0.001)
        waits.append((time.perf_counter() - t) * 1e3)
    out["alias on A routes on B (ms)"] = max(waits)
    a.close()
    b.close()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bench cluster-accounts")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="postier-bench-") as tmp:
        db = Path(tmp) / "accounts.sqlite"
        sqlite = measure(lambda: Accounts(db), args.users, args.rounds)
    pg = PgServer()
    pg.start()
    try:
        dsn = pg.create_db()
        cluster = measure(lambda: Accounts(PGAccountStorage(dsn)), args.users, args.rounds)
    finally:
        pg.remove()
    print(f"{'measure (µs per call unless said)':<36} {'SQLite':>10} {'PostgreSQL':>12}")
    for key in sqlite:
        print(f"{key:<36} {sqlite[key]:>10.1f} {cluster[key]:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
