"""The resolver layer: typed outcomes, RFC 5321 §5.1 routing, RFC 7505 null MX, the sync twin."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from postier.resolver import (
    DNSStatus, MXRecord, Resolver, RouteStatus, SyncLookup, parse_nameserver, reverse_name,
)
from postier.resolver.fake import FakeResolver
from tests.dnsserver import DNSServer


@pytest.fixture(scope="module")
def server() -> Iterator[DNSServer]:
    with DNSServer() as dns:
        dns.add("a.test", "MX", "10 mx1.a.test.")
        dns.add("a.test", "MX", "20 mx2.a.test.")
        dns.add("mx1.a.test", "A", "127.0.0.2")
        dns.add("mx1.a.test", "AAAA", "::2")
        dns.add("implicit.test", "A", "127.0.0.3")
        dns.add("nullmx.test", "MX", "0 .")
        dns.add("nomail.test", "TXT", "hello")
        dns.add("alias.test", "CNAME", "a.test.")
        dns.add("a.test", "TXT", ["v=spf1 ", "-all"])
        dns.add("long.test", "TXT", "x" * 3000)
        dns.add_ptr("127.0.0.2", "mx1.a.test")
        dns.add_ptr("::2", "mx1.a.test")
        dns.add("_25._tcp.mx1.a.test", "TLSA", "3 1 1 " + "ab" * 32)
        dns.servfail("servfail.test")
        dns.refused("refused.test")
        dns.timeout("slow.test")
        yield dns


@pytest.fixture(scope="module")
def resolver(server: DNSServer) -> Resolver:
    return Resolver([server.nameserver], timeout=0.5)


def run[T](coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_outcomes(resolver: Resolver) -> None:
    mx = run(resolver.mx("a.test"))
    assert mx.status is DNSStatus.OK and sorted(mx.records) == [MXRecord(10, "mx1.a.test"), MXRecord(20, "mx2.a.test")]
    assert run(resolver.a("nope.a.test")).status is DNSStatus.NXDOMAIN
    assert run(resolver.aaaa("implicit.test")).status is DNSStatus.NODATA
    assert run(resolver.a("test")).status is DNSStatus.NODATA  # empty non-terminal
    for name in ("servfail.test", "refused.test", "slow.test"):
        assert run(resolver.a(name)).status is DNSStatus.TEMPFAIL, name
    assert run(resolver.a("x" * 64 + ".test")).status is DNSStatus.NXDOMAIN  # not a DNS name
    assert run(resolver.addresses("mx1.a.test")).records == ("::2", "127.0.0.2")
    assert run(resolver.ptr("127.0.0.2")).records == ("mx1.a.test",)
    assert run(resolver.ptr("::2")).records == ("mx1.a.test",)
    assert run(resolver.fcrdns("127.0.0.2")).records == ("mx1.a.test",)
    assert run(resolver.tlsa("_25._tcp.mx1.a.test")).records[0].data == bytes.fromhex("ab" * 32)


def test_txt_strings_joined_and_tcp_fallback(resolver: Resolver, server: DNSServer) -> None:
    assert run(resolver.txt("a.test")).records == (b"v=spf1 -all",)  # RFC 7208 §3.3
    assert run(resolver.txt("long.test")).records == (b"x" * 3000,)
    assert ("long.test", "TXT", "tcp") in server.queries  # truncated over UDP, retried over TCP


def test_cname_followed(resolver: Resolver) -> None:
    assert run(resolver.mx("alias.test")).records[0].exchange == "mx1.a.test"


def test_mx_routing(resolver: Resolver) -> None:
    route = run(resolver.mx_hosts("a.test"))
    assert route.status is RouteStatus.OK and [h.name for h in route.hosts] == ["mx1.a.test", "mx2.a.test"]
    implicit = run(resolver.mx_hosts("implicit.test"))
    assert implicit.implicit and implicit.hosts[0].name == "implicit.test"
    assert run(resolver.mx_hosts("nullmx.test")).status is RouteStatus.NULL_MX
    assert run(resolver.mx_hosts("nxdomain.test")).status is RouteStatus.NXDOMAIN
    assert run(resolver.mx_hosts("nomail.test")).status is RouteStatus.NO_HOSTS
    assert run(resolver.mx_hosts("servfail.test")).status is RouteStatus.TEMPFAIL


def test_mx_tempfail_never_falls_back_to_a() -> None:
    fake = FakeResolver()
    fake.add("d.test", "A", "192.0.2.1")
    fake.tempfail("d.test", "MX")
    route = run(fake.mx_hosts("d.test"))
    assert route.status is RouteStatus.TEMPFAIL and not route.hosts
    fake2 = FakeResolver()
    fake2.touch("e.test")
    fake2.tempfail("e.test", "AAAA")
    assert run(fake2.mx_hosts("e.test")).status is RouteStatus.TEMPFAIL


def test_equal_preferences_are_shuffled() -> None:
    fake = FakeResolver()
    for host in ("m1", "m2", "m3"):
        fake.add("r.test", "MX", f"10 {host}.r.test")
    fake.add("r.test", "MX", "5 first.r.test")
    fake.add("r.test", "MX", "50 last.r.test")
    orders = set()
    rng = random.Random(1)
    for _ in range(40):
        hosts = [h.name for h in run(fake.mx_hosts("r.test", rng=rng)).hosts]
        assert hosts[0] == "first.r.test" and hosts[-1] == "last.r.test"
        orders.add(tuple(hosts[1:4]))
    assert len(orders) > 1


def test_null_mx_among_others_is_ignored() -> None:
    fake = FakeResolver()
    fake.add("z.test", "MX", "0 .")
    fake.add("z.test", "MX", "10 mx.z.test")
    assert [h.name for h in run(fake.mx_hosts("z.test")).hosts] == ["mx.z.test"]


def test_sync_twin_same_nameservers(resolver: Resolver) -> None:
    assert isinstance(resolver, SyncLookup)
    assert resolver.query_sync("mx1.a.test", "A").records == ("127.0.0.2",)
    assert resolver.query_sync("servfail.test", "TXT").status is DNSStatus.TEMPFAIL
    assert resolver.query_sync("nope.test", "TXT", timeout=0.2).status is DNSStatus.NXDOMAIN


def test_unreachable_nameserver_is_tempfail() -> None:
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a port nobody answers on
        s.bind(("127.0.0.1", 0))
        dead = Resolver([f"127.0.0.1:{s.getsockname()[1]}"], timeout=0.3)
        assert dead.query_sync("a.test", "A").status is DNSStatus.TEMPFAIL
        assert run(dead.a("a.test")).status is DNSStatus.TEMPFAIL


def test_parse_nameserver() -> None:
    assert parse_nameserver("192.0.2.1") == ("192.0.2.1", 53)
    assert parse_nameserver("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_nameserver("[::1]:5353") == ("::1", 5353)
    assert parse_nameserver("[::1]") == ("::1", 53)
    assert parse_nameserver("2001:db8::1") == ("2001:db8::1", 53)
    for bad in ("host.test", "1.2.3.4:0", "1.2.3.4:x", "[::1", "[::1]x", "1.2.3.4:70000"):
        with pytest.raises(ValueError):
            parse_nameserver(bad)
    with pytest.raises(ValueError):
        Resolver([])


def test_reverse_name() -> None:
    assert reverse_name("192.0.2.1") == "1.2.0.192.in-addr.arpa"
    assert reverse_name("2001:db8::1").endswith(".8.b.d.0.1.0.0.2.ip6.arpa")
    with pytest.raises(ValueError):
        reverse_name("nope")


def test_fake_resolver_cname_loop_and_types() -> None:
    fake = FakeResolver()
    fake.add("l1.test", "CNAME", "l2.test")
    fake.add("l2.test", "CNAME", "l1.test")
    assert fake.query_sync("l1.test", "A").status is DNSStatus.TEMPFAIL
    assert fake.query_sync("l1.test", "CNAME").records == ("l2.test",)
    with pytest.raises(ValueError):
        fake.add("x.test", "A", "::1")
    with pytest.raises(ValueError):
        fake.query_sync("x.test", "SOA")
