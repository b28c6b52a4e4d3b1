"""SPF (RFC 7208): the openspf/RFC 7208 test suite against our wrapper, plus wrapper behaviour."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml

from postier.mailauth.spf import SPFStatus, check_helo, check_host, check_spf, check_spf_helo
from postier.resolver import SUPPORTED_TYPES, Resolver
from postier.resolver.fake import FakeResolver
from tests.dnsserver import DNSServer

SUITE = Path(__file__).parent / "data" / "rfc7208-tests.yml"


def zone_from(zonedata: dict[str, list[Any]]) -> FakeResolver:
    """The suite's zonedata as a FakeResolver, with the conventions of the suite's own driver:
    type SPF records double as TXT when a name lists no TXT at all ("TXT: NONE" only says the name
    has no TXT), and TIMEOUT makes every type without records at that name time out."""
    fake = FakeResolver()
    for name, entries in zonedata.items():
        fake.touch(name)
        has_txt = any(isinstance(e, dict) and "TXT" in e for e in entries)
        typed: set[str] = set()
        timeout = False
        for entry in entries:
            if entry == "TIMEOUT":
                timeout = True
                continue
            for rtype, value in entry.items():
                if rtype == "SPF":
                    if has_txt:
                        continue
                    rtype = "TXT"
                if value == "NONE":
                    continue
                if rtype == "TXT":
                    strings = value if isinstance(value, list) else [value]
                    value = [s.encode("utf-8") for s in strings]
                elif rtype == "MX":
                    value = (value[0], value[1] or ".")
                fake.add(name, rtype, value)
                typed.add(rtype)
        if timeout:
            for rtype in SUPPORTED_TYPES - typed:
                fake.tempfail(name, rtype)
    return fake


def load_cases() -> list[Any]:
    cases = []
    with SUITE.open("rb") as fp:
        for scenario in yaml.safe_load_all(fp):
            for test_id, test in scenario["tests"].items():
                cases.append(pytest.param(scenario["zonedata"], test, id=test_id))
    return cases


CASES = load_cases()


@pytest.mark.parametrize(("zonedata", "test"), CASES)
def test_rfc7208_suite(zonedata: dict[str, list[Any]], test: dict[str, Any]) -> None:
    fake = zone_from(zonedata)
    result = check_host(test["host"], test["mailfrom"], test["helo"], fake, default_explanation="DEFAULT")
    expected = test["result"] if isinstance(test["result"], list) else [test["result"]]
    assert result.status.value in expected, (result, test.get("description"))
    if "explanation" in test:
        assert result.explanation == test["explanation"]


def test_suite_is_complete() -> None:
    assert len(CASES) >= 150  # the 2014.04 suite: every scenario, none skipped


def simple_zone() -> FakeResolver:
    fake = FakeResolver()
    fake.add("a.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    fake.add("mx.a.test", "TXT", "v=spf1 a -all")
    fake.add("mx.a.test", "A", "192.0.2.7")
    fake.add("soft.test", "TXT", "v=spf1 ~all")
    fake.add("broken.test", "TXT", "v=spf1 include:down.test -all")
    fake.tempfail("down.test")
    return fake


def test_pass_fail_and_identity() -> None:
    fake = simple_zone()
    ok = check_host("192.0.2.1", "alice@a.test", "mx.a.test", fake)
    assert (ok.status, ok.domain, ok.scope, ok.identity) == (SPFStatus.PASS, "a.test", "mailfrom", "alice@a.test")
    bad = check_host("192.0.2.9", "alice@A.test", "mx.a.test", fake)
    assert bad.status is SPFStatus.FAIL and bad.domain == "a.test"
    assert check_host("192.0.2.9", "x@soft.test", "h.test", fake).status is SPFStatus.SOFTFAIL
    assert check_host("192.0.2.9", "x@none.test", "h.test", fake).status is SPFStatus.NONE


def test_null_sender_uses_helo() -> None:
    # RFC 7208 §2.4
    res = check_host("192.0.2.7", "", "mx.a.test", simple_zone())
    assert (res.status, res.domain, res.identity, res.scope) == (
        SPFStatus.PASS, "mx.a.test", "postmaster@mx.a.test", "helo")


def test_helo_check() -> None:
    fake = simple_zone()
    assert check_helo("192.0.2.7", "mx.a.test", fake).status is SPFStatus.PASS
    assert check_helo("192.0.2.8", "mx.a.test", fake).status is SPFStatus.FAIL
    assert check_helo("192.0.2.8", "[192.0.2.8]", fake).status is SPFStatus.NONE
    assert check_helo("192.0.2.8", "localhost", fake).status is SPFStatus.NONE


def test_dns_tempfail_is_temperror() -> None:
    fake = simple_zone()
    assert check_host("192.0.2.1", "x@broken.test", "h.test", fake).status is SPFStatus.TEMPERROR
    fake.tempfail("a.test", "TXT")
    assert check_host("192.0.2.1", "x@a.test", "h.test", fake).status is SPFStatus.TEMPERROR


def test_lookup_limit_is_permerror() -> None:
    # RFC 7208 §4.6.4: more than 10 DNS-querying terms
    fake = FakeResolver()
    fake.add("many.test", "TXT", "v=spf1 " + " ".join(f"a:h{i}.test" for i in range(12)) + " -all")
    for i in range(12):
        fake.add(f"h{i}.test", "A", "198.51.100.1")
    assert check_host("192.0.2.1", "x@many.test", "h.test", fake).status is SPFStatus.PERMERROR


def test_bad_ip_is_permerror() -> None:
    assert check_host("not-an-ip", "x@a.test", "h", simple_zone()).status is SPFStatus.PERMERROR


def test_async_wrapper_and_concurrent_resolvers() -> None:
    one, two = simple_zone(), FakeResolver()
    two.add("a.test", "TXT", "v=spf1 -all")

    async def main() -> list[SPFStatus]:
        results = await asyncio.gather(*[
            check_spf("192.0.2.1", "x@a.test", "h.test", one if i % 2 == 0 else two) for i in range(8)])
        return [r.status for r in results]

    assert asyncio.run(main()) == [SPFStatus.PASS, SPFStatus.FAIL] * 4


def test_async_fast_path_agrees_with_pyspf() -> None:
    """Domains without an SPF record are settled on the event loop; the answer is pyspf's."""
    with DNSServer() as dns:
        dns.add("txt-only.test", "TXT", "google-site-verification=abc")
        dns.add("a-only.test", "A", "192.0.2.1")
        dns.add("spf.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
        dns.add("upper.test", "TXT", "V=SPF1 -all")
        dns.add("almost.test", "TXT", "v=spf10 -all")
        dns.servfail("broken.test")
        r = Resolver([dns.nameserver], timeout=2)
        for domain in ("nx.test", "txt-only.test", "a-only.test", "spf.test", "upper.test", "almost.test",
                       "broken.test"):
            for ip in ("192.0.2.1", "192.0.2.9"):
                fast = asyncio.run(check_spf(ip, f"user@{domain}", "helo.test", r))
                slow = check_host(ip, f"user@{domain}", "helo.test", r)
                assert (fast.status, fast.domain, fast.identity) == (slow.status, slow.domain, slow.identity), domain
                fast_h = asyncio.run(check_spf_helo(ip, domain, r))
                slow_h = check_helo(ip, domain, r)
                assert (fast_h.status, fast_h.identity, fast_h.scope) == (slow_h.status, slow_h.identity,
                                                                           slow_h.scope), domain
