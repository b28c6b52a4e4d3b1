"""Ports 587 and 465 for real: AUTH required, no open relay, no sender spoofing, header additions,
the daily limit, and the queue CLI on what was queued."""

from __future__ import annotations

import re
import smtplib
import ssl
import time
from collections.abc import Iterator

import pytest

from tests.harness import Instance

from .conftest import PASSWORD


def msg(sender: str, to: str, extra: str = "", ids: bool = True) -> bytes:
    head = f"From: {sender}\r\nTo: <{to}>\r\nSubject: test {time.monotonic_ns()}\r\n{extra}"
    if ids:
        head += f"Date: Mon, 1 Jan 2029 10:00:00 +0000\r\nMessage-ID: <{time.monotonic_ns()}@a.test>\r\n"
    return (head + "\r\nHello.\r\n").encode()


def wait_messages(inst: Instance, address: str, n: int, timeout: float = 10.0) -> list[bytes]:
    deadline = time.monotonic() + timeout
    while True:
        msgs = inst.messages(address)
        if len(msgs) >= n or time.monotonic() > deadline:
            return msgs
        time.sleep(0.05)


def ctx(inst: Instance) -> ssl.SSLContext:
    return inst.client_ssl_context()


@pytest.fixture(params=["submission", "submissions"])
def port(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def connect(inst: Instance, role: str, login: str | None = "alice@a.test") -> smtplib.SMTP:
    if role == "submissions":
        s: smtplib.SMTP = smtplib.SMTP_SSL(*inst.addr(role), context=ctx(inst), timeout=10)
        s.ehlo("client.test")
    else:
        s = smtplib.SMTP(*inst.addr(role), timeout=10)
        s.ehlo("client.test")
        s.starttls(context=ctx(inst))
        s.ehlo("client.test")
    if login:
        s.login(login, PASSWORD)
    return s


@pytest.fixture
def alice(msa: Instance, port: str) -> Iterator[smtplib.SMTP]:
    s = connect(msa, port)
    yield s
    s.close()


def test_no_auth_before_tls_and_no_mail_before_auth(msa: Instance) -> None:
    with smtplib.SMTP(*msa.addr("submission"), timeout=10) as s:
        code, caps = s.ehlo("client.test")
        assert b"STARTTLS" in caps and b"AUTH" not in caps  # RFC 4954 §4: never AUTH in clear
        assert s.docmd("AUTH", "PLAIN AGFsaWNlQGEudGVzdABwYXNzd29yZDEyMw==")[0] in (530, 538)
        assert s.docmd("MAIL", "FROM:<alice@a.test>")[0] == 530
        s.starttls(context=ctx(msa))
        code, caps = s.ehlo("client.test")
        assert b"AUTH PLAIN LOGIN SCRAM-SHA-256" in caps
        code, text = s.docmd("MAIL", "FROM:<alice@a.test>")
        assert (code, text[:5]) == (530, b"5.7.0")  # RFC 4954 §6: authentication required


@pytest.mark.parametrize("role", ["submission", "submissions"])
def test_open_relay_refused_without_auth(msa: Instance, role: str) -> None:
    s = connect(msa, role, login=None)
    try:
        code, text = s.docmd("MAIL", "FROM:<spammer@elsewhere.test>")
        assert (code, text[:5]) == (530, b"5.7.0")
        assert s.docmd("RCPT", "TO:<victim@elsewhere.test>")[0] == 503  # no transaction without MAIL
    finally:
        s.close()


def test_bad_password_refused(msa: Instance) -> None:
    s = connect(msa, "submission", login=None)
    try:
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("alice@a.test", "wrong-password")
        assert e.value.smtp_code == 535
    finally:
        s.close()


@pytest.mark.parametrize(("sender", "code"), [
    ("alice@a.test", 250), ("Alice@A.TEST", 250), ("alice+news@a.test", 250), ("sales@a.test", 250),
    ("bob@a.test", 553), ("alice@elsewhere.test", 553), ("ceo@a.test", 553), ("", 553),
])
def test_envelope_sender_policy(alice: smtplib.SMTP, sender: str, code: int) -> None:
    got, text = alice.docmd("MAIL", f"FROM:<{sender}>")
    assert got == code, text
    if code == 553:
        assert text.startswith(b"5.7.1")
    alice.rset()


@pytest.mark.parametrize("header_from", [
    "bob@a.test", '"alice@a.test" <bob@a.test>', "Alice <alice@a.test>, Bob <bob@a.test>",
    "alice@evil.test",
])
def test_from_header_spoofing_refused(msa: Instance, alice: smtplib.SMTP, header_from: str) -> None:
    before = len(msa.messages("dave@a.test"))
    with pytest.raises(smtplib.SMTPDataError) as e:
        alice.sendmail("alice@a.test", ["dave@a.test"], msg(header_from, "dave@a.test"))
    assert (e.value.smtp_code, e.value.smtp_error[:5]) == (553, b"5.7.1")
    time.sleep(0.1)
    assert len(msa.messages("dave@a.test")) == before


def test_sender_header_checked_and_missing_from_refused(msa: Instance, alice: smtplib.SMTP) -> None:
    with pytest.raises(smtplib.SMTPDataError) as e:
        alice.sendmail("alice@a.test", ["dave@a.test"], msg("alice@a.test", "dave@a.test", "Sender: bob@a.test\r\n"))
    assert e.value.smtp_code == 553
    no_from = b"To: <dave@a.test>\r\nSubject: x\r\n\r\nbody\r\n"
    with pytest.raises(smtplib.SMTPDataError) as e:
        alice.sendmail("alice@a.test", ["dave@a.test"], no_from)
    assert (e.value.smtp_code, e.value.smtp_error[:5]) == (550, b"5.6.0")


def test_recipient_checks(alice: smtplib.SMTP) -> None:
    assert alice.docmd("MAIL", "FROM:<alice@a.test>")[0] == 250
    assert alice.docmd("RCPT", "TO:<nobody@a.test>")[:1] == (550,)
    assert alice.docmd("RCPT", "TO:<x%elsewhere.test@a.test>")[0] == 550
    assert alice.docmd("RCPT", "TO:<x@[127.0.0.1]>")[0] == 550
    assert alice.docmd("RCPT", "TO:<someone@elsewhere.test>")[0] == 250  # authenticated: may relay
    alice.rset()


def test_local_delivery_adds_date_message_id_received(msa: Instance, alice: smtplib.SMTP) -> None:
    before = len(msa.messages("dave@a.test"))
    alice.sendmail("sales@a.test", ["dave@a.test"], msg("Sales <sales@a.test>", "dave@a.test", ids=False))
    got = wait_messages(msa, "dave@a.test", before + 1)[-1]
    head = got.split(b"\r\n\r\n")[0]
    assert head.startswith(b"Return-Path: <sales@a.test>\r\nReceived: from client.test ([127.0.0.1])")
    assert b"with ESMTPSA id" in head and b"using TLSv1." in head
    assert re.search(rb"\r\nDate: \w{3}, \d+ \w{3} \d{4} ", head)
    assert re.search(rb"\r\nMessage-ID: <[0-9A-F]+\.[0-9a-f]+@mail\.a\.test>\r\n", head + b"\r\n")
    # present ones are kept, not doubled
    alice.sendmail("alice@a.test", ["dave@a.test"], msg("alice@a.test", "dave@a.test"))
    got = wait_messages(msa, "dave@a.test", before + 2)[-1]
    assert got.count(b"\r\nDate: ") == 1 and got.count(b"\r\nMessage-ID: ") == 1
    assert b"Message-ID: <" in got and b"@mail.a.test>" not in got.split(b"Message-ID:")[1][:80]


def test_remote_mail_is_queued_and_listed(msa: Instance) -> None:
    s = connect(msa, "submission", login="bob@a.test")
    try:
        refused = s.sendmail("bob@a.test", ["someone@defer.test"], msg("bob@a.test", "someone@defer.test"))
        assert refused == {}
    finally:
        s.close()
    deadline = time.monotonic() + 10
    out = ""
    while time.monotonic() < deadline:
        out = msa.cli("queue", "list").stdout
        if "someone@defer.test" in out and "DNS" in out:
            break
        time.sleep(0.1)
    assert "<bob@a.test>" in out and "someone@defer.test" in out and "DNS" in out, out
    msg_id = next(line.split()[0] for line in out.splitlines() if "<bob@a.test>" in line)
    show = msa.cli("queue", "show", msg_id).stdout
    assert "someone@defer.test: queued, 1 attempt" in show and "user:     bob@a.test" in show
    r = msa.cli("queue", "retry", msg_id)
    assert r.stdout.startswith("1 recipient")
    assert f"postier: queue retry {msg_id}: 1 recipient rescheduled, by " in r.stderr  # the audit line
    assert msa.cli("queue", "retry", "--all").returncode == 0
    assert msa.cli("queue", "show", "../etc", check=False).returncode == 1
    r = msa.cli("queue", "delete", msg_id)
    assert r.stdout == f"deleted {msg_id}\n"
    assert f"postier: queue delete {msg_id}: removed without a DSN, from <bob@a.test>" in r.stderr
    assert "someone@defer.test" in r.stderr and "uid" in r.stderr
    assert msg_id not in msa.cli("queue", "list").stdout
    assert msa.cli("queue", "delete", msg_id, check=False).returncode == 1


def test_bounce_comes_back_to_the_user(msa: Instance) -> None:
    before = len(msa.messages("carol@a.test"))
    s = connect(msa, "submissions", login="carol@a.test")
    try:
        s.sendmail("carol@a.test", ["x@nxdomain.test"], msg("carol@a.test", "x@nxdomain.test"))
    finally:
        s.close()
    dsn = wait_messages(msa, "carol@a.test", before + 1)[-1]
    assert b"Return-Path: <>" in dsn and b"Final-Recipient: rfc822; x@nxdomain.test" in dsn
    assert b"Action: failed" in dsn and b"Status: 5.1.2" in dsn


def test_daily_limit(msa: Instance) -> None:
    s = connect(msa, "submission", login="dave@a.test")
    try:
        for _ in range(3):  # max_messages_per_day = 3 (remote messages count)
            s.sendmail("dave@a.test", ["x@defer.test"], msg("dave@a.test", "x@defer.test"))
        code, text = s.docmd("MAIL", "FROM:<dave@a.test>")
        assert (code, text[:5]) == (450, b"4.7.1")
    finally:
        s.close()
