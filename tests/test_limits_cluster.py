"""The limits counted across cluster nodes without sockets or PostgreSQL (server/limits.py): port
25's rates, IMAP sessions per user and POP3's last logins, each this node's count plus the other
nodes' rows; what an exchange takes and puts back, the leases, the bounds, the outage. The exchange
here is a table in memory with the statement's rules (store/cluster/throttle.py EXCHANGE_LIMITS;
tests/cluster/test_limits.py runs the real one)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from postier.antispam.builtin import RateLimiter
from postier.server import limits as limits_mod
from postier.server.limits import (
    CONNECTIONS,
    MESSAGES,
    ClusterLimits,
    ClusterLogins,
    ClusterRateLimiter,
    ClusterUserSessions,
    LimitBatch,
)
from postier.server.throttle import AuthThrottle, ClusterThrottle, LastLogins, UserSessions
from postier.store.errors import StoreUnavailable

type LimitRow = tuple[str, str, str, int, list[float], list[int], float]  # store/cluster/throttle.py's
from tests.test_throttle_cluster import Clock  # noqa: E402  # the fake clock the throttle's tests use


class Table:
    """`cluster_limits` in memory: (kind, key, node, proc) -> (stamps, counts, expires, version)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rows: dict[tuple[str, str, str, int], tuple[list[float], list[int], float, int]] = {}
        self.version = 0
        self.down = False


class Exchange:
    def __init__(self, table: Table, node: str, proc: int = 0) -> None:
        self.table = table
        self.node = node
        self.proc = proc
        self.seen = 0
        self.batches: list[LimitBatch] = []

    async def exchange(self, ips: Sequence[str], ages: Sequence[float], clears: Sequence[str],
                       limits: LimitBatch | None = None) -> tuple[list[Any], list[LimitRow]]:
        t = self.table
        if t.down:
            raise StoreUnavailable("down")
        assert limits is not None
        self.batches.append(limits)
        now = t.clock()
        read: list[LimitRow] = [
            (kind, key, node, proc, [now - s for s in stamps], counts, expires - now)
            for (kind, key, node, proc), (stamps, counts, expires, v) in sorted(t.rows.items(), key=lambda kv: kv[1][3])
            if v > self.seen and node != self.node and expires > now]
        self.seen = t.version
        kinds, keys, lages, counts = limits.flat(now)
        written = set()
        for kind, key, age, n in zip(kinds, keys, lages, counts, strict=True):
            row = (kind, key, self.node, self.proc)
            written.add(row)
            keep = {"s": limits.lease, "l": limits.login_window}.get(kind, limits.rate_window)
            stamps, cs = [now - age], [n]
            if kind in (CONNECTIONS, MESSAGES) and row in t.rows:
                old_s, old_c, _e, _v = t.rows[row]
                pairs = [(s, c) for s, c in zip(old_s + stamps, old_c + cs, strict=True) if s > now - limits.rate_window]
                stamps, cs = [s for s, _c in pairs], [c for _s, c in pairs]
            t.version += 1
            t.rows[row] = (stamps, cs, now + keep, t.version)
        if limits.reset:
            for row, (stamps, cs, _e, _v) in list(t.rows.items()):
                if row[0] == "s" and row[2:] == (self.node, self.proc) and row not in written and cs != [0]:
                    t.version += 1
                    t.rows[row] = (stamps, [0], now + limits.lease, t.version)
        return [], read

    async def close(self) -> None:
        pass


class Node:
    def __init__(self, table: Table, name: str, limit: int = 6, proc: int = 0) -> None:
        clock = table.clock
        self.limits = ClusterLimits(1.0, clock)
        self.exchange = Exchange(table, name, proc)
        self.throttle = ClusterThrottle(AuthThrottle(0.0, 6, 600.0, clock), name, self.exchange, 1.0, self.limits)
        self.conns = ClusterRateLimiter(RateLimiter(limit, clock=clock), self.limits, CONNECTIONS)
        self.messages = ClusterRateLimiter(RateLimiter(limit, clock=clock), self.limits, MESSAGES)
        self.sessions = ClusterUserSessions(UserSessions(), self.limits)
        self.logins = ClusterLogins(LastLogins(clock), self.limits)


