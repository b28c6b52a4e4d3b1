"""Failed-login throttling per client IP, shared by SMTP AUTH, IMAP, POP3 and ManageSieve.

Each failure within `failure_window` seconds adds `failure_delay` seconds before the failure reply
(capped at 15 s, so a client cannot make us hold many slow sessions for long); at `max_failures`
the IP is refused outright (421 / BYE / -ERR) until its failures age out. Success clears the
record. The delay is applied to the failing session only: other IPs are never slowed down. The
same reply and the same delay are given whether or not the user exists (no enumeration).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
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
