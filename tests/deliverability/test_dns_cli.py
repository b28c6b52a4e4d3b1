"""`postier dkim`, `postier dns records|check` and `postier dmarc reports` against the test DNS server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.cli import main
from postier.mailauth.reports import AggregateReport, PolicyPublished, ReportRow, ReportStore
from tests.deliverability.common import load_zone
from tests.dnsserver import DNSServer


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        yield server


@pytest.fixture
def config(tmp_path: Path, dns: DNSServer) -> Path:
    path = tmp_path / "postier.toml"
    path.write_text(f'hostname = "mail.a.test"\ndata_dir = "."\n[listeners.smtp]\naddress = "127.0.0.2"\n'
                    f'port = 2525\n[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 1.0\n'
                    f'[mailauth]\ndnsbl = ["bl.test"]\ndmarc_policy = "reject"\n')
    return path


def cli(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = main(["--config", str(config), *args])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_records_check_missing_wrong_listed(config: Path, dns: DNSServer, capsys: pytest.CaptureFixture[str]) -> None:
    dns.clear()
    assert cli(config, capsys, "dkim", "generate", "a.test", "--bits", "1024")[0] == 0
    rc, out = cli(config, capsys, "dkim", "generate", "a.test", "--algorithm", "ed25519", "--selector", "ed1")
    assert rc == 0 and "ed1._domainkey.a.test.\t3600\tIN\tTXT\t\"v=DKIM1; k=ed25519; p=" in out
    rc, zone = cli(config, capsys, "dns", "records", "a.test", "--address", "127.0.0.2")
    assert rc == 0
    for line in ("a.test.\t3600\tIN\tMX\t10 mail.a.test.", "mail.a.test.\t3600\tIN\tA\t127.0.0.2",
                 'a.test.\t3600\tIN\tTXT\t"v=spf1 mx ~all"',
                 '_dmarc.a.test.\t3600\tIN\tTXT\t"v=DMARC1; p=reject; rua=mailto:dmarc-reports@a.test"',
                 "2.0.0.127.in-addr.arpa.\t3600\tIN\tPTR\tmail.a.test."):
        assert line in zone, zone
    assert load_zone(dns, zone) == 16  # MX, A, 2 SPF, 2 DKIM, DMARC, TLS-RPT, 7 SRV (none offered), PTR

    rc, out = cli(config, capsys, "dns", "check", "a.test", "--address", "127.0.0.2")
    assert rc == 0, out
    assert "0 problem(s)" in out and "forward-confirmed" in out and "127.0.0.2 not listed" in out
    rc, out = cli(config, capsys, "dns", "check", "a.test")  # the address from the DNS
    assert rc == 0, out

    # one record missing, one wrong: both named, exit code 1
    rsa = next(line.split()[0] for line in zone.splitlines() if line.startswith("p2026"))
    dns.remove(rsa, "TXT")
    dns.remove("a.test", "TXT")
    dns.add("a.test", "TXT", "v=spf1 ip4:192.0.2.99 -all")
    rc, out = cli(config, capsys, "dns", "check", "a.test", "--address", "127.0.0.2")
    assert rc == 1
    assert f"MISSING  DKIM   {rsa.rstrip('.')}" in out
    assert "WRONG    SPF    a.test: 'v=spf1 ip4:192.0.2.99 -all' does not pass for 127.0.0.2: fail" in out
    assert "expected: v=spf1 mx ~all" in out and "2 problem(s)" in out

    dns.add("2.0.0.127.bl.test", "A", "127.0.0.2")
    dns.add("2.0.0.127.bl.test", "TXT", "listed for testing")
    dns.remove("2.0.0.127.in-addr.arpa", "PTR")
    rc, out = cli(config, capsys, "dns", "check", "a.test", "--address", "127.0.0.2")
    assert rc == 1 and "LISTED   DNSBL  bl.test: 127.0.0.2 is listed: 127.0.0.2 (listed for testing)" in out
    assert "MISSING  PTR    2.0.0.127.in-addr.arpa: no reverse DNS for 127.0.0.2" in out


def test_dns_trouble_is_unknown_not_ok(config: Path, dns: DNSServer, capsys: pytest.CaptureFixture[str]) -> None:
    dns.clear()
    dns.servfail("a.test")
    rc, out = cli(config, capsys, "dns", "check", "a.test", "--address", "127.0.0.2")
    assert rc == 1 and "UNKNOWN  MX     a.test" in out


def test_records_without_address_say_fill_in(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out = cli(config, capsys, "dns", "records", "a.test")
    assert rc == 0
    assert "; mail.a.test.\t3600\tIN\tA\t<public IPv4 address of this server>" in out
    assert "no DKIM key yet" in out


def test_dkim_rotation_commands(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for sel in ("one", "two"):
        assert cli(config, capsys, "dkim", "generate", "a.test", "--algorithm", "ed25519", "--selector", sel)[0] == 0
    rc, out = cli(config, capsys, "dkim", "list")
    assert "a.test\tone\ted25519-sha256\tactive" in out and "a.test\ttwo\ted25519-sha256\tpublished" in out
    assert cli(config, capsys, "dkim", "activate", "a.test", "two")[1].strip() == "a.test two: active"
    assert cli(config, capsys, "dkim", "retire", "a.test", "one")[1].strip() == "a.test one: retired"
    rc, out = cli(config, capsys, "dkim", "list", "a.test")
    assert "\tone\ted25519-sha256\tretired" in out and "\ttwo\ted25519-sha256\tactive" in out
    rc, out = cli(config, capsys, "dns", "records", "a.test")
    assert "; retired DKIM key: may be removed\n; one._domainkey.a.test." in out
    rc, out = cli(config, capsys, "dkim", "activate", "a.test", "nope")
    assert rc == 1 and "no selector nope" in out
    rc, out = cli(config, capsys, "dkim", "generate", "../etc")
    assert rc == 1


def test_dmarc_reports_listing(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "no DMARC aggregate reports received" in cli(config, capsys, "dmarc", "reports")[1]
    store = ReportStore(config.parent / "dmarc.sqlite")
    for rid, org in (("r1", "google.test"), ("r2", "outlook.test")):
        store.store_received(AggregateReport(org, f"noreply@{org}", rid, 1_790_000_000, 1_790_086_400,
                                             PolicyPublished("a.test", "quarantine"),
                                             (ReportRow("127.0.0.2", 10, "none", "pass", "pass", "a.test"),
                                              ReportRow("203.0.113.9", 4, "quarantine", "fail", "fail", "a.test"))),
                             rid == "r1", 1.0)
    store.close()
    rc, out = cli(config, capsys, "dmarc", "reports", "a.test")
    assert rc == 0
    assert "report r1 from google.test" in out and "(sender not authenticated)" in out
    assert "a.test: 2 report(s), 28 message(s): 20 pass, 8 fail" in out
    assert "failing source 203.0.113.9: 8 message(s)" in out
    assert "no DMARC aggregate reports received for b.test" in cli(config, capsys, "dmarc", "reports", "b.test")[1]


def test_external_report_address_needs_its_authorization_record(tmp_path: Path) -> None:
    from postier.mailauth.records import expected_records, zone_lines
    from tests.deliverability.common import make_config

    cfg = make_config(tmp_path, hostname="mail.a.test", report_address="dmarc@reports.example")
    lines = "\n".join(zone_lines(expected_records(cfg, "a.test", [], ["192.0.2.1"])))
    assert '_dmarc.a.test.\t3600\tIN\tTXT\t"v=DMARC1; p=quarantine; rua=mailto:dmarc@reports.example"' in lines
    assert 'a.test._report._dmarc.reports.example.\t3600\tIN\tTXT\t"v=DMARC1"' in lines
    own = "\n".join(zone_lines(expected_records(make_config(tmp_path, hostname="mail.a.test"), "a.test", [], [])))
    assert "_report._dmarc" not in own
