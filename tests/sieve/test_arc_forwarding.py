"""ARC (RFC 8617) end to end: a.test forwards (an alias to b.test, a Sieve redirect) and seals; b.test
receives with mail authentication on and records the chain's validation. Two postier processes and
the in-process DNS server, which publishes a.test's DKIM key (`postier dns records`); the copy b.test
stored is checked with dkimpy's own `arc_verify` over that DNS: the chain passes, one set, cv=none.
"""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator

import dkim as dkimpy
import pytest

from postier.mailauth.dkim import dkim_dnsfunc
from postier.resolver import make_resolver
from tests.deliverability.common import load_zone
from tests.dnsserver import DNSServer
from tests.harness import Instance

pytestmark = pytest.mark.timeout(120)

ADDRS = {"a.test": "127.0.0.9", "b.test": "127.0.0.10", "c.test": "127.0.0.11"}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Instance, Instance, DNSServer]]:
    with DNSServer() as dns:
        common = f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 2.0\n'
        a = Instance(tmp_path_factory.mktemp("a"), "a.test", address=ADDRS["a.test"], extra_config=common)
        b = Instance(tmp_path_factory.mktemp("b"), "b.test", address=ADDRS["b.test"], extra_config=common)
        a.add_config(f'[outbound]\nsmtp_port = {b.port("smtp")}\nsource_address = "{ADDRS["a.test"]}"\n')
        a.cli("dkim", "generate", "a.test")
        load_zone(dns, a.cli("dns", "records", "a.test", "--address", ADDRS["a.test"]).stdout)
        dns.add("b.test", "MX", f"10 {b.hostname}")
        dns.add(b.hostname, "A", ADDRS["b.test"])
        dns.add("c.test", "TXT", f"v=spf1 ip4:{ADDRS['c.test']} -all")  # the original sender's domain
        a.add_user("alice@a.test")
        a.cli("alias", "add", "fwd@a.test", "bob@b.test")
        a.cli("sieve", "put", "alice@a.test", "main", "-", stdin='redirect "bob@b.test";\n')
        a.cli("sieve", "activate", "alice@a.test", "main")
        b.add_user("bob@b.test")
        try:
            a.start()
            b.start()
            yield a, b, dns
        finally:
            a.stop()
            b.stop()




def header_fields(message: bytes, name: str) -> list[str]:
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.split(r"\r\n(?![ \t])", head)
    return [" ".join(f.split()) for f in fields if f.lower().startswith(name.lower() + ":")]


@pytest.mark.parametrize("via", ["fwd@a.test", "alice@a.test"])
def test_forwarded_mail_is_arc_sealed_and_the_chain_passes(net: tuple[Instance, Instance, DNSServer],
                                                         via: str) -> None:
    a, b, dns = net
    subject = f"sealed via {via}"
    data = (f"From: Carol <carol@c.test>\r\nTo: <{via}>\r\nSubject: {subject}\r\n"
            f"Message-ID: <{via.replace('@', '.')}@c.test>\r\nDate: Fri, 04 Dec 2026 10:00:00 +0000\r\n"
            "\r\nhello through a forwarder\r\n").encode()
    with smtplib.SMTP(*a.addr("smtp"), local_hostname="mail.c.test", source_address=(ADDRS["c.test"], 0),
                      timeout=30) as s:
        s.sendmail("carol@c.test", [via], data)
    got = b.wait_message("bob@b.test", subject.encode())

    seals = header_fields(got, "ARC-Seal")
    assert len(seals) == 1 and "i=1;" in seals[0] and "cv=none" in seals[0] and "d=a.test" in seals[0], seals
    aar = header_fields(got, "ARC-Authentication-Results")
    assert len(aar) == 1 and aar[0].startswith("ARC-Authentication-Results: i=1; mail.a.test;"), aar
    assert "spf=pass" in aar[0] and "smtp.mailfrom=carol@c.test" in aar[0], aar  # a.test's own results
    assert len(header_fields(got, "ARC-Message-Signature")) == 1

    dnsfunc = dkim_dnsfunc(make_resolver([dns.nameserver], 2.0, cache=False))
    cv, results, reason = dkimpy.arc_verify(got, dnsfunc=dnsfunc)
    assert cv == dkimpy.CV_Pass, (reason, results)
    assert [r["instance"] for r in results] == [1], results
    ours = [f for f in header_fields(got, "Authentication-Results") if "mail.b.test" in f]
    assert ours and "arc=pass" in ours[0], ours  # b.test validated the chain on the way in
