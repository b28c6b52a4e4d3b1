"""Live reload: SIGHUP and `postier reload` re-read the configuration and the certificate.

A new TLS connection gets the new certificate at once (implicit TLS and STARTTLS) while an IMAP IDLE
session opened before the reload goes on and still gets its EXISTS; listeners removed and added in the
file are closed and opened; a broken file is logged on one line naming the key and the old
configuration stays; a change of data_dir is reported, not applied.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import time
from collections.abc import Iterator

import pytest

from postier.certs import write_self_signed
from tests.harness import Instance

PASSWORD = "password123"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("reload"), "r.test")
    i.add_user("alice@r.test", PASSWORD)
    i.start()
    yield i
    i.stop()
    assert "Traceback" not in i.log.read_text()


def peer_cert(inst: Instance, role: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if role == "smtp":
        with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
            s.starttls(context=ctx)
            assert isinstance(s.sock, ssl.SSLSocket)
            der = s.sock.getpeercert(binary_form=True)
    else:
        with socket.create_connection(inst.addr(role), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def reloads(inst: Instance) -> int:
    log = inst.log.read_text()
    return log.count("reloaded ") + log.count("reload failed")


def hup(inst: Instance, command: bool = False) -> str:
    """Reload (SIGHUP, or `postier reload`) and wait until it has finished, applied or not (in
    every worker, with POSTIER_TEST_WORKERS)."""
    assert inst.proc is not None
    before = reloads(inst)
    if command:
        inst.cli("reload")
    else:
        inst.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if reloads(inst) >= before + max(1, inst.workers):
            return inst.log.read_text()
        time.sleep(0.05)
    raise AssertionError(inst.log.read_text()[-3000:])


class Idle:
    """An IMAP session over implicit TLS, selected and idling."""

    def __init__(self, inst: Instance) -> None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        self.sock = ctx.wrap_socket(socket.create_connection(inst.addr("imaps"), timeout=20))
        self.f = self.sock.makefile("rwb")
        assert self.line().startswith(b"* OK")
        self.cmd(b"a LOGIN alice@r.test " + PASSWORD.encode())
        self.cmd(b"b SELECT INBOX")
        self.f.write(b"c IDLE\r\n")
        self.f.flush()
        assert self.line().startswith(b"+ ")

    def line(self) -> bytes:
        return self.f.readline()

    def cmd(self, line: bytes) -> None:
        self.f.write(line + b"\r\n")
        self.f.flush()
        tag = line.split()[0]
        while not (ln := self.line()).startswith(tag + b" "):
            assert ln, "connection closed"
        assert ln.startswith(tag + b" OK"), ln

    def wait_exists(self) -> None:
        while True:
            ln = self.line()
            assert ln, "connection closed"
            if ln.endswith(b" EXISTS\r\n"):
                return

    def close(self) -> None:
        self.f.write(b"DONE\r\n")
        self.f.flush()
        self.sock.close()


def test_new_certificate_for_new_handshakes_idle_goes_on(inst: Instance) -> None:
    old = {role: peer_cert(inst, role) for role in ("imaps", "smtp")}
    idle = Idle(inst)
    try:
        tls = inst.root / "tls"
        write_self_signed(tls / "cert.pem", tls / "key.pem", ["renewed.r.test", "localhost"])
        hup(inst, command=True)  # `postier reload`; SIGHUP in the other tests
        for role, der in old.items():
            assert peer_cert(inst, role) != der, role
        with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
            s.sendmail("x@remote.test", ["alice@r.test"], b"Subject: after reload\r\n\r\nhi\r\n")
        idle.wait_exists()  # the session from before the reload is still served
    finally:
        idle.close()
    assert b"renewed.r.test" in peer_cert(inst, "pop3s")


def test_broken_config_keeps_the_running_one(inst: Instance) -> None:
    good = inst.config.read_text()
    cert = peer_cert(inst, "imaps")
    try:
        inst.config.write_text(good + "\n[limits]\nmax_errors = -1\n")
        log = hup(inst)
        line = next(ln for ln in log.splitlines() if "reload failed" in ln)
        assert "limits.max_errors: must not be negative; keeping the running configuration" in line
        assert peer_cert(inst, "imaps") == cert
        with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
            assert s.noop()[0] == 250
    finally:
        inst.config.write_text(good)


def test_listeners_removed_and_added(inst: Instance) -> None:
    good = inst.config.read_text()
    block = f'[listeners.pop3]\naddress = "{inst.address}"\nport = {inst.port("pop3")}\n'
    assert block in good
    try:
        inst.config.write_text(good.replace(block, ""))
        hup(inst)
        with pytest.raises(OSError):
            socket.create_connection(inst.addr("pop3"), timeout=5).close()
        assert socket.create_connection(inst.addr("imap"), timeout=5)  # the others stay
    finally:
        inst.config.write_text(good)
    hup(inst)
    with socket.create_connection(inst.addr("pop3"), timeout=5) as s:
        assert s.recv(100).startswith(b"+OK")


def test_data_dir_change_is_reported_not_applied(inst: Instance) -> None:
    good = inst.config.read_text()
    try:
        inst.config.write_text(good.replace('data_dir = "."', 'data_dir = "/nonexistent-postier"'))
        log = hup(inst)
        assert "reload: data_dir changed; it takes effect at the next restart" in log
        with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
            s.sendmail("x@remote.test", ["alice@r.test"], b"Subject: still here\r\n\r\nhi\r\n")
        deadline = time.monotonic() + 10
        while not any(b"still here" in m for m in inst.messages("alice@r.test")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any(b"still here" in m for m in inst.messages("alice@r.test"))
    finally:
        inst.config.write_text(good)