def _nodes(n: int = 2, limit: int = 6) -> tuple[Clock, Table, list[Node]]:
    clock = Clock()
    table = Table(clock)
    return clock, table, [Node(table, name, limit) for name in "abcdefg"[:n]]


def _sync(*nodes: Node) -> None:
    async def run() -> None:
        for n in nodes:
            assert await n.throttle.sync()
    asyncio.run(run())


def test_rates_over_two_nodes_reach_the_limit_together() -> None:
    clock, _table, (a, b) = _nodes()
    for _ in range(3):
        assert a.conns.hit("192.0.2.1") and b.conns.hit("192.0.2.1")
    assert a.conns.count("192.0.2.1") == 3  # nothing exchanged yet
    _sync(a, b, a)
    assert a.conns.count("192.0.2.1") == b.conns.count("192.0.2.1") == 6
    assert not a.conns.hit("192.0.2.1") and not b.conns.hit("192.0.2.1")
    assert a.conns.local.count("192.0.2.1") == 3  # a refused connection is not counted
    assert a.messages.hit("192.0.2.1") and a.conns.hit("192.0.2.2")  # the other rate, another IP
    clock.now += 61  # the minute passes, the other node's events too
    assert a.conns.count("192.0.2.1") == 0 and b.conns.hit("192.0.2.1")


def test_the_other_nodes_groups_age_out_one_by_one() -> None:
    clock, _table, (a, b) = _nodes()
    assert a.conns.hit("192.0.2.1")
    _sync(a)
    clock.now += 30
    assert a.conns.hit("192.0.2.1") and a.conns.hit("192.0.2.1")
    _sync(a, b)
    assert b.conns.count("192.0.2.1") == 3
    clock.now += 31
    assert b.conns.count("192.0.2.1") == 2


def test_sessions_of_one_user_over_nodes_and_their_release() -> None:
    _clock, table, (a, b) = _nodes()
    assert a.sessions.admit("Alice@example.org", 3) and a.sessions.admit("alice@example.org", 3)
    _sync(a, b)
    assert b.sessions.admit("alice@example.org", 3) and not b.sessions.admit("ALICE@example.org", 3)
    assert b.sessions.total() == 1  # the node's own (the admin page's figure)
    a.sessions.release("alice@example.org")
    _sync(a, b)
    assert b.sessions.admit("alice@example.org", 3)
    a.sessions.release("alice@example.org")
    _sync(a)
    assert table.rows[("s", "alice@example.org", "a", 0)][1] == [0]  # written once at zero
    _sync(a)
    assert "alice@example.org" not in a.limits._written


def test_open_sessions_are_rewritten_within_the_lease_and_a_silent_node_stops_counting() -> None:
    clock, _table, (a, b) = _nodes()
    assert a.limits.lease == 60.0
    assert a.sessions.admit("alice@example.org", 2)
    _sync(a, b)
    for _ in range(10):  # a keeps exchanging: its row is rewritten every lease / 3
        clock.now += 10
        _sync(a, b)
        assert b.limits.sessions("alice@example.org") == 1
    written = [bt.sessions for bt in a.exchange.batches if bt.sessions]
    assert 4 <= len(written) <= 6, written
    clock.now += 61  # a stops (dies): its row is not rewritten
    _sync(b)
    assert b.limits.sessions("alice@example.org") == 0
    assert b.sessions.admit("alice@example.org", 2) and b.sessions.admit("alice@example.org", 2)


def test_a_restarted_process_blanks_the_sessions_of_its_previous_life() -> None:
    _clock, table, (a, b) = _nodes()
    assert a.sessions.admit("alice@example.org", 2) and a.sessions.admit("bob@example.org", 2)
    _sync(a, b)
    assert b.limits.sessions("alice@example.org") == 1
    a2 = Node(table, "a")
    assert a2.sessions.admit("bob@example.org", 2)  # admitted before its first exchange: written, not blanked
    _sync(a2, b)
    assert b.limits.sessions("alice@example.org") == 0 and b.limits.sessions("bob@example.org") == 1
    _sync(a2)
    assert [bt.reset for bt in a2.exchange.batches] == [True, False]  # the first exchange only


