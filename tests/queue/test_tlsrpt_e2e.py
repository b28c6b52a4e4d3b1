"""TLS reporting (RFC 8460) end to end between two real instances and the in-process DNS: a.test's queue
meets b.test's MTA-STS enforce policy with a certificate for another name (deferred, never plaintext),
records the failure, and `postier tls report-now` sends the report through the queue, despite the
same TLS failure (§5.3), to the rua b.test publishes as `dns records` prints it; b.test keeps it and
`postier tls reports` shows a.test's failure."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.dnsserver import DNSServer
from tests.harness import Instance
from tests.queue.test_mtasts import A_IP, B_IP, Net, deferred_with, sts_net


def _prepare(dns: DNSServer, a: Instance, b: Instance) -> None:
    a.cli("dkim", "generate", "a.test")  # §5.3: reports are DKIM-signed
    # b.test's TLS-RPT record, exactly as `dns records` prints it
    line = next(x for x in b.cli("dns", "records", "b.test").stdout.splitlines()
                if x.startswith("_smtp._tls.b.test."))
    dns.add("_smtp._tls.b.test", "TXT", line.split('"')[1])


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    # the policy host verifies; the MX does not
    yield from sts_net(tmp_path_factory.mktemp("tlsrpt"), ("other.b.test", "mta-sts.b.test"),
                       ("mail.b.test", "mta-sts.b.test"), _prepare)


def wait_for(what: str, probe: object, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    out = ""
    while time.monotonic() < deadline:
        out = probe() if callable(probe) else ""
        if what in out:
            return out
        time.sleep(0.2)
    raise AssertionError(f"{what!r} never showed:\n{out}")


def test_failure_recorded_reported_and_read_on_the_other_side(net: Net) -> None:
    a, b = net.a, net.b
    assert 'v=TLSRPTv1; rua=mailto:tls-reports@b.test' in b.cli("dns", "records", "b.test").stdout
    net.send("tlsrpt-bad-cert")
    deferred_with(a, "certificate not verified")
    assert not any(b"tlsrpt-bad-cert" in m for m in b.messages("bob@b.test"))

    out = a.cli("tls", "report-now").stdout
    assert "b.test: report queued for tls-reports@b.test" in out, out
    # a's running server picks the report up from the spool and delivers it despite the certificate
    text = wait_for("certificate-host-mismatch", lambda: b.cli("tls", "reports", "--domain", "b.test").stdout)
    assert "from mail.a.test <postmaster@a.test>" in text
    assert "b.test: policy sts (mx mail.b.test): 0 successful, 1 failed" in text
    assert f"mail.b.test[{B_IP}] from {A_IP}" in text

    [got] = json.loads(b.cli("tls", "reports", "--json").stdout)
    rep = got["report"]
    assert rep["organization-name"] == "mail.a.test" and rep["contact-info"] == "postmaster@a.test"
    [pol] = rep["policies"]
    assert pol["policy"]["policy-type"] == "sts" and pol["policy"]["policy-domain"] == "b.test"
    assert "mode: enforce" in pol["policy"]["policy-string"] and pol["policy"]["mx-host"] == ["mail.b.test"]
    assert pol["summary"] == {"total-successful-session-count": 0, "total-failure-session-count": 1}
    [detail] = pol["failure-details"]
    assert detail["result-type"] == "certificate-host-mismatch" and detail["failed-session-count"] == 1
    assert (detail["sending-mta-ip"], detail["receiving-mx-hostname"], detail["receiving-ip"]) == (
        A_IP, "mail.b.test", B_IP)

    # the mail itself reached the admin's mailbox (no alias needed), DKIM-signed by a.test (§5.3)
    [mail] = [m for m in b.messages("bob@b.test") if b"TLS-Report-Domain: b.test" in m]
    assert b"TLS-Report-Submitter: mail.a.test" in mail and b"report-type=\"tlsrpt\"" in mail
    assert b"application/tlsrpt+gzip" in mail and b"DKIM-Signature:" in mail and b"d=a.test" in mail
    # the report's own session is not counted: nothing is left to report, and a's log of sent reports says so
    assert "no TLS report to send" in a.cli("tls", "report-now").stdout
    sent = a.cli("tls", "reports", "--sent").stdout
    assert "b.test\ttls-reports@b.test\t0 ok, 1 failed\tqueued" in sent
    # the message stays deferred: the report went out, the mail did not
    assert "bob@b.test" in a.cli("queue", "list").stdout
