"""End to end: real postier processes for a.test (127.0.0.2) and b.test (127.0.0.3), an in-process
DNS server with their MX records, certificates from a throwaway CA. Users submit on 587 (STARTTLS)
and 465 (implicit TLS); the queue routes by MX to the other side's port 25 with verified STARTTLS.
A third instance, c.test (127.0.0.4), sends everything through b.test's submission port (smarthost)."""

from __future__ import annotations

import smtplib
import ssl
import time
from collections.abc import Iterator

import pytest
import trustme

from tests.dnsserver import DNSServer
from tests.harness import Instance

PASSWORD = "password123"
ADDRS = {"a.test": "127.0.0.2", "b.test": "127.0.0.3", "c.test": "127.0.0.4"}


class Net:
    def __init__(self, ca: trustme.CA, dns: DNSServer, insts: dict[str, Instance]) -> None:
        self.ca, self.dns, self.insts = ca, dns, insts

    def ctx(self) -> ssl.SSLContext:
        c = ssl.create_default_context()
        self.ca.configure_trust(c)
        c.check_hostname = False  # the test connects by IP address
        return c


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    ca = trustme.CA()
    ca_file = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    with DNSServer() as dns:
        insts: dict[str, Instance] = {}
        for domain, ip in ADDRS.items():
            inst = Instance(tmp_path_factory.mktemp(domain.split(".")[0]), domain, address=ip)
            cert = ca.issue_cert(inst.hostname)
            cert.private_key_pem.write_to_path(str(inst.root / "tls" / "key.pem"))
            (inst.root / "tls" / "cert.pem").write_bytes(b"".join(p.bytes() for p in cert.cert_chain_pems))
            dns.add(domain, "MX", f"10 {inst.hostname}")
            dns.add(inst.hostname, "A", ip)
            insts[domain] = inst
        a, b, c = insts["a.test"], insts["b.test"], insts["c.test"]
        # each side reaches the other's MX port; real deployments all use 25
        common = f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
        a.add_config(common + f"[outbound]\nsmtp_port = {b.port('smtp')}\nca_file = \"{ca_file}\"\n"
                     "tls_policy = \"verify\"\n")
        b.add_config(common + f"[outbound]\nsmtp_port = {a.port('smtp')}\nca_file = \"{ca_file}\"\n"
                     "[submission]\nsender_policy = \"any\"\n")
        (c.root / "relay.pw").write_text("relay-password\n")
        c.add_config(common + f"[outbound]\nca_file = \"{ca_file}\"\n"
                     f"[relay]\nhost = \"{b.hostname}\"\nport = {b.port('submission')}\nusername = \"relay@b.test\"\n"
                     "password_file = \"relay.pw\"\n")
        a.add_user("alice@a.test", PASSWORD)
        b.add_user("bob@b.test", PASSWORD)
        b.add_user("relay@b.test", "relay-password")
        c.add_user("carol@c.test", PASSWORD)
        try:
            for inst in insts.values():
                inst.start()
            yield Net(ca, dns, insts)
        finally:
            for inst in insts.values():
                inst.stop()




def message(sender: str, to: str, marker: str) -> bytes:
    return f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {marker}\r\n\r\nHello from {sender}.\r\n".encode()


def test_a_to_b_over_587_with_starttls(net: Net) -> None:
    a, b = net.insts["a.test"], net.insts["b.test"]
    marker = f"a-to-b-{time.monotonic_ns()}"
    t0 = time.monotonic()
    with smtplib.SMTP(*a.addr("submission"), timeout=10) as s:
        s.ehlo("laptop.a.test")
        s.starttls(context=net.ctx())
        s.login("alice@a.test", PASSWORD)
        assert s.sendmail("alice@a.test", ["bob@b.test"], message("alice@a.test", "bob@b.test", marker)) == {}
    got = b.wait_message("bob@b.test", marker.encode())
    elapsed = time.monotonic() - t0
    assert got.startswith(b"Return-Path: <alice@a.test>\r\n")
    # b's MX saw a's queue connect from 127.0.0.2 (the source address) over TLS
    assert b"Received: from mail.a.test ([127.0.0.2])" in got and b"(using TLSv1.3" in got
    assert b"with ESMTPSA id" in got  # the submission hop's Received, written by a
    assert b"Message-ID: <" in got and b"Date: " in got
    log = a.log.read_text()
    assert "connected, TLS TLSv1.3" in log and " verified" in log
    assert elapsed < 10


def test_b_to_a_over_465(net: Net) -> None:
    a, b = net.insts["a.test"], net.insts["b.test"]
    marker = f"b-to-a-{time.monotonic_ns()}"
    with smtplib.SMTP_SSL(*b.addr("submissions"), context=net.ctx(), timeout=10) as s:
        s.login("bob@b.test", PASSWORD)
        s.sendmail("bob@b.test", ["alice@a.test"], message("bob@b.test", "alice@a.test", marker))
    got = a.wait_message("alice@a.test", marker.encode())
    assert b"Received: from mail.b.test ([127.0.0.3])" in got


def test_unknown_remote_user_bounces_to_sender(net: Net) -> None:
    a = net.insts["a.test"]
    marker = f"bounce-{time.monotonic_ns()}"
    with smtplib.SMTP_SSL(*a.addr("submissions"), context=net.ctx(), timeout=10) as s:
        s.login("alice@a.test", PASSWORD)
        s.sendmail("alice@a.test", ["bob@b.test", "nobody@b.test"], message("alice@a.test", "bob@b.test", marker))
    net.insts["b.test"].wait_message("bob@b.test", marker.encode())
    dsn = a.wait_message("alice@a.test", b"Final-Recipient: rfc822; nobody@b.test")
    assert marker.encode() in dsn  # the original headers
    assert b"Status: 5.1.1" in dsn and b"Remote-MTA: dns; mail.b.test" in dsn
    assert b"bob@b.test\r\nAction" not in dsn  # only the failed recipient


def test_c_relays_through_b_smarthost(net: Net) -> None:
    a, b, c = net.insts["a.test"], net.insts["b.test"], net.insts["c.test"]
    marker = f"via-smarthost-{time.monotonic_ns()}"
    with smtplib.SMTP(*c.addr("submission"), timeout=10) as s:
        s.starttls(context=net.ctx())
        s.login("carol@c.test", PASSWORD)
        s.sendmail("carol@c.test", ["alice@a.test"], message("carol@c.test", "alice@a.test", marker))
    got = a.wait_message("alice@a.test", marker.encode())
    assert b"by mail.b.test (postier) with ESMTPSA" in got  # c -> b authenticated (relay@b.test)
    assert b"Received: from mail.b.test ([127.0.0.3])" in got  # b -> a by MX
    assert "authenticated as relay@b.test" in b.log.read_text()


def test_queue_is_empty_afterwards(net: Net) -> None:
    for inst in net.insts.values():
        deadline = time.monotonic() + 10
        while "-- 0 messages" not in (out := inst.cli("queue", "list").stdout) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "-- 0 messages in the queue" in out, out
