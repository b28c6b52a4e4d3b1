"""Quotas through real servers and real clients: SMTP (smtplib) RCPT and DATA replies, LMTP's
per-recipient replies, IMAP (imaplib) APPEND over quota, GETQUOTAROOT against the bytes on disk
after deliveries, expunges and a file removed by another program, two sessions APPENDing at once."""

from __future__ import annotations

import imaplib
import re
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.accounts import CACHE_CHECK, Accounts
from tests.concurrency import together
from tests.harness import Instance

PASSWORD = "password123"
DOMAIN = "q.test"


def disk_bytes(maildir: Path) -> int:
    """Bytes of every message file of every folder (what the quota counts)."""
    if not maildir.exists():
        return 0
    total = 0
    for d in [maildir, *[p for p in maildir.iterdir() if p.name.startswith(".") and p.is_dir()]]:
        for sub in ("cur", "new"):
            if (d / sub).is_dir():
                total += sum(f.stat().st_size for f in (d / sub).iterdir())
    return total


def files(maildir: Path) -> int:
    return sum(len(list((maildir / sub).iterdir())) for sub in ("cur", "new", "tmp") if (maildir / sub).is_dir())


class QuotaServer:
    def __init__(self, inst: Instance):
        self.inst = inst
        self.accounts = Accounts(inst.root / "accounts.sqlite")
        self.accounts.set_hash_cost(1, 8, 1)  # fast logins (tests/imap does the same)
        self.n = 0

    def user(self, quota: int | None) -> str:
        self.n += 1
        addr = f"u{self.n}@{DOMAIN}"
        self.accounts.add_user(addr, PASSWORD)
        self.set_quota(addr, quota)
        return addr

    def set_quota(self, addr: str, quota: int | None) -> None:
        """Change a quota in the accounts database, which the server reads live: its lookups notice a
        change within accounts.CACHE_CHECK seconds (a documented bound, not a race)."""
        self.accounts.set_quota(addr, quota)
        time.sleep(3 * CACHE_CHECK)

    def imap(self, addr: str) -> imaplib.IMAP4_SSL:
        c = imaplib.IMAP4_SSL("127.0.0.1", self.inst.port("imaps"), ssl_context=self.inst.client_ssl_context(),
                              timeout=30)
        c.login(addr, PASSWORD)
        return c

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.inst.port("smtp"), timeout=30)


@pytest.fixture(scope="module")
def qs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuotaServer]:
    inst = Instance(tmp_path_factory.mktemp("quota"), DOMAIN,
                    extra_config="[auth]\nfailure_delay = 0.01\nmax_failures = 1000\n")
    inst.start()
    try:
        yield QuotaServer(inst)
    finally:
        rc = inst.stop()
        log = inst.log.read_text()
        assert "Traceback" not in log, log[-4000:]
        assert rc == 0, log[-2000:]


def message(n: int, subject: str = "q") -> bytes:
    return f"From: s@remote.test\r\nTo: x@{DOMAIN}\r\nSubject: {subject}\r\n\r\n".encode() + b"y" * n + b"\r\n"


