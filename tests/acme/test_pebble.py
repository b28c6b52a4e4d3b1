"""ACME against a real ACME server: Debian's Pebble on loopback, validating through the in-process DNS
server, talking to a real `postier serve`. The certificate must reach every TLS listener (993, 465,
443) without a restart, a renewal must swap it under an open IMAP IDLE session, and a CA that fails
must leave the certificate in service alone.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.x509.oid import NameOID

from tests.dnsserver import DNSServer
from tests.harness import Instance, free_port
from tests.programs import require

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _pebble_installed() -> None:
    require("pebble")  # fails (naming the package) under POSTIER_REQUIRE_INTEROP=1, else skips

DOMAIN = "example.test"
NAMES = [f"mail.{DOMAIN}", f"mta-sts.{DOMAIN}", f"autoconfig.{DOMAIN}"]


class Pebble:
    """A Pebble process with its own API certificate (from a trustme CA) and a fresh issuing CA."""

    def __init__(self, root: Path, dns: DNSServer, http_port: int, tls_port: int):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.api_ca = trustme.CA()
        cert = self.api_ca.issue_cert("127.0.0.1", "localhost")
        cert.private_key_and_cert_chain_pem.write_to_path(str(root / "api.pem"))
        cert.private_key_pem.write_to_path(str(root / "api-key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(root / "api-cert.pem"))
        self.ca_bundle = root / "api-ca.pem"
        self.api_ca.cert_pem.write_to_path(str(self.ca_bundle))
        self.port, self.mport = free_port(), free_port()
        (root / "pebble.json").write_text(json.dumps({"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}", "managementListenAddress": f"127.0.0.1:{self.mport}",
            "certificate": str(root / "api-cert.pem"), "privateKey": str(root / "api-key.pem"),
            "httpPort": http_port, "tlsPort": tls_port, "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}))
        env = dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE="0")
        self.log = open(root / "pebble.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(["pebble", "-config", str(root / "pebble.json"), "-dnsserver", dns.nameserver],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("pebble did not start: " + (root / "pebble.log").read_text()) from None
                time.sleep(0.05)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def root_pem(self) -> str:
        """The issuing CA's root, from Pebble's management interface (regenerated at each start)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_bundle))
        with socket.create_connection(("127.0.0.1", self.mport), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(b"GET /roots/0 HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        for n in NAMES:
            server.add(n, "A", "127.0.0.1")
        yield server


def start(tmp_path: Path, dns: DNSServer, challenge: str) -> tuple[Instance, Pebble]:
    inst = Instance(tmp_path / "postier", DOMAIN)
    pebble = Pebble(tmp_path / "pebble", dns, inst.port("http"), inst.port("https"))
    inst.add_config(f'[acme]\nenabled = true\ndirectory = "{pebble.directory}"\nemail = "admin@{DOMAIN}"\n'
                    f'ca_bundle = "{pebble.ca_bundle}"\nchallenge = "{challenge}"\nretry_initial = 1.0\n')
    inst.start()
    return inst, pebble


def peer_cert(inst: Instance, role: str) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", inst.port(role)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=f"mail.{DOMAIN}") as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def issuer_cn(cert: x509.Certificate) -> str:
    return str(cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def wait_for_issuer(inst: Instance, role: str, fragment: str, timeout: float = 90) -> x509.Certificate:
    deadline = time.monotonic() + timeout
    while True:
        cert = peer_cert(inst, role)
        if fragment in issuer_cn(cert):
            return cert
        if time.monotonic() > deadline:
            raise AssertionError(f"no certificate from {fragment!r} on {role}: {issuer_cn(cert)}\n"
                                 + inst.log.read_text()[-3000:])
        time.sleep(0.2)


def verified(inst: Instance, role: str, root_pem: str, name: str) -> x509.Certificate:
    """A full verification (chain to Pebble's root, name) of what the listener serves."""
    ctx = ssl.create_default_context(cadata=root_pem)
    with socket.create_connection(("127.0.0.1", inst.port(role)), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname=name) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_http01_issues_renews_live_and_survives_a_failing_ca(tmp_path: Path, dns: DNSServer) -> None:
    inst, pebble = start(tmp_path, dns, "http-01")
    try:
        first = wait_for_issuer(inst, "https", "Pebble")
        root = pebble.root_pem()
        for role in ("imaps", "submissions", "https", "pop3s"):
            cert = verified(inst, role, root, f"mail.{DOMAIN}")
            assert cert.serial_number == first.serial_number, role
        verified(inst, "https", root, f"mta-sts.{DOMAIN}")  # every name is on it
        san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sorted(san.get_values_for_type(x509.DNSName)) == sorted(NAMES)
        acme_dir = inst.root / "acme"
        assert acme_dir.stat().st_mode & 0o777 == 0o700
        for f in ("account.key", "key.pem", "cert.pem", "state.json"):
            assert (acme_dir / f).stat().st_mode & 0o777 == 0o600, f
        status = inst.cli("cert", "status").stdout
        assert "(ACME)" in status and "Pebble" in status and "mta-sts.example.test" in status

        # an IMAP IDLE session opened on the first certificate stays up through the renewal
        ctx = ssl.create_default_context(cadata=root)
        idle = ctx.wrap_socket(socket.create_connection(("127.0.0.1", inst.port("imaps")), timeout=10),
                               server_hostname=f"mail.{DOMAIN}")
        inst.add_user(f"alice@{DOMAIN}", "alice-password")
        f = idle.makefile("rb")
        assert f.readline().startswith(b"* OK")
        idle.sendall(b"a LOGIN alice@example.test alice-password\r\n")
        while not (line := f.readline()).startswith(b"a "):
            pass
        assert line.startswith(b"a OK"), line
        idle.sendall(b"b SELECT INBOX\r\n")
        while not (line := f.readline()).startswith(b"b "):
            pass
        idle.sendall(b"c IDLE\r\n")
        assert f.readline().startswith(b"+")

        r = inst.cli("cert", "renew", "--wait", "90")
        assert "renewed" in r.stdout
        second = verified(inst, "imaps", root, f"mail.{DOMAIN}")
        assert second.serial_number != first.serial_number
        assert second.public_key() == first.public_key()  # the key is kept (stable TLSA 3 1 1)
        for role in ("submissions", "https"):
            assert verified(inst, role, root, f"mail.{DOMAIN}").serial_number == second.serial_number

        idle.sendall(b"DONE\r\n")
        while not (line := f.readline()).startswith(b"c "):
            pass
        assert line.startswith(b"c OK"), line
        old = x509.load_der_x509_certificate(idle.getpeercert(binary_form=True) or b"")
        assert old.serial_number == first.serial_number  # the open session kept its certificate
        idle.close()

        # the CA refuses (a name no longer validates): the error is reported, the certificate stays
        dns.remove(f"mta-sts.{DOMAIN}")
        r = inst.cli("cert", "renew", "--wait", "90", check=False)
        assert r.returncode == 1 and "renewal failed" in r.stderr and "mta-sts.example.test" in r.stderr, r.stderr
        assert verified(inst, "imaps", root, f"mail.{DOMAIN}").serial_number == second.serial_number
        dns.add(f"mta-sts.{DOMAIN}", "A", "127.0.0.1")

        # the CA goes away: renewal fails, is reported, and the certificate in service stays
        pebble.stop()
        r = inst.cli("cert", "renew", "--wait", "60", check=False)
        assert r.returncode == 1 and "renewal failed" in r.stderr and "stays" in r.stderr
        assert verified(inst, "imaps", root, f"mail.{DOMAIN}").serial_number == second.serial_number
        status = inst.cli("cert", "status", check=False)
        assert status.returncode == 1 and "last error" in status.stdout and "(ACME)" in status.stdout
        log = inst.log.read_text()
        assert "acme: certificate for" in log and "failed (attempt 2" in log

        # a restart serves the issued certificate at once, not the self-signed fallback
        inst.stop()
        inst.start()
        assert verified(inst, "https", root, f"mail.{DOMAIN}").serial_number == second.serial_number
    finally:
        inst.stop()
        pebble.stop()


def test_tls_alpn01(tmp_path: Path, dns: DNSServer) -> None:
    inst, pebble = start(tmp_path, dns, "tls-alpn-01")
    try:
        first = wait_for_issuer(inst, "https", "Pebble")
        root = pebble.root_pem()
        for role in ("imaps", "submissions", "https"):
            assert verified(inst, role, root, f"mail.{DOMAIN}").serial_number == first.serial_number
        assert "challenge = \"tls-alpn-01\"" in inst.config.read_text()
    finally:
        inst.stop()
        pebble.stop()


def test_hostname_first_when_a_domain_name_does_not_validate_yet(tmp_path: Path, dns: DNSServer) -> None:
    """A domain whose autoconfig name is not in DNS yet must not keep the mail host on self-signed."""
    dns.remove(f"autoconfig.{DOMAIN}")
    inst, pebble = start(tmp_path, dns, "http-01")
    try:
        first = wait_for_issuer(inst, "imaps", "Pebble")
        san = first.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [f"mail.{DOMAIN}"]
        status = inst.cli("cert", "status", check=False)
        assert status.returncode == 1 and "last error" in status.stdout and f"autoconfig.{DOMAIN}" in status.stdout
        assert f"acme: certificate for mail.{DOMAIN} installed" in inst.log.read_text()
        dns.add(f"autoconfig.{DOMAIN}", "A", "127.0.0.1")  # the admin publishes the record
        assert "renewed" in inst.cli("cert", "renew", "--wait", "90").stdout
        full = verified(inst, "https", pebble.root_pem(), f"autoconfig.{DOMAIN}")
        assert sorted(full.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                      .get_values_for_type(x509.DNSName)) == sorted(NAMES)
    finally:
        inst.stop()
        pebble.stop()
