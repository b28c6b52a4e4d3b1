"""Checks that need no Rspamd: the GTUBE test string, HELO/EHLO sanity, per-client rate limits.

So that a small server without Rspamd is still defended:
- GTUBE (the "Generic Test for Unsolicited Bulk Email" string every filter recognises) in a message
  refuses it with 550 5.7.1, so an admin can check the chain end to end;
- a HELO/EHLO name that is not a fully qualified domain name or an address literal (RFC 5321
  §4.1.1.1, §2.3.5), claims to be us (our hostname, or one of our addresses), or does not resolve,
  is a classic bot sign: `helo_problem()` names the problem and the policy decides (refuse or score);
- `RateLimiter`: connections and messages per client address per minute on port 25 (the gap
  docs/security.md listed), a sliding one-minute window over a bounded table, like Postfix's anvil.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

#: The GTUBE string; matched anywhere in the message as bytes.
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def contains_gtube(chunks: Iterable[bytes]) -> bool:
    """True when the GTUBE string occurs in the concatenation of chunks (found across chunk edges too)."""
    tail = b""
    keep = len(GTUBE) - 1
    for chunk in chunks:
        data = tail + chunk
        if GTUBE in data:
            return True
        tail = data[-keep:]
    return False


def helo_problem(helo: str, our_names: Iterable[str], our_addresses: Iterable[str]) -> str | None:
    """Why a HELO/EHLO name is suspicious, or None. DNS resolution is checked by the caller."""
    name = helo.strip()
    if not name:
        return "empty HELO"
    if name.startswith("[") and name.endswith("]"):
        lit = name[1:-1]
        if lit.lower().startswith("ipv6:"):
            lit = lit[5:]
        try:
            addr = ipaddress.ip_address(lit)
        except ValueError:
            return f"HELO {name}: malformed address literal"
        if str(addr) in {str(ipaddress.ip_address(a)) for a in our_addresses if _is_ip(a)}:
            return f"HELO {name}: our own address"
        return None
    if _is_ip(name):
        return f"HELO {name}: a bare IP address (RFC 5321 §4.1.3 requires brackets)"
    low = name.lower().rstrip(".")
    if "." not in low:
        return f"HELO {name}: not a fully qualified domain name"
    if low in {n.lower().rstrip(".") for n in our_names}:
        return f"HELO {name}: our own name"
    return None


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


class RateLimiter:
    """Events per key in a sliding window; `hit(key)` records one and says whether it is within the limit."""

    def __init__(self, limit: int, window: float = 60.0, max_keys: int = 100_000,
                 clock: Callable[[], float] = time.monotonic):
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, key: str) -> bool:
        if self.limit <= 0:
            return True
        now = self.clock()
        q = self._events.get(key)
        if q is None:
            q = self._events[key] = deque()
            while len(self._events) > self.max_keys:
                self._events.popitem(last=False)
        else:
            self._events.move_to_end(key)
        while q and q[0] <= now - self.window:
            q.popleft()
        if len(q) >= self.limit:
            return False
        q.append(now)
        return True

    def count(self, key: str) -> int:
        q = self._events.get(key)
        if not q:
            return 0
        now = self.clock()
        return sum(1 for t in q if t > now - self.window)
