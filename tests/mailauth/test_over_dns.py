"""SPF, DKIM, DMARC and Authentication-Results end to end over a real resolver and the test DNS server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from postier.mailauth.authresults import authentication_results
from postier.mailauth.dkim import DKIMStatus, generate_key, sign_async, verify_all_async
from postier.mailauth.dmarc import DMARCStatus, evaluate, from_domain
from postier.mailauth.spf import SPFStatus, check_spf, check_spf_helo
from postier.resolver import Resolver
from tests.dnsserver import DNSServer

MESSAGE = (b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\nSubject: hi\r\n"
           b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\nMessage-ID: <1@a.test>\r\n\r\nHello.\r\n")


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[DNSServer, Resolver, bytes]]:
    pem, txt = generate_key("rsa-sha256", bits=2048)  # a 2048-bit key needs a TXT split into strings
    with DNSServer() as dns:
        dns.add("a.test", "TXT", "v=spf1 ip4:127.0.0.2 -all")
        dns.add("mx.a.test", "TXT", "v=spf1 a -all")
        dns.add("mx.a.test", "A", "127.0.0.2")
        dns.add("sel._domainkey.a.test", "TXT", txt)
        dns.add("_dmarc.a.test", "TXT", "v=DMARC1; p=reject; rua=mailto:dmarc@a.test")
        dns.add("slow.test", "TXT", "v=spf1 include:down.test -all")
        dns.servfail("down.test")
        dns.servfail("sel._domainkey.broken.test")
        yield dns, Resolver([dns.nameserver], timeout=0.5), pem


def test_all_pass(world: tuple[DNSServer, Resolver, bytes]) -> None:
    _, resolver, pem = world

    async def main() -> bytes:
        signed = await sign_async(MESSAGE, "a.test", "sel", pem) + MESSAGE
        spf = await check_spf("127.0.0.2", "alice@a.test", "mx.a.test", resolver)
        helo = await check_spf_helo("127.0.0.2", "mx.a.test", resolver)
        dkim = await verify_all_async(signed, resolver)
        author = from_domain(signed)
        assert author == "a.test"
        dmarc = await evaluate(author, spf, dkim, resolver)
        assert (spf.status, helo.status, [d.status for d in dkim], dmarc.status) == (
            SPFStatus.PASS, SPFStatus.PASS, [DKIMStatus.PASS], DMARCStatus.PASS)
        return authentication_results("mx.b.test", spf=spf, helo=helo, dkim=dkim, dmarc=dmarc)

    header = asyncio.run(main())
    assert b"spf=pass" in header and b"dkim=pass header.d=a.test" in header and b"dmarc=pass" in header


def test_dns_trouble_is_temperror(world: tuple[DNSServer, Resolver, bytes]) -> None:
    _, resolver, pem = world

    async def main() -> None:
        spf = await check_spf("127.0.0.2", "x@slow.test", "mx.a.test", resolver)
        assert spf.status is SPFStatus.TEMPERROR
        signed = await sign_async(MESSAGE, "broken.test", "sel", pem) + MESSAGE
        [dkim] = await verify_all_async(signed, resolver)
        assert dkim.status is DKIMStatus.TEMPERROR

    asyncio.run(main())


def test_forged_mail_fails_dmarc(world: tuple[DNSServer, Resolver, bytes]) -> None:
    _, resolver, _ = world

    async def main() -> None:
        spf = await check_spf("127.0.0.9", "alice@a.test", "evil.test", resolver)
        assert spf.status is SPFStatus.FAIL
        dmarc = await evaluate("a.test", spf, await verify_all_async(MESSAGE, resolver), resolver)
        assert (dmarc.status, dmarc.disposition.value) == (DMARCStatus.FAIL, "reject")

    asyncio.run(main())
