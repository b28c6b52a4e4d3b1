"""Sieve at delivery, end to end: a running postier, scripts installed with `postier sieve put`, mail
over real SMTP (port 25) and LMTP, the results read over IMAP and from the Maildir.

Covers fileinto (seen over IMAP), discard, reject at SMTP time (550 5.7.1) and per recipient over
LMTP, vacation once per sender (and never to a list message), two sessions at once on the shared
vacation store, and the implicit keep of a script that fails at run time.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import smtplib
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.concurrency import together
from tests.harness import Instance

SCRIPTS = {
    "alice@a.test": 'require ["fileinto"];\nif header :contains "subject" "[list]" { fileinto "Lists"; }\n',
    "bob@a.test": 'require ["vacation"];\nvacation :days 1 :subject "Away" "I am away.";\n',
    "dave@a.test": "discard;\n",
    "erin@a.test": 'require ["reject"];\nreject "no mail please";\n',
    "frank@a.test": 'require ["vacation"];\nvacation :days 1 "Frank is away.";\n',
}


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    root: Path = tmp_path_factory.mktemp("sieve")
    inst = Instance(root, "a.test")
    for user in ("alice", "bob", "carol", "dave", "erin", "frank", "gina", "hank", "ivan"):
        inst.add_user(f"{user}@a.test")
    for addr, text in SCRIPTS.items():
        inst.cli("sieve", "put", addr, "main", "-", stdin=text)
        inst.cli("sieve", "activate", addr, "main")
    inst.start()
    yield inst
    inst.stop()


def wait_messages(inst: Instance, address: str, n: int, folder: str = "") -> list[bytes]:
    deadline = time.monotonic() + 20
    while True:
        msgs = inst.messages(address, folder)
        if len(msgs) >= n or time.monotonic() > deadline:
            return msgs
        time.sleep(0.05)


def queue_empty(inst: Instance) -> bool:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if "-- 0 messages" in inst.cli("queue", "list").stdout:
            return True
        time.sleep(0.1)
    return False


def msg(frm: str, to: str, subject: str, extra: str = "") -> bytes:
    return (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}"
            f"@x.test>\r\n{extra}\r\nbody\r\n").encode()


def send(inst: Instance, frm: str, to: list[str], data: bytes) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(*inst.addr("smtp"), timeout=30) as s:
        return s.sendmail(frm, to, data)


def test_fileinto_seen_over_imap(mx: Instance) -> None:
    send(mx, "x@remote.test", ["alice@a.test"], msg("x@remote.test", "alice@a.test", "[list] news"))
    send(mx, "x@remote.test", ["alice@a.test"], msg("x@remote.test", "alice@a.test", "personal"))
    assert len(wait_messages(mx, "alice@a.test", 1, "Lists")) == 1
    with imaplib.IMAP4(*mx.addr("imap")) as im:
        im.starttls(mx.client_ssl_context())
        im.login("alice@a.test", "password123")
        typ, data = im.select("Lists")
        assert typ == "OK" and data[0] == b"1"
        typ, got = im.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK" and b"[list] news" in got[0][1]  # type: ignore[index]
        typ, data = im.select("INBOX")
        assert typ == "OK" and data[0] == b"1"


def test_discard(mx: Instance) -> None:
    assert send(mx, "x@remote.test", ["dave@a.test"], msg("x@remote.test", "dave@a.test", "gone")) == {}
    assert mx.messages("dave@a.test") == []


def test_reject_at_smtp_time(mx: Instance) -> None:
    with pytest.raises(smtplib.SMTPDataError) as e:
        send(mx, "x@remote.test", ["erin@a.test"], msg("x@remote.test", "erin@a.test", "hello"))
    assert e.value.smtp_code == 550 and b"5.7.1" in e.value.smtp_error and b"no mail please" in e.value.smtp_error
    assert mx.messages("erin@a.test") == []


def test_reject_per_recipient_over_lmtp(mx: Instance) -> None:
    with smtplib.LMTP(str(mx.lmtp_path), timeout=30) as s:  # LMTP listens on its Unix socket
        s.ehlo("relay.test")
        s.mail("x@remote.test")
        assert s.rcpt("erin@a.test")[0] == 250
        assert s.rcpt("gina@a.test")[0] == 250
        s.putcmd("data")
        assert s.getreply()[0] == 354
        s.send(msg("x@remote.test", "erin@a.test", "lmtp") + b".\r\n")
        first, second = s.getreply(), s.getreply()
    assert first[0] == 550 and b"5.7.1" in first[1]
    assert second[0] == 250
    assert len(wait_messages(mx, "gina@a.test", 1)) == 1


def test_vacation_once_and_never_to_lists(mx: Instance) -> None:
    send(mx, "carol@a.test", ["bob@a.test"], msg("carol@a.test", "bob@a.test", "first"))
    replies = wait_messages(mx, "carol@a.test", 1)
    assert len(replies) == 1
    assert b"Auto-Submitted: auto-replied" in replies[0] and b"Subject: Away" in replies[0]
    assert b"In-Reply-To: <first@x.test>" in replies[0]
    send(mx, "carol@a.test", ["bob@a.test"], msg("carol@a.test", "bob@a.test", "second"))
    send(mx, "gina@a.test", ["bob@a.test"], msg("gina@a.test", "bob@a.test", "list mail", "List-Id: <l.x.test>\r\n"))
    # Replies are queued before the 250: once the queue is empty, none is on its way.
    assert queue_empty(mx)
    assert len(mx.messages("carol@a.test")) == 1
    assert mx.messages("gina@a.test") == [] or all(b"Frank" not in m and b"Away" not in m
                                                    for m in mx.messages("gina@a.test"))
    assert len(mx.messages("bob@a.test")) == 3  # vacation keeps every message


def test_vacation_two_sessions_at_once_reply_once(mx: Instance) -> None:
    def one(i: int) -> None:
        send(mx, "alice@a.test", ["frank@a.test"], msg("alice@a.test", "frank@a.test", f"concurrent {i}"))

    before = len(mx.messages("alice@a.test"))
    together(*(partial(one, i) for i in range(4)), timeout=60)
    assert queue_empty(mx)
    got = [m for m in mx.messages("alice@a.test")[before:] if b"Frank is away" in m]
    assert len(got) == 1
    assert len(mx.messages("frank@a.test")) == 4


def test_runtime_error_keeps(mx: Instance) -> None:
    script = 'require ["fileinto"];\nfileinto "Not A Valid/Name";\n'
    mx.cli("sieve", "put", "gina@a.test", "odd", "-", stdin=script)
    mx.cli("sieve", "activate", "gina@a.test", "odd")
    before = len(mx.messages("gina@a.test"))
    assert send(mx, "x@remote.test", ["gina@a.test"], msg("x@remote.test", "gina@a.test", "odd")) == {}
    assert len(wait_messages(mx, "gina@a.test", before + 1)) == before + 1


def test_fileinto_non_ascii_and_child_folders_seen_over_imap(mx: Instance) -> None:
    """RFC 5228 §4.1: fileinto names are UTF-8; they land in the folder IMAP lists under that name
    (modified UTF-7 on the wire, RFC 3501 §5.1.3), a child of an existing one too (found by a chaos
    run: both went to INBOX with an ERROR in the log)."""
    script = 'require ["fileinto"];\nif header :contains "subject" "cafe" { fileinto "Café"; }\n' \
             'elsif header :contains "subject" "child" { fileinto "Lists.Работа"; }\n'
    mx.cli("sieve", "put", "ivan@a.test", "names", "-", stdin=script)
    mx.cli("sieve", "activate", "ivan@a.test", "names")
    assert send(mx, "x@remote.test", ["ivan@a.test"], msg("x@remote.test", "ivan@a.test", "cafe time")) == {}
    assert send(mx, "x@remote.test", ["ivan@a.test"], msg("x@remote.test", "ivan@a.test", "child one")) == {}
    assert len(wait_messages(mx, "ivan@a.test", 1, "Caf&AOk-")) == 1
    assert len(wait_messages(mx, "ivan@a.test", 1, "Lists.&BCAEMAQxBD4EQgQw-")) == 1
    with imaplib.IMAP4(*mx.addr("imap")) as im:
        im.starttls(mx.client_ssl_context())
        im.login("ivan@a.test", "password123")
        typ, listed = im.list()
        assert typ == "OK"
        assert any(b' "Caf&AOk-"' in ln or ln.endswith(b" Caf&AOk-") for ln in listed if isinstance(ln, bytes)), listed
        for box, subject in (("Caf&AOk-", b"cafe time"), ("Lists.&BCAEMAQxBD4EQgQw-", b"child one")):
            typ, data = im.select(box)
            assert typ == "OK" and data[0] == b"1", (box, data)
            typ, got = im.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK" and subject in got[0][1]  # type: ignore[index]
        typ, data = im.select("INBOX")
        assert typ == "OK" and data[0] == b"0"
    assert not [ln for ln in mx.log.read_text().splitlines() if "delivery to ivan@a.test failed" in ln]


def test_mdn_when_rejecting_one_of_several_recipients(mx: Instance) -> None:
    before = len(mx.messages("carol@a.test"))
    assert send(mx, "carol@a.test", ["erin@a.test", "gina@a.test"],
                msg("carol@a.test", "erin@a.test", "two of them")) == {}
    got = wait_messages(mx, "carol@a.test", before + 1)[before:]
    assert any(b"disposition-notification" in m and b"no mail please" in m for m in got)
    assert mx.messages("erin@a.test") == []


@pytest.mark.skipif(shutil.which("sieve-connect") is None and os.environ.get("POSTIER_REQUIRE_INTEROP") != "1",
                    reason="sieve-connect not installed")
def test_managesieve_listener_with_sieve_connect(mx: Instance, tmp_path: Path) -> None:
    """The configured port-4190 listener: STARTTLS, PLAIN through the accounts, a script that delivery runs."""
    script = tmp_path / "work.sieve"
    script.write_text('require "fileinto";\nif address :is "from" "boss@x.test" { fileinto "Work"; }\n')

    def sc(*args: str) -> subprocess.CompletedProcess[str]:
        r, w = os.pipe()
        os.write(w, b"password123\n")
        os.close(w)
        try:
            return subprocess.run(
                ["sieve-connect", "--server", "127.0.0.1", "--port", str(mx.port("managesieve")),
                 "--user", "hank@a.test", "--passwordfd", str(r), "--tlscafile", str(mx.root / "tls" / "cert.pem"),
                 "--tlshostname", mx.hostname, "--authmech", "PLAIN", *args],
                capture_output=True, text=True, timeout=60, pass_fds=(r,))
        finally:
            os.close(r)

    up = sc("--upload", "--localsieve", str(script), "--remotesieve", "work")
    assert up.returncode == 0, up.stdout + up.stderr
    assert sc("--activate", "--remotesieve", "work").returncode == 0
    listing = sc("--list")
    assert "work" in listing.stdout and "ACTIVE" in listing.stdout.upper()
    send(mx, "boss@x.test", ["hank@a.test"], msg("boss@x.test", "hank@a.test", "from the boss"))
    assert len(wait_messages(mx, "hank@a.test", 1, "Work")) == 1
