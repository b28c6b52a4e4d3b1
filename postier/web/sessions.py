"""Server-side web sessions: random ids, CSRF tokens, idle and absolute expiry, bounded count.

The cookie carries only a random 256-bit id; the server keeps who it belongs to. Ids are stored
under their SHA-256 so that the table never holds a usable cookie value. Sessions live in this
process's memory (a restart logs everyone out, which is the safe direction), and their number is
bounded: per user (the oldest is dropped) and overall (the least recently used is dropped).
Written here rather than with aiohttp-session because that package keeps the session in the cookie
or in Redis/memcached; neither gives "log out everywhere" without another server.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["ABSOLUTE_TTL", "IDLE_TTL", "MAX_PER_USER", "MAX_SESSIONS", "SessionTable", "WebSession"]

IDLE_TTL = 30 * 60.0  # no request for this long: logged out
ABSOLUTE_TTL = 12 * 3600.0  # whatever the activity: log in again after this
MAX_PER_USER = 32
MAX_SESSIONS = 10_000


def _key(sid: str) -> str:
    return hashlib.sha256(sid.encode("ascii", "replace")).hexdigest()


@dataclass(slots=True)
class WebSession:
    address: str
    csrf: str
    created: float
    last: float
    #: (folder, uid) of messages whose remote content the user asked to see (bounded)
    remote_ok: set[tuple[str, int]] = field(default_factory=set)

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


class SessionTable:
    def __init__(self, idle: float = IDLE_TTL, absolute: float = ABSOLUTE_TTL, per_user: int = MAX_PER_USER,
                 total: int = MAX_SESSIONS, clock: Callable[[], float] = time.monotonic):
        self.idle = idle
        self.absolute = absolute
        self.per_user = per_user
        self.total = total
        self.clock = clock
        self._by_key: OrderedDict[str, WebSession] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._by_key)

    def create(self, address: str) -> tuple[str, WebSession]:
        """A new session for `address`: returns the cookie value and the session."""
        now = self.clock()
        mine = [k for k, s in self._by_key.items() if s.address == address]
        for k in mine[: max(0, len(mine) - self.per_user + 1)]:
            del self._by_key[k]
        while len(self._by_key) >= self.total:
            self._by_key.popitem(last=False)
        sid = secrets.token_urlsafe(32)
        s = WebSession(address, secrets.token_urlsafe(32), now, now)
        self._by_key[_key(sid)] = s
        return sid, s

    def get(self, sid: str | None) -> WebSession | None:
        """The live session for a cookie value (touching it), or None."""
        if not sid or len(sid) > 128:
            return None
        k = _key(sid)
        s = self._by_key.get(k)
        if s is None:
            return None
        now = self.clock()
        if now - s.last > self.idle or now - s.created > self.absolute:
            del self._by_key[k]
            return None
        s.last = now
        self._by_key.move_to_end(k)
        return s

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_key.pop(_key(sid), None)

    def drop_user(self, address: str) -> int:
        """Log `address` out everywhere; returns how many sessions ended."""
        keys = [k for k, s in self._by_key.items() if s.address == address]
        for k in keys:
            del self._by_key[k]
        return len(keys)
