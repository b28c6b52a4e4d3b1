"""Port 25's per-IP rates, IMAP sessions per user and POP3's last logins (RFC 2449 §6.5) counted
across cluster nodes, over the exchange of the failed-login throttle (server/throttle.py
`ClusterThrottle`, store/cluster/throttle.py): no second loop and no second statement.

Each limit keeps its local count (the process's, or with `[server] workers` the table the workers
share, server/shared.py) and adds what the other nodes reported: a node counts an event here at
once, keeps it as pending, and `ClusterLimits.take()` hands the pending events to the throttle's
next exchange, which writes them under (node, process) and reads back the other nodes' rows; their
ages travel, never their clocks. Nothing on the accept or login path waits for PostgreSQL.

- Rates (`[antispam] max_connections_per_minute`, `max_messages_per_minute`): one group per IP and
  exchange (its newest stamp, its count: a group counts until its newest event leaves the minute,
  stricter by at most one interval); another node's groups of the IP within the minute add to the
  local count.
- IMAP sessions per user: each process writes its own open sessions of a user when they change and
  again every `lease / 3` seconds while they are open; a row not refreshed within `lease` (its node
  died) no longer counts, and a process's first exchange blanks the rows it left before a restart.
- POP3's last logins: each login is written with its age; the newest from any node is the user's
  last login here.

Memory is bounded as the throttle's: MAX_TRACKED keys pending and from other nodes per kind (the
oldest gives way), RATE_RING groups per IP and node (beyond, the two oldest merge: stricter), and
FLUSH_LIMIT keys written per exchange (the rest at the next).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..antispam.builtin import RateLimiter
from .throttle import FLUSH_LIMIT, MAX_TRACKED, LastLogins, UserSessions

if TYPE_CHECKING:  # the rows' shape is the store's (psycopg is the optional cluster extra)
    from ..store.cluster.throttle import LimitRow

__all__ = ["CONNECTIONS", "LOGINS", "MESSAGES", "SESSIONS", "ClusterLimits", "ClusterLogins", "ClusterRateLimiter",
           "ClusterUserSessions", "LimitBatch"]

CONNECTIONS, MESSAGES, SESSIONS, LOGINS = "c", "m", "s", "l"  # the kinds of rows in `cluster_limits`
RATE_WINDOW = 60.0  # port 25's rates are per minute (antispam/builtin.py RateLimiter)
RATE_RING = 32  # groups kept per IP and other node (as server/shared.py's RATE_RING)



@dataclass
class LimitBatch:
    """What one exchange writes, one entry per (kind, key): rate groups (newest stamp, count),
    session counts, last logins; `reset`: blank this process's session rows of before (its first
    exchange); `lease` and `login_window`: how long the rows written stand (rates: RATE_WINDOW)."""

    rates: dict[str, dict[str, tuple[float, int]]] = field(default_factory=dict)
    sessions: dict[str, int] = field(default_factory=dict)
    logins: dict[str, float] = field(default_factory=dict)
    reset: bool = False
    lease: float = 60.0
    login_window: float = 0.0
    rate_window: float = RATE_WINDOW

    def flat(self, now: float) -> tuple[list[str], list[str], list[float], list[int]]:
        """(kinds, keys, ages, counts), parallel: the statement's parameters."""
        kinds: list[str] = []
        keys: list[str] = []
        ages: list[float] = []
        counts: list[int] = []
        for kind, groups in self.rates.items():
            for key, (t, n) in groups.items():
                kinds.append(kind)
                keys.append(key)
                ages.append(max(0.0, now - t))
                counts.append(n)
        for user, n in self.sessions.items():
            kinds.append(SESSIONS)
            keys.append(user)
            ages.append(0.0)
            counts.append(n)
        for user, t in self.logins.items():
            kinds.append(LOGINS)
            keys.append(user)
            ages.append(max(0.0, now - t))
            counts.append(1)
        return kinds, keys, ages, counts

    def __bool__(self) -> bool:
        return bool(self.rates or self.sessions or self.logins or self.reset)


def _bound[V](d: OrderedDict[str, V], limit: int) -> None:
    """The oldest keys give way beyond `limit`."""
    while len(d) > limit:
        d.popitem(last=False)


