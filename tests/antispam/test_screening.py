"""DNSBL/DNSWL screening against a real DNS server in-process (RFC 5782)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from postier.antispam.screening import DNSList, Screener, query_name
from postier.resolver import AnswerCache, Resolver
from tests.dnsserver import DNSServer


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as d:
        # RFC 5782 §5: 127.0.0.2 is the test entry every list must carry.
        d.add("2.0.0.127.bl.test", "A", "127.0.0.2")
        d.add("2.0.0.127.bl2.test", "A", "127.0.0.4")
        d.add("3.0.0.127.bl.test", "A", "127.255.255.254")  # Spamhaus: query refused
        d.add("4.0.0.127.bl.test", "A", "192.0.2.1")  # poisoned/wildcard: not in 127/8
        d.add("5.0.0.127.wl.test", "A", "127.0.10.1")
        d.add("5.0.0.127.bl.test", "A", "127.0.0.2")
        d.servfail("6.0.0.127.bl.test")
        d.add("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.test", "A", "127.0.0.2", ttl=600)
        yield d


def screener(dns: DNSServer, **kw: object) -> Screener:
    return Screener(Resolver([dns.nameserver], timeout=2.0),
                    dnsbl=[DNSList("bl.test", 2.0), DNSList("bl2.test", 1.0, ("127.0.0.4",))],
                    dnswl=[DNSList("wl.test")], threshold=3.0, pregreet_weight=1.0, **kw)  # type: ignore[arg-type]


def test_query_names() -> None:
    assert query_name("192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert query_name("::ffff:192.0.2.99", "bl.test") == "99.2.0.192.bl.test"
    assert query_name("2001:db8:1:2:3:4:567:89ab", "bl.test").startswith("b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0")


def test_listed_over_threshold_is_blocked_and_named(dns: DNSServer) -> None:
    res = asyncio.run(screener(dns).screen("127.0.0.2"))
    assert res.blocked and res.score == 3.0
    assert {h.zone for h in res.listed} == {"bl.test", "bl2.test"}
    assert res.explain() == "refused: listed on bl.test (127.0.0.2); listed on bl2.test (127.0.0.4), score 3 >= 3"


def test_refused_and_non_loopback_answers_are_not_listings(dns: DNSServer) -> None:
    s = screener(dns)
    r3 = asyncio.run(s.screen("127.0.0.3"))
    assert not r3.listed and not r3.blocked and r3.ignored[0].answer == "127.255.255.254"
    r4 = asyncio.run(s.screen("127.0.0.4"))
    assert not r4.listed and r4.ignored[0].answer == "192.0.2.1"


def test_tempfail_never_blocks(dns: DNSServer) -> None:
    res = asyncio.run(screener(dns).screen("127.0.0.6"))
    assert not res.blocked and "bl.test" in res.unavailable


def test_allowlisted_client_skips_screening(dns: DNSServer) -> None:
    res = asyncio.run(screener(dns).screen("127.0.0.5", pregreet=True))
    assert res.allowlisted and not res.blocked and res.explain().startswith("allowed")


def test_pregreet_adds_weight(dns: DNSServer) -> None:
    s = Screener(Resolver([dns.nameserver]), dnsbl=[DNSList("bl.test", 2.0)], threshold=3.0, pregreet_weight=1.0)
    assert not asyncio.run(s.screen("127.0.0.2")).blocked
    r = asyncio.run(s.screen("127.0.0.2", pregreet=True))
    assert r.blocked and "spoke before the greeting" in r.explain()


def test_ipv6_and_cache(dns: DNSServer) -> None:
    now = [1000.0]
    uncached = Resolver([dns.nameserver], cache=AnswerCache(max_entries=0))  # only the screener's cache
    s = Screener(uncached, dnsbl=[DNSList("bl.test", 3.0)], threshold=3.0, clock=lambda: now[0])
    assert asyncio.run(s.screen("::1")).blocked
    dns.remove("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.bl.test")
    assert asyncio.run(s.screen("::1")).blocked  # cached
    now[0] += 4000
    assert not asyncio.run(s.screen("::1")).blocked  # expired: looked up again


def test_deadline_bounds_a_slow_list(dns: DNSServer) -> None:
    dns.timeout("7.0.0.127.slow.test")
    s = Screener(Resolver([dns.nameserver], timeout=5.0), dnsbl=[DNSList("slow.test", 5.0)], threshold=1.0,
                 timeout=0.3)
    res = asyncio.run(s.screen("127.0.0.7"))
    assert not res.blocked and res.unavailable == ("slow.test",)
