"""SRS end to end: two postier processes (a.test forwards, b.test receives with SPF on) and the
in-process DNS server. Mail forwarded by an alias and by a Sieve redirect reaches b.test with an SRS
sender at a.test that passes SPF there (the original sender's own SPF would fail from a.test's
address); a bounce to that SRS address (null sender, as b.test's queue sends it) goes back to the
original sender; a forged SRS address is refused at RCPT with 550 5.1.1."""

from __future__ import annotations

import re
import smtplib
from collections.abc import Iterator

import pytest

from tests.dnsserver import DNSServer
from tests.harness import Instance

ADDRS = {"a.test": "127.0.0.2", "b.test": "127.0.0.3"}


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Instance, Instance]]:
    with DNSServer() as dns:
        a = Instance(tmp_path_factory.mktemp("a"), "a.test", address=ADDRS["a.test"])
        b = Instance(tmp_path_factory.mktemp("b"), "b.test", address=ADDRS["b.test"], mailauth=True)
        for inst, ip in ((a, ADDRS["a.test"]), (b, ADDRS["b.test"])):
            dns.add(inst.domain, "MX", f"10 {inst.hostname}")
            dns.add(inst.hostname, "A", ip)
            dns.add(inst.domain, "TXT", f"v=spf1 ip4:{ip} -all")  # each domain sends from its own address
        common = f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
        a.add_config(common + f'[outbound]\nsmtp_port = {b.port("smtp")}\nsource_address = "{ADDRS["a.test"]}"\n')
        b.add_config(common + f'[outbound]\nsmtp_port = {a.port("smtp")}\nsource_address = "{ADDRS["b.test"]}"\n'
                     '[mailauth]\ndkim_verify = false\ndmarc = false\n')
        a.add_user("alice@a.test")
        a.cli("alias", "add", "fwd@a.test", "bob@b.test")
        a.cli("alias", "add", "lost@a.test", "nobody@b.test")
        a.cli("sieve", "put", "alice@a.test", "main", "-", stdin='redirect "bob@b.test";\n')
        a.cli("sieve", "activate", "alice@a.test", "main")
        b.add_user("bob@b.test")
        b.add_user("carol@b.test")
        try:
            a.start()
            b.start()
            yield a, b
        finally:
            a.stop()
            b.stop()




def send(inst: Instance, frm: str, to: str, subject: str) -> None:
    data = f"From: <carol@b.test>\r\nTo: <{to}>\r\nSubject: {subject}\r\n\r\nhello\r\n".encode()
    with smtplib.SMTP(*inst.addr("smtp"), timeout=30) as s:
        s.sendmail(frm, [to], data)


def forwarded_sender(msg: bytes) -> str:
    m = re.match(rb"Return-Path: <([^>]*)>", msg)
    assert m is not None, msg[:300]
    return m.group(1).decode()


@pytest.mark.parametrize("via", ["fwd@a.test", "alice@a.test"])
def test_forwarded_with_srs_passes_spf(net: tuple[Instance, Instance], via: str) -> None:
    a, b = net
    send(a, "carol@b.test", via, f"forwarded by {via}")
    got = b.wait_message("bob@b.test", f"forwarded by {via}".encode())
    sender = forwarded_sender(got)
    assert sender.startswith("SRS0=") and sender.endswith("@a.test") and "=b.test=carol@" in sender
    assert re.search(rb"spf=pass[^;]*smtp.mailfrom=" + re.escape(sender.encode()), got), got[:800]


def test_bounce_to_srs_returns_to_the_original_sender(net: tuple[Instance, Instance]) -> None:
    a, b = net
    send(a, "carol@b.test", "fwd@a.test", "to be bounced")
    sender = forwarded_sender(b.wait_message("bob@b.test", b"to be bounced"))
    # b.test's bounce: the null sender, to the SRS address, from b.test's address
    dsn = (b"From: MAILER-DAEMON@mail.b.test\r\nTo: <" + sender.encode() + b">\r\nSubject: bounce of it\r\n"
           b"Auto-Submitted: auto-replied\r\n\r\nundeliverable\r\n")
    with smtplib.SMTP(*a.addr("smtp"), timeout=30, source_address=(ADDRS["b.test"], 0)) as s:
        s.sendmail("", [sender], dsn)
    b.wait_message("carol@b.test", b"bounce of it")


def test_forged_srs_refused(net: tuple[Instance, Instance]) -> None:
    a, _b = net
    with smtplib.SMTP(*a.addr("smtp"), timeout=30) as s:
        s.ehlo("x.test")
        s.mail("")
        code, msg = s.rcpt("SRS0=abcd=aa=b.test=carol@a.test")
    assert code == 550 and b"5.1.1" in msg


def test_real_bounce_of_forwarded_mail_returns(net: tuple[Instance, Instance]) -> None:
    """b.test refuses the forwarded copy (no such user): a.test's DSN goes to the SRS sender, which a.test
    reverses, and the DSN reaches the original sender at b.test."""
    a, b = net
    send(a, "carol@b.test", "lost@a.test", "will not arrive")
    dsn = b.wait_message("carol@b.test", b"nobody@b.test", timeout=60)
    assert b"delivery-status" in dsn.lower() and b"Return-Path: <>" in dsn
