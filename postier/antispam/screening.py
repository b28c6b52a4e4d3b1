"""Connection screening with DNS blocklists and allowlists (RFC 5782), in the manner of Postfix's postscreen.

At connect, the client address is looked up in every configured list at once, under one deadline.
Each blocklist that lists it adds its weight to a score; a pregreet talker adds
`pregreet_weight`; a client whose score reaches the threshold is refused (554 5.7.1 naming the
lists). An allowlisted client (any DNSWL hit) skips screening.

Rules that keep a DNS answer from blocking mail it should not:
- only answers inside 127.0.0.0/8 count (RFC 5782 §2.3): a poisoned or wildcarded zone answering
  with a routable address lists nobody;
- a list's return codes can be restricted (`codes`); Spamhaus' 127.255.255.x answers mean "query
  refused" (public resolver, over quota), never a listing, and are ignored and logged;
- a temporary DNS failure or a list that misses the deadline never blocks (it is reported);
- results are cached per client address for the answer's TTL (bounded LRU), so a client that
  reconnects costs no lookups.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..config import DNSListConfig
from ..resolver import AsyncLookup, DNSStatus

log = logging.getLogger("postier.antispam")

#: RFC 5782 §2.3: list entries are 127.0.0.0/8; Spamhaus' error codes sit in 127.255.255.0/24.
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")
_REFUSED = ipaddress.ip_network("127.255.255.0/24")
DEFAULT_CACHE_TTL = 300.0
MIN_CACHE_TTL = 30.0
MAX_CACHE_TTL = 3600.0


@dataclass(frozen=True)
class DNSList:
    """One list: its zone, the weight of a hit and, optionally, the answers that count."""

    zone: str
    weight: float = 1.0
    #: Return codes that count as a listing ("127.0.0.2"); empty: any 127.0.0.0/8 answer but the
    #: 127.255.255.x error codes.
    codes: tuple[str, ...] = ()

    def query_name(self, ip: str) -> str:
        return query_name(ip, self.zone)


@dataclass(frozen=True)
class Hit:
    zone: str
    answer: str
    weight: float


@dataclass(frozen=True)
class ScreenResult:
    score: float = 0.0
    threshold: float = 0.0
    listed: tuple[Hit, ...] = ()
    allowlisted: tuple[Hit, ...] = ()
    #: Lists that could not answer (temporary failure, deadline): never a reason to block.
    unavailable: tuple[str, ...] = ()
    ignored: tuple[Hit, ...] = ()  # 127.255.255.x and answers outside 127.0.0.0/8
    pregreet: bool = False

    def with_pregreet(self, weight: float) -> ScreenResult:
        """The result for a client that talked before the greeting (postscreen's pregreet test)."""
        if self.allowlisted or self.pregreet:
            return self
        return dataclasses.replace(self, score=self.score + weight, pregreet=True)

    @property
    def blocked(self) -> bool:
        return not self.allowlisted and self.threshold > 0 and self.score >= self.threshold

    def explain(self) -> str:
        """One line in plain words, for the log, `postier why` and the 554 reply."""
        if self.allowlisted:
            return "allowed: listed on " + ", ".join(f"{h.zone} ({h.answer})" for h in self.allowlisted)
        parts = [f"listed on {h.zone} ({h.answer})" for h in self.listed]
        if self.pregreet:
            parts.append("spoke before the greeting")
        words = "; ".join(parts) or "not listed"
        verb = "refused" if self.blocked else "accepted"
        tail = f", score {self.score:g} {'>=' if self.blocked else '<'} {self.threshold:g}" if parts else ""
        extra = f" (no answer from {', '.join(self.unavailable)})" if self.unavailable else ""
        return f"{verb}: {words}{tail}{extra}"


def query_name(ip: str, zone: str) -> str:
    """RFC 5782 §2.1 (IPv4: reversed octets) and §2.4 (IPv6: reversed nibbles), under zone."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        return ".".join(reversed(str(addr).split("."))) + "." + zone
    return ".".join(reversed(addr.exploded.replace(":", ""))) + "." + zone


@dataclass
class Screener:
    """DNSBL/DNSWL scoring for one client address; `screen()` never raises for a DNS condition."""

    resolver: AsyncLookup
    dnsbl: Sequence[DNSList] = ()
    dnswl: Sequence[DNSList] = ()
    threshold: float = 3.0
    pregreet_weight: float = 0.0
    timeout: float = 2.0
    cache_size: int = 10_000
    clock: Callable[[], float] = time.monotonic
    _cache: OrderedDict[str, tuple[float, ScreenResult]] = field(default_factory=OrderedDict)

    @property
    def enabled(self) -> bool:
        return bool(self.dnsbl or self.dnswl)

    async def screen(self, ip: str, pregreet: bool = False) -> ScreenResult:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return ScreenResult(threshold=self.threshold)
        key = str(addr)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            self._cache.move_to_end(key)
            res = cached[1]
        else:
            res, ttl = await self._lookup(key)
            self._cache[key] = (now + ttl, res)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return res.with_pregreet(self.pregreet_weight) if pregreet else res

    async def _lookup(self, ip: str) -> tuple[ScreenResult, float]:
        lists = [(lst, False) for lst in self.dnsbl] + [(lst, True) for lst in self.dnswl]
        tasks = [asyncio.ensure_future(self.resolver.query(lst.query_name(ip), "A")) for lst, _ in lists]
        done, pending = await asyncio.wait(tasks, timeout=self.timeout) if tasks else (set(), set())
        for t in pending:
            t.cancel()
        listed: list[Hit] = []
        allowed: list[Hit] = []
        ignored: list[Hit] = []
        unavailable: list[str] = []
        ttl = MAX_CACHE_TTL
        for (lst, allow), task in zip(lists, tasks, strict=True):
            if task not in done or task.exception() is not None:
                unavailable.append(lst.zone)
                ttl = MIN_CACHE_TTL
                continue
            ans = task.result()
            if ans.status is DNSStatus.TEMPFAIL:
                unavailable.append(lst.zone)
                ttl = MIN_CACHE_TTL
                continue
            ans_ttl = ans.ttl or DEFAULT_CACHE_TTL
            ttl = min(ttl, max(MIN_CACHE_TTL, ans_ttl))
            if ans.status is not DNSStatus.OK:
                continue
            for value in ans.records:
                hit = Hit(lst.zone, str(value), lst.weight)
                if not _counts(str(value), lst):
                    ignored.append(hit)
                    log.warning("dnsbl %s answered %s for %s: not a listing (ignored)", lst.zone, value, ip)
                    continue
                (allowed if allow else listed).append(hit)
                break  # one hit per list
        score = sum(h.weight for h in listed)
        res = ScreenResult(score, self.threshold, tuple(listed), tuple(allowed), tuple(unavailable),
                           tuple(ignored))
        return res, ttl


def _counts(answer: str, lst: DNSList) -> bool:
    try:
        a = ipaddress.ip_address(answer)
    except ValueError:
        return False
    if a not in _LOOPBACK or a in _REFUSED:  # RFC 5782 §2.3; Spamhaus error codes
        return False
    return not lst.codes or answer in lst.codes


def dns_lists(configured: Sequence[DNSListConfig]) -> tuple[DNSList, ...]:
    """[antispam] dnsbl / dnswl entries as lists to query."""
    return tuple(DNSList(c.zone.lower().rstrip("."), c.weight, c.codes) for c in configured)