class ClusterLimits:
    """One process's share of the limits counted across nodes: what it has not written yet, and
    what it read of the other nodes (their stamps on this process's monotonic clock)."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        #: Seconds a node's session count stands without being written again (it rewrites every
        #: third, so two exchanges late still count): after a node dies, its sessions count this long.
        self.lease = max(60.0, 6 * interval)
        self.login_window = 0.0  # the longest LOGIN-DELAY asked (rows of logins are kept this long)
        self._rates: dict[str, OrderedDict[str, tuple[float, int]]] = {CONNECTIONS: OrderedDict(),
                                                                        MESSAGES: OrderedDict()}
        self._remote_rates: dict[str, OrderedDict[str, dict[str, list[tuple[float, int]]]]] = {
            CONNECTIONS: OrderedDict(), MESSAGES: OrderedDict()}
        self._open: Counter[str] = Counter()  # this process's IMAP sessions per user
        self._changed: OrderedDict[str, None] = OrderedDict()  # users whose count is to be written
        self._written: dict[str, float] = {}  # user -> when its nonzero count was last written
        self._remote_sessions: OrderedDict[str, dict[str, tuple[int, float]]] = OrderedDict()  # -> until
        self._logins: OrderedDict[str, float] = OrderedDict()
        self._remote_logins: OrderedDict[str, tuple[float, float]] = OrderedDict()  # -> (when, until)
        self._reset = True  # the first exchange blanks the rows of this process's previous life

    # -- the accept and login paths: memory only ---------------------------------------------------

    def rate(self, kind: str, key: str) -> int:
        """The other nodes' events of `key` within the minute."""
        nodes = self._remote_rates[kind].get(key)
        if not nodes:
            return 0
        cutoff = self.clock() - RATE_WINDOW
        n = 0
        for node, groups in list(nodes.items()):
            live = [g for g in groups if g[0] > cutoff]
            if live:
                nodes[node] = live
                n += sum(c for _t, c in live)
            else:
                del nodes[node]
        if not nodes:
            del self._remote_rates[kind][key]
        return n

    def event(self, kind: str, key: str) -> None:
        pending = self._rates[kind]
        _t, n = pending.pop(key, (0.0, 0))
        pending[key] = (self.clock(), n + 1)
        _bound(pending, MAX_TRACKED)

    def sessions(self, user: str) -> int:
        """The other nodes' open sessions of `user` (rows refreshed within the lease)."""
        nodes = self._remote_sessions.get(user)
        if not nodes:
            return 0
        now = self.clock()
        for node, (_n, until) in list(nodes.items()):
            if until <= now:  # not refreshed within its lease: that node is gone
                del nodes[node]
        if not nodes:
            del self._remote_sessions[user]
        return sum(n for n, _at in nodes.values())

    def opened(self, user: str) -> None:
        self._open[user] += 1
        self._change(user)

    def closed(self, user: str) -> None:
        self._open[user] -= 1
        if self._open[user] <= 0:
            del self._open[user]
        self._change(user)

    def _change(self, user: str) -> None:
        """`user`'s count is to be written (beyond MAX_TRACKED waiting, the oldest gives way: an
        open count is written at its refresh, a closed one stops counting at its lease)."""
        self._changed.pop(user, None)
        self._changed[user] = None
        _bound(self._changed, MAX_TRACKED)

    def last_login(self, user: str, delay: float) -> float | None:
        """Another node's last login of `user`, if within `delay` seconds."""
        self.login_window = max(self.login_window, delay)
        seen = self._remote_logins.get(user)
        return seen[0] if seen is not None and self.clock() - seen[0] < delay else None

    def login(self, user: str, delay: float) -> None:
        self.login_window = max(self.login_window, delay)
        self._logins.pop(user, None)
        self._logins[user] = self.clock()
        _bound(self._logins, MAX_TRACKED)

    # -- the exchange: background -----------------------------------------------------------------

    def take(self) -> LimitBatch:
        """The pending events for one exchange (at most FLUSH_LIMIT keys of each kind)."""
        now = self.clock()
        batch = LimitBatch(reset=self._reset, lease=self.lease, login_window=self.login_window)
        self._reset = False
        for kind, pending in self._rates.items():
            groups: dict[str, tuple[float, int]] = {}
            while pending and len(groups) < FLUSH_LIMIT:
                key, (t, n) = pending.popitem(last=False)
                if t > now - RATE_WINDOW:
                    groups[key] = (t, n)
            if groups:
                batch.rates[kind] = groups
        while self._changed and len(batch.sessions) < FLUSH_LIMIT:
            user, _ = self._changed.popitem(last=False)
            batch.sessions[user] = self._open.get(user, 0)
        for user, n in self._open.items():  # rewrite the open ones before their rows age out
            if len(batch.sessions) >= FLUSH_LIMIT:
                break
            if self._written.get(user, float("-inf")) < now - self.lease / 3 and user not in batch.sessions:
                batch.sessions[user] = n
        for user, n in batch.sessions.items():
            if n:
                self._written[user] = now
            else:
                self._written.pop(user, None)
        while self._logins and len(batch.logins) < FLUSH_LIMIT:
            user, t = self._logins.popitem(last=False)
            if t > now - self.login_window:
                batch.logins[user] = t
        return batch

    def restore(self, batch: LimitBatch) -> None:
        """The exchange failed: what it held waits for the next one."""
        self._reset = self._reset or batch.reset
        for kind, groups in batch.rates.items():
            pending = self._rates[kind]
            for key, (t, n) in groups.items():
                t2, n2 = pending.pop(key, (t, 0))
                pending[key] = (max(t, t2), n + n2)
            _bound(pending, MAX_TRACKED)
        for user in batch.sessions:
            self._changed[user] = None
            self._written.pop(user, None)  # written again when the table answers
        for user, t in batch.logins.items():
            if user not in self._logins:
                self._logins[user] = t
        _bound(self._logins, MAX_TRACKED)

    def merge(self, rows: Sequence[LimitRow]) -> None:
        """Take in the rows of the other nodes an exchange read back."""
        now = self.clock()
        for kind, key, node, proc, ages, counts, left in rows:
            who = f"{node}#{proc}"
            if kind in (CONNECTIONS, MESSAGES):
                remote = self._remote_rates[kind]
                groups = sorted((now - a, c) for a, c in zip(ages, counts, strict=False) if a < RATE_WINDOW)
                while len(groups) > RATE_RING:  # the two oldest merge under the newer stamp (stricter)
                    groups[0:2] = [(groups[1][0], groups[0][1] + groups[1][1])]
                nodes = remote.get(key)
                if groups:
                    if nodes is None:
                        nodes = remote[key] = {}
                    nodes[who] = groups
                    remote.move_to_end(key)
                    _bound(remote, MAX_TRACKED)
                elif nodes is not None:
                    nodes.pop(who, None)
                    if not nodes:
                        del remote[key]
            elif kind == SESSIONS:
                n = counts[0] if counts else 0
                users = self._remote_sessions.get(key)
                if n > 0 and left > 0:
                    if users is None:
                        users = self._remote_sessions[key] = {}
                    users[who] = (n, now + left)
                    self._remote_sessions.move_to_end(key)
                    _bound(self._remote_sessions, MAX_TRACKED)
                elif users is not None:
                    users.pop(who, None)
                    if not users:
                        del self._remote_sessions[key]
            elif kind == LOGINS and ages:
                at = now - min(ages)
                if at > self._remote_logins.get(key, (float("-inf"), 0.0))[0]:
                    self._remote_logins.pop(key, None)
                    self._remote_logins[key] = (at, now + left)  # (the writer's delay: it may not be ours yet)
                    _bound(self._remote_logins, MAX_TRACKED)
        # forget the logins past their delay, oldest first (bounded as well by MAX_TRACKED)
        while self._remote_logins and next(iter(self._remote_logins.values()))[1] < now:
            self._remote_logins.popitem(last=False)


