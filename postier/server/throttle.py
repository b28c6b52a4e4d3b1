"""Failed-login throttling per client IP, shared by SMTP AUTH, IMAP, POP3 and ManageSieve; and the
two other login-time limits kept per user: IMAP sessions per user and POP3's last logins.

Each failure within `failure_window` seconds adds `failure_delay` seconds before the failure reply
(capped at 15 s, so a client cannot make us hold many slow sessions for long); at `max_failures`
the IP is refused outright (421 / BYE / -ERR) until its failures age out. Success clears the
record. The delay is applied to the failing session only: other IPs are never slowed down. The
same reply and the same delay are given whether or not the user exists (no enumeration).

Each class here is one process's memory; with `[server] workers` > 1 server/shared.py subclasses
each over the table the workers share, with the same rules.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable

MAX_DELAY = 15.0
MAX_TRACKED = 100_000  # bounded memory under a distributed attack


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

    def blocked(self, ip: str) -> bool:
        """True when this IP has failed too often recently: refuse before checking anything."""
        return self.max_failures > 0 and len(self._recent(ip)) >= self.max_failures

    def delay(self, ip: str) -> float:
        return min(MAX_DELAY, len(self._recent(ip)) * self.failure_delay)

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
