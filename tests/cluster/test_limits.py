"""The other limits counted across nodes on a real PostgreSQL (server/limits.py over
store/cluster/throttle.py's EXCHANGE_LIMITS), driven as nodes would drive them: port 25's rate
groups appended and aged, IMAP session counts that stop counting when their lease runs out and are
blanked by a restarted process, POP3's last logins, the workers of one node under one name, the
sweep, and two nodes exchanging at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

pytest.importorskip("psycopg")

from postier.antispam.builtin import RateLimiter  # noqa: E402
from postier.server.limits import (  # noqa: E402
    CONNECTIONS,
    ClusterLimits,
    ClusterLogins,
    ClusterRateLimiter,
    ClusterUserSessions,
)
from postier.server.throttle import AuthThrottle, ClusterThrottle, LastLogins, UserSessions  # noqa: E402

from .conftest import PgServer  # noqa: E402


class Node:
    """One process of a node: its throttle's exchange carries the limits."""

    def __init__(self, dsn: str, name: str, proc: int = 0, rate: int = 6):
        from postier.store.cluster.throttle import PGThrottleExchange
        self.limits = ClusterLimits(1.0)
        self.rate = ClusterRateLimiter(RateLimiter(rate), self.limits, CONNECTIONS)
        self.sessions = ClusterUserSessions(UserSessions(), self.limits)
        self.logins = ClusterLogins(LastLogins(), self.limits)
        self.exchange = PGThrottleExchange(dsn, name, 600.0, 6, timeout=2.0, proc=proc)
        self.throttle = ClusterThrottle(AuthThrottle(0.0, 6, 600.0), name, self.exchange, 1.0, self.limits)

    async def sync(self) -> None:
        assert await self.throttle.sync()

    async def close(self) -> None:
        await self.exchange.close()


def _rows(dsn: str, kind: str) -> dict[tuple[str, str, int], tuple[list[float], list[int]]]:
    import psycopg
    with psycopg.connect(dsn) as conn:
        return {(key, node, proc): (list(stamps), list(counts)) for key, node, proc, stamps, counts in conn.execute(
            "SELECT key, node, proc, stamps, counts FROM cluster_limits WHERE kind = %s", (kind,)).fetchall()}


def _run(dsn: str, body: Any, *names: str) -> None:
    async def run() -> None:
        nodes = [Node(dsn, n) for n in names]
        try:
            await body(*nodes)
        finally:
            for n in nodes:
                await n.close()
    asyncio.run(run())


def test_rates_add_the_other_nodes_events(pg: PgServer) -> None:
    dsn = pg.create_db()

    async def body(a: Node, b: Node) -> None:
        ip = "192.0.2.1"
        for _ in range(3):
            assert a.rate.hit(ip)
        await a.sync()
        for _ in range(2):
            assert b.rate.hit(ip)
        assert a.rate.hit(ip)  # a fourth on a, after its first exchange: a second group in a's row
        await a.sync()
        await b.sync()
        await a.sync()
        rows = _rows(dsn, "c")
        assert [c for _s, c in [rows[(ip, "a", 0)]]] == [[3, 1]] and rows[(ip, "b", 0)][1] == [2]
        assert a.rate.count(ip) == b.rate.count(ip) == 6
        assert not a.rate.hit(ip) and not b.rate.hit(ip)  # the limit (6) counts both nodes
        assert a.rate.hit("192.0.2.2") and b.rate.count("192.0.2.2") == 0  # another IP is its own
    _run(dsn, body, "a", "b")


def test_session_counts_cross_nodes_release_and_restart(pg: PgServer) -> None:
    dsn = pg.create_db()

    async def body(a: Node, b: Node) -> None:
        assert a.sessions.admit("Alice@example.org", 3) and a.sessions.admit("alice@example.org", 3)
        await a.sync()
        await b.sync()
        assert b.sessions.admit("alice@example.org", 3)  # 2 on a + 1 here
        assert not b.sessions.admit("alice@example.org", 3)
        assert b.sessions.admit("bob@example.org", 3)
        await b.sync()
        await a.sync()
        assert not a.sessions.admit("alice@example.org", 3)  # a sees b's too
        a.sessions.release("alice@example.org")
        await a.sync()
        await b.sync()
        assert b.sessions.admit("alice@example.org", 3)
        # a's process restarts (same node, same index): its first exchange blanks its old row
        a2 = Node(dsn, "a")
        try:
            await a2.sync()
            assert _rows(dsn, "s")[("alice@example.org", "a", 0)][1] == [0]
            await b.sync()
            assert b.limits.sessions("alice@example.org") == 0
        finally:
            await a2.close()
    _run(dsn, body, "a", "b")


