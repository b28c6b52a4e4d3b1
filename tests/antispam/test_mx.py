"""Spam defence at a real MX: DNSBL screening before the greeting, greylisting at RCPT, GTUBE and a real
Rspamd at the end of DATA, fail-open, `postier why`, and learning from IMAP moves into Junk."""

from __future__ import annotations

import asyncio
import imaplib
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.antispam.builtin import GTUBE
from postier.antispam.rspamd import RspamdClient
from postier.mailauth.dkim import generate_key, sign
from tests.dnsserver import DNSServer
from tests.harness import Instance, start_all

from .rspamd_server import RspamdServer

PASSWORD = "password123"


def banner(inst: Instance, source: str, role: str = "smtp") -> bytes:
    """The greeting a client connecting from `source` (a loopback address) gets."""
    with socket.create_connection(inst.addr(role), timeout=20, source_address=(source, 0)) as s:
        s.settimeout(20)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.sendall(b"QUIT\r\n")
        return data


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as d:
        d.add("2.0.0.127.bl.test", "A", "127.0.0.2")  # RFC 5782 §5 test entry
        d.add("3.0.0.127.bl.test", "A", "127.255.255.254")  # "query refused", not a listing
        d.servfail("4.0.0.127.bl.test")
        d.add("5.0.0.127.wl.test", "A", "127.0.10.2")
        d.add("5.0.0.127.bl.test", "A", "127.0.0.2")
        yield d


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory, dns: DNSServer) -> Iterator[Instance]:
    inst = Instance(tmp_path_factory.mktemp("screened"), "b.test",
                    extra_config=f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
                                 "[mailauth]\nspf = false\ndkim_verify = false\ndmarc = false\n"
                                 '[antispam]\ndnsbl = [{zone = "bl.test", weight = 3}]\n'
                                 'dnswl = [{zone = "wl.test"}]\nthreshold = 3\n')
    inst.add_user("u@b.test", PASSWORD)
    inst.start()
    try:
        yield inst
    finally:
        inst.stop()


def test_listed_client_refused_at_greeting_naming_the_list(screened: Instance) -> None:
    greeting = banner(screened, "127.0.0.2")
    assert greeting.startswith(b"554 5.7.1 ") and b"bl.test" in greeting, greeting
    assert banner(screened, "127.0.0.3").startswith(b"220 ")  # 127.255.255.254: ignored
    assert banner(screened, "127.0.0.4").startswith(b"220 ")  # SERVFAIL never blocks
    assert banner(screened, "127.0.0.5").startswith(b"220 ")  # allowlisted wins
    r = screened.cli("why", "127.0.0.2")
    assert "refused" in r.stdout and "listed on bl.test (127.0.0.2)" in r.stdout


def test_submission_is_never_screened(screened: Instance) -> None:
    assert banner(screened, "127.0.0.2", "submission").startswith(b"220 ")


def test_listed_client_gets_503_until_quit(screened: Instance) -> None:
    with socket.create_connection(screened.addr("smtp"), timeout=20, source_address=("127.0.0.2", 0)) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"554")
        s.sendall(b"EHLO x.test\r\n")
        assert f.readline().startswith(b"503")
        s.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"221")


@pytest.fixture
def greylisted(tmp_path: Path) -> Iterator[Instance]:
    inst = Instance(tmp_path / "g", "b.test",
                    extra_config="[antispam]\ngreylist = true\ngreylist_delay = 1\ngreylist_retry_window = 600\n"
                                 "greylist_auto_allow = 1\n")
    inst.add_user("u@b.test", PASSWORD)
    inst.add_user("v@b.test", PASSWORD)
    inst.start()
    try:
        yield inst
    finally:
        inst.stop()


