"""Running postier instances for the POP3 tests (real process, real sockets, real TLS) and helpers."""

from __future__ import annotations

import email
import itertools
import poplib
import smtplib
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.accounts import Accounts
from postier.store.index import read_journal
from tests.hardening.conftest import Line
from tests.harness import Instance

PASSWORD = "password123"
_serial = itertools.count(1)
_accounts: dict[Path, Accounts] = {}


@pytest.fixture(scope="module")
def pop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    """Default settings; each test makes its own users so tests do not depend on each other."""
    inst = Instance(tmp_path_factory.mktemp("pop"), "a.test", extra_config="[auth]\nfailure_delay = 0.05\n")
    inst.start()
    yield inst
    inst.stop()


def new_user(inst: Instance, fmt: str | None = None) -> str:
    """A fresh user, added to the running instance's account database from this process.

    The password hash uses argon2's cheapest parameters (they travel inside the hash, so the server
    verifies with them): a login then costs milliseconds instead of half a second, which keeps this
    test suite, with its many logins, fast. The real parameters are tested with the accounts."""
    accounts = _accounts.get(inst.root)
    if accounts is None:
        accounts = _accounts[inst.root] = Accounts(inst.root / "accounts.sqlite")
        accounts.set_hash_cost(1, 8, 1)
    address = f"u{next(_serial)}@{inst.domain}"
    accounts.add_user(address, PASSWORD, fmt)
    return address


def deliver(inst: Instance, rcpt: str, subject: str, body: bytes = b"hello\r\n") -> bytes:
    """Deliver one message over SMTP (port 25) and return what was stored for it (CRLF lines)."""
    msg = b"Subject: " + subject.encode() + b"\r\nFrom: x@remote.test\r\n\r\n" + body
    with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
        s.sendmail("x@remote.test", [rcpt], msg)
    return stored(inst, rcpt, subject)


def stored(inst: Instance, address: str, subject: str) -> bytes:
    hits = [m for m in inst.messages(address) if subject_of(m) == subject]
    assert len(hits) == 1, f"{len(hits)} stored messages with subject {subject!r}"
    return hits[0]


def subject_of(raw: bytes) -> str:
    return str(email.message_from_bytes(raw).get("Subject", ""))


def maildir_files(inst: Instance, address: str) -> list[Path]:
    md = inst.maildir(address)
    return sorted(p for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir())


def imap_uidl(inst: Instance, address: str) -> dict[str, str]:
    """subject -> the UIDL the IMAP identity implies (UID and UIDVALIDITY as in the index's journal)."""
    md = inst.maildir(address)
    journal = read_journal(md)
    assert journal is not None
    out = {}
    for f in maildir_files(inst, address):
        uid = journal.uids[f.name.split(":", 1)[0]]
        out[subject_of(f.read_bytes())] = f"{uid:08X}{journal.uidvalidity:08X}"
    return out


def pop3s(inst: Instance, user: str | None = None, password: str = PASSWORD) -> poplib.POP3_SSL:
    """A poplib client on the implicit-TLS port, logged in with USER/PASS when `user` is given."""
    p = poplib.POP3_SSL(*inst.addr("pop3s"), context=inst.client_ssl_context(), timeout=20)
    if user is not None:
        p.user(user)
        p.pass_(password)
    return p


def login_retrying(inst: Instance, user: str, timeout: float = 10.0) -> poplib.POP3_SSL:
    """Log in, waiting while an ended session of the same user still holds the maildrop lock."""
    deadline = time.monotonic() + timeout
    while True:
        p = pop3s(inst)
        p.user(user)
        try:
            p.pass_(PASSWORD)
            return p
        except poplib.error_proto as exc:
            p.close()
            if b"[IN-USE]" not in exc.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def retr_text(lines: list[bytes]) -> bytes:
    """poplib's RETR lines (dot-unstuffed, CRLF removed) back to message bytes."""
    return b"".join(line + b"\r\n" for line in lines)


class Raw(Line):
    """A raw POP3 connection for byte-exact checks."""

    def __init__(self, inst: Instance, role: str = "pop3", source: str | None = None):
        super().__init__(inst.addr(role), source, timeout=20)
        self.inst = inst
        if role == "pop3s":
            self.sock = inst.client_ssl_context().wrap_socket(self.sock, server_hostname="mail.a.test")

    def multiline(self) -> bytes:
        """The raw body of a multi-line response, up to and including the terminating ".\\r\\n"."""
        while b"\r\n.\r\n" not in b"\r\n" + self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        framed = b"\r\n" + self.buf
        end = framed.index(b"\r\n.\r\n") + 5
        body, self.buf = framed[2:end], framed[end:]
        return body

    def starttls(self, ctx: ssl.SSLContext | None = None) -> None:
        assert not isinstance(self.sock, ssl.SSLSocket)
        ctx = ctx or self.inst.client_ssl_context()
        self.sock = ctx.wrap_socket(self.sock, server_hostname="mail.a.test")

    def close(self) -> None:
        self.sock.close()
