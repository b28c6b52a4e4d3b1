"""`dns records` and `dns check` for the client and transport-security records: SRV (RFC 6186/8314), the
web host names, `_mta-sts` (RFC 8461) and `_smtp._tls` (RFC 8460), against the in-process DNS server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from postier.certs import write_self_signed
from postier.cli import main
from tests.deliverability.common import load_zone
from tests.dnsserver import DNSServer

PORTS = {"smtp": 2525, "submissions": 2465, "submission": 2587, "imaps": 2993, "imap": 2143, "pop3s": 2995,
         "http": 2080, "https": 2443}


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


def write_config(tmp_path: Path, dns: DNSServer, extra: str = "") -> Path:
    if not (tmp_path / "cert.pem").exists():
        write_self_signed(tmp_path / "cert.pem", tmp_path / "key.pem", ["mail.a.test"])
    text = (f'hostname = "mail.a.test"\ndata_dir = "."\n[tls]\ncert = "cert.pem"\nkey = "key.pem"\n'
            f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 1.0\n[mailauth]\ndnsbl = []\n{extra}\n')
    for role, port in PORTS.items():
        text += f'[listeners.{role}]\naddress = "127.0.0.2"\nport = {port}\n'
    path = tmp_path / "postier.toml"
    path.write_text(text)
    return path


def cli(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["--config", str(config), *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_records_and_check(tmp_path: Path, dns: DNSServer, capsys: pytest.CaptureFixture[str]) -> None:
    dns.clear()
    config = write_config(tmp_path, dns)
    assert cli(config, capsys, "dkim", "generate", "a.test", "--algorithm", "ed25519")[0] == 0
    rc, zone = cli(config, capsys, "dns", "records", "a.test", "--address", "127.0.0.2")
    assert rc == 0
    for line in ("_submissions._tcp.a.test.\t3600\tIN\tSRV\t0 1 2465 mail.a.test.",
                 "_submission._tcp.a.test.\t3600\tIN\tSRV\t10 1 2587 mail.a.test.",
                 "_imaps._tcp.a.test.\t3600\tIN\tSRV\t0 1 2993 mail.a.test.",
                 "_imap._tcp.a.test.\t3600\tIN\tSRV\t10 1 2143 mail.a.test.",
                 "_pop3s._tcp.a.test.\t3600\tIN\tSRV\t20 1 2995 mail.a.test.",
                 "_pop3._tcp.a.test.\t3600\tIN\tSRV\t0 0 0 .",  # no pop3 listener: "not offered"
                 "_autodiscover._tcp.a.test.\t3600\tIN\tSRV\t0 1 2443 mail.a.test.",
                 "mta-sts.a.test.\t3600\tIN\tCNAME\tmail.a.test.",
                 "autoconfig.a.test.\t3600\tIN\tCNAME\tmail.a.test.",
                 "autodiscover.a.test.\t3600\tIN\tCNAME\tmail.a.test.",
                 '_smtp._tls.a.test.\t3600\tIN\tTXT\t"v=TLSRPTv1; rua=mailto:tls-reports@a.test"'):
        assert line in zone, zone
    tlsa = [line for line in zone.splitlines() if "\tTLSA\t" in line]
    assert len(tlsa) == 1 and tlsa[0].startswith("_2525._tcp.mail.a.test.\t3600\tIN\tTLSA\t3 1 1 ")
    cert = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert tlsa[0].endswith(hashlib.sha256(spki).hexdigest())
    sts = next(line for line in zone.splitlines() if line.startswith("_mta-sts.a.test."))
    assert '"v=STSv1; id=' in sts
    load_zone(dns, zone)
    rc, out = cli(config, capsys, "dns", "check", "a.test", "--address", "127.0.0.2")
    assert rc == 0 and "0 problem(s)" in out, out
    assert "OK       MTASTS _mta-sts.a.test: mode testing" in out
    assert "OK       SRV    _imaps._tcp.a.test: mail.a.test:2993" in out
    assert "OK       WEB    mta-sts.a.test" in out
    assert "OK       TLSA   _2525._tcp.mail.a.test: 3 1 1 for the key in service" in out

    # the policy changes (enforce): the published id is now stale, and check says so
    config = write_config(tmp_path, dns, "[mta_sts]\nmode = \"enforce\"\n")
    rc, out = cli(config, capsys, "dns", "check", "a.test", "--address", "127.0.0.2")
    assert rc == 1 and "WRONG    MTASTS _mta-sts.a.test" in out and "1 problem(s)" in out, out

    # a missing SRV, an SRV on the wrong port, one for a service we do not run, a missing web name
    dns.remove("_imaps._tcp.a.test", "SRV")
    dns.remove("_submissions._tcp.a.test", "SRV")
    dns.add("_submissions._tcp.a.test", "SRV", "0 1 465 mail.a.test.")
    dns.remove("_pop3._tcp.a.test", "SRV")
    dns.add("_pop3._tcp.a.test", "SRV", "0 1 110 mail.a.test.")
    dns.remove("autoconfig.a.test")
    dns.remove("_smtp._tls.a.test")
    rc, out = cli(config, capsys, "dns", "check", "a.test", "--address", "127.0.0.2")
    assert rc == 1
    assert "MISSING  SRV    _imaps._tcp.a.test: no SRV record" in out
    assert "WRONG    SRV    _submissions._tcp.a.test: mail.a.test:465" in out
    assert "WRONG    SRV    _pop3._tcp.a.test: points at a service we do not offer" in out
    assert "MISSING  WEB    autoconfig.a.test: does not resolve" in out
    assert "MISSING  TLSRPT _smtp._tls.a.test: no TLS-RPT record" in out


def test_tlsa_lists_the_next_acme_key_before_the_switch(tmp_path: Path, dns: DNSServer,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    dns.clear()
    config = write_config(tmp_path, dns, '[acme]\nenabled = true\nemail = "a@a.test"\n')
    rc, zone = cli(config, capsys, "dns", "records", "a.test")
    tlsa = [line.rsplit("\t", 1)[1] for line in zone.splitlines() if "\tTLSA\t" in line]
    assert len(tlsa) == 2 and tlsa[0] != tlsa[1]  # the self-signed key in service, then the ACME key
    assert (tmp_path / "acme" / "key.pem").stat().st_mode & 0o777 == 0o600
    rc2, zone2 = cli(config, capsys, "dns", "records", "a.test")
    assert [line.rsplit("\t", 1)[1] for line in zone2.splitlines() if "\tTLSA\t" in line] == tlsa  # stable
    dns.add("_2525._tcp.mail.a.test", "TLSA", tlsa[0])  # only the current key is published
    rc, out = cli(config, capsys, "dns", "check", "a.test", "--address", "127.0.0.2")
    assert "OK       TLSA   _2525._tcp.mail.a.test: 3 1 1 for the key in service" in out
    assert "WRONG    TLSA   _2525._tcp.mail.a.test: no 3 1 1 record for the ACME key" in out