def test_greylisting_first_try_451_then_accepted_then_allowlisted(greylisted: Instance) -> None:
    msg = b"From: s@remote.test\r\nSubject: grey\r\n\r\nhello\r\n"
    with smtplib.SMTP(*greylisted.addr("smtp"), timeout=20) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            s.sendmail("s@remote.test", ["u@b.test"], msg)
        code, text = exc.value.recipients["u@b.test"]
        assert code == 451 and b"4.7.1" in text
    deadline = time.monotonic() + 10
    while True:  # the retry passes once the delay is over (a real MTA retries the same way)
        time.sleep(0.5)
        with smtplib.SMTP(*greylisted.addr("smtp"), timeout=20) as s:
            try:
                s.sendmail("s@remote.test", ["u@b.test"], msg)
                break
            except smtplib.SMTPRecipientsRefused:
                assert time.monotonic() < deadline, "never accepted after the greylisting delay"
    assert len(greylisted.messages("u@b.test")) == 1
    # One pass was enough to allowlist the client's network: a new triplet goes through at once.
    with smtplib.SMTP(*greylisted.addr("smtp"), timeout=20) as s:
        s.sendmail("other@elsewhere.test", ["v@b.test"], msg)
    assert len(greylisted.messages("v@b.test")) == 1


def test_trusted_dkim_signer_skips_greylisting(tmp_path: Path) -> None:
    """`greylist_trusted_dkim`: a passing signature of the trusted domain goes through at once; the same
    sender without it is greylisted at the end of DATA, and its retry after the delay passes."""
    pem, txt = generate_key("ed25519-sha256")
    with DNSServer() as d:
        d.add("sel._domainkey.trusted.test", "TXT", txt)
        inst = Instance(tmp_path / "t", "b.test", extra_config=(
            f'[dns]\nnameservers = ["{d.nameserver}"]\n'
            "[mailauth]\nspf = false\ndkim_verify = true\ndmarc = false\n"
            "[antispam]\ngreylist = true\ngreylist_delay = 1\ngreylist_retry_window = 600\n"
            'greylist_auto_allow = 5\ngreylist_trusted_dkim = ["trusted.test"]\n'))
        inst.add_user("u@b.test", PASSWORD)
        inst.start()
        try:
            msg = (b"From: s@trusted.test\r\nTo: u@b.test\r\nSubject: signed\r\n"
                   b"Message-ID: <signed1@trusted.test>\r\n\r\nhello\r\n")
            signed = sign(msg, "trusted.test", "sel", pem, "ed25519-sha256") + msg
            with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
                s.sendmail("s@news.trusted.test", ["u@b.test"], signed)  # first sight, not greylisted
                with pytest.raises(smtplib.SMTPDataError) as exc:  # unsigned: greylisted after DATA
                    s.sendmail("t@trusted.test", ["u@b.test"], msg.replace(b"signed1", b"unsigned1"))
                assert exc.value.smtp_code == 451 and b"4.7.1" in exc.value.smtp_error
            deadline = time.monotonic() + 10
            while True:
                time.sleep(0.5)
                with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
                    try:
                        s.sendmail("t@trusted.test", ["u@b.test"], msg.replace(b"signed1", b"unsigned1"))
                        break
                    except smtplib.SMTPDataError:
                        assert time.monotonic() < deadline, "never accepted after the greylisting delay"
            got = inst.messages("u@b.test")
            assert sum(b"<signed1@" in m for m in got) == 1 and sum(b"<unsigned1@" in m for m in got) == 1
            why = inst.cli("why", "<signed1@trusted.test>").stdout
            assert "DKIM pass from trusted.test" in why, why
        finally:
            inst.stop()


def test_gtube_refused_without_rspamd(tmp_path: Path) -> None:
    inst = Instance(tmp_path / "plain", "b.test")
    inst.add_user("u@b.test", PASSWORD)
    inst.start()
    try:
        with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
            with pytest.raises(smtplib.SMTPDataError) as exc:
                s.sendmail("g@remote.test", ["u@b.test"], b"Subject: t\r\n\r\n" + GTUBE + b"\r\n")
            assert exc.value.smtp_code == 550 and b"GTUBE" in exc.value.smtp_error
        assert inst.messages("u@b.test") == []
    finally:
        inst.stop()


# -- with a real Rspamd ---------------------------------------------------------------------------------

