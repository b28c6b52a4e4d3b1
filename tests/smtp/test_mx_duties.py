"""What a public MX owes the world: postmaster@ and abuse@ for every domain (RFC 5321 §4.5.1, RFC 2142),
a certificate clients accept, the Mozilla "intermediate" TLS profile, per-role HELP, `+0000` dates."""

from __future__ import annotations

import datetime
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.harness import STAY_ROOT, Instance, run_cli


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    inst = Instance(tmp_path_factory.mktemp("mx"), "a.test", quickstart_args=("--admin", "boss@a.test", *STAY_ROOT))
    inst.add_user("alice@a.test")  # the first user: not the admin, since --admin names one
    inst.add_user("boss@a.test")
    inst.add_user("other@a.test")
    inst.cli("domain", "add", "b.test")
    inst.start()
    yield inst
    inst.stop()
    assert "Traceback" not in inst.log.read_text()



@pytest.mark.parametrize("rcpt", ["<postmaster>", "<POSTMASTER>", "<PostMaster@a.test>", "<postmaster@b.test>",
                                  "<abuse@a.test>", "<ABUSE@b.test>"])
def test_role_addresses_reach_the_admin(mx: Instance, rcpt: str) -> None:
    marker = f"role-{time.monotonic_ns()}".encode()
    with smtplib.SMTP(*mx.addr("smtp"), timeout=10) as s:
        s.ehlo("client.remote.test")
        assert s.mail("<>")[0] == 250  # a bounce may go to postmaster: RFC 5321 §4.5.5
        code, msg = s.docmd("RCPT TO:" + rcpt)
        assert code == 250, msg
        assert s.data(b"Subject: " + marker + b"\r\n\r\nfor the admin\r\n")[0] == 250
    mx.wait_message("boss@a.test", marker)
    assert not any(marker in m for m in mx.messages("alice@a.test"))


def test_an_alias_overrides_the_admin(mx: Instance) -> None:
    mx.cli("alias", "add", "abuse@b.test", "other@a.test")
    marker = f"alias-{time.monotonic_ns()}".encode()
    time.sleep(0.2)  # the server's recipient cache re-reads the database after CACHE_CHECK (0.1 s)
    with smtplib.SMTP(*mx.addr("smtp"), timeout=10) as s:
        s.sendmail("x@remote.test", ["abuse@b.test"], b"Subject: " + marker + b"\r\n\r\nhi\r\n")
    mx.wait_message("other@a.test", marker)


def test_first_user_is_admin_without_admin_option(tmp_path: Path) -> None:
    from postier.accounts import Accounts

    run_cli(None, "quickstart", "--domain", "c.test", "--data-dir", str(tmp_path), "--quiet", *STAY_ROOT)
    cfg = tmp_path / "postier.toml"
    for u in ("first@c.test", "second@c.test"):
        run_cli(cfg, "user", "add", u, "--password-stdin", stdin="password123\n")
    acc = Accounts(tmp_path / "accounts.sqlite")
    try:
        res = acc.resolve("Postmaster@c.test")
        assert [u.address for u in res.users] == ["first@c.test"]
        assert [u.address for u in acc.resolve("abuse+x@c.test").users] == ["first@c.test"]
        assert acc.resolve("nobody@c.test").users == ()
    finally:
        acc.close()


def test_received_date_is_plus_0000(mx: Instance) -> None:
    marker = f"date-{time.monotonic_ns()}".encode()
    with smtplib.SMTP(*mx.addr("smtp"), timeout=10) as s:
        s.sendmail("x@remote.test", ["alice@a.test"], b"Subject: " + marker + b"\r\n\r\nhi\r\n")
    got = mx.wait_message("alice@a.test", marker)
    received = got.split(b"\r\n\r\n")[0].split(b"Received:")[1]
    assert b" +0000\r\n" in received and b"-0000" not in received  # RFC 5322 §3.3


