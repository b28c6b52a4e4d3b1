"""External probes and end-to-end checks of the security review (docs/security.md): nmap's
smtp-open-relay script against ports 25 and 587 (with a positive control: it does flag a server
that relays), oversized header blocks, and path traversal through local parts and mailbox names."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Instance

from .conftest import PASSWORD, Line, Sink, add_cheap_user, require

NOT_RELAY = "Server doesn't seem to be an open relay, all tests failed"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    # max_errors raised so that nmap runs all of its relay tests in one session (postier would
    # otherwise hang up after 10 refusals, which nmap reports as a failure to probe)
    i = Instance(tmp_path_factory.mktemp("probe"), "p.test", extra_config="[limits]\nmax_errors = 1000\n")
    add_cheap_user(i, "known@p.test")
    i.start()
    yield i
    i.stop()


def nmap_relay(port: int, domain: str) -> str:
    nmap = require("nmap")
    assert nmap is not None
    # "+" runs the script although the port is not a standard SMTP port (no service detection)
    r = subprocess.run([nmap, "-Pn", "-n", "-p", str(port), "--script", "+smtp-open-relay", "--script-args",
                        f"smtp-open-relay.domain={domain},smtp-open-relay.ip=127.0.0.1", "127.0.0.1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("role", ["smtp", "submission"])
def test_nmap_smtp_open_relay(inst: Instance, role: str) -> None:
    out = nmap_relay(inst.port(role), "p.test")
    verdict = NOT_RELAY if role == "smtp" else "Server isn't an open relay, authentication needed"
    assert "smtp-open-relay" in out and verdict in out, out
    assert "is an open relay" not in out


@pytest.mark.slow
def test_nmap_flags_a_real_open_relay(sink: Sink) -> None:
    """Positive control: the same probe reports a server that accepts every recipient."""
    out = nmap_relay(sink.port, "sink.test")
    assert "Server is an open relay" in out, out


def test_header_block_too_large_gets_552(inst: Instance) -> None:
    head = b"".join(b"X-Filler-%06d: %s\r\n" % (i, b"h" * 60) for i in range(4000))  # ~300 KiB, no end
    with Line(inst.addr("smtp")) as c:
        c.reply()
        c.smtp(b"EHLO big.test")
        assert c.smtp(b"MAIL FROM:<a@remote.test>").startswith(b"250")
        assert c.smtp(b"RCPT TO:<known@p.test>").startswith(b"250")
        assert c.smtp(b"DATA").startswith(b"354")
        c.send(head + b"X-Last: 1\r\n.\r\n")
        assert c.reply().startswith(b"552 5.3.4"), "a header block past 256 KiB must be refused"
        assert c.smtp(b"NOOP").startswith(b"250")  # the session goes on
    assert not [m for m in inst.messages("known@p.test") if b"X-Filler" in m]


@pytest.mark.parametrize("rcpt", [b"../../etc/passwd@p.test", b"..@p.test", b"a/../../b@p.test",
                                  b"\"../x\"@p.test", b"known/../../x@p.test", b".@p.test", b"known@p.test/.."])
def test_traversal_in_local_parts_is_refused(inst: Instance, rcpt: bytes) -> None:
    with Line(inst.addr("smtp")) as c:
        c.reply()
        c.smtp(b"EHLO t.test")
        c.smtp(b"MAIL FROM:<a@remote.test>")
        reply = c.smtp(b"RCPT TO:<" + rcpt + b">")
        assert reply[:1] == b"5", reply


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_traversal_in_mailbox_names_stays_inside_the_maildir(inst: Instance) -> None:
    user = add_cheap_user(inst, "names@p.test")
    outside_before = _tree(inst.root / "mail" / "p.test")
    names = [b"\"../escape\"", b"\"INBOX/../../escape\"", b"\"/abs\"", b"\"~root\"", b"\"a/./b\"",
             b"\"..\"", b"\".hidden\"", b"\"x\\\\y\"", b"\"new\"", b"\"cur\"", b"\"tmp\"", b"\"a//b\"",
             b"{9+}\r\n../escape"]
    with Line(inst.addr("imaps"), tls=inst.client_ssl_context()) as c:
        c.line()
        assert c.imap(b"l", b"LOGIN " + user.encode() + b" " + PASSWORD.encode())[1].startswith(b"l OK")
        for i, n in enumerate(names):
            c.imap(b"c%d" % i, b"CREATE " + n)
            c.imap(b"r%d" % i, b"RENAME INBOX " + n)
            c.imap(b"s%d" % i, b"SELECT " + n)
    home = inst.maildir(user).parent
    for p in (inst.root / "mail" / "p.test").rglob("*"):
        rel = str(p.relative_to(inst.root / "mail" / "p.test"))
        assert rel in outside_before or rel.startswith(home.name), f"created outside the user's home: {rel}"
        assert ".." not in Path(rel).parts
    assert not (inst.root / "escape").exists() and not (inst.root / "mail" / "escape").exists()
    assert os.path.realpath(inst.maildir(user)).startswith(str(home))


def test_mail_loop_gets_554(inst: Instance) -> None:
    trace = b"".join(b"Received: from hop%d.test by hop%d.test; Thu, 1 Jan 2026 00:00:00 +0000\r\n" % (i, i + 1)
                     for i in range(50))  # limits.max_received_headers = 50
    with Line(inst.addr("smtp")) as c:
        c.reply()
        c.smtp(b"EHLO loop.test")
        c.smtp(b"MAIL FROM:<a@remote.test>")
        assert c.smtp(b"RCPT TO:<known@p.test>").startswith(b"250")
        assert c.smtp(b"DATA").startswith(b"354")
        c.send(trace + b"Subject: loop\r\n\r\nx\r\n.\r\n")
        assert c.reply().startswith(b"554 5.4.0")