class ClusterRateLimiter(RateLimiter):
    """A port 25 rate (`kind` CONNECTIONS or MESSAGES) over this node's count (`local`: the
    process's `RateLimiter`, or the workers' `SharedRateLimiter`) plus the other nodes' events."""

    def __init__(self, local: RateLimiter, limits: ClusterLimits, kind: str):
        super().__init__(local.limit, local.window, clock=local.clock)
        self.local = local
        self.limits = limits
        self.kind = kind

    def hit(self, key: str) -> bool:
        if self.limit <= 0:
            return True
        remote = self.limits.rate(self.kind, key)
        if remote and self.local.count(key) + remote >= self.limit:
            return False  # a refused event is not counted (as RateLimiter)
        if not self.local.hit(key):
            return False
        self.limits.event(self.kind, key)
        return True

    def count(self, key: str) -> int:
        return self.local.count(key) + self.limits.rate(self.kind, key)


class ClusterUserSessions(UserSessions):
    """`[imap] max_connections_per_user` over this node's sessions (`local`: the process's, or the
    workers' `SharedUserSessions`) plus the other nodes' (each node's own count, refreshed)."""

    def __init__(self, local: UserSessions, limits: ClusterLimits):
        super().__init__()
        self.local = local
        self.limits = limits

    def admit(self, user: str, limit: int) -> bool:
        key = user.lower()
        room = limit - self.limits.sessions(key)
        if room <= 0 or not self.local.admit(key, room):
            return False
        self.limits.opened(key)
        return True

    def release(self, user: str) -> None:
        key = user.lower()
        self.local.release(key)
        self.limits.closed(key)

    def total(self) -> int:
        return self.local.total()


class ClusterLogins(LastLogins):
    """POP3's last logins (RFC 2449 §6.5 LOGIN-DELAY) of this node (`local`: the process's, or the
    workers' `SharedLogins`) and of the other nodes: the newest counts."""

    def __init__(self, local: LastLogins, limits: ClusterLimits):
        super().__init__(local.clock)
        self.local = local
        self.limits = limits

    def last(self, user: str, delay: float) -> float | None:
        key = user.lower()
        seen = [t for t in (self.local.last(key, delay), self.limits.last_login(key, delay)) if t is not None]
        return max(seen) if seen else None

    def record(self, user: str, delay: float) -> None:
        key = user.lower()
        self.local.record(key, delay)
        self.limits.login(key, delay)
