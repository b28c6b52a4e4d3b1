"""`postier status`: listeners, certificate, privileges, queue, the last hour, disk; exit 1 on trouble."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator

import pytest

from postier.certs import write_self_signed
from tests.harness import Instance


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("status"), "s.test")
    i.add_user("alice@s.test")
    yield i
    i.stop()


def test_stopped_server_needs_attention(inst: Instance) -> None:
    r = inst.cli("status", check=False)
    assert r.returncode == 1
    assert "! server: not running" in r.stdout
    assert "needs attention" in r.stdout


def test_running_server_all_well(inst: Instance) -> None:
    inst.start()
    with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
        s.sendmail("x@remote.test", ["alice@s.test"], b"Subject: one\r\n\r\nhi\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("x@remote.test", ["nobody@s.test"], b"Subject: two\r\n\r\nhi\r\n")
    deadline = time.monotonic() + 20
    while True:
        r = inst.cli("status", check=False)
        if "1 messages accepted, 1 refusals" in r.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.returncode == 0, r.stdout
    out = r.stdout
    assert "last hour: 1 messages accepted, 1 refusals, 0 deferrals" in out
    assert "server: pid " in out and "running as root" in out  # the test instance stays root (allow_root)
    assert f"listener smtp on {inst.address}:{inst.port('smtp')}: answering" in out
    assert f"listener lmtp on {inst.lmtp_path}: answering" in out
    assert "certificate: CN=mail.s.test, issued by CN=mail.s.test (self-signed), 39" in out  # 396/397 days
    assert "queue: empty" in out
    assert "disk: " in out and "GiB free" in out
    assert out.rstrip().endswith("all well")


def test_certificate_about_to_expire(inst: Instance) -> None:
    tls = inst.root / "tls"
    write_self_signed(tls / "cert.pem", tls / "key.pem", ["mail.s.test"], days=5)
    r = inst.cli("status", check=False)
    assert r.returncode == 1
    assert "days left: renew it (then `postier reload`)" in r.stdout
