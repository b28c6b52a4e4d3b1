"""Two postier instances and the test DNS server publishing what `postier dns records` printed.

a.test runs on 127.0.0.2, b.test on 127.0.0.3. Mail from a.test to b.test must arrive with
spf=pass dkim=pass dmarc=pass, both through a.test's own queue and injected straight into b.test's
port 25 from 127.0.0.2 with a signature made by a.test's key; forged mail claiming a.test from
another address is refused under p=reject and goes to Junk under p=quarantine.
"""

from __future__ import annotations

import asyncio
import smtplib
import time
from collections.abc import Iterator

import pytest

from postier.mailauth.keys import DKIMSigner, KeyStore
from postier.mailauth.reports import ReportStore, build_reports, report_message
from tests.deliverability.common import load_zone
from tests.dnsserver import DNSServer
from tests.harness import Instance

pytestmark = pytest.mark.timeout(120)


def wait_messages(inst: Instance, address: str, n: int, folder: str = "", timeout: float = 20) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        msgs = inst.messages(address, folder)
        if len(msgs) >= n or time.monotonic() > deadline:
            return msgs
        time.sleep(0.05)


def auth_results(message: bytes) -> str:
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    fields = head.replace("\r\n\t", " ").replace("\r\n ", " ").split("\r\n")
    return " ".join(f for f in fields if f.lower().startswith("authentication-results: mail.b.test"))


class World:
    def __init__(self, dns: DNSServer, a: Instance, b: Instance):
        self.dns, self.a, self.b = dns, a, b

    def set_policy(self, policy: str) -> None:
        self.dns.remove("_dmarc.a.test", "TXT")
        self.dns.add("_dmarc.a.test", "TXT", f"v=DMARC1; p={policy}; rua=mailto:dmarc-reports@a.test")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with DNSServer() as dns:
        common = f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 2.0\n'
        b = Instance(tmp_path_factory.mktemp("b"), "b.test", address="127.0.0.3", extra_config=common)
        a = Instance(tmp_path_factory.mktemp("a"), "a.test", address="127.0.0.2",
                     extra_config=common + f'[outbound]\nsmtp_port = {b.port("smtp")}\nsource_address = "127.0.0.2"\n'
                     '[mailauth]\ndmarc_policy = "reject"\n[auth]\nallow_plaintext = true\n')
        a.add_user("alice@a.test")
        a.cli("alias", "add", "dmarc-reports@a.test", "alice@a.test")
        b.add_user("bob@b.test")
        a.cli("dkim", "generate", "a.test")
        a.cli("dkim", "generate", "a.test", "--algorithm", "ed25519")
        b.cli("dkim", "generate", "b.test", "--algorithm", "ed25519")
        for inst, ip in ((a, "127.0.0.2"), (b, "127.0.0.3")):
            zone = inst.cli("dns", "records", inst.domain, "--address", ip).stdout
            load_zone(dns, zone)
        a.start()
        b.start()
        try:
            yield World(dns, a, b)
        finally:
            a.stop()
            b.stop()


MESSAGE = ("From: Alice <alice@a.test>\r\nTo: Bob <bob@b.test>\r\nSubject: {subject}\r\n"
           "Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@a.test>\r\n\r\nHello Bob.\r\n")


def test_through_the_queue_all_pass(world: World) -> None:
    a, b = world.a, world.b
    before = len(b.messages("bob@b.test"))
    with smtplib.SMTP(*a.addr("submission"), timeout=30) as s:
        s.starttls(context=a.client_ssl_context())
        s.login("alice@a.test", "password123")
        s.sendmail("alice@a.test", ["bob@b.test"], MESSAGE.format(subject="queued").encode())
    msgs = wait_messages(b, "bob@b.test", before + 1)
    assert len(msgs) == before + 1, (a.log.read_text()[-3000:], b.log.read_text()[-3000:])
    got = next(m for m in msgs if b"Subject: queued" in m)
    ar = auth_results(got)
    assert "spf=pass smtp.mailfrom=alice@a.test" in ar, ar
    assert "dkim=pass header.d=a.test header.a=rsa-sha256 header.s=p20" in ar, ar
    assert "dkim=pass header.d=a.test header.a=ed25519-sha256 header.s=e20" in ar, ar
    assert "dmarc=pass" in ar and "header.from=a.test" in ar, ar


