"""A real Postfix (Debian's, own config directory, loopback) hands mail to postier: over SMTP to
port 25 (relay), and over LMTP (postier as Postfix's delivery agent)."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import postfix
from tests.harness import Instance, free_port
from tests.programs import missing

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    if not postfix.available():
        missing("postfix is not installed (Debian package postfix), or we are not root")
    inst = Instance(tmp_path_factory.mktemp("pfx-target"), "a.test")
    inst.lmtp_over_tcp()  # Postfix's lmtp runs as the postfix user, outside our socket's group
    inst.add_user("alice@a.test")
    inst.start()
    yield inst
    inst.stop()


def run_postfix(transport: str) -> postfix.Postfix:
    pf = postfix.Postfix("127.0.0.1", free_port(), {
        "relay_domains": "a.test",
        "transport_maps": f"inline:{{ a.test={transport} }}",
        "smtp_tls_security_level": "may",
    })
    pf.start()
    return pf



@pytest.mark.parametrize("mode", ["smtp", "lmtp"])
def test_postfix_delivers_into_postier(target: Instance, tmp_path: Path, mode: str) -> None:
    if mode == "smtp":
        transport = f"smtp:[127.0.0.1]:{target.port('smtp')}"
    else:
        transport = f"lmtp:inet:127.0.0.1:{target.port('lmtp')}"
    pf = run_postfix(transport)
    marker = f"via-{mode}-{time.monotonic_ns()}".encode()
    try:
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=10) as s:
            s.sendmail("sender@postfix.test", ["Alice@a.test"],
                       b"From: sender@postfix.test\r\nTo: alice@a.test\r\nSubject: " + marker
                       + b"\r\n\r\nRelayed by Postfix.\r\n")
        got = target.wait_message("alice@a.test", marker, log=pf.log)
        assert b"Relayed by Postfix." in got
        assert b"by postfix.test (Postfix)" in got  # Postfix's own Received header came along
        proto = b"LMTP" if mode == "lmtp" else b"ESMTP"
        assert b"(postier) with " + proto in got
        if mode == "smtp":
            assert b"ESMTPS" in got, "Postfix should have used STARTTLS (smtp_tls_security_level)"
        # Postfix logged a successful delivery with postier's reply
        deadline = time.monotonic() + 10
        while b"status=sent" not in pf.log().encode() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "status=sent" in pf.log()
    finally:
        pf.stop()


def test_postfix_sees_unknown_user_refused(target: Instance, tmp_path: Path) -> None:
    pf = run_postfix(f"smtp:[127.0.0.1]:{target.port('smtp')}")
    try:
        with smtplib.SMTP("127.0.0.1", pf.port, timeout=10) as s:
            s.sendmail("sender@postfix.test", ["nobody@a.test"], b"Subject: x\r\n\r\nx\r\n")
        deadline = time.monotonic() + 30
        while "status=bounced" not in pf.log() and time.monotonic() < deadline:
            time.sleep(0.2)
        log = pf.log()
        assert "status=bounced" in log and "550 5.1.1" in log
    finally:
        pf.stop()
