"""The resolver's answer cache: TTLs honoured, negative caching per RFC 2308, no caching of failures,
one query for concurrent askers, bounded size."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from dnslib import DNSRecord

from postier.resolver import Answer, AnswerCache, DNSStatus, Resolver
from tests.dnsserver import DNSServer


class CountingDNS(DNSServer):
    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def answer(self, request: DNSRecord, transport: str) -> DNSRecord | None:
        self.asked.append(str(request.q.qname).rstrip("."))
        return super().answer(request, transport)


class Clock:
    t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def dns() -> Iterator[CountingDNS]:
    with CountingDNS() as d:
        yield d


def test_positive_answer_reused_for_its_ttl(dns: CountingDNS) -> None:
    clock = Clock()
    dns.add("cached.test", "TXT", "v=spf1 -all", ttl=300)
    r = Resolver([dns.nameserver], cache=AnswerCache(clock=clock))
    first = r.query_sync("cached.test", "TXT")
    assert first.ok and first.ttl == 300
    dns.remove("cached.test")
    assert asyncio.run(r.query("Cached.Test.", "TXT")).records == first.records  # cached, any case
    assert dns.asked.count("cached.test") == 1
    clock.t += 301
    assert r.query_sync("cached.test", "TXT").status is DNSStatus.NXDOMAIN
    assert dns.asked.count("cached.test") == 2


def test_zero_ttl_and_negative_without_soa_not_cached(dns: CountingDNS) -> None:
    r = Resolver([dns.nameserver])
    dns.add("zero.test", "A", "127.0.0.9")  # TTL 0
    r.query_sync("zero.test", "A")
    r.query_sync("zero.test", "A")
    r.query_sync("missing.test", "A")
    r.query_sync("missing.test", "A")
    assert dns.asked.count("zero.test") == 2 and dns.asked.count("missing.test") == 2


def test_tempfail_never_cached(dns: CountingDNS) -> None:
    dns.servfail("broken.test")
    r = Resolver([dns.nameserver], timeout=2)
    assert r.query_sync("broken.test", "A").status is DNSStatus.TEMPFAIL
    assert r.query_sync("broken.test", "A").status is DNSStatus.TEMPFAIL
    assert dns.asked.count("broken.test") >= 2


def test_negative_answers_cached_for_the_soa_ttl(dns: CountingDNS) -> None:
    clock = Clock()
    dns.negative_ttl = 120
    r = Resolver([dns.nameserver], cache=AnswerCache(clock=clock))
    first = r.query_sync("nothing.neg.test", "TXT")
    assert first.status is DNSStatus.NXDOMAIN and first.ttl == 120
    dns.add("nothing.neg.test", "TXT", "now it exists")
    assert r.query_sync("nothing.neg.test", "TXT").status is DNSStatus.NXDOMAIN  # cached
    clock.t += 121
    assert r.query_sync("nothing.neg.test", "TXT").ok
    dns.add("nodata.neg.test", "A", "127.0.0.1")
    assert asyncio.run(r.query("nodata.neg.test", "TXT")).status is DNSStatus.NODATA
    assert dns.asked.count("nodata.neg.test") == 1 and r.query_sync("nodata.neg.test", "TXT").ttl == 120
    assert dns.asked.count("nodata.neg.test") == 1


def test_negative_ttl_from_soa() -> None:
    clock = Clock()
    c = AnswerCache(clock=clock, max_negative_ttl=100)
    key = c.key("gone.test", "A")
    c.put(key, Answer(DNSStatus.NXDOMAIN, (), "NXDOMAIN", 3600))
    assert c.get(key) is not None
    clock.t += 101  # capped at max_negative_ttl
    assert c.get(key) is None


def test_concurrent_askers_share_one_query(dns: CountingDNS) -> None:
    dns.add("shared.test", "A", "127.0.0.7", ttl=60)

    async def go() -> list[Answer[Any]]:
        r = Resolver([dns.nameserver])
        return await asyncio.gather(*(r.query("shared.test", "A") for _ in range(20)))

    answers = asyncio.run(go())
    assert all(a.records == ("127.0.0.7",) for a in answers)
    assert dns.asked.count("shared.test") == 1


def test_bounded() -> None:
    c = AnswerCache(max_entries=3)
    for i in range(10):
        c.put(c.key(f"n{i}.test", "A"), Answer(DNSStatus.OK, ("127.0.0.1",), "", 60))
    assert c.get(c.key("n9.test", "A")) is not None and c.get(c.key("n0.test", "A")) is None
    assert len(c._entries) == 3