def test_last_login_of_any_node_and_the_delay() -> None:
    clock, _table, (a, b) = _nodes()
    a.logins.record("Alice@example.org", 300)
    assert b.logins.last("alice@example.org", 300) is None  # not exchanged yet
    _sync(a, b)
    assert b.logins.last("alice@example.org", 300) == clock.now
    clock.now += 100
    b.logins.record("alice@example.org", 300)  # b's own is newer
    assert b.logins.last("alice@example.org", 300) == clock.now
    clock.now += 250  # a's login is 350 s old, b's 250
    assert b.logins.last("alice@example.org", 300) == clock.now - 250
    _sync(b, a)
    assert a.logins.last("alice@example.org", 300) == clock.now - 250
    clock.now += 60
    assert a.logins.last("alice@example.org", 300) is None


def test_outage_keeps_counting_locally_warns_once_and_writes_later(caplog: pytest.LogCaptureFixture) -> None:
    _clock, table, (a, b) = _nodes()
    table.down = True
    assert a.conns.hit("192.0.2.1") and a.sessions.admit("alice@example.org", 2)
    a.logins.record("alice@example.org", 300)

    async def run() -> list[bool]:
        return [await a.throttle.sync() for _ in range(3)]
    with caplog.at_level(logging.WARNING, logger="postier.server"):
        assert asyncio.run(run()) == [False, False, False]
        assert a.conns.hit("192.0.2.1") and a.conns.count("192.0.2.1") == 2
        table.down = False
        _sync(a, b)
    warnings = [r.getMessage() for r in caplog.records]
    assert len([w for w in warnings if "on this node only" in w]) == 1, warnings
    assert b.conns.count("192.0.2.1") == 2  # one group: what waited merged with the new event
    assert b.limits.sessions("alice@example.org") == 1
    assert b.logins.last("alice@example.org", 300) is not None
    assert a.exchange.batches[0].reset  # the reset waited too


def test_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_mod, "MAX_TRACKED", 50)
    monkeypatch.setattr(limits_mod, "FLUSH_LIMIT", 20)
    clock, _table, (a, b) = _nodes(limit=10_000)
    for i in range(200):  # more IPs than tracked
        for _ in range(5):
            assert a.conns.hit(f"198.51.100.{i}")
    assert len(a.limits._rates[CONNECTIONS]) == 50
    assert all(n == 5 for _t, n in a.limits._rates[CONNECTIONS].values())  # one group per IP
    batch = a.limits.take()
    assert len(batch.rates[CONNECTIONS]) == 20 and len(a.limits._rates[CONNECTIONS]) == 30
    a.limits.restore(batch)
    _sync(a, a, a)
    assert not a.limits._rates[CONNECTIONS]
    _sync(b)
    assert len(b.limits._remote_rates[CONNECTIONS]) == 50 and b.conns.count("198.51.100.199") == 5
    for _ in range(40):  # 40 exchanges with an event each: 40 groups in a's row, 32 kept on b (merged)
        clock.now += 1
        assert a.conns.hit("192.0.2.9")
        _sync(a)
    _sync(b)
    groups = b.limits._remote_rates[CONNECTIONS]["192.0.2.9"]["a#0"]
    assert len(groups) == limits_mod.RATE_RING and sum(c for _t, c in groups) == 40
    for i in range(200):
        a.logins.record(f"u{i}@example.org", 300)
    assert len(a.limits._logins) == 50


def test_a_login_read_before_this_node_asked_for_any_delay_is_kept() -> None:
    """The rows carry the writer's delay: a node that has not yet asked about LOGIN-DELAY (no
    POP3 login since its start) keeps what it reads until then."""
    clock, _table, (a, b) = _nodes()
    a.logins.record("alice@example.org", 300)
    _sync(a, b)
    clock.now += 10
    assert b.logins.last("alice@example.org", 300) == clock.now - 10
    clock.now += 291
    _sync(b)  # past the writer's delay: forgotten
    assert not b.limits._remote_logins