CLEAN = (b"From: Alice <alice@remote.test>\r\nTo: u@b.test\r\nSubject: lunch tomorrow\r\n"
         b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <clean1@remote.test>\r\n"
         b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nShall we have lunch? Alice\r\n")
# No Date, no Message-ID, an all-caps subject, a lone HTML part: Rspamd scores it over add_header.
SPAMMY = (b"From: WINNER <promo@remote.test>\r\nTo: u@b.test\r\nSubject: YOU WON!!! CLAIM YOUR PRIZE NOW\r\n"
          b"MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
          b"<html><body><a href='http://198.51.100.7/claim'>CLICK HERE</a></body></html>\r\n")


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdServer]:
    with DNSServer() as d:
        # Rspamd asks for header changes (milter.add_headers / remove_headers) as a site would configure.
        srv = RspamdServer(tmp_path_factory.mktemp("rspamd-mx"), d.nameserver, add_header=2.0, local={
            "milter_headers.conf": ('use = ["x-spamd-bar", "remove-headers"];\nskip_local = false;\n'
                                    "skip_authenticated = false;\n"
                                    'routines { remove-headers { headers { "X-Upstream-Filter" = 0; } } }\n')})
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


@pytest.fixture(scope="module")
def filtered(tmp_path_factory: pytest.TempPathFactory, rspamd: RspamdServer) -> Iterator[Instance]:
    root = tmp_path_factory.mktemp("filtered")
    inst = Instance(root, "b.test", extra_config=(
        f'[antispam]\nrspamd = "{rspamd.url}"\nrspamd_controller = "{rspamd.controller}"\n'
        'rspamd_password_file = "rspamd.password"\nscan_outbound = true\n'))
    (root / "rspamd.password").write_text(rspamd.password + "\n")
    inst.add_user("u@b.test", PASSWORD)
    inst.start()
    try:
        yield inst
    finally:
        inst.stop()


def deliver(inst: Instance, msg: bytes) -> str:
    with smtplib.SMTP(*inst.addr("smtp"), timeout=30) as s:
        s.ehlo("mail.remote.test")
        s.mail("alice@remote.test")
        s.rcpt("u@b.test")
        code, text = s.data(msg)
        assert code == 250, text
        return text.decode().split()[-1]  # "Ok: delivered as QID"


def test_clean_to_inbox_spammy_to_junk_with_headers(filtered: Instance) -> None:
    qid = deliver(filtered, CLEAN)
    inbox = [m for m in filtered.messages("u@b.test") if b"clean1@remote.test" in m]
    assert len(inbox) == 1 and b"X-Spam-Status: No, score=" in inbox[0]
    deliver(filtered, SPAMMY)
    junk = filtered.messages("u@b.test", "Junk")
    assert len(junk) == 1 and b"X-Spam-Status: Yes" in junk[0] and b"X-Spam-Report: " in junk[0]
    why = filtered.cli("why", qid).stdout
    assert "inbox" in why and "rspamd: clean" in why, why


def test_rspamd_header_changes_applied_and_forged_spam_headers_removed(filtered: Instance) -> None:
    forged = (b"X-Spam-Status: No, score=-100.00\r\nX-Spam-Flag: NO\r\nX-Upstream-Filter: clean\r\n"
              b" (folded)\r\n")
    deliver(filtered, forged + CLEAN.replace(b"clean1", b"forged1"))
    (msg,) = [m for m in filtered.messages("u@b.test") if b"forged1@remote.test" in m]
    head = msg.split(b"\r\n\r\n", 1)[0]
    assert head.count(b"X-Spam-Status:") == 1 and b"score=-100" not in head  # only ours
    assert b"X-Spam-Flag: NO" not in head
    assert b"X-Upstream-Filter" not in head and b"(folded)" not in head  # Rspamd's remove_headers
    assert b"X-Spamd-Bar:" in head  # Rspamd's add_headers


def test_gtube_rejected_at_data(filtered: Instance) -> None:
    with smtplib.SMTP(*filtered.addr("smtp"), timeout=30) as s:
        with pytest.raises(smtplib.SMTPDataError) as exc:
            s.sendmail("alice@remote.test", ["u@b.test"], CLEAN.replace(b"Alice\r\n", GTUBE + b"\r\n"))
        assert exc.value.smtp_code == 550


def learned(rspamd: RspamdServer) -> int:
    async def stat() -> int:
        c = RspamdClient(rspamd.url, rspamd.controller, rspamd.password)
        try:
            return int((await c.stat()).get("learned", 0))
        finally:
            await c.close()

    return asyncio.run(stat())


