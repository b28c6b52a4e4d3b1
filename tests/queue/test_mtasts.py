"""MTA-STS outbound (RFC 8461): policy parsing and matching, the cache's rules, and end to end between two
real instances: b.test serves its own policy on its https listener, a.test's queue fetches it over
verified TLS and enforces it (a wrong MX name or a certificate for another name defers, never a
plaintext delivery), while `testing` delivers."""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from postier.queue.mtasts import PolicyCache, PolicyError, mx_matches, parse_policy, parse_txt
from postier.resolver.fake import FakeResolver
from tests.dnsserver import DNSServer
from tests.harness import Instance

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.b.test\r\nmx: *.mx.b.test\r\nmax_age: 86400\r\n"


def test_parse_and_match() -> None:
    p = parse_policy(POLICY, "b.test", "id1", 1000.0)
    assert (p.mode, p.mx, p.max_age) == ("enforce", ("mail.b.test", "*.mx.b.test"), 86400)
    assert p.matches("MAIL.b.test.") and p.matches("a.mx.b.test")
    assert not p.matches("a.b.mx.b.test") and not p.matches("mx.b.test") and not p.matches("evil.test")
    assert mx_matches("*.b.test", "x.b.test") and not mx_matches("*.b.test", "b.test")
    assert not p.expired(1000.0 + 86399) and p.expired(1000.0 + 86400)
    assert parse_policy("version: STSv1\nmode: testing\nmx: m\nmax_age: 5\n", "d", "i", 0).mode == "testing"
    for bad in ("version: STSv2\nmode: enforce\nmx: m\nmax_age: 1\n", "version: STSv1\nmode: strict\nmx: m\n"
                "max_age: 1\n", "version: STSv1\nmode: enforce\nmax_age: 1\n",
                "version: STSv1\nmode: enforce\nmx: m\nmax_age: 99999999999\n", "garbage"):
        with pytest.raises(PolicyError):
            parse_policy(bad, "b.test", "i", 0)
    assert parse_txt(["v=STSv1; id=20261204T1;"]) == "20261204T1"
    assert parse_txt(["v=STSv1; id=a", "v=STSv1; id=b"]) is None  # §3.1: several records, no policy
    assert parse_txt(["v=STSv1; id=not-alnum!"]) is None and parse_txt(["v=spf1 -all"]) is None


def test_cache_rules(tmp_path: Path) -> None:
    dns = FakeResolver()
    fetched: list[str] = []
    text = {"b.test": POLICY}

    async def fetch(domain: str) -> str:
        fetched.append(domain)
        if domain not in text:
            raise OSError("connection refused")
        return text[domain]

    async def run() -> None:
        cache = PolicyCache(dns, tmp_path / "sts.json", fetch=fetch)
        assert await cache.get("b.test") is None and fetched == []  # no record: no policy, no fetch
        dns.add("_mta-sts.b.test", "TXT", "v=STSv1; id=one")
        p = await cache.get("b.test")
        assert p is not None and p.mode == "enforce" and fetched == ["b.test"]
        assert await cache.get("b.test") == p and fetched == ["b.test"]  # same id: cached
        text["b.test"] = POLICY.replace("enforce", "testing")
        dns.remove("_mta-sts.b.test")
        dns.add("_mta-sts.b.test", "TXT", "v=STSv1; id=two")
        p2 = await cache.get("b.test")
        assert p2 is not None and p2.mode == "testing" and p2.id == "two"  # new id: fetched again
        # the record vanishes, DNS fails, the policy host is down: the cached policy stays in force
        dns.remove("_mta-sts.b.test")
        assert await cache.get("b.test") == p2
        dns.tempfail("_mta-sts.b.test")
        assert await cache.get("b.test") == p2
        # a restart reads the cache back from disk
        del text["b.test"]
        again = PolicyCache(dns, tmp_path / "sts.json", fetch=fetch)
        assert await again.get("b.test") == p2

    asyncio.run(run())


# -- end to end ----------------------------------------------------------------------------------------

A_IP, B_IP = "127.0.0.2", "127.0.0.3"