def test_a_session_count_not_refreshed_stops_counting_and_is_swept(pg: PgServer) -> None:
    from postier.store.cluster import throttle as pgt
    dsn = pg.create_db()

    async def body(a: Node, b: Node) -> None:
        a.limits.lease = 1.0  # (60 s at least in service: a dead node's sessions count that long)
        assert a.sessions.admit("alice@example.org", 2)
        await a.sync()
        await b.sync()
        assert b.limits.sessions("alice@example.org") == 1
        await asyncio.sleep(1.2)  # a writes nothing more: as if it died
        assert b.limits.sessions("alice@example.org") == 0 and b.sessions.admit("alice@example.org", 2)
        b.exchange._swept -= pgt.SWEEP
        await b.sync()
        assert ("alice@example.org", "a", 0) not in _rows(dsn, "s")
        assert ("alice@example.org", "b", 0) in _rows(dsn, "s")
    _run(dsn, body, "a", "b")


def test_open_sessions_are_refreshed_before_their_lease_runs_out(pg: PgServer) -> None:
    dsn = pg.create_db()

    async def body(a: Node, b: Node) -> None:
        a.limits.lease = 3.0  # rewritten after a third of it
        assert a.sessions.admit("alice@example.org", 2)
        end = time.monotonic() + 5
        while time.monotonic() < end:
            await a.sync()
            await b.sync()
            assert b.limits.sessions("alice@example.org") == 1
            await asyncio.sleep(0.3)
    _run(dsn, body, "a", "b")


def test_last_login_of_any_node(pg: PgServer) -> None:
    dsn = pg.create_db()

    async def body(a: Node, b: Node) -> None:
        assert b.logins.last("alice@example.org", 30) is None
        a.logins.record("Alice@example.org", 30)
        await a.sync()
        await b.sync()
        seen = b.logins.last("alice@example.org", 30)
        assert seen is not None and time.monotonic() - seen < 10  # its age travelled, not a's clock
        assert b.logins.last("alice@example.org", 0.001) is None  # older than that delay
        assert b.logins.last("bob@example.org", 30) is None
    _run(dsn, body, "a", "b")


def test_workers_of_one_node_write_their_own_rows_and_skip_their_node(pg: PgServer) -> None:
    """Two processes of node a (proc 0 and 1; their node's count is the table they share, not
    read back) and node b: b counts both of a's rows."""
    dsn = pg.create_db()

    async def run() -> None:
        a0, a1, b = Node(dsn, "a", 0), Node(dsn, "a", 1), Node(dsn, "b")
        try:
            assert a0.rate.hit("192.0.2.1") and a1.rate.hit("192.0.2.1")
            assert a0.sessions.admit("alice@example.org", 9) and a1.sessions.admit("alice@example.org", 9)
            for n in (a0, a1, b, a0):
                await n.sync()
            assert b.rate.count("192.0.2.1") == 2 and b.limits.sessions("alice@example.org") == 2
            assert a0.limits.rate(CONNECTIONS, "192.0.2.1") == 0  # a1's row is a0's own node's
            assert a0.limits.sessions("alice@example.org") == 0
        finally:
            for n in (a0, a1, b):
                await n.close()
    asyncio.run(run())


def test_two_nodes_exchanging_at_once_lose_no_event(pg: PgServer) -> None:
    dsn = pg.create_db()

    async def body(a: Node, b: Node) -> None:
        for n in (a, b):
            n.rate.limit = n.rate.local.limit = 10_000

        async def hammer(n: Node) -> None:
            for i in range(20):
                for ip in ("192.0.2.1", "192.0.2.2"):
                    assert n.rate.hit(ip)
                if i % 3 == 0:
                    await n.sync()
                    n.logins.record(f"user{i}@example.org", 60)
            await n.sync()
        await asyncio.gather(hammer(a), hammer(b))
        await a.sync()
        await b.sync()
        for ip in ("192.0.2.1", "192.0.2.2"):
            assert a.rate.count(ip) == b.rate.count(ip) == 40
        assert all(b.logins.last(f"user{i}@example.org", 60) is not None for i in range(0, 20, 3))
    _run(dsn, body, "a", "b")
