"""Port 25 for real: smtplib/aiosmtplib/raw sockets against a running postier, with TLS."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import ssl
import time

import aiosmtplib
import pytest

from tests.harness import Instance

MSG = b"From: x@remote.test\r\nTo: alice@a.test\r\nSubject: hello\r\n\r\nHi Alice.\r\n.leading dot\r\n"


def wait_messages(inst: Instance, address: str, n: int, folder: str = "") -> list[bytes]:
    deadline = time.monotonic() + 10
    while True:
        msgs = inst.messages(address, folder)
        if len(msgs) >= n or time.monotonic() > deadline:
            return msgs
        time.sleep(0.05)


class Raw:
    """A line-level SMTP client for the byte-exact cases smtplib cannot produce."""

    def __init__(self, inst: Instance) -> None:
        self.sock = socket.create_connection(inst.addr("smtp"), timeout=10)
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        """The last line of a (possibly multi-line) reply."""
        while True:
            ln = self.line()
            if ln[3:4] != b"-":
                return ln

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def cmd(self, data: bytes) -> bytes:
        self.send(data + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def test_delivery_with_starttls(mx: Instance) -> None:
    before = len(mx.messages("alice@a.test"))
    with smtplib.SMTP(*mx.addr("smtp"), timeout=10) as s:
        code, caps = s.ehlo("client.remote.test")
        assert code == 250
        for ext in (b"STARTTLS", b"PIPELINING", b"8BITMIME", b"SMTPUTF8", b"ENHANCEDSTATUSCODES", b"CHUNKING",
                    b"SIZE 1048576"):
            assert ext in caps
        assert b"AUTH" not in caps  # never AUTH on the MX port
        s.starttls(context=mx.client_ssl_context())
        s.ehlo("client.remote.test")
        assert s.sendmail("x@remote.test", ["Alice@A.TEST"], MSG) == {}
    msgs = wait_messages(mx, "alice@a.test", before + 1)
    got = msgs[-1]
    assert got.startswith(b"Return-Path: <x@remote.test>\r\n")
    assert b"\r\nReceived: from client.remote.test ([127.0.0.1])\r\n" in got
    assert b"with ESMTPS id" in got and b"using TLSv1." in got
    assert got.endswith(MSG)


def test_alias_plus_and_mbox(mx: Instance) -> None:
    a, b = len(mx.messages("alice@a.test")), len(mx.messages("bob@a.test"))
    with smtplib.SMTP(*mx.addr("smtp"), timeout=10) as s:
        assert s.sendmail("", ["team@a.test", "alice+lists@a.test", "carol@a.test"], MSG) == {}
    assert len(wait_messages(mx, "alice@a.test", a + 1)) == a + 1  # alias and plus reach her once
    assert len(wait_messages(mx, "bob@a.test", b + 1)) == b + 1
    mbox = (mx.root / "mail" / "a.test" / "carol" / "mbox").read_bytes()
    assert mbox.startswith(b"From MAILER-DAEMON ") and b"\n>.leading dot" not in mbox and b"Hi Alice." in mbox


@pytest.mark.parametrize(("rcpt", "code", "enhanced"), [
    ("someone@elsewhere.test", 554, b"5.7.1"),
    ("nobody@a.test", 550, b"5.1.1"),
    ("alice%elsewhere.test@a.test", 550, b"5.7.1"),
    ('"alice@elsewhere.test"@a.test', 550, b"5.7.1"),
    ("@a.test:alice@elsewhere.test", 553, b"5.1.3"),
    ("elsewhere.test!alice@a.test", 550, b"5.7.1"),
    ("alice@[127.0.0.1]", 554, b"5.7.1"),
])
def test_relay_attempts_refused(mx: Instance, rcpt: str, code: int, enhanced: bytes) -> None:
    r = Raw(mx)
    try:
        r.reply()
        r.cmd(b"EHLO relay.test")
        assert r.cmd(b"MAIL FROM:<spammer@elsewhere.test>").startswith(b"250")
        reply = r.cmd(f"RCPT TO:<{rcpt}>".encode())
        assert reply.startswith(f"{code} ".encode() + enhanced), reply
        assert r.cmd(b"DATA").startswith(b"554 5.5.1")  # no valid recipient: nothing is ever queued
    finally:
        r.close()


@pytest.mark.parametrize("smuggle", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r"])
def test_smuggling_rejected(mx: Instance, smuggle: bytes) -> None:
    before = len(mx.messages("bob@a.test"))
    r = Raw(mx)
    try:
        r.reply()
        r.cmd(b"EHLO smuggler.test")
        r.cmd(b"MAIL FROM:<a@remote.test>")
        assert r.cmd(b"RCPT TO:<bob@a.test>").startswith(b"250")
        assert r.cmd(b"DATA").startswith(b"354")
        r.send(b"Subject: one\r\n\r\nfirst" + smuggle + b"MAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@a.test>\r\n"
               b"DATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\n")
        reply = r.reply()
        assert reply.startswith(b"554 5.6.0"), reply
        assert r.cmd(b"NOOP").startswith(b"250")  # one reply: nothing was read as a command
    finally:
        r.close()
    time.sleep(0.2)
    assert len(mx.messages("bob@a.test")) == before


def test_oversized_command_line_and_message(mx: Instance) -> None:
    r = Raw(mx)
    try:
        r.reply()
        r.cmd(b"EHLO big.test")
        assert r.cmd(b"NOOP " + b"x" * 600).startswith(b"500 5.5.2")
        assert r.cmd(b"MAIL FROM:<a@remote.test> SIZE=2000000").startswith(b"552 5.3.4")
        r.cmd(b"MAIL FROM:<a@remote.test>")
        r.cmd(b"RCPT TO:<bob@a.test>")
        assert r.cmd(b"DATA").startswith(b"354")
        line = b"y" * 998 + b"\r\n"
        for _ in range(1200):  # 1.2 MB > max_message_size 1 MiB
            r.send(line)
        r.send(b".\r\n")
        assert r.reply().startswith(b"552 5.3.4")
    finally:
        r.close()


def test_too_many_recipients(mx: Instance) -> None:
    with smtplib.SMTP(*mx.addr("smtp"), timeout=10) as s:
        s.ehlo("x.test")
        s.mail("a@remote.test")
        codes = [s.rcpt(f"alice+{i}@a.test")[0] for i in range(6)]
        assert codes == [250] * 5 + [452]


def test_early_talker_refused(tmp_path_factory: pytest.TempPathFactory) -> None:
    inst = Instance(tmp_path_factory.mktemp("early"), "e.test", extra_config="[limits]\ngreet_pause = 0.5\n")
    inst.start()
    try:
        s = socket.create_connection(inst.addr("smtp"), timeout=5)
        s.sendall(b"EHLO eager.test\r\n")
        data = s.recv(4096)
        assert data.startswith(b"554 5.5.0"), data
        s.close()
        with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as ok:  # a patient client is served
            assert ok.ehlo("patient.test")[0] == 250
    finally:
        inst.stop()


def test_pipelining_and_starttls_injection(mx: Instance) -> None:
    r = Raw(mx)
    try:
        r.reply()
        r.cmd(b"EHLO inject.test")
        # RFC 3207 §4 / CVE-2011-0411: the plaintext after STARTTLS must be discarded
        r.send(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert r.reply().startswith(b"220")
        tls = mx.client_ssl_context().wrap_socket(r.sock, server_hostname="mail.a.test")
        tls.sendall(b"EHLO inject.test\r\n")
        time.sleep(0.2)
        data = b""
        while not data.endswith(b"250 CHUNKING\r\n"):
            data += tls.recv(4096)
        tls.sendall(b"RCPT TO:<bob@a.test>\r\n")
        assert tls.recv(4096).startswith(b"503 5.5.1")  # no MAIL survived the upgrade
        tls.close()
    finally:
        r.sock.close()


def test_bdat_chunking(mx: Instance) -> None:
    before = len(mx.messages("bob@a.test"))
    body = b"Subject: bdat\r\n\r\nchunked\r\n"
    r = Raw(mx)
    try:
        r.reply()
        r.cmd(b"EHLO chunk.test")
        r.cmd(b"MAIL FROM:<a@remote.test>")
        r.cmd(b"RCPT TO:<bob@a.test>")
        r.send(b"BDAT %d\r\n" % 10 + body[:10])
        assert r.reply().startswith(b"250")
        rest = body[10:]
        r.send(b"BDAT %d LAST\r\n" % len(rest) + rest)
        assert r.reply().startswith(b"250 2.0.0")
    finally:
        r.close()
    msgs = wait_messages(mx, "bob@a.test", before + 1)
    assert msgs[-1].endswith(body)


def test_aiosmtplib_vrfy_help_starttls(mx: Instance) -> None:
    async def go() -> None:
        client = aiosmtplib.SMTP(hostname=mx.address, port=mx.port("smtp"), start_tls=False)
        await client.connect()
        await client.ehlo(hostname="aio.test")
        code, _ = await client.vrfy("alice@a.test")
        assert code == 252  # no user enumeration
        resp = await client.execute_command(b"HELP")
        assert resp.code == 214
        await client.starttls(tls_context=mx.client_ssl_context())
        errors, _ = await client.sendmail("aio@remote.test", ["alice@a.test"], MSG)
        assert errors == {}
        await client.quit()

    asyncio.run(go())


def test_too_many_errors_disconnects(mx: Instance) -> None:
    r = Raw(mx)
    try:
        r.reply()
        replies = [r.cmd(b"BOGUS") for _ in range(5)]
        assert all(x.startswith(b"500 5.5.1") for x in replies)
        assert r.reply().startswith(b"421 4.7.0")  # RFC 5321 §4.3.2: the server gives up
        with pytest.raises((ConnectionError, OSError)):
            r.cmd(b"NOOP")
            r.cmd(b"NOOP")
    finally:
        r.close()


def test_lmtp_per_recipient_replies(mx: Instance) -> None:
    """RFC 2033 §4.2: after the final dot, one reply per accepted recipient, in RCPT order."""
    before = len(mx.messages("alice@a.test"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(mx.lmtp_path))  # quickstart puts LMTP on DATA_DIR/run/lmtp
    r = Raw.__new__(Raw)
    r.sock, r.buf = sock, b""
    try:
        assert r.reply().startswith(b"220")
        assert r.cmd(b"EHLO x.test").startswith(b"500")  # LMTP speaks LHLO only
        assert r.cmd(b"LHLO x.test").startswith(b"250")
        r.cmd(b"MAIL FROM:<x@remote.test>")
        assert r.cmd(b"RCPT TO:<alice@a.test>").startswith(b"250")
        assert r.cmd(b"RCPT TO:<nobody@a.test>").startswith(b"550 5.1.1")
        assert r.cmd(b"RCPT TO:<bob@a.test>").startswith(b"250")
        assert r.cmd(b"DATA").startswith(b"354")
        r.send(MSG + b".\r\n")
        assert r.reply().startswith(b"250 2.0.0")
        assert r.reply().startswith(b"250 2.0.0")
        assert r.cmd(b"NOOP").startswith(b"250")
    finally:
        sock.close()
    msgs = wait_messages(mx, "alice@a.test", before + 1)
    assert len(msgs) == before + 1
    assert b"Received: from x.test\r\n\tby " in msgs[-1]  # no TCP-info for a Unix-socket peer


def test_submission_requires_tls_for_auth(mx: Instance) -> None:
    with smtplib.SMTP(*mx.addr("submission"), timeout=10) as s:
        _, caps = s.ehlo("client.test")
        assert b"AUTH" not in caps and b"STARTTLS" in caps
        code, msg = s.docmd("AUTH", "PLAIN AGFsaWNlQGEudGVzdABwYXNzd29yZDEyMw==")
        assert code in (503, 530, 538), msg
        code, msg = s.docmd("MAIL", "FROM:<alice@a.test>")
        assert code == 530


def test_graceful_shutdown_sends_421(tmp_path_factory: pytest.TempPathFactory) -> None:
    inst = Instance(tmp_path_factory.mktemp("stop"), "s.test")
    inst.start()
    s = socket.create_connection(inst.addr("smtp"), timeout=10)
    assert s.recv(1024).startswith(b"220")
    s.sendall(b"EHLO x.test\r\n")
    time.sleep(0.2)
    s.recv(4096)
    assert inst.stop() == 0
    data = s.recv(1024)
    assert data.startswith(b"421 4.3.2"), data
    s.close()


def test_tls_certificate_verifies_with_our_ca(mx: Instance) -> None:
    ctx = ssl.create_default_context(cafile=str(mx.root / "tls" / "cert.pem"))
    with smtplib.SMTP_SSL(mx.address, mx.port("submissions"), context=ctx, timeout=10) as s:
        _, caps = s.ehlo("client.test")
        assert b"AUTH PLAIN LOGIN" in caps or b"AUTH " in caps