class Net:
    def __init__(self, tmp: Path, ca: trustme.CA, dns: DNSServer, a: Instance, b: Instance) -> None:
        self.tmp, self.ca, self.dns, self.a, self.b = tmp, ca, dns, a, b

    def b_cert(self, *names: str) -> None:
        cert = self.ca.issue_cert(*names)
        cert.private_key_pem.write_to_path(str(self.b.root / "tls" / "key.pem"))
        (self.b.root / "tls" / "cert.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))

    def b_mode(self, mode: str) -> None:
        """(Re)start b with this policy mode and publish its `_mta-sts` record as `dns records` prints it."""
        self.b.stop()
        text = self.b.config.read_text().split("\n[mta_sts]")[0]
        self.b.config.write_text(text + f'\n[mta_sts]\nmode = "{mode}"\n')
        out = self.b.cli("dns", "records", "b.test").stdout
        line = next(x for x in out.splitlines() if x.startswith("_mta-sts.b.test."))
        self.dns.remove("_mta-sts.b.test")
        self.dns.add("_mta-sts.b.test", "TXT", line.split('"')[1])
        self.b.start()

    def send(self, marker: str) -> None:
        with smtplib.SMTP(*self.a.addr("submission"), timeout=10) as s:
            s.starttls(context=self.a.client_ssl_context())
            s.login("alice@a.test", "password123")
            s.sendmail("alice@a.test", ["bob@b.test"],
                       f"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: {marker}\r\n\r\n{marker}\r\n")


def sts_net(tmp: Path, b_names: tuple[str, ...], mx_hosts: tuple[str, ...],
            prepare: Callable[[DNSServer, Instance, Instance], None] = lambda dns, a, b: None) -> Iterator[Net]:
    """a.test (alice) and b.test (bob) on their own addresses, a's DNS and outbound ports pointing at b,
    b with a certificate for `b_names` from a test CA that a trusts, and b's MTA-STS policy in enforce."""
    ca = trustme.CA()
    ca_file = tmp / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with DNSServer() as dns:
        a = Instance(tmp / "a", "a.test", address=A_IP)
        b = Instance(tmp / "b", "b.test", address=B_IP)
        dns.add("b.test", "MX", "10 mail.b.test")
        for name in mx_hosts:
            dns.add(name, "A", B_IP)
        a.add_config(f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {b.port("smtp")}\n'
                     f'https_port = {b.port("https")}\nca_file = "{ca_file}"\n')
        a.add_user("alice@a.test")
        b.add_user("bob@b.test")  # the first user: the admin, who gets postmaster@ and the report mailboxes
        prepare(dns, a, b)
        n = Net(tmp, ca, dns, a, b)
        n.b_cert(*b_names)
        try:
            a.start()
            n.b_mode("enforce")
            yield n
        finally:
            a.stop()
            b.stop()


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    yield from sts_net(tmp_path_factory.mktemp("sts"), ("mail.b.test", "mta-sts.b.test"),
                       ("mail.b.test", "mx.b.test", "mta-sts.b.test"))


def delivered(inst: Instance, marker: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(marker.encode() in m for m in inst.messages("bob@b.test")):
            return True
        time.sleep(0.05)
    return False


def deferred_with(inst: Instance, text: str, timeout: float = 20.0) -> str:
    """Wait until the queue lists bob@b.test as deferred with `text` in the last reply."""
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = inst.cli("queue", "list").stdout
        if text in out:
            return out
        time.sleep(0.1)
    raise AssertionError(f"no deferral with {text!r}:\n{out}\n{inst.log.read_text()[-3000:]}")


def test_enforce_delivers_to_a_listed_mx_over_verified_tls(net: Net) -> None:
    net.send("sts-ok")
    assert delivered(net.b, "sts-ok"), net.a.log.read_text()[-3000:]
    log = net.a.log.read_text()
    assert "mta-sts: b.test: policy" in log and "mode enforce, mx mail.b.test" in log
    got = next(m for m in net.b.messages("bob@b.test") if b"sts-ok" in m)
    assert b"(using TLSv1.3" in got


def test_enforce_defers_an_unlisted_mx(net: Net) -> None:
    net.dns.remove("b.test", "MX")
    net.dns.add("b.test", "MX", "10 mx.b.test")
    try:
        net.send("sts-wrong-mx")
        out = deferred_with(net.a, "MTA-STS: no MX host of b.test matches its policy")
        assert "bob@b.test" in out
        assert not delivered(net.b, "sts-wrong-mx", timeout=0.5)
    finally:
        net.dns.remove("b.test", "MX")
        net.dns.add("b.test", "MX", "10 mail.b.test")
    net.a.cli("queue", "delete", out.split()[0])


def test_enforce_defers_a_certificate_for_another_name_and_testing_delivers(net: Net) -> None:
    net.b_cert("other.b.test", "mta-sts.b.test")  # the policy host still verifies; the MX does not
    net.b_mode("enforce")
    net.send("sts-bad-cert")
    out = deferred_with(net.a, "certificate not verified")
    assert "4.7.5" in out or "certificate" in out
    assert not any(b"sts-bad-cert" in m for m in net.b.messages("bob@b.test"))  # never in plaintext either
    # the domain relaxes to testing (a new id): the same message now goes through, unverified
    net.b_mode("testing")
    net.a.cli("queue", "retry", "--all")
    assert delivered(net.b, "sts-bad-cert"), net.a.log.read_text()[-3000:]
    log = net.a.log.read_text()
    assert "mode testing" in log and "the testing policy would refuse this host: certificate not verified" in log
