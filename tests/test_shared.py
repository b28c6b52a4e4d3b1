"""The state worker processes share (server/shared.py), without processes: two workers' views of one
memory-mapped table agree on connection counts and on the login throttle, whose rules are those
of the in-process `AuthThrottle` (same fake clock, same answers)."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from postier.antispam.builtin import RateLimiter
from postier.server.shared import (
    RATE_RING,
    Bus,
    SharedConnections,
    SharedLogins,
    SharedRateLimiter,
    SharedTable,
    SharedThrottle,
    SharedUserSessions,
)
from postier.server.throttle import AuthThrottle, LastLogins, UserSessions


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_connection_counts_are_summed_over_workers(tmp_path: Path) -> None:
    table = SharedTable.create(tmp_path / "run" / "workers.shm", 2, 10)
    w0, w1 = SharedConnections(table, 0), SharedConnections(table, 1)
    assert w0.admit("10.0.0.1", 3, 2) and w1.admit("10.0.0.1", 3, 2)
    assert not w0.admit("10.0.0.1", 3, 2) and not w1.admit("10.0.0.1", 3, 2)  # per IP, both workers
    assert w1.admit("10.0.0.2", 3, 2)
    assert not w0.admit("10.0.0.3", 3, 2)  # global: 3 open in all
    assert (w0.total(), w0.per_ip("10.0.0.1")) == (3, 2)
    table.clear_worker(1)  # worker 1 died: its connections are gone
    assert (w0.total(), w0.per_ip("10.0.0.1"), w0.per_ip("10.0.0.2")) == (1, 1, 0)
    w0.release("10.0.0.1")
    w0.release("10.0.0.1")  # never below zero
    assert w0.total() == 0 and w0.admit("10.0.0.1", 3, 2)
    table.close()


def test_throttle_shared_by_two_workers_follows_the_same_rules(tmp_path: Path) -> None:
    clock = Clock()
    table = SharedTable.create(tmp_path / "workers.shm", 2, 3)
    a = SharedThrottle(table, 1.0, 3, 600.0, clock)
    b = SharedThrottle(table, 1.0, 3, 600.0, clock)
    ref = AuthThrottle(1.0, 3, 600.0, clock)
    ip = "192.0.2.7"
    for t, step in ((a, 0.0), (b, 10.0), (a, 10.0)):
        clock.now += step
        assert t.blocked(ip) == ref.blocked(ip) and t.delay(ip) == ref.delay(ip)
        t.failure(ip)
        ref.failure(ip)
    assert a.blocked(ip) and b.blocked(ip) and ref.blocked(ip)
    assert not a.blocked("192.0.2.8")  # other IPs untouched
    clock.now += 585.0  # the first failure ages out (600 s window)
    assert not b.blocked(ip) and b.delay(ip) == ref.delay(ip) == 2.0
    b.failure(ip)
    ref.failure(ip)
    assert a.blocked(ip)
    a.success(ip)  # a login succeeds in one worker: cleared in both
    assert not b.blocked(ip) and b.delay(ip) == 0.0
    table.close()


def test_table_is_fresh_and_private(tmp_path: Path) -> None:
    p = tmp_path / "workers.shm"
    p.write_bytes(b"old")
    table = SharedTable.create(p, 3, 10)
    assert os.stat(p).st_mode & 0o777 == 0o600
    assert SharedConnections(table, 2).total() == 0
    table.close()


@pytest.mark.parametrize("deep", [False, True])
def test_bus_carries_wakeups_to_the_other_workers(tmp_path: Path, deep: bool) -> None:
    run = tmp_path / ("d" * 110 if deep else "run")  # too deep for a socket path: abstract names
    run.mkdir()

    async def main() -> list[tuple[int, bytes]]:
        buses = [Bus(run, i, 3) for i in range(3)]
        got: list[tuple[int, bytes]] = []
        for i, b in enumerate(buses):
            b.on(b"N", lambda data, i=i: got.append((i, data)))
            b.start()
        buses[0].send(b"N", b"user\0INBOX")  # to every other worker
        buses[2].send(b"N", b"only-0", to=0)
        buses[1].send(b"?", b"unknown kind: ignored")
        for _ in range(100):
            if len(got) >= 3:
                break
            await asyncio.sleep(0.01)
        for b in buses:
            b.close()
        return sorted(got)

    assert asyncio.run(main()) == [(0, b"only-0"), (1, b"user\0INBOX"), (2, b"user\0INBOX")]
    assert not list(run.glob("*.sock"))  # removed at close


def test_bus_gathers_the_wakeups_of_one_step(tmp_path: Path) -> None:
    """Deliveries answered together wake the other workers with one datagram, each wake-up once;
    more than a datagram holds goes in several; from a thread, at once."""
    run = tmp_path / "run"
    run.mkdir()

    async def main() -> tuple[list[bytes], int]:
        a, b = Bus(run, 0, 2), Bus(run, 1, 2)
        got: list[bytes] = []
        b.on(b"N", got.append)
        b.start()
        datagrams = 0
        recv = b.sock.recv

        def counting(n: int) -> bytes:
            nonlocal datagrams
            data = recv(n)
            datagrams += 1
            return data

        b.sock = _Counting(b.sock, counting)  # type: ignore[assignment]
        await asyncio.to_thread(a.send, b"N", b"from a thread")
        for _ in range(3):
            a.send(b"N", b"u@x.test\0INBOX")  # three deliveries to one folder: one wake-up
        a.send(b"N", b"v@x.test\0INBOX")
        for i in range(40):  # 40 x ~60 bytes: more than one datagram
            a.send(b"N", f"user{i}@x.test\0{'F' * 40}".encode())
        for _ in range(100):
            if len(got) >= 43:
                break
            await asyncio.sleep(0.01)
        a.close()
        b.close()
        return got, datagrams

    got, datagrams = asyncio.run(main())
    assert got[0] == b"from a thread"  # sent at once, before the step's gathered ones
    assert got[1:3] == [b"u@x.test\0INBOX", b"v@x.test\0INBOX"]
    assert got[3:] == [f"user{i}@x.test\0{'F' * 40}".encode() for i in range(40)]
    assert 2 <= datagrams - 1 <= 3  # 42 wake-ups of the step in two datagrams (2048 bytes each)


class _Counting:
    """A socket whose recv is counted (the Bus reads with recv only)."""

    def __init__(self, sock: socket.socket, recv: Callable[[int], bytes]) -> None:
        self._sock, self.recv = sock, recv

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


def test_imap_sessions_per_user_are_counted_over_workers(tmp_path: Path) -> None:
    table = SharedTable.create(tmp_path / "workers.shm", 2, 10)
    a, b = SharedUserSessions(table, 0), SharedUserSessions(table, 1)
    ref = UserSessions()
    for s in (a, b, a):
        assert s.admit("u@x.test", 3) and ref.admit("u@x.test", 3)
    assert not b.admit("U@x.test", 3) and not ref.admit("U@x.test", 3)  # addresses compare without case
    assert a.admit("v@x.test", 3) and (a.total(), b.total(), ref.total()) == (4, 4, 3)
    b.release("u@x.test")
    ref.release("u@x.test")
    assert a.admit("u@x.test", 3) and ref.admit("u@x.test", 3)
    assert SharedConnections(table, 0).total() == 0  # a kind of its own: not the IP connection counts
    table.clear_worker(0)  # worker 0 died: its sessions are gone
    assert b.total() == 0 and a.admit("u@x.test", 1)
    table.close()


def test_last_logins_shared_follow_the_same_rules(tmp_path: Path) -> None:
    clock = Clock()
    table = SharedTable.create(tmp_path / "workers.shm", 2, 10)
    a, b, ref = SharedLogins(table, clock), SharedLogins(table, clock), LastLogins(clock)
    assert a.last("p@x.test", 30) is None is ref.last("p@x.test", 30)
    a.record("p@x.test", 30)
    ref.record("p@x.test", 30)
    clock.now += 10
    assert b.last("P@x.test", 30) == ref.last("p@x.test", 30) == 1000.0  # the other worker sees it
    assert b.last("q@x.test", 30) is None
    clock.now += 20  # the delay is over
    assert b.last("p@x.test", 30) is None is ref.last("p@x.test", 30)
    table.close()


@pytest.mark.parametrize("limit", [3, 40])
def test_rate_limiter_shared_by_two_workers_follows_the_same_rules(tmp_path: Path, limit: int) -> None:
    clock = Clock()
    table = SharedTable.create(tmp_path / "workers.shm", 2, 10, (True, True))
    a, b = SharedRateLimiter(table, 0, limit, clock=clock), SharedRateLimiter(table, 0, limit, clock=clock)
    ref = RateLimiter(limit, clock=clock)
    other = SharedRateLimiter(table, 1, limit, clock=clock)  # the message rate: its own region
    ip = "198.51.100.4"
    answers, expected = [], []
    for i in range(3 * limit):
        clock.now += 0.5 if i % 4 else 7.0
        answers.append((a if i % 2 else b).hit(ip))
        expected.append(ref.hit(ip))
    if limit <= RATE_RING:
        assert answers == expected and a.count(ip) == ref.count(ip)
    else:  # more events than groups kept: merged groups leave later, never earlier
        assert all(e or not g for g, e in zip(answers, expected, strict=True)) and sum(answers) >= limit
    assert other.count(ip) == 0 and other.hit(ip)
    clock.now += 61
    assert a.count(ip) == 0 and b.hit(ip)
    table.close()
