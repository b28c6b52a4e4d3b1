"""Least privilege, as root: `serve` binds, then runs as the service user (server and delivery agent,
read from /proc/PID/status), refuses to stay root unless told, and admin commands run as root leave
nothing the server cannot write; delivery, IMAP and POP3 keep working after each of them.

A deployment installs postier where its service user can read it (a venv under /opt, pipx with
PIPX_HOME=/opt/pipx): after the drop the server still imports modules and starts the delivery agent.
A development machine may have Python under /root (pyenv), which is 0700: the fixture lets the
service user search those directories (an ACL entry, `setfacl`, removed when the last test using it
ends) instead of changing their mode for everyone.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import pwd
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.dnsserver import DNSServer
from tests.hardening.conftest import Sink
from tests.harness import STAY_ROOT, Instance
from tests.programs import require

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs the suite as root)")

PASSWORD = "password123"


def ids(pid: int) -> dict[str, list[int]]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            out[key] = [int(v) for v in value.split()]
    return out


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def closed_ancestors() -> list[Path]:
    """Directories on the way to the interpreter and the checkout that others may not search."""
    out: list[Path] = []
    for target in (Path(os.path.realpath(sys.executable)), Path(sys.prefix), Path(__file__).resolve()):
        for d in reversed(target.parents):
            if not d.stat().st_mode & 0o001 and d not in out:
                out.append(d)
    return out


@contextmanager
def searchable_by(user: str) -> Iterator[None]:
    """Grant `user` search permission (ACL) on closed_ancestors(); counted across test processes."""
    import fcntl

    dirs = closed_ancestors()
    if not dirs:
        yield
        return
    setfacl = require("setfacl")
    lock = Path(tempfile.gettempdir()) / "postier-test-acl.lock"
    count = Path(tempfile.gettempdir()) / "postier-test-acl.count"

    def step(delta: int) -> None:
        with open(lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            n = int(count.read_text() or 0) if count.exists() else 0
            if n == 0 and delta > 0:
                for d in dirs:
                    subprocess.run([setfacl, "-m", f"u:{user}:x", str(d)], check=True, timeout=30)
            n += delta
            if n == 0:
                for d in dirs:
                    subprocess.run([setfacl, "-x", f"u:{user}", str(d)], check=False, timeout=30)
            count.write_text(str(n))

    step(+1)
    try:
        yield
    finally:
        step(-1)


@pytest.fixture(scope="module")
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def inst(sink: Sink) -> Iterator[Instance]:
    require("useradd")
    with DNSServer() as dns:
        dns.add("remote.test", "A", "127.0.0.1")  # implicit MX (RFC 5321 §5.1): the sink
        with _instance(f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {sink.port}\n') as i:
            yield i


@contextmanager
def _instance(extra: str) -> Iterator[Instance]:
    # Not under pytest's 0700 temporary directory: the service user must be able to reach its data.
    root = Path(tempfile.mkdtemp(prefix="postier-priv-", dir="/tmp"))
    os.chmod(root, 0o755)
    i = Instance(root / "data", "p.test", quickstart_args=("--user", "postier"))
    i.add_config(extra)
    try:
        with searchable_by("postier"):
            i.add_user("alice@p.test", PASSWORD)
            i.start()
            try:
                yield i
            finally:
                i.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def postier_ids() -> tuple[int, int]:
    pw = pwd.getpwnam("postier")
    return pw.pw_uid, pw.pw_gid


def deliver(inst: Instance, to: str) -> bytes:
    marker = f"m-{time.monotonic_ns()}".encode()
    with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
        s.sendmail("x@remote.test", [to], b"Subject: " + marker + b"\r\n\r\nhi\r\n")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(marker in m for m in inst.messages(to)):
            return marker
        time.sleep(0.05)
    raise AssertionError(f"not delivered: {inst.log.read_text()[-3000:]}")


def read_back(inst: Instance, user: str, marker: bytes) -> None:
    with imaplib.IMAP4(*inst.addr("imap"), timeout=10) as m:
        m.starttls(inst.client_ssl_context())
        m.login(user, PASSWORD)
        m.select("INBOX")
        typ, data = m.search(None, "SUBJECT", marker.decode())
        assert typ == "OK" and data[0], "IMAP does not see the message"
    p = poplib.POP3(*inst.addr("pop3"), timeout=10)
    try:
        p.stls(inst.client_ssl_context())
        p.user(user)
        p.pass_(PASSWORD)
        assert p.stat()[0] >= 1
    finally:
        p.quit()


def assert_nothing_root_owned(inst: Instance) -> None:
    uid, _ = postier_ids()
    bad = [str(p) for p in inst.root.rglob("*") if p.name != "server.log" and p.lstat().st_uid != uid]
    assert not bad, f"not owned by the service user: {bad[:10]}"


def test_quickstart_created_the_user_and_handed_over_the_data(inst: Instance) -> None:
    uid, gid = postier_ids()
    st = inst.root.stat()
    assert (st.st_uid, st.st_gid) == (uid, gid)
    assert 'user = "postier"' in inst.config.read_text()
    assert_nothing_root_owned(inst)


def test_server_and_agent_run_as_the_service_user(inst: Instance) -> None:
    assert inst.proc is not None
    marker = deliver(inst, "alice@p.test")  # starts the delivery agent
    uid, gid = postier_ids()
    server = ids(inst.proc.pid)
    assert server["Uid"] == [uid] * 4 and server["Gid"] == [gid] * 4, server
    assert 0 not in server["Groups"]
    agents = children(inst.proc.pid)
    assert agents, "no delivery agent process"
    for pid in agents:
        got = ids(pid)
        assert got["Uid"] == [uid] * 4 and got["Gid"] == [gid] * 4, got
    read_back(inst, "alice@p.test", marker)
    log = inst.log.read_text()
    assert f"running as postier (uid {uid}" in log


def test_relays_through_the_queue(inst: Instance, sink: Sink) -> None:
    marker = f"relay-{time.monotonic_ns()}".encode()
    with smtplib.SMTP(*inst.addr("submission"), timeout=10) as s:
        s.starttls(context=inst.client_ssl_context())
        s.login("alice@p.test", PASSWORD)
        s.sendmail("alice@p.test", ["bob@remote.test"],
                   b"From: alice@p.test\r\nTo: bob@remote.test\r\nSubject: " + marker + b"\r\n\r\nhi\r\n")
    deadline = time.monotonic() + 30
    while sink.count(marker) < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sink.count(marker) == 1, inst.log.read_text()[-3000:]
    assert_nothing_root_owned(inst)


def test_runtime_files_are_private(inst: Instance) -> None:
    deliver(inst, "alice@p.test")
    files = [p for p in inst.maildir("alice@p.test").rglob("*") if p.is_file()]
    assert files and all(p.stat().st_mode & 0o077 == 0 for p in files), [oct(p.stat().st_mode) for p in files]
    assert inst.lmtp_path.stat().st_uid == postier_ids()[0]


@pytest.mark.parametrize("command", [
    ("user", "add", "bob@p.test", "--password-stdin"),
    ("user", "passwd", "alice@p.test", "--password-stdin"),
    ("alias", "add", "team@p.test", "alice@p.test"),
    ("domain", "add", "q.test"),
    ("dkim", "generate", "p.test", "--algorithm", "ed25519"),
    ("queue", "retry", "--all"),
    ("reindex", "alice@p.test"),
    ("dns", "records", "p.test"),
])
def test_admin_commands_as_root_leave_the_server_working(inst: Instance, command: tuple[str, ...]) -> None:
    stdin = PASSWORD + "\n" if "--password-stdin" in command else None
    inst.cli(*command, stdin=stdin)
    assert_nothing_root_owned(inst)
    marker = deliver(inst, "alice@p.test")
    read_back(inst, "alice@p.test", marker)
    if command[:3] == ("user", "add", "bob@p.test"):
        read_back(inst, "bob@p.test", deliver(inst, "bob@p.test"))


def test_refuses_to_stay_root(tmp_path: Path) -> None:
    i = Instance(tmp_path / "root", "r.test", quickstart_args=STAY_ROOT)
    i.config.write_text(i.config.read_text().replace("allow_root = true", "allow_root = false"))
    with pytest.raises(AssertionError) as exc:
        i.start(timeout=20)
    out = str(exc.value)
    assert "postier: refusing to run as root: set [server] user" in out
    assert "[server] allow_root = true" in out


def test_certificate_readable_only_by_root_still_serves_tls(tmp_path: Path) -> None:
    """The TLS contexts are loaded before root is given up (as Postfix and Dovecot read their keys):
    a key in a root-only directory, as certbot keeps them, works."""
    require("useradd")
    with _instance("") as i:
        i.stop()
        private = tmp_path / "letsencrypt"
        private.mkdir(mode=0o700)
        for name in ("cert.pem", "key.pem"):
            shutil.copy(i.root / "tls" / name, private / name)
            os.chmod(private / name, 0o600)
        text = i.config.read_text()
        text = text.replace('cert = "tls/cert.pem"', f'cert = "{private / "cert.pem"}"')
        text = text.replace('key = "tls/key.pem"', f'key = "{private / "key.pem"}"')
        i.config.write_text(text)
        with searchable_by("postier"):
            i.start()
            try:
                uid, _ = postier_ids()
                assert i.proc is not None and ids(i.proc.pid)["Uid"][0] == uid
                with imaplib.IMAP4_SSL(*i.addr("imaps"), ssl_context=i.client_ssl_context(), timeout=10) as m:
                    m.login("alice@p.test", PASSWORD)
            finally:
                i.stop()
