"""Failed-login throttling per client IP, shared by SMTP AUTH, IMAP, POP3 and ManageSieve; and the
two other login-time limits kept per user: IMAP sessions per user and POP3's last logins.

Each failure within `failure_window` seconds adds `failure_delay` seconds before the failure reply
(capped at 15 s, so a client cannot make us hold many slow sessions for long); at `max_failures`
the IP is refused outright (421 / BYE / -ERR) until its failures age out. Success clears the
record. The delay is applied to the failing session only: other IPs are never slowed down. The
same reply and the same delay are given whether or not the user exists (no enumeration).

Each class here is one process's memory; with `[server] workers` > 1 server/shared.py subclasses
each over the table the workers share, with the same rules. In cluster mode `ClusterThrottle` adds
the other nodes' failures to this node's, exchanged in the background (see its docstring); the
same exchange carries the other limits counted across nodes (server/limits.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..store.errors import StoreUnavailable

if TYPE_CHECKING:
    from ..store.cluster.throttle import LimitRow
    from .limits import ClusterLimits, LimitBatch

log = logging.getLogger("postier.server")

MAX_DELAY = 15.0
MAX_TRACKED = 100_000  # bounded memory under a distributed attack
RING_MAX = 64  # failure stamps kept per IP and node in the cluster's table (as server/shared.py's MAX_RING)
FLUSH_LIMIT = 5000  # IPs written (and IPs cleared) per exchange; the rest wait for the next one


class AuthThrottle:
    def __init__(self, failure_delay: float = 1.0, max_failures: int = 10, window: float = 600.0,
                 clock: Callable[[], float] = time.monotonic):
        self.failure_delay = failure_delay
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: OrderedDict[str, list[float]] = OrderedDict()

    def _recent(self, ip: str) -> list[float]:
        stamps = self._failures.get(ip)
        if not stamps:
            return []
        cutoff = self.clock() - self.window
        while stamps and stamps[0] < cutoff:
            stamps.pop(0)
        if not stamps:
            del self._failures[ip]
        return stamps

    def count(self, ip: str) -> int:
        """This IP's failures within the window."""
        return len(self._recent(ip))

    def blocked(self, ip: str) -> bool:
        """True when this IP has failed too often recently: refuse before checking anything."""
        return self.max_failures > 0 and self.count(ip) >= self.max_failures

    def delay(self, ip: str) -> float:
        return min(MAX_DELAY, self.count(ip) * self.failure_delay)

    def failure(self, ip: str) -> None:
        stamps = self._failures.setdefault(ip, [])
        stamps.append(self.clock())
        del stamps[: -max(self.max_failures, 1)]
        self._failures.move_to_end(ip)
        while len(self._failures) > MAX_TRACKED:
            self._failures.popitem(last=False)

    def success(self, ip: str) -> None:
        self._failures.pop(ip, None)

    async def penalize(self, ip: str) -> None:
        """Record a failure and sleep the growing delay (call before sending the failure reply)."""
        self.failure(ip)
        d = self.delay(ip)
        if d > 0:
            await asyncio.sleep(d)


class ThrottleExchange(Protocol):
    """Where the nodes meet (store/cluster/throttle.py `PGThrottleExchange`): one call writes this
    node's new failures (`ips` and `ages` parallel, one entry per failure, ages in seconds) and the
    IPs that logged in here, and returns the rows changed since the last call: (ip, node, the ages
    of that node's failures of that IP within the window; none once cleared). With `limits` (the
    other limits' batch, server/limits.py) the same call writes it and also returns the other
    nodes' changed rows of those limits (none without `limits`)."""

    async def exchange(self, ips: Sequence[str], ages: Sequence[float], clears: Sequence[str],
                       limits: LimitBatch | None = None
                       ) -> tuple[list[tuple[str, str, list[float]]], list[LimitRow]]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class Batch:
    """What one exchange writes: failures (monotonic stamps) per IP, and successes (when) per IP."""

    failures: dict[str, list[float]]
    clears: dict[str, float]

    def flat(self, now: float) -> tuple[list[str], list[float]]:
        """(ips, ages): one entry per failure."""
        ips, ages = [], []
        for ip, stamps in self.failures.items():
            for t in stamps:
                ips.append(ip)
                ages.append(max(0.0, now - t))
        return ips, ages


