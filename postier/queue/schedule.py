"""When to try a queued recipient again, and when to give up (RFC 5321 §4.5.4.1 retry strategy).

RFC 5321 §4.5.4.1 asks for a retry interval of at least 30 minutes and a give-up time of at least
4-5 days; Postfix, whose defaults these follow, retries sooner at first (minimal_backoff_time 300 s)
and doubles the wait up to maximal_backoff_time (4000 s), giving up after maximal_queue_lifetime
(5 days). Pure functions over numbers, plus the injectable clock that the queue reads time from.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Wall-clock seconds since the epoch; the queue never reads time any other way."""

    def time(self) -> float: ...


class SystemClock:
    def time(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told to (tests of retries and expiry without waiting)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.now = start

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def retry_delay(attempts: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the `attempts`-th failed attempt (1-based): initial, doubling, capped.

    RFC 5321 §4.5.4.1: the sender MUST delay retrying a particular destination after one attempt
    has failed.
    """
    if attempts < 1:
        return 0.0
    delay = initial * (2.0 ** min(attempts - 1, 32))
    return max(min(delay, maximum), initial if initial <= maximum else maximum)


def expired(created: float, now: float, lifetime: float) -> bool:
    """RFC 5321 §4.5.4.1: give up (and return the message) once it has been queued `lifetime`."""
    return now - created >= lifetime


def next_attempt(created: float, now: float, attempts: int, initial: float, maximum: float,
                 lifetime: float) -> float:
    """The time of the next attempt, never later than the expiry time (so expiry is noticed)."""
    return min(now + retry_delay(attempts, initial, maximum), created + lifetime)


def warn_due(created: float, now: float, delay_warning: float, warned: bool) -> bool:
    """A delay warning (RFC 3464 Action: delayed) is due once, after `delay_warning` seconds (0 = off)."""
    return delay_warning > 0 and not warned and now - created >= delay_warning
