"""DANE for outbound SMTP (RFC 7672): TLSA matching without sockets, then two real instances with the
in-process DNS server setting the AD bit: a matching TLSA delivers, a mismatching one defers, and
without the AD bit the same mismatching record is ignored (opportunistic TLS, as before)."""

from __future__ import annotations

import hashlib
import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postier.queue.dane import match_chain, usable
from postier.resolver import TLSARecord
from tests.dnsserver import DNSServer
from tests.harness import Instance


def der(pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)


def spki(cert_der: bytes) -> bytes:
    return x509.load_der_x509_certificate(cert_der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_match_chain() -> None:
    ca, other_ca = trustme.CA(), trustme.CA()
    leaf = der(ca.issue_cert("mail.b.test").cert_chain_pems[0].bytes())
    root = der(ca.cert_pem.bytes())
    chain = [leaf, root]  # RFC 7672 §3.1.2: a DANE-TA server sends its trust anchor too
    ok = [TLSARecord(3, 1, 1, hashlib.sha256(spki(leaf)).digest()), TLSARecord(3, 0, 1, hashlib.sha256(leaf).digest()),
          TLSARecord(3, 1, 2, hashlib.sha512(spki(leaf)).digest()), TLSARecord(3, 1, 0, spki(leaf)),
          TLSARecord(2, 0, 1, hashlib.sha256(root).digest()), TLSARecord(2, 1, 1, hashlib.sha256(spki(root)).digest())]
    for rec in ok:
        assert match_chain(chain, [rec], "mail.b.test")[0], rec
    # DANE-EE ignores names (RFC 7672 §3.1.1); DANE-TA checks the MX host name (§3.2.3)
    assert match_chain(chain, [ok[0]], "elsewhere.test")[0]
    assert not match_chain(chain, [ok[4]], "elsewhere.test")[0]
    other_root = der(other_ca.cert_pem.bytes())
    assert not match_chain(chain, [TLSARecord(2, 0, 1, hashlib.sha256(other_root).digest())], "mail.b.test")[0]
    assert not match_chain(chain, [TLSARecord(3, 1, 1, b"\0" * 32)], "mail.b.test")[0]
    # PKIX-TA/PKIX-EE are not usable for SMTP (§3.1.3)
    assert usable([TLSARecord(1, 1, 1, b"x"), TLSARecord(0, 0, 1, b"y"), TLSARecord(3, 1, 3, b"z")]) == []
    assert not match_chain(chain, [TLSARecord(1, 1, 1, hashlib.sha256(spki(leaf)).digest())], "mail.b.test")[0]


# -- end to end ----------------------------------------------------------------------------------------

class Net:
    def __init__(self, dns: DNSServer, a: Instance, b: Instance) -> None:
        self.dns, self.a, self.b = dns, a, b

    @property
    def tlsa_name(self) -> str:
        return f"_{self.b.port('smtp')}._tcp.mail.b.test"

    def b_digest(self) -> str:
        pem = (self.b.root / "tls" / "cert.pem").read_bytes()
        return hashlib.sha256(spki(der(pem))).hexdigest()

    def publish(self, value: str, secure: bool) -> None:
        self.dns.remove(self.tlsa_name)
        self.dns.add(self.tlsa_name, "TLSA", value)
        for name in ("b.test", "mail.b.test", self.tlsa_name):
            self.dns.secure(name, secure)

    def send(self, marker: str) -> None:
        with smtplib.SMTP(*self.a.addr("submission"), timeout=10) as s:
            s.starttls(context=self.a.client_ssl_context())
            s.login("alice@a.test", "password123")
            s.sendmail("alice@a.test", ["bob@b.test"],
                       f"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: {marker}\r\n\r\n{marker}\r\n")

    def delivered(self, marker: str, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(marker.encode() in m for m in self.b.messages("bob@b.test")):
                return True
            time.sleep(0.05)
        return False


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    tmp: Path = tmp_path_factory.mktemp("dane")
    with DNSServer() as dns:
        a = Instance(tmp / "a", "a.test", address="127.0.0.2")
        b = Instance(tmp / "b", "b.test", address="127.0.0.3")
        dns.add("b.test", "MX", "10 mail.b.test")
        dns.add("mail.b.test", "A", "127.0.0.3")
        a.add_config(f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {b.port("smtp")}\n')
        a.add_user("alice@a.test")
        b.add_user("bob@b.test")
        try:
            a.start()
            b.start()
            yield Net(dns, a, b)
        finally:
            a.stop()
            b.stop()


def test_matching_tlsa_delivers_with_dane(net: Net) -> None:
    net.publish(f"3 1 1 {net.b_digest()}", secure=True)
    net.send("dane-ok")
    assert net.delivered("dane-ok"), net.a.log.read_text()[-3000:]
    assert "verified" in net.a.log.read_text().split("dane-ok")[0] or " verified" in net.a.log.read_text()


def test_mismatching_tlsa_defers_and_without_ad_it_is_ignored(net: Net) -> None:
    net.publish("3 1 1 " + "00" * 32, secure=True)
    net.send("dane-bad")
    deadline = time.monotonic() + 20
    out = ""
    while time.monotonic() < deadline and "DANE" not in out:
        out = net.a.cli("queue", "list").stdout
        time.sleep(0.1)
    assert "DANE: no TLSA record matches the certificate" in out, out + net.a.log.read_text()[-3000:]
    assert not net.delivered("dane-bad", timeout=0.2)
    # the same records, no AD bit: DANE does not apply, opportunistic TLS delivers
    net.publish("3 1 1 " + "00" * 32, secure=False)
    net.a.stop()  # a fresh resolver cache: the answers cached with the AD bit are gone
    net.a.start()
    net.a.cli("queue", "retry", "--all")
    assert net.delivered("dane-bad"), net.a.log.read_text()[-3000:]
