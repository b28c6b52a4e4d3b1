"""Cluster mode's accounts across real nodes on 127.0.0.2-4: a user added with node A's command line logs in
on B at once; `user passwd` on B ends the old password on A (whose login cache held it); an alias
added on A routes mail accepted by C; a DKIM key generated on A signs mail submitted on B, and the
signature verifies (dkimpy, with the key's published TXT record)."""

from __future__ import annotations

import email
import imaplib
import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import dkim  # noqa: E402
import psycopg  # noqa: E402

from tests.harness import Instance  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import DOMAIN, _nodes  # noqa: E402

CAROL = f"carol@{DOMAIN}"
TEAM = f"team@{DOMAIN}"


@pytest.fixture
def three(tmp_path: Path, pg: PgServer, s3: S3Server) -> Iterator[tuple[list[Instance], str]]:
    dsn = pg.create_db()
    ns = _nodes(tmp_path, dsn, s3, count=3)
    yield ns, dsn
    for n in ns:
        n.stop()


def login(inst: Instance, user: str, password: str) -> imaplib.IMAP4:
    c = imaplib.IMAP4(*inst.addr("imap"), timeout=20)
    c.starttls(inst.client_ssl_context())
    c.login(user, password)
    return c


def login_fails(inst: Instance, user: str, password: str) -> bool:
    try:
        login(inst, user, password).logout()
    except imaplib.IMAP4.error as exc:
        assert "AUTHENTICATIONFAILED" in str(exc), exc  # a refused password, not an unavailable database
        return True
    return False


def inbox(inst: Instance, user: str, password: str) -> list[bytes]:
    c = login(inst, user, password)
    try:
        typ, _ = c.select("INBOX")
        assert typ == "OK"
        typ, data = c.uid("FETCH", "1:*", "(BODY.PEEK[])")
        return [x[1] for x in data if isinstance(x, tuple)]
    finally:
        c.logout()


def rcpt(inst: Instance, to: str) -> int:
    with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
        s.ehlo()
        s.mail("bob@example.net")
        return s.rcpt(to)[0]


def test_accounts_aliases_and_dkim_keys_serve_every_node(three: tuple[list[Instance], str]) -> None:
    (a, b, c), dsn = three
    # a user added through A's command line logs in on B, with no restart
    a.cli("user", "add", CAROL, "--password-stdin", stdin="first-password\n")
    login(b, CAROL, "first-password").logout()
    assert CAROL in c.cli("user", "list").stdout
    # A remembers the good login (LoginCache); passwd on B ends it on A at once
    login(a, CAROL, "first-password").logout()
    b.cli("user", "passwd", CAROL, "--password-stdin", stdin="second-password\n")
    assert login_fails(a, CAROL, "first-password")
    login(a, CAROL, "second-password").logout()
    # an alias added on A routes mail accepted on C (C asked first: its cached "unknown" is dropped)
    assert rcpt(c, TEAM) == 550
    a.cli("alias", "add", TEAM, CAROL)
    for _ in range(50):  # C's resolution cache compares the change counter every 0.1 s (accounts.py)
        code = rcpt(c, TEAM)
        if code == 250:
            break
    assert code == 250
    with smtplib.SMTP(*c.addr("smtp"), timeout=20) as s:
        s.sendmail("bob@example.net", [TEAM], f"From: bob@example.net\r\nTo: {TEAM}\r\nSubject: via alias\r\n"
                   "\r\nto the team\r\n")
    assert any(b"Subject: via alias" in m for m in inbox(b, CAROL, "second-password"))
    # a DKIM key generated on A signs what B's submission port takes in
    out = a.cli("dkim", "generate", DOMAIN, "--selector", "clu1", "--bits", "1024").stdout
    assert "(active)" in out
    assert "clu1" in c.cli("dkim", "list").stdout
    with smtplib.SMTP(*b.addr("submission"), timeout=20) as s:
        s.starttls(context=b.client_ssl_context())
        s.login(CAROL, "second-password")
        s.sendmail(CAROL, [CAROL], f"From: {CAROL}\r\nTo: {CAROL}\r\nSubject: signed on B\r\n\r\nsigned\r\n")
    signed = [m for m in inbox(c, CAROL, "second-password") if b"Subject: signed on B" in m]
    assert len(signed) == 1
    sig = email.message_from_bytes(signed[0])["DKIM-Signature"]
    assert sig is not None and "d=example.org" in sig.replace(" ", "") and "s=clu1" in sig.replace(" ", "")
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT txt FROM dkim_keys WHERE domain = %s AND selector = 'clu1'", (DOMAIN,)).fetchone()
    assert row is not None
    txt = row[0].encode()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"clu1._domainkey.{DOMAIN}.".encode()
        return txt
    assert dkim.verify(signed[0], dnsfunc=dns)  # Return-Path and Received were added unsigned