def help_of(sock: socket.socket, hello: bytes) -> str:
    f = sock.makefile("rwb")

    def reply() -> bytes:
        out = b""
        while True:
            line = f.readline()
            out += line
            if line[3:4] != b"-":
                return out

    reply()
    f.write(hello + b" client.test\r\n")
    f.flush()
    reply()
    f.write(b"HELP\r\n")
    f.flush()
    return reply().decode()


def test_help_per_role(mx: Instance) -> None:
    port25 = help_of(socket.create_connection(mx.addr("smtp"), timeout=10), b"EHLO")
    assert port25.startswith("214") and "EHLO" in port25 and "STARTTLS" in port25 and "AUTH" not in port25
    sub = help_of(socket.create_connection(mx.addr("submission"), timeout=10), b"EHLO")
    assert "AUTH" in sub and "STARTTLS" in sub
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.settimeout(10)
    lsock.connect(str(mx.lmtp_path))
    lmtp = help_of(lsock, b"LHLO")
    assert "LHLO" in lmtp and "EHLO" not in lmtp and "HELO " not in lmtp and "AUTH" not in lmtp


def test_quickstart_certificate(tmp_path: Path) -> None:
    run_cli(None, "quickstart", "--domain", "d.test", "--data-dir", str(tmp_path), "--listen", "192.0.2.25",
            "--quiet", *STAY_ROOT)
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "cert.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.d.test", "localhost"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.25", "127.0.0.1"]
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime < datetime.timedelta(days=398)  # CA/Browser Forum and Apple's limit
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]


def client_ctx(version: ssl.TLSVersion | None = None, ciphers: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    if ciphers:
        ctx.set_ciphers(ciphers)  # raises when the client itself has none of them
    if version:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


def handshake(mx: Instance, role: str, ctx: ssl.SSLContext) -> str:
    if role == "smtp":
        with smtplib.SMTP(*mx.addr("smtp"), timeout=10) as s:
            s.starttls(context=ctx)
            sock = s.sock
            assert isinstance(sock, ssl.SSLSocket)
            return f"{sock.version()} {sock.cipher()[0]}"  # type: ignore[index]
    with socket.create_connection(mx.addr(role), timeout=10) as raw, ctx.wrap_socket(raw) as tls:
        return f"{tls.version()} {tls.cipher()[0]}"  # type: ignore[index]


@pytest.mark.parametrize("role", ["smtp", "imaps", "submissions", "pop3s"])
def test_tls_profile_is_mozilla_intermediate(mx: Instance, role: str) -> None:
    assert handshake(mx, role, client_ctx()).startswith("TLSv1.3 ")
    got = handshake(mx, role, client_ctx(ssl.TLSVersion.TLSv1_2))
    assert got.startswith("TLSv1.2 ECDHE-") and ("GCM" in got or "CHACHA20" in got), got
    assert handshake(mx, role, client_ctx(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305")).endswith(
        "CHACHA20-POLY1305")
    for cbc in ("ECDHE-ECDSA-AES128-SHA256", "ECDHE-ECDSA-AES256-SHA", "AES128-GCM-SHA256"):  # CBC, static RSA
        ctx = client_ctx(ssl.TLSVersion.TLSv1_2, cbc)
        with pytest.raises((ssl.SSLError, ConnectionError, smtplib.SMTPException)):
            handshake(mx, role, ctx)


def test_no_tls_below_1_2(mx: Instance) -> None:
    # OpenSSL at security level 2 refuses to offer TLS 1.1 at all; use the openssl client at level 0.
    r = subprocess.run(["openssl", "s_client", "-connect", "{}:{}".format(*mx.addr("imaps")), "-tls1_1",
                        "-cipher", "DEFAULT@SECLEVEL=0"], input=b"", capture_output=True, timeout=30)
    assert r.returncode != 0 or b"Cipher is (NONE)" in r.stdout
    ok = subprocess.run(["openssl", "s_client", "-connect", "{}:{}".format(*mx.addr("imaps")), "-tls1_2"],
                        input=b"", capture_output=True, timeout=30)
    assert b"Protocol  : TLSv1.2" in ok.stdout or b"TLSv1.2" in ok.stdout
