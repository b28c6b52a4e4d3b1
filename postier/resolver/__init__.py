"""One DNS interface (A, AAAA, MX, TXT, PTR) with typed outcomes over dnspython; MX routing per RFC 5321 §5.1.

Every lookup returns an `Answer` whose `status` is one of `DNSStatus`: the caller decides what
NXDOMAIN, "no data" or a temporary failure mean for it, nothing here raises for a DNS condition.
SERVFAIL, REFUSED, timeouts and network errors all become TEMPFAIL (DESIGN.md: DNS trouble is a
temporary failure, never a bounce).

Two front ends share the record conversion and the routing logic:
- `Resolver`: the real thing, over `dns.asyncresolver` (and a synchronous twin over `dns.resolver`
  with the same nameservers, for pyspf and dkimpy, which are synchronous and run in a worker thread);
- `postier.resolver.fake.FakeResolver`: a dict-backed stand-in for unit tests.
Both implement `query(name, rtype)` (async) and `query_sync(name, rtype)`; everything else
(`mx`, `a`, `txt`, `mx_hosts`, ...) is written once in `BaseResolver` on top of them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import dns.asyncresolver
import dns.exception
import dns.flags
import dns.name
import dns.nameserver
import dns.rdata
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rdtypes.IN.SRV
import dns.rdtypes.mxbase
import dns.rdtypes.nsbase
import dns.rdtypes.tlsabase
import dns.rdtypes.txtbase
import dns.resolver
import dns.reversename

from ..metrics import Metrics

__all__ = [
    "DNSStatus", "Answer", "MXRecord", "SRVRecord", "TLSARecord", "MXHost", "RouteStatus", "MXRoute", "SyncLookup",
    "AsyncLookup", "BaseResolver", "Resolver", "parse_nameserver", "reverse_name", "SUPPORTED_TYPES", "RecordValue",
    "AnswerCache", "make_resolver",
]

# Types this layer converts to plain Python values; others are refused with ValueError.
SUPPORTED_TYPES = frozenset({"A", "AAAA", "MX", "TXT", "PTR", "CNAME", "TLSA", "SRV"})
MAX_NAME_LENGTH = 253  # RFC 1035 §2.3.4 (255 octets on the wire, 253 in text form)


class DNSStatus(StrEnum):
    OK = "ok"                # at least one record of the asked type
    NXDOMAIN = "nxdomain"    # the name does not exist (RFC 1035 RCODE 3), or cannot be a DNS name
    NODATA = "nodata"        # the name exists, no record of that type (RFC 2308 §2.2)
    TEMPFAIL = "tempfail"    # SERVFAIL, REFUSED, timeout, network error: try again later


@dataclass(frozen=True, slots=True)
class Answer[T]:
    status: DNSStatus
    records: tuple[T, ...] = ()
    reason: str = ""
    #: Seconds this answer may be reused: the record set's TTL, or for NXDOMAIN/NODATA the negative
    #: TTL of the zone's SOA (RFC 2308 §5); 0 when unknown (temporary failures are never reused).
    ttl: float = 0.0
    #: The resolver set the AD bit: DNSSEC-validated (RFC 4035 §3.2.3); meaningful only from a
    #: validating resolver we trust (the one named in [dns]), as Postfix's DANE support assumes.
    secure: bool = False

    @property
    def ok(self) -> bool:
        return self.status is DNSStatus.OK


@dataclass(frozen=True, slots=True, order=True)
class MXRecord:
    preference: int
    exchange: str  # lower case, no trailing dot; "." is the root (RFC 7505 null MX)


@dataclass(frozen=True, slots=True)
class SRVRecord:
    priority: int
    weight: int
    port: int
    target: str  # lower case, no trailing dot; "." means "no such service" (RFC 2782, RFC 6186 §4)


@dataclass(frozen=True, slots=True)
class TLSARecord:
    usage: int
    selector: int
    mtype: int
    data: bytes


# What `Answer.records` holds: A, AAAA, PTR, CNAME -> address or host text (lower case, no final dot);
# TXT -> bytes (the record's strings joined); MX -> MXRecord; TLSA -> TLSARecord.
type RecordValue = str | bytes | MXRecord | SRVRecord | TLSARecord


class RouteStatus(StrEnum):
    OK = "ok"              # hosts to try, in order
    NULL_MX = "null-mx"    # RFC 7505: the domain accepts no mail; bounce with 556 5.1.10
    NXDOMAIN = "nxdomain"  # the domain does not exist: permanent failure
    NO_HOSTS = "no-hosts"  # neither MX nor A/AAAA (RFC 5321 §5.1): permanent failure
    TEMPFAIL = "tempfail"  # try again later; never fall back to A/AAAA on this


@dataclass(frozen=True, slots=True)
class MXHost:
    name: str
    preference: int


@dataclass(frozen=True, slots=True)
class MXRoute:
    status: RouteStatus
    hosts: tuple[MXHost, ...] = ()
    implicit: bool = False  # True when the domain itself is the host (no MX records)
    reason: str = ""
    secure: bool = False  # the MX (or address) answer was DNSSEC-validated (RFC 7672 §2.2.1)


@runtime_checkable
class SyncLookup(Protocol):
    """What the synchronous libraries (pyspf, dkimpy) get: one blocking query."""

    def query_sync(self, name: str, rtype: str, timeout: float | None = None) -> Answer[Any]: ...


@runtime_checkable
class AsyncLookup(Protocol):
    async def query(self, name: str, rtype: str) -> Answer[Any]: ...


def reverse_name(ip: str) -> str:
    """The in-addr.arpa / ip6.arpa name of an address (RFC 1035 §3.5, RFC 3596 §2.5). ValueError if not an IP."""
    return dns.reversename.from_address(str(ipaddress.ip_address(ip))).to_text(omit_final_dot=True)


def parse_nameserver(spec: str) -> tuple[str, int]:
    """"ADDR", "ADDR:PORT", "[V6]" or "[V6]:PORT" -> (address, port). ValueError when malformed."""
    spec = spec.strip()
    port = 53
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep:
            raise ValueError(f"nameserver {spec!r}: missing ']'")
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"nameserver {spec!r}: junk after ']'")
            port = _port(rest[1:], spec)
    elif spec.count(":") == 1:
        host, _, p = spec.partition(":")
        port = _port(p, spec)
    else:
        host = spec  # IPv4, or a bare IPv6 address without port
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {spec!r}: not an IP address") from None
    return host, port


def _port(text: str, spec: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"nameserver {spec!r}: bad port")
    return int(text)


def _norm_host(name: str) -> str:
    name = name.lower()
    return name if name == "." else name.rstrip(".")


def convert_rdata(rtype: str, rdata: dns.rdata.Rdata) -> RecordValue:
    """dnspython rdata -> the plain value this layer promises for `rtype`."""
    if rtype in ("A", "AAAA") and isinstance(rdata, dns.rdtypes.IN.A.A | dns.rdtypes.IN.AAAA.AAAA):
        return str(rdata.address)
    if rtype == "MX" and isinstance(rdata, dns.rdtypes.mxbase.MXBase):
        return MXRecord(int(rdata.preference), _norm_host(rdata.exchange.to_text()))
    if rtype == "TXT" and isinstance(rdata, dns.rdtypes.txtbase.TXTBase):
        # RFC 7208 §3.3 / RFC 6376 §3.6.2.2: the character-strings of one record are concatenated
        # without separator.
        return b"".join(rdata.strings)
    if rtype in ("PTR", "CNAME") and isinstance(rdata, dns.rdtypes.nsbase.NSBase):
        return _norm_host(rdata.target.to_text())
    if rtype == "SRV" and isinstance(rdata, dns.rdtypes.IN.SRV.SRV):
        return SRVRecord(int(rdata.priority), int(rdata.weight), int(rdata.port), _norm_host(rdata.target.to_text()))
    if rtype == "TLSA" and isinstance(rdata, dns.rdtypes.tlsabase.TLSABase):
        return TLSARecord(int(rdata.usage), int(rdata.selector), int(rdata.mtype), bytes(rdata.cert))
    raise ValueError(f"unsupported record type {rtype} ({type(rdata).__name__})")


class BaseResolver:
    """Record-level helpers and RFC 5321 §5.1 routing over two primitives that subclasses supply."""

    async def query(self, name: str, rtype: str) -> Answer[Any]:
        raise NotImplementedError

    def query_sync(self, name: str, rtype: str, timeout: float | None = None) -> Answer[Any]:
        raise NotImplementedError

    async def a(self, name: str) -> Answer[str]:
        return await self.query(name, "A")

    async def aaaa(self, name: str) -> Answer[str]:
        return await self.query(name, "AAAA")

    async def mx(self, domain: str) -> Answer[MXRecord]:
        return await self.query(domain, "MX")

    async def txt(self, name: str) -> Answer[bytes]:
        return await self.query(name, "TXT")

    async def srv(self, name: str) -> Answer[SRVRecord]:
        return await self.query(name, "SRV")

    async def tlsa(self, name: str) -> Answer[TLSARecord]:
        return await self.query(name, "TLSA")

    async def ptr(self, ip: str) -> Answer[str]:
        """PTR names of an address. ValueError if `ip` is not an IP address."""
        return await self.query(reverse_name(ip), "PTR")

    async def addresses(self, name: str) -> Answer[str]:
        """A and AAAA together (IPv6 first). OK if either has records; TEMPFAIL wins over NODATA."""
        v4, v6 = await asyncio.gather(self.a(name), self.aaaa(name))
        records = v6.records + v4.records
        if records:
            return Answer(DNSStatus.OK, records, secure=all(a.secure for a in (v4, v6) if a.records))
        for status in (DNSStatus.TEMPFAIL, DNSStatus.NXDOMAIN):
            if status in (v4.status, v6.status):
                return Answer(status, (), v4.reason or v6.reason)
        return Answer(DNSStatus.NODATA)

    async def fcrdns(self, ip: str) -> Answer[str]:
        """Forward-confirmed reverse DNS: PTR names whose A/AAAA include `ip` (RFC 8601 §3 "iprev")."""
        ptrs = await self.ptr(ip)
        if not ptrs.ok:
            return ptrs
        target = ipaddress.ip_address(ip)
        confirmed: list[str] = []
        tempfail = False
        for host in ptrs.records[:10]:  # bounded, as RFC 7208 §4.6.4 bounds PTR names
            fwd = await self.addresses(host)
            tempfail |= fwd.status is DNSStatus.TEMPFAIL
            if any(ipaddress.ip_address(a) == target for a in fwd.records):
                confirmed.append(host)
        if confirmed:
            return Answer(DNSStatus.OK, tuple(confirmed))
        return Answer(DNSStatus.TEMPFAIL if tempfail else DNSStatus.NODATA)

    async def mx_hosts(self, domain: str, rng: random.Random | None = None) -> MXRoute:
        """Where to deliver mail for `domain` (RFC 5321 §5.1, RFC 7505)."""
        rng = rng or random.Random()
        answer = await self.mx(domain)
        if answer.status is DNSStatus.TEMPFAIL:
            return MXRoute(RouteStatus.TEMPFAIL, reason=answer.reason)  # never fall back to A here
        if answer.status is DNSStatus.NXDOMAIN:
            return MXRoute(RouteStatus.NXDOMAIN, reason=answer.reason)
        if answer.status is DNSStatus.NODATA:
            # RFC 5321 §5.1: no MX records -> the domain itself is the implicit MX, preference 0.
            addrs = await self.addresses(domain)
            if addrs.ok:
                return MXRoute(RouteStatus.OK, (MXHost(_norm_host(domain), 0),), implicit=True, secure=addrs.secure)
            if addrs.status is DNSStatus.TEMPFAIL:
                return MXRoute(RouteStatus.TEMPFAIL, reason=addrs.reason)
            if addrs.status is DNSStatus.NXDOMAIN:
                return MXRoute(RouteStatus.NXDOMAIN, reason=addrs.reason)
            return MXRoute(RouteStatus.NO_HOSTS, reason="no MX and no address records")
        records: Sequence[MXRecord] = answer.records
        real = [r for r in records if r.exchange != "."]
        if not real:
            # RFC 7505 §3: a single MX "." (preference 0) says the domain accepts no mail.
            return MXRoute(RouteStatus.NULL_MX, reason="null MX (RFC 7505)")
        # RFC 5321 §5.1: lowest preference first, randomised among equal preferences.
        keyed = sorted((r.preference, rng.random(), r.exchange) for r in real)
        seen: set[str] = set()
        hosts: list[MXHost] = []
        for pref, _, host in keyed:
            if host not in seen:
                seen.add(host)
                hosts.append(MXHost(host, pref))
        return MXRoute(RouteStatus.OK, tuple(hosts), secure=answer.secure)


def _name(name: str) -> dns.name.Name:
    if len(name.rstrip(".")) > MAX_NAME_LENGTH:
        raise dns.name.NameTooLong
    return dns.name.from_text(name)  # absolute: never the search list


def _negative_ttl(response: Any) -> float:
    """RFC 2308 §5: a negative answer lives min(SOA TTL, SOA MINIMUM) from the authority section."""
    for rrset in getattr(response, "authority", ()) or ():
        if rrset.rdtype == dns.rdatatype.SOA:
            for soa in rrset:
                return float(min(rrset.ttl, soa.minimum))
    return 0.0


def _classify(exc: BaseException) -> Answer[Any]:
    if isinstance(exc, dns.resolver.NXDOMAIN):
        responses: dict[Any, Any] = getattr(exc, "kwargs", {}).get("responses") or {}
        ttl = min((_negative_ttl(r) for r in responses.values()), default=0.0)
        return Answer(DNSStatus.NXDOMAIN, (), "NXDOMAIN", ttl)
    if isinstance(exc, dns.resolver.NoAnswer):
        return Answer(DNSStatus.NODATA, (), "no data")
    if isinstance(exc, (dns.exception.SyntaxError, dns.name.NameTooLong, dns.name.IDNAException,
                        UnicodeError)):
        return Answer(DNSStatus.NXDOMAIN, (), f"invalid name: {exc.__class__.__name__}")
    if isinstance(exc, dns.exception.Timeout):
        return Answer(DNSStatus.TEMPFAIL, (), "timeout")
    if isinstance(exc, dns.resolver.NoNameservers):
        return Answer(DNSStatus.TEMPFAIL, (), "SERVFAIL or REFUSED from every nameserver")
    return Answer(DNSStatus.TEMPFAIL, (), f"{exc.__class__.__name__}: {exc}"[:200])


def _from_response(rtype: str, answer: dns.resolver.Answer) -> Answer[RecordValue]:
    if answer.rrset is None:
        return Answer(DNSStatus.NODATA, (), "no data", _negative_ttl(answer.response))
    records = tuple(convert_rdata(rtype, r) for r in answer.rrset)
    if not records:
        return Answer(DNSStatus.NODATA, (), "no data", _negative_ttl(answer.response))
    secure = bool(answer.response.flags & dns.flags.AD)
    return Answer(DNSStatus.OK, records, "", float(answer.rrset.ttl), secure=secure)


class AnswerCache:
    """Answers kept for their TTL (positive) or negative TTL (RFC 2308), bounded, shared by threads.

    Mail authentication asks the same names again and again (the sender domain's SPF and DMARC
    records, the HELO name, DNSBL entries of a reconnecting client); each answer is asked once per
    TTL. Temporary failures are never cached. TTLs are capped (`max_ttl`, `max_negative_ttl`, the
    3 hours RFC 2308 §5 suggests) so a zone fix is seen within that time; negative answers without a
    SOA are not cached (RFC 2308 §5: they SHOULD NOT be).
    """

    def __init__(self, max_entries: int = 20_000, max_ttl: float = 86400.0, max_negative_ttl: float = 10800.0,
                 default_negative_ttl: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_ttl = max_ttl
        self.max_negative_ttl = max_negative_ttl
        self.default_negative_ttl = default_negative_ttl
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, Answer[Any]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(name: str, rtype: str) -> tuple[str, str]:
        return name.lower().rstrip("."), rtype

    def get(self, key: tuple[str, str]) -> Answer[Any] | None:
        now = self.clock()
        with self._lock:
            item = self._entries.get(key)
            if item is None or item[0] <= now:
                if item is not None:
                    del self._entries[key]
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return item[1]

    def put(self, key: tuple[str, str], answer: Answer[Any]) -> None:
        if answer.status is DNSStatus.TEMPFAIL or self.max_entries <= 0:
            return
        if answer.status is DNSStatus.OK:
            ttl = min(answer.ttl, self.max_ttl)
        else:
            ttl = min(answer.ttl or self.default_negative_ttl, self.max_negative_ttl)
        if ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (self.clock() + ttl, answer)
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


@dataclass
class Resolver(BaseResolver):
    """dnspython-backed resolver. nameservers: "ADDR" / "ADDR:PORT" / "[V6]:PORT"; None = resolv.conf."""

    nameservers: list[str] | None = None
    timeout: float = 5.0
    #: Answers reused for their TTL; `AnswerCache(max_entries=0)` turns caching off.
    cache: AnswerCache = field(default_factory=AnswerCache)
    #: Queries sent (not answers from the cache) are timed and counted here.
    metrics: Metrics | None = field(default=None, repr=False)
    _inflight: dict[tuple[str, str], asyncio.Future[Answer[Any]]] = field(default_factory=dict, init=False,
                                                                          repr=False)
    _async: dns.asyncresolver.Resolver = field(init=False, repr=False)
    _sync: dns.resolver.Resolver = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._async = self._configure(dns.asyncresolver.Resolver)
        self._sync = self._configure(dns.resolver.Resolver)

    def _configure[R: dns.resolver.BaseResolver](self, cls: type[R]) -> R:
        if self.nameservers is None:
            try:
                res = cls(configure=True)
            except dns.resolver.NoResolverConfiguration:
                res = cls(configure=False)
                res.nameservers = ["127.0.0.1"]  # what the C library does without resolv.conf
        else:
            if not self.nameservers:
                raise ValueError("nameservers: empty list")
            res = cls(configure=False)
            res.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(s)) for s in self.nameservers]
        res.timeout = self.timeout
        res.lifetime = self.timeout
        res.use_edns(0, 0, 1232)  # the DNS flag day 2020 buffer size; TC answers are retried over TCP
        res.flags = dns.flags.RD | dns.flags.AD  # RFC 6840 §5.7: ask for the AD bit (DANE, RFC 7672)
        return res

    async def query(self, name: str, rtype: str) -> Answer[Any]:
        if rtype not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported record type {rtype}")
        key = self.cache.key(name, rtype)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        # Concurrent sessions asking the same name share one query.
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        fut: asyncio.Future[Answer[Any]] = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            started = time.monotonic()
            try:
                response = await self._async.resolve(_name(name), rtype, raise_on_no_answer=False, search=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every DNS or network condition becomes an outcome
                answer = _classify(exc)
            else:
                answer = _from_response(rtype, response)
            if self.metrics is not None:
                self.metrics.dns_query(rtype, time.monotonic() - started, answer.status is DNSStatus.TEMPFAIL)
            self.cache.put(key, answer)
            fut.set_result(answer)
            return answer
        finally:
            if not fut.done():  # this query was cancelled: whoever shared it sees a temporary failure
                fut.set_result(Answer(DNSStatus.TEMPFAIL, (), "query cancelled"))
            self._inflight.pop(key, None)

    def query_sync(self, name: str, rtype: str, timeout: float | None = None) -> Answer[Any]:
        if rtype not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported record type {rtype}")
        key = self.cache.key(name, rtype)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        lifetime = self.timeout if timeout is None else min(self.timeout, timeout)
        started = time.monotonic()
        try:
            response = self._sync.resolve(_name(name), rtype, raise_on_no_answer=False, search=False,
                                          lifetime=lifetime)
        except Exception as exc:
            answer = _classify(exc)
        else:
            answer = _from_response(rtype, response)
        if self.metrics is not None:
            self.metrics.dns_query(rtype, time.monotonic() - started, answer.status is DNSStatus.TEMPFAIL)
        self.cache.put(key, answer)
        return answer


def make_resolver(nameservers: Sequence[str], timeout: float, cache: bool = True,
                  metrics: Metrics | None = None) -> Resolver:
    """The resolver [dns] describes: its nameservers (none: the system's), timeout and answer cache."""
    return Resolver(list(nameservers) or None, timeout=timeout,
                    cache=AnswerCache() if cache else AnswerCache(max_entries=0), metrics=metrics)
