"""The cluster's failed-login table on a real PostgreSQL (store/cluster/throttle.py), driven by two
`ClusterThrottle`s as two nodes would: the exchange statement's writes, reads, clears and ring, the
read-back page and cursor, the sweep, and PostgreSQL stopped then started again."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

pytest.importorskip("psycopg")

from postier.server.throttle import AuthThrottle, ClusterThrottle  # noqa: E402
from postier.store.errors import StoreUnavailable  # noqa: E402

from .conftest import PgServer  # noqa: E402


def _node(dsn: str, name: str, max_failures: int = 6, window: float = 600.0) -> ClusterThrottle:
    from postier.store.cluster.throttle import PGThrottleExchange
    local = AuthThrottle(0.0, max_failures, window)
    return ClusterThrottle(local, name, PGThrottleExchange(dsn, name, window, ClusterThrottle.ring_for(max_failures),
                                                           timeout=2.0))


def _rows(dsn: str) -> dict[tuple[str, str], int]:
    import psycopg
    with psycopg.connect(dsn) as conn:
        return {(ip, node): n for ip, node, n in conn.execute(
            "SELECT ip, node, cardinality(stamps) FROM throttle_failures").fetchall()}


async def _close(*nodes: ClusterThrottle) -> None:
    for n in nodes:
        assert n.exchange is not None
        await n.exchange.close()


def test_two_nodes_share_failures_and_clears(pg: PgServer) -> None:
    dsn = pg.create_db()

    async def run() -> None:
        a, b = _node(dsn, "a"), _node(dsn, "b")
        try:
            for _ in range(4):
                a.failure("192.0.2.1")
            for _ in range(2):
                b.failure("192.0.2.1")
            for _ in range(9):  # more than the ring (max_failures): the newest 6 are kept
                b.failure("192.0.2.9")
            assert await a.sync() and await b.sync() and await a.sync()
            assert _rows(dsn) == {("192.0.2.1", "a"): 4, ("192.0.2.1", "b"): 2, ("192.0.2.9", "b"): 6}
            assert a.count("192.0.2.1") == b.count("192.0.2.1") == 6 and a.blocked("192.0.2.1")
            assert a.count("192.0.2.9") == 6
            a.success("192.0.2.1")
            assert await a.sync() and await b.sync()
            assert _rows(dsn)[("192.0.2.1", "a")] == 0 and _rows(dsn)[("192.0.2.1", "b")] == 0
            assert b.count("192.0.2.1") == 0 and a.count("192.0.2.1") == 0
            b.failure("192.0.2.1")  # a failure after the success counts again, appended to the blank row
            assert await b.sync() and await a.sync()
            assert a.count("192.0.2.1") == 1
        finally:
            await _close(a, b)
    asyncio.run(run())


def test_two_nodes_exchanging_at_once_lose_no_failure(pg: PgServer) -> None:
    """Two nodes (each its own connection) failing and exchanging concurrently on the same IPs."""
    dsn = pg.create_db()

    async def run() -> None:
        a, b = _node(dsn, "a", max_failures=64), _node(dsn, "b", max_failures=64)
        try:
            async def hammer(n: ClusterThrottle) -> None:
                for i in range(20):
                    for ip in ("192.0.2.1", "192.0.2.2"):
                        n.failure(ip)
                    if i % 3 == 0:
                        assert await n.sync()
                assert await n.sync()
            await asyncio.gather(hammer(a), hammer(b))
            assert await a.sync() and await b.sync()
            for ip in ("192.0.2.1", "192.0.2.2"):
                assert a.count(ip) == b.count(ip) == 40
        finally:
            await _close(a, b)
    asyncio.run(run())


def test_read_back_is_paged_and_aged_rows_are_swept(pg: PgServer, monkeypatch: pytest.MonkeyPatch) -> None:
    from postier.store.cluster import throttle as pgt
    monkeypatch.setattr(pgt, "READ_LIMIT", 7)
    dsn = pg.create_db()

    async def run() -> None:
        a, b = _node(dsn, "a", window=3.0), _node(dsn, "b", window=3.0)
        try:
            for i in range(20):
                a.failure(f"198.51.100.{i}")
            assert await a.sync()
            for _ in range(3):  # 7 + 7 + 6 rows
                assert await b.sync()
            assert all(b.count(f"198.51.100.{i}") == 1 for i in range(20))
            ex = b.exchange
            assert isinstance(ex, pgt.PGThrottleExchange)
            deadline = time.monotonic() + 20
            while _rows(dsn) and time.monotonic() < deadline:  # rows older than the window: swept
                ex._swept -= pgt.SWEEP
                assert await b.sync()
                await asyncio.sleep(0.5)
            assert _rows(dsn) == {}
            assert b.count("198.51.100.0") == 0  # aged out here too
        finally:
            await _close(a, b)
    asyncio.run(run())


def test_postgresql_stopped_counts_locally_and_recovers(pg_own: PgServer) -> None:
    dsn = pg_own.create_db()

    async def run() -> None:
        a, b = _node(dsn, "a"), _node(dsn, "b")
        try:
            assert await a.sync() and await b.sync()
            pg_own.stop()
            a.failure("192.0.2.1")
            a.failure("192.0.2.1")
            t0 = time.monotonic()
            assert not await a.sync()  # StoreUnavailable within the timeout, the failures kept
            assert time.monotonic() - t0 < 10
            assert a.count("192.0.2.1") == 2 and not a.shared
            pg_own.start()
            deadline = time.monotonic() + 30
            while not await a.sync():
                assert time.monotonic() < deadline, "no exchange after PostgreSQL came back"
                await asyncio.sleep(0.5)
            assert a.shared and await b.sync()
            assert b.count("192.0.2.1") == 2
        finally:
            await _close(a, b)
    asyncio.run(run())


def test_exchange_raises_store_unavailable(pg_own: PgServer) -> None:
    from postier.store.cluster.throttle import PGThrottleExchange
    dsn = pg_own.create_db()
    pg_own.stop()
    ex = PGThrottleExchange(dsn, "a", 600.0, 6, timeout=1.0)

    async def run() -> Any:
        return await ex.exchange(["192.0.2.1"], [0.0], [])
    with pytest.raises(StoreUnavailable):
        asyncio.run(run())