def wait_learned(rspamd: RspamdServer, count: int) -> None:
    deadline = time.monotonic() + 30
    while learned(rspamd) < count:  # learnt in the background, after the OK
        assert time.monotonic() < deadline, "the user's verdict never reached Rspamd"
        time.sleep(0.3)


def test_move_into_junk_trains_rspamd(filtered: Instance, rspamd: RspamdServer) -> None:
    deliver(filtered, CLEAN.replace(b"clean1", b"train1").replace(b"lunch tomorrow", b"cheap meds"))
    before = learned(rspamd)
    c = imaplib.IMAP4_SSL(*filtered.addr("imaps"), ssl_context=filtered.client_ssl_context())
    try:
        c.login("u@b.test", PASSWORD)
        c.select("INBOX")
        typ, data = c.uid("SEARCH", "HEADER", "Message-ID", "train1")
        uid = data[0].split()[-1].decode()
        typ, _ = c.uid("MOVE", uid, "Junk")
        assert typ == "OK"
    finally:
        c.logout()
    wait_learned(rspamd, before + 1)


def test_copy_and_expunge_out_of_junk_trains_ham(filtered: Instance, rspamd: RspamdServer) -> None:
    """Clients without MOVE (RFC 6851) copy, flag \\Deleted and expunge: the COPY out of Junk is the verdict."""
    deliver(filtered, SPAMMY.replace(b"CLAIM YOUR PRIZE", b"CLAIM YOUR REWARD") + b"<!-- ham1 -->\r\n")
    before = learned(rspamd)
    c = imaplib.IMAP4_SSL(*filtered.addr("imaps"), ssl_context=filtered.client_ssl_context())
    try:
        c.login("u@b.test", PASSWORD)
        c.select("Junk")
        typ, data = c.uid("SEARCH", "SUBJECT", "REWARD")
        uid = data[0].split()[-1].decode()
        assert c.uid("COPY", uid, "INBOX")[0] == "OK"
        assert c.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert c.expunge()[0] == "OK"
    finally:
        c.logout()
    wait_learned(rspamd, before + 1)
    assert any(b"ham1" in m for m in filtered.messages("u@b.test"))


def test_outbound_scan_refuses_spam_from_our_own_user(filtered: Instance) -> None:
    with smtplib.SMTP(*filtered.addr("submission"), timeout=30) as s:
        s.starttls(context=filtered.client_ssl_context())
        s.login("u@b.test", PASSWORD)
        with pytest.raises(smtplib.SMTPDataError) as exc:
            s.sendmail("u@b.test", ["someone@remote.test"],
                       b"From: u@b.test\r\nSubject: hi\r\n\r\n" + GTUBE + b"\r\n")
        assert exc.value.smtp_code == 550
        s.sendmail("u@b.test", ["u@b.test"], b"From: u@b.test\r\nSubject: note to self\r\n\r\nhello\r\n")


def test_rspamd_down_fail_open_and_closed(tmp_path: Path) -> None:
    open_ = Instance(tmp_path / "open", "b.test", extra_config='[antispam]\nrspamd = "http://127.0.0.1:9"\n'
                                                              "rspamd_timeout = 2\n")
    closed = Instance(tmp_path / "closed", "b.test", extra_config='[antispam]\nrspamd = "http://127.0.0.1:9"\n'
                                                                  "rspamd_timeout = 2\nfail_open = false\n")
    for inst in (open_, closed):
        inst.add_user("u@b.test", PASSWORD)
    start_all([open_, closed])  # both, or neither left running
    try:
        deliver(open_, CLEAN)
        (msg,) = open_.messages("u@b.test")
        assert b"X-Spam-Status: unknown" in msg
        with smtplib.SMTP(*closed.addr("smtp"), timeout=30) as s:
            with pytest.raises(smtplib.SMTPDataError) as exc:
                s.sendmail("alice@remote.test", ["u@b.test"], CLEAN)
            assert exc.value.smtp_code == 451
        assert closed.messages("u@b.test") == []
    finally:
        open_.stop()
        closed.stop()