def storage(c: imaplib.IMAP4_SSL, mailbox: str = "INBOX") -> tuple[int, int] | None:
    """(usage, limit) in KiB from GETQUOTAROOT, or None when the mailbox has no quota root."""
    typ, data = c.getquotaroot(mailbox)
    assert typ == "OK", data
    text = b" ".join(x if isinstance(x, bytes) else b" ".join(x) for x in data[1] if x)
    m = re.search(rb"\(STORAGE (\d+) (\d+)\)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def test_smtp_rcpt_and_data_over_quota(qs: QuotaServer) -> None:
    addr = qs.user(None)
    md = qs.inst.maildir(addr)
    with qs.smtp() as s:
        s.sendmail("s@remote.test", [addr], message(1000))
        s.sendmail("s@remote.test", [addr], message(1000))
    used = disk_bytes(md)
    qs.set_quota(addr, used + 500)  # room for less than the next message
    with qs.smtp() as s:
        s.ehlo("client.test")
        s.mail("s@remote.test")  # no SIZE=: RCPT accepted, the message turns out not to fit
        assert s.rcpt(addr)[0] == 250
        code, text = s.data(message(1000))
        assert (code, text[:5]) == (452, b"4.2.2"), text
        assert disk_bytes(md) == used and files(md) == 2  # nothing stored, nothing left in tmp/
        # RFC 1870: the declared SIZE (smtplib sends it) is checked at RCPT already
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            s.sendmail("s@remote.test", [addr], message(1000))
        assert exc.value.recipients[addr] == (452, b"4.2.2 Mailbox full")
        s.sendmail("s@remote.test", [addr], message(10))  # a small one still fits
    qs.set_quota(addr, disk_bytes(md))
    with qs.smtp() as s:
        s.ehlo("client.test")
        s.mail("s@remote.test")
        code, text = s.rcpt(addr)
        assert (code, text) == (452, b"4.2.2 Mailbox full")
    with qs.imap(addr) as c:
        assert storage(c) == (disk_bytes(md) // 1024, disk_bytes(md) // 1024)


def test_lmtp_answers_per_recipient(qs: QuotaServer) -> None:
    full, free = qs.user(None), qs.user(None)
    with smtplib.LMTP(str(qs.inst.lmtp_path), timeout=30) as s:
        s.sendmail("s@remote.test", [full], message(200))
    qs.set_quota(full, disk_bytes(qs.inst.maildir(full)) + 100)
    with smtplib.LMTP(str(qs.inst.lmtp_path), timeout=30) as s:
        s.ehlo("client.test")
        s.mail("s@remote.test")
        assert s.rcpt(full)[0] == 250 and s.rcpt(free)[0] == 250  # both have room for something
        code, text = s.data(message(1000))  # RFC 2033 §4.2: one reply per recipient, in order
        assert (code, text[:5]) == (452, b"4.2.2"), text
        code, text = s.getreply()
        assert code == 250, text
    assert len(qs.inst.messages(full)) == 1 and len(qs.inst.messages(free)) == 1


def test_getquotaroot_follows_the_disk(qs: QuotaServer) -> None:
    addr = qs.user(1 << 20)
    md = qs.inst.maildir(addr)
    with qs.smtp() as s:
        for i in range(3):
            s.sendmail("s@remote.test", [addr], message(3000 + i * 1000))
    with qs.imap(addr) as c:
        assert storage(c) == (disk_bytes(md) // 1024, 1024)
        typ, data = c.getquota('""')
        assert typ == "OK" and data[0] == f'"" (STORAGE {disk_bytes(md) // 1024} 1024)'.encode(), data
        c.select("INBOX")
        c.store("1", "+FLAGS", "\\Deleted")
        typ, data = c.status("INBOX", "(DELETED DELETED-STORAGE)")
        assert typ == "OK" and b"DELETED 1 DELETED-STORAGE " in data[0], data
        c.expunge()
        assert storage(c) == (disk_bytes(md) // 1024, 1024)
        # another program removes a message file: the next command's rescan counts it
        victim = next(iter(sorted((md / "cur").iterdir()) or sorted((md / "new").iterdir())))
        victim.unlink()
        assert storage(c) == (disk_bytes(md) // 1024, 1024)
        assert disk_bytes(md) > 0
        typ, data = c._simple_command("SETQUOTA", '""', "(STORAGE 1)"), None
        assert typ[0] == "NO"
    free = qs.user(None)
    with qs.imap(free) as c:
        assert storage(c) is None  # no quota: no quota root (RFC 9208 §4.1.2)
        assert c.getquota('""')[0] == "NO"


def test_append_over_quota_stores_nothing(qs: QuotaServer) -> None:
    addr = qs.user(5000)
    md = qs.inst.maildir(addr)
    with qs.imap(addr) as c:
        assert c.append("INBOX", None, None, message(2000))[0] == "OK"
        assert c.append("INBOX", None, None, message(2000))[0] == "OK"
        used = disk_bytes(md)
        typ, data = c.append("INBOX", None, None, message(2000))
        assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]"), data
        c.select("INBOX")
        typ, data = c.copy("1:2", "Archive")
        assert typ == "NO" and data[0].startswith(b"[OVERQUOTA]"), data
        assert disk_bytes(md) == used and files(md) == 2
        assert c.status("Archive", "(MESSAGES)")[1][0].endswith(b"(MESSAGES 0)")
        assert c.uid("MOVE", "1", "Archive")[0] == "OK"  # moving needs no room
        assert disk_bytes(md) == used


def test_two_sessions_appending_never_exceed_the_quota(qs: QuotaServer) -> None:
    one = len(message(1000))
    addr = qs.user(7 * one)
    md = qs.inst.maildir(addr)
    answers: list[str] = []
    lock = threading.Lock()

    def session() -> None:
        with qs.imap(addr) as c:
            for _ in range(6):
                typ, _data = c.append("INBOX", None, None, message(1000))
                with lock:
                    answers.append(typ)

    together(session, session)
    assert answers.count("OK") == 7 and answers.count("NO") == 5
    assert disk_bytes(md) == 7 * one
    with qs.imap(addr) as c:
        assert storage(c) == (7 * one // 1024, 7 * one // 1024)


def test_warning_mail_once_per_level(qs: QuotaServer) -> None:
    limit = 40000
    addr = qs.user(limit)
    md = qs.inst.maildir(addr)

    def warnings(level: int) -> list[bytes]:
        return [m for m in qs.inst.messages(addr) if f"Subject: Your mailbox is {level}% full".encode() in m]

    def fill_to(percent: int) -> None:
        with qs.smtp() as s:
            for _ in range(100):  # bounded
                if disk_bytes(md) * 100 >= percent * limit:
                    return
                s.sendmail("s@remote.test", [addr], message(5000 if disk_bytes(md) < 0.7 * limit else 300))
        raise AssertionError("never filled")

    fill_to(80)
    assert wait_for(lambda: len(warnings(80)) == 1)
    warning = warnings(80)[0]
    assert warning.startswith(b"Return-Path: <>\r\n")
    assert b"\r\nAuto-Submitted: auto-generated\r\n" in warning
    fill_to(95)
    assert wait_for(lambda: len(warnings(95)) == 1)
    assert len(warnings(80)) == 1  # once per crossing
    assert disk_bytes(md) <= limit


def wait_for(pred, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    """Poll a condition a bounded time (the warning is delivered after the 250 of the message)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_cli_quota_user_list_and_status(qs: QuotaServer) -> None:
    addr = f"cli@{DOMAIN}"
    qs.inst.cli("user", "add", addr, "--quota", "10K", "--password-stdin", stdin=PASSWORD + "\n")

    def listed() -> str:
        out = qs.inst.cli("user", "list").stdout
        return next(line for line in out.splitlines() if line.startswith(addr + "\t"))

    assert listed().endswith("0B/10K (0%), 0 messages")
    md = qs.inst.maildir(addr)
    with smtplib.LMTP(str(qs.inst.lmtp_path), timeout=30) as s:  # never indexed: counted from new/
        for _ in range(60):
            if disk_bytes(md) * 100 >= 95 * 10240:
                break
            s.sendmail("s@remote.test", [addr], message(200))
    pct = disk_bytes(md) * 100 // 10240
    assert pct >= 95
    assert f"/10K ({pct}%)" in listed()
    st = qs.inst.cli("status", check=False)
    assert f"! quota: {addr} at {pct}% ({disk_bytes(md)} of 10240 bytes)" in st.stdout, st.stdout
    assert st.returncode == 1
    qs.inst.cli("user", "quota", addr, "1M")
    assert "/1M (" in listed()
    qs.inst.cli("user", "quota", addr, "none")
    assert "/unlimited, " in listed()
    qs.inst.cli("domain", "quota", DOMAIN, "5M")
    qs.inst.cli("user", "quota", addr, "default")
    assert "/5M (" in listed()
    qs.inst.cli("domain", "quota", DOMAIN, "default")
    assert "/unlimited, " in listed()
    bad = qs.inst.cli("user", "quota", addr, "lots", check=False)
    assert bad.returncode == 1 and "not a size" in bad.stderr


def test_permanent_refusal_when_configured(tmp_path: Path) -> None:
    inst = Instance(tmp_path / "perm", DOMAIN, extra_config="[limits]\nquota_reject_permanent = true\n")
    accounts = Accounts(inst.root / "accounts.sqlite")
    accounts.set_hash_cost(1, 8, 1)
    addr = f"p@{DOMAIN}"
    accounts.add_user(addr, PASSWORD)
    accounts.set_quota(addr, 1000)
    inst.start()
    try:
        with smtplib.SMTP("127.0.0.1", inst.port("smtp"), timeout=30) as s:
            s.ehlo("client.test")
            s.mail("s@remote.test")
            assert s.rcpt(addr)[0] == 250  # empty mailbox: accepted
            code, text = s.data(message(2000))
            assert (code, text) == (552, b"5.2.2 Mailbox full")
            with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:  # SIZE= known at RCPT
                s.sendmail("s@remote.test", [addr], message(2000))
            assert exc.value.recipients[addr] == (552, b"5.2.2 Mailbox full")
        assert files(inst.maildir(addr)) == 0
    finally:
        assert inst.stop() == 0
