"""The cluster's login throttle without sockets or PostgreSQL (server/throttle.py `ClusterThrottle`):
how this node's count and the other nodes' rows are merged, what an exchange takes and puts back,
what a success clears, the bounds, and the outage. The exchange here is a table in memory with the
statement's rules (store/cluster/throttle.py; tests/cluster/test_nodes_throttle.py runs the real one)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from postier.server import throttle as throttle_mod
from postier.server.throttle import AuthThrottle, ClusterThrottle
from postier.store.errors import StoreUnavailable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Table:
    """`throttle_failures` in memory: (ip, node) -> stamps, and a change counter per row."""

    def __init__(self, clock: Clock, window: float, ring: int) -> None:
        self.clock = clock
        self.window = window
        self.ring = ring
        self.rows: dict[tuple[str, str], tuple[list[float], int]] = {}
        self.version = 0
        self.down = False
        self.calls = 0

    def _set(self, key: tuple[str, str], stamps: list[float]) -> None:
        self.version += 1
        self.rows[key] = (stamps, self.version)


class Exchange:
    def __init__(self, table: Table, node: str) -> None:
        self.table = table
        self.node = node
        self.seen = 0

    async def exchange(self, ips: Sequence[str], ages: Sequence[float], clears: Sequence[str],
                       limits: object = None) -> tuple[list[tuple[str, str, list[float]]], list[Any]]:
        t = self.table
        t.calls += 1
        if t.down:
            raise StoreUnavailable("down")
        now = t.clock()
        # the read's snapshot is taken before the statement's own writes
        read = [(ip, node, [now - s for s in stamps if s > now - t.window])
                for (ip, node), (stamps, v) in sorted(t.rows.items(), key=lambda kv: kv[1][1]) if v > self.seen]
        self.seen = t.version
        for (ip, node), (stamps, _v) in list(t.rows.items()):
            if ip in clears and stamps and not (node == self.node and ip in ips):
                t._set((ip, node), [])
        fresh: dict[str, list[float]] = {}
        for ip, age in zip(ips, ages, strict=True):
            fresh.setdefault(ip, []).append(now - age)
        for ip, stamps in fresh.items():
            old = [] if ip in clears else t.rows.get((ip, self.node), ([], 0))[0]
            t._set((ip, self.node), sorted(s for s in old + stamps if s > now - t.window)[-t.ring:])
        return read, []

    async def close(self) -> None:
        pass


def _pair(max_failures: int = 6) -> tuple[Clock, Table, ClusterThrottle, ClusterThrottle]:
    clock = Clock()
    table = Table(clock, 600.0, max_failures)
    a = ClusterThrottle(AuthThrottle(0.5, max_failures, 600.0, clock), "a", Exchange(table, "a"))
    b = ClusterThrottle(AuthThrottle(0.5, max_failures, 600.0, clock), "b", Exchange(table, "b"))
    return clock, table, a, b


def _sync(*nodes: ClusterThrottle) -> None:
    async def run() -> None:
        for n in nodes:
            assert await n.sync()
    asyncio.run(run())


def test_failures_on_two_nodes_reach_the_refusal_together() -> None:
    clock, _table, a, b = _pair()
    for _ in range(3):
        a.failure("192.0.2.1")
        b.failure("192.0.2.1")
    assert a.count("192.0.2.1") == 3 and not a.blocked("192.0.2.1")  # nothing exchanged yet
    _sync(a, b, a)  # a writes, b writes and reads a's, a reads b's
    assert a.count("192.0.2.1") == b.count("192.0.2.1") == 6
    assert a.blocked("192.0.2.1") and b.blocked("192.0.2.1")
    assert a.delay("192.0.2.1") == b.delay("192.0.2.1") == 3.0
    assert not a.blocked("192.0.2.2") and b.count("192.0.2.2") == 0
    clock.now += 601  # every stamp leaves the window, the other node's too
    assert a.count("192.0.2.1") == b.count("192.0.2.1") == 0


def test_other_nodes_stamps_age_out_one_by_one() -> None:
    clock, _table, a, b = _pair()
    a.failure("192.0.2.1")
    clock.now += 300
    a.failure("192.0.2.1")
    _sync(a, b)
    assert b.count("192.0.2.1") == 2
    clock.now += 301  # the first failure is older than the window
    assert b.count("192.0.2.1") == 1 and a.count("192.0.2.1") == 1


def test_a_success_on_one_node_clears_the_other() -> None:
    _clock, table, a, b = _pair()
    for _ in range(4):
        a.failure("192.0.2.1")
    b.failure("192.0.2.1")
    _sync(a, b, a)
    assert a.count("192.0.2.1") == b.count("192.0.2.1") == 5
    b.success("192.0.2.1")  # b forgets at once, a at its next read after b's exchange
    assert b.count("192.0.2.1") == 0
    _sync(a)  # a reads before b's exchange: b's success is not known yet
    assert a.count("192.0.2.1") == 5
    _sync(b, a)
    assert a.count("192.0.2.1") == 0 and b.count("192.0.2.1") == 0
    assert all(not stamps for (ip, _n), (stamps, _v) in table.rows.items() if ip == "192.0.2.1")
    a.failure("192.0.2.1")  # a new failure after the success counts again, on both
    _sync(a, b)
    assert a.count("192.0.2.1") == b.count("192.0.2.1") == 1


def test_a_failure_after_a_clear_is_kept() -> None:
    """A's row blanked by b's success must not clear a failure a saw since. (The earlier one stays
    too: a's count is stricter by it until the window passes, never looser.)"""
    _clock, _table, a, b = _pair()
    a.failure("192.0.2.1")
    _sync(a)
    b.success("192.0.2.1")
    _sync(b)  # a's row is blank in the table
    a.failure("192.0.2.1")  # pending on a when a reads the blank row
    _sync(a)
    assert a.count("192.0.2.1") == 2
    _sync(b)
    assert b.count("192.0.2.1") == 1  # a's row holds the new failure only


def test_rows_read_after_a_local_success_count_only_later_failures() -> None:
    clock, _table, a, b = _pair()
    for _ in range(3):
        b.failure("192.0.2.1")
    _sync(b)
    clock.now += 1
    a.success("192.0.2.1")  # not written yet: the rows a reads now predate it
    _sync(a)
    assert a.count("192.0.2.1") == 0
    clock.now += 1
    b.failure("192.0.2.1")  # after a's success, before b sees it blanked
    _sync(b, a)
    assert a.count("192.0.2.1") == 1


def test_own_rows_never_count_twice() -> None:
    _clock, _table, a, _b = _pair()
    for _ in range(2):
        a.failure("192.0.2.1")
    _sync(a, a, a)
    assert a.count("192.0.2.1") == 2


def test_outage_counts_locally_warns_once_and_writes_later(caplog: pytest.LogCaptureFixture) -> None:
    _clock, table, a, b = _pair()
    table.down = True
    a.failure("192.0.2.1")

    async def run() -> list[bool]:
        return [await a.sync() for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="postier.server"):
        assert asyncio.run(run()) == [False, False, False]
        a.failure("192.0.2.1")
        assert a.count("192.0.2.1") == 2 and not a.shared
        table.down = False
        _sync(a, b)
    warnings = [r.getMessage() for r in caplog.records]
    assert len([w for w in warnings if "on this node only" in w]) == 1, warnings
    assert len([w for w in warnings if "shared with the other nodes again" in w]) == 1, warnings
    assert b.count("192.0.2.1") == 2  # what waited was written once PostgreSQL answered


def test_a_success_during_an_outage_drops_the_failures_it_cleared() -> None:
    _clock, table, a, b = _pair()
    a.failure("192.0.2.1")
    table.down = True
    batch = a.take()
    a.success("192.0.2.1")
    a.restore(batch)  # the exchange failed: the failure taken before the success is not put back
    table.down = False
    _sync(a, b)
    assert b.count("192.0.2.1") == 0 and a.count("192.0.2.1") == 0


def test_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(throttle_mod, "MAX_TRACKED", 50)
    monkeypatch.setattr(throttle_mod, "FLUSH_LIMIT", 20)
    clock, _table, a, b = _pair(max_failures=3)
    for i in range(200):  # a distributed attack: more IPs than tracked
        for _ in range(5):
            a.failure(f"198.51.100.{i}")
    assert len(a._pending) == 50 and all(len(s) == 3 for s in a._pending.values())  # ring: max_failures
    batch = a.take()
    assert len(batch.failures) == 20 and len(a._pending) == 30  # the rest at the next exchange
    a.restore(batch)
    _sync(a, a, a)
    assert not a._pending
    _sync(b)
    assert len(b._remote) == 50 and b.count("198.51.100.199") == 3
    for i in range(200):
        b.success(f"203.0.113.{i}")
    assert len(b._clears) == 50
    clock.now += 700
    assert b.count("198.51.100.199") == 0 and "198.51.100.199" not in b._remote


def test_a_success_in_another_worker_drops_this_workers_unsent_failures() -> None:
    """Two workers of node a share the node's count (one AuthThrottle here, the workers' table in
    server/shared.py): a failure seen by worker 0, then a login in worker 1 before worker 0's
    exchange, must not reach the other nodes after the success that cleared it."""
    clock = Clock()
    table = Table(clock, 600.0, 6)
    shared = AuthThrottle(0.5, 6, 600.0, clock)
    w0 = ClusterThrottle(shared, "a", Exchange(table, "a"))
    w1 = ClusterThrottle(shared, "a", Exchange(table, "a"))
    b = ClusterThrottle(AuthThrottle(0.5, 6, 600.0, clock), "b", Exchange(table, "b"))
    for _ in range(3):
        w0.failure("192.0.2.9")
    w1.success("192.0.2.9")
    w0.failure("192.0.2.10")  # another IP's failure still goes out
    _sync(w1, w0, b)
    assert b.count("192.0.2.9") == 0
    assert b.count("192.0.2.10") == 1