def node_id(data_dir: Path) -> str:
    """This node's name in the cluster's throttle table: the host and a digest of its data
    directory (the workers of one server share it; two nodes on one host do not)."""
    digest = hashlib.blake2b(str(data_dir.resolve()).encode(), digest_size=6).hexdigest()
    return f"{socket.gethostname()[:64]}/{digest}"


class ClusterThrottle(AuthThrottle):
    """The failed-login throttle of a cluster node: this node's count (`local`: the process's
    `AuthThrottle`, or the workers' `SharedThrottle`) plus the other nodes' recent failures of the
    same IP, with the same rules (delay per failure, refusal at `max_failures` within the window).

    A failure is counted locally at once, so this node's answer never waits; it is also kept as
    pending, and `run()` hands the pending failures and successes to the exchange every `interval`
    seconds, off the login path: one statement writes them and reads back the rows the other nodes
    changed. A node's statements per second are thus bounded by 1/interval, whatever the failure
    rate; another node's failures count here within about two intervals. A success clears the IP
    here at once and, at the next exchange, on every node (their rows are blanked; a blank row of
    this node read back clears the IP here too). When the exchange fails (PostgreSQL out of reach)
    the throttle goes on counting locally, keeps the pending failures (bounded) for later, logs one
    warning per outage, and the other nodes' counts it holds age out as usual.

    Memory is bounded: MAX_TRACKED IPs pending, cleared and from other nodes, RING_MAX stamps per
    IP and node (the oldest IP gives way); an exchange writes at most FLUSH_LIMIT IPs and reads a
    bounded page (the rest follow at the next ones)."""

    def __init__(self, local: AuthThrottle, node: str, exchange: ThrottleExchange | None = None,
                 interval: float = 1.0, limits: ClusterLimits | None = None):
        super().__init__(local.failure_delay, local.max_failures, local.window, local.clock)
        self.local = local
        self.node = node
        self.exchange = exchange
        self.interval = interval
        self.limits = limits  # the other limits shared by the same exchange (server/limits.py)
        self.ring = self.ring_for(local.max_failures)
        self._pending: OrderedDict[str, list[float]] = OrderedDict()
        self._clears: OrderedDict[str, float] = OrderedDict()  # IP -> when it logged in
        self._remote: OrderedDict[str, dict[str, list[float]]] = OrderedDict()  # IP -> node -> stamps
        self.shared = True  # False while the exchanges fail

    @staticmethod
    def ring_for(max_failures: int) -> int:
        """Failure stamps kept per IP and node."""
        return max(1, min(max_failures, RING_MAX))

    # -- the login path: memory only ------------------------------------------------------------

    def _remote_count(self, ip: str) -> int:
        nodes = self._remote.get(ip)
        if not nodes:
            return 0
        cutoff = self.clock() - self.window
        n = 0
        for node, stamps in list(nodes.items()):
            if stamps[0] < cutoff:  # stamps are in order
                stamps = nodes[node] = [t for t in stamps if t >= cutoff]
                if not stamps:
                    del nodes[node]
            n += len(stamps)
        if not nodes:
            del self._remote[ip]
        return n

    def count(self, ip: str) -> int:
        return self.local.count(ip) + self._remote_count(ip)

    def failure(self, ip: str) -> None:
        self.local.failure(ip)
        stamps = self._pending.setdefault(ip, [])
        stamps.append(self.clock())
        del stamps[:-self.ring]
        self._pending.move_to_end(ip)
        while len(self._pending) > MAX_TRACKED:
            self._pending.popitem(last=False)

    def success(self, ip: str) -> None:
        self.local.success(ip)
        self._pending.pop(ip, None)
        self._remote.pop(ip, None)
        self._clears[ip] = self.clock()
        self._clears.move_to_end(ip)
        while len(self._clears) > MAX_TRACKED:
            self._clears.popitem(last=False)

    # -- the exchange: background ---------------------------------------------------------------

    def take(self) -> Batch:
        """The pending failures (within the window) and successes, for one exchange."""
        cutoff = self.clock() - self.window
        failures: dict[str, list[float]] = {}
        while self._pending and len(failures) < FLUSH_LIMIT:
            ip, stamps = self._pending.popitem(last=False)
            stamps = [t for t in stamps if t >= cutoff]
            # A success on this node since cleared them (in another worker: the node's count is the
            # table its workers share); without this they would reach the other nodes after it.
            known = self.local.count(ip)
            stamps = stamps[-known:] if known else []
            if stamps:
                failures[ip] = stamps
        clears: dict[str, float] = {}
        while self._clears and len(clears) < FLUSH_LIMIT:
            ip, at = self._clears.popitem(last=False)
            clears[ip] = at
        return Batch(failures, clears)

    def restore(self, batch: Batch) -> None:
        """The exchange failed: its failures and successes wait for the next one (a failure taken
        before a success that came since is dropped, as the success cleared it)."""
        for ip, at in batch.clears.items():
            self._clears.setdefault(ip, at)
        for ip, stamps in batch.failures.items():
            if ip in self._clears and self._clears[ip] >= stamps[-1]:
                continue
            newer = self._pending.pop(ip, [])
            self._pending[ip] = (stamps + newer)[-self.ring:]
        while len(self._pending) > MAX_TRACKED:
            self._pending.popitem(last=False)
        while len(self._clears) > MAX_TRACKED:
            self._clears.popitem(last=False)

    def merge(self, batch: Batch, rows: Sequence[tuple[str, str, list[float]]]) -> None:
        """Take in the rows an exchange read back (written before that exchange's own writes)."""
        now = self.clock()
        for ip, node, ages in rows:
            if node == self.node:
                # This node's row blanked: another node (or worker) saw the IP log in. Failures here
                # since (pending, or written by this very exchange) are newer than that success.
                if not ages and ip not in batch.failures and ip not in self._pending:
                    self.local.success(ip)
                continue
            stamps = sorted(now - a for a in ages)[-self.ring:]
            since = self._clears.get(ip, batch.clears.get(ip))
            if since is not None:  # a success here not yet written, or written after this read
                stamps = [t for t in stamps if t > since]
            nodes = self._remote.get(ip)
            if stamps:
                if nodes is None:
                    nodes = self._remote[ip] = {}
                nodes[node] = stamps
                self._remote.move_to_end(ip)
            elif nodes is not None:
                nodes.pop(node, None)
                if not nodes:
                    del self._remote[ip]
        while len(self._remote) > MAX_TRACKED:
            self._remote.popitem(last=False)

    async def sync(self) -> bool:
        """One exchange (False: it failed, and what it held waits for the next one)."""
        assert self.exchange is not None
        batch = self.take()
        limits = self.limits.take() if self.limits is not None else None
        ips, ages = batch.flat(self.clock())
        try:
            rows, limit_rows = await self.exchange.exchange(ips, ages, list(batch.clears), limits)
        except StoreUnavailable as exc:
            self.restore(batch)
            if self.limits is not None and limits is not None:
                self.limits.restore(limits)
            if self.shared:
                log.warning("cluster: failed logins and the shared limits are counted on this node only until "
                            "PostgreSQL answers (%s: %s)", exc, exc.__cause__)
                self.shared = False
            return False
        if not self.shared:
            log.warning("cluster: failed logins and the shared limits are shared with the other nodes again")
            self.shared = True
        self.merge(batch, rows)
        if self.limits is not None:
            self.limits.merge(limit_rows)
        return True

    async def run(self) -> None:
        """Exchange every `interval` seconds until cancelled."""
        try:
            while True:
                await asyncio.sleep(self.interval)
                await self.sync()
        finally:
            if self.exchange is not None:
                await self.exchange.close()


class UserSessions:
    """Open sessions per user, for `[imap] max_connections_per_user`."""

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()

    def admit(self, user: str, limit: int) -> bool:
        """Count a session of `user` unless it already has `limit`."""
        if self._open[user.lower()] >= limit:
            return False
        self._open[user.lower()] += 1
        return True

    def release(self, user: str) -> None:
        key = user.lower()
        self._open[key] -= 1
        if self._open[key] <= 0:
            del self._open[key]

    def total(self) -> int:
        return sum(self._open.values())


class LastLogins:
    """When each user last logged in (monotonic seconds), for POP3's LOGIN-DELAY (RFC 2449 §6.5);
    logins older than the delay are forgotten, so memory is bounded by the logins of one delay."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._at: dict[str, float] = {}

    def last(self, user: str, delay: float) -> float | None:
        """When `user` last logged in, if within `delay` seconds."""
        at = self._at.get(user.lower())
        return at if at is not None and self.clock() - at < delay else None

    def record(self, user: str, delay: float) -> None:
        now = self.clock()
        for name, at in list(self._at.items()):  # bounded: forget logins older than the delay
            if now - at >= delay:
                del self._at[name]
        self._at[user.lower()] = now