def test_injected_with_a_test_signature_all_pass(world: World) -> None:
    a, b = world.a, world.b
    world.set_policy("reject")
    before = len(b.messages("bob@b.test"))
    forged_ar = "Authentication-Results: mail.b.test; dkim=pass header.d=evil.test\r\n"
    msg = MESSAGE.format(subject="injected").encode()
    signature = asyncio.run(DKIMSigner(KeyStore(a.root / "dkim")).sign_bytes(msg))
    assert signature.count(b"DKIM-Signature:") == 2
    with smtplib.SMTP(*b.addr("smtp"), local_hostname="mail.a.test", source_address=("127.0.0.2", 0),
                      timeout=30) as s:
        s.sendmail("alice@a.test", ["bob@b.test"], forged_ar.encode() + signature + msg)
    msgs = wait_messages(b, "bob@b.test", before + 1)
    got = next(m for m in msgs if b"Subject: injected" in m)
    ar = auth_results(got)
    assert "spf=pass" in ar and "dkim=pass header.d=a.test" in ar and "dmarc=pass" in ar, ar
    assert b"evil.test" not in got  # the forged header claiming b's authserv-id is gone


def _forge(world: World, subject: str) -> None:
    with smtplib.SMTP(*world.b.addr("smtp"), local_hostname="evil.test", source_address=("127.0.0.4", 0),
                      timeout=30) as s:
        s.sendmail("ceo@evil.test", ["bob@b.test"], MESSAGE.format(subject=subject).encode())


def test_forged_refused_with_reject_and_junked_with_quarantine(world: World) -> None:
    b = world.b
    world.set_policy("reject")
    with pytest.raises(smtplib.SMTPDataError) as exc:
        _forge(world, "forged1")
    assert exc.value.smtp_code == 550 and b"5.7.1" in exc.value.smtp_error
    assert not any(b"forged1" in m for m in b.messages("bob@b.test") + b.messages("bob@b.test", "Junk"))

    world.set_policy("quarantine")
    try:
        _forge(world, "forged2")
        junk = wait_messages(b, "bob@b.test", 1, "Junk")
        got = next(m for m in junk if b"Subject: forged2" in m)
        assert "dmarc=fail" in auth_results(got)
        assert not any(b"forged2" in m for m in b.messages("bob@b.test"))
    finally:
        world.set_policy("reject")


def test_aggregate_report_from_b_reaches_a(world: World) -> None:
    """b.test records its verdicts on a.test mail, reports them to a.test's rua; a.test reads the report."""
    a, b = world.a, world.b
    world.set_policy("reject")
    msg = MESSAGE.format(subject="for-report").encode()
    signature = asyncio.run(DKIMSigner(KeyStore(a.root / "dkim")).sign_bytes(msg))
    with smtplib.SMTP(*b.addr("smtp"), local_hostname="mail.a.test", source_address=("127.0.0.2", 0),
                      timeout=30) as s:
        s.sendmail("alice@a.test", ["bob@b.test"], signature + msg)
    with pytest.raises(smtplib.SMTPDataError):
        _forge(world, "for-report-forged")

    store = ReportStore(b.root / "dmarc.sqlite")
    try:
        pending = [(i, ev) for i, ev in store.pending(time.time() + 1) if ev.policy.domain == "a.test" and ev.policy.p == "reject"]
    finally:
        store.close()
    [out] = build_reports(pending, org_name="mail.b.test", email="postmaster@b.test", submitter="mail.b.test",
                          end=int(time.time()) + 1)
    assert {(r.source_ip, r.disposition) for r in out.report.rows} >= {("127.0.0.2", "none"), ("127.0.0.4", "reject")}
    assert out.rua == ("mailto:dmarc-reports@a.test",)
    report = report_message(out, "postmaster@b.test", "dmarc-reports@a.test")
    signature = asyncio.run(DKIMSigner(KeyStore(b.root / "dkim")).sign_bytes(report))
    assert signature
    with smtplib.SMTP(*a.addr("smtp"), local_hostname="mail.b.test", source_address=("127.0.0.3", 0),
                      timeout=30) as s:
        s.sendmail("postmaster@b.test", ["dmarc-reports@a.test"], signature + report)
    shown = ""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        shown = a.cli("dmarc", "reports", "a.test").stdout
        if out.report.report_id in shown:
            break
        time.sleep(0.2)
    assert f"report {out.report.report_id} from mail.b.test" in shown, (shown, a.log.read_text()[-2000:])
    assert "(sender not authenticated)" not in shown
    assert "failing source 127.0.0.4" in shown
