"""Crash tests at the named fault points (postier/faults.py: POSTIER_FAULT=NAME[:N] SIGKILLs the
server there) and a full disk. After each crash the server restarts with no repair and the
invariants hold: every acknowledged message is delivered, queued or bounced exactly once (a
duplicate only inside the documented windows); nothing half-written is visible; (UIDVALIDITY, UID)
never names different bytes. The Maildir tmp->new points are tested in tests/smtp/test_faults.py.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DNSServer
from tests.harness import PY, Instance

from .conftest import PASSWORD, Line, Sink, add_cheap_user, require, wait_dead, wait_for

pytestmark = pytest.mark.slow

CONFIG = "[auth]\nallow_plaintext = true\nfailure_delay = 0.0\n"


def restart(inst: Instance, fault: str | None, role: str = "smtp") -> None:
    """(Re)start the server, with POSTIER_FAULT set only for this start."""
    if inst.proc is not None:
        inst.stop()
    old = os.environ.pop("POSTIER_FAULT", None)
    if fault:
        os.environ["POSTIER_FAULT"] = fault
    try:
        inst.start(wait_role=role)
    finally:
        os.environ.pop("POSTIER_FAULT", None)
        if old is not None:
            os.environ["POSTIER_FAULT"] = old


@pytest.fixture(scope="module")
def fi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    inst = Instance(tmp_path_factory.mktemp("faults"), "f.test", extra_config=CONFIG)
    yield inst
    if inst.proc is not None:
        inst.stop()


# -- a small IMAP client that reads FETCH literals ----------------------------------------------

def imap_login(inst: Instance, user: str) -> Line:
    c = Line(inst.addr("imap"))
    assert c.line().startswith(b"* OK")
    assert c.imap(b"l", b"LOGIN " + user.encode() + b" " + PASSWORD.encode())[1].startswith(b"l OK")
    return c


def append(c: Line, msg: bytes) -> tuple[int, int]:
    _u, t = c.imap(b"a", b"APPEND INBOX {%d+}\r\n" % len(msg) + msg)
    m = re.search(rb"a OK \[APPENDUID (\d+) (\d+)\]", t)
    assert m, t
    return int(m.group(1)), int(m.group(2))


def select(c: Line) -> int:
    u, t = c.imap(b"s", b"SELECT INBOX")
    assert t.startswith(b"s OK"), t
    for ln in u:
        m = re.search(rb"\[UIDVALIDITY (\d+)\]", ln)
        if m:
            return int(m.group(1))
    raise AssertionError(u)


def bodies(c: Line) -> dict[int, tuple[bytes, bytes]]:
    """UID -> (flags, full bytes) of every message in the selected mailbox."""
    c.send(b"f UID FETCH 1:* (FLAGS BODY.PEEK[])\r\n")
    out: dict[int, tuple[bytes, bytes]] = {}
    while True:
        ln = c.line()
        if ln.startswith(b"f "):
            assert ln.startswith(b"f OK"), ln
            return out
        m = re.match(rb"\* \d+ FETCH \(.*?UID (\d+).*?FLAGS \(([^)]*)\).*\{(\d+)\}$", ln) or \
            re.match(rb"\* \d+ FETCH \(.*?FLAGS \(([^)]*)\).*?UID (\d+).*\{(\d+)\}$", ln)
        assert m, ln
        a, b, n = m.group(1), m.group(2), int(m.group(3))
        uid, flags = (int(a), b) if a.isdigit() else (int(b), a)
        while len(c.buf) < n:
            chunk = c.sock.recv(65536)
            assert chunk
            c.buf += chunk
        data, c.buf = c.buf[:n], c.buf[n:]
        c.line()  # the closing ")"
        out[uid] = (flags, data)


def msg(tag: str, size: int = 2000) -> bytes:
    return f"From: a@f.test\r\nSubject: {tag}\r\n\r\n".encode() + b"z" * size + f"\r\nend-{tag}\r\n".encode()


# -- IMAP and POP3 -------------------------------------------------------------------------------

def test_kill_during_imap_append(fi: Instance) -> None:
    user = add_cheap_user(fi, "append@f.test")
    restart(fi, "imap.append:2", "imap")
    c = imap_login(fi, user)
    v, u1 = append(c, msg("first"))
    with pytest.raises((EOFError, ConnectionError, AssertionError)):
        append(c, msg("second"))  # the server dies: no OK for this one
    c.close()
    wait_dead(fi)
    restart(fi, None, "imap")
    c = imap_login(fi, user)
    assert select(c) == v  # UIDVALIDITY unchanged
    got = bodies(c)
    assert got[u1][1] == msg("first")  # (v, u1) still names the same bytes
    seconds = [u for u, (_f, b) in got.items() if b"Subject: second" in b]
    assert len(seconds) <= 1 and all(got[u][1] == msg("second") and u > u1 for u in seconds)
    _v, u3 = append(c, msg("third"))  # serves again, UIDs keep growing
    assert u3 > max(got)
    c.close()


def test_kill_during_imap_expunge(fi: Instance) -> None:
    user = add_cheap_user(fi, "expunge@f.test")
    restart(fi, "imap.expunge", "imap")
    c = imap_login(fi, user)
    uids = [append(c, msg(t))[1] for t in ("keep", "del1", "del2")]
    v = select(c)
    before = bodies(c)
    assert c.imap(b"d", b"UID STORE %d,%d +FLAGS (\\Deleted)" % (uids[1], uids[2]))[1].startswith(b"d OK")
    with pytest.raises((EOFError, ConnectionError)):
        c.imap(b"e", b"EXPUNGE")
    c.close()
    wait_dead(fi)
    restart(fi, None, "imap")
    c = imap_login(fi, user)
    assert select(c) == v
    after = bodies(c)
    assert uids[0] in after and uids[1] not in after  # the first file was removed before the kill
    for uid, (flags, data) in after.items():
        assert data == before[uid][1], f"UID {uid} names different bytes after the crash"
        if uid != uids[0]:
            assert b"\\Deleted" in flags
    assert c.imap(b"e", b"EXPUNGE")[1].startswith(b"e OK")  # finishes the job, no repair needed
    assert set(bodies(c)) == {uids[0]}
    c.close()


def _pop(inst: Instance, user: str) -> Line:
    c = Line(inst.addr("pop3"))
    assert c.line().startswith(b"+OK")
    assert c.cmd(b"USER " + user.encode()).startswith(b"+OK")
    assert c.cmd(b"PASS " + PASSWORD.encode()).startswith(b"+OK")
    return c


def _uidl(c: Line) -> dict[str, int]:
    assert c.cmd(b"UIDL").startswith(b"+OK")
    out = {}
    while (ln := c.line()) != b".":
        n, u = ln.split()
        out[u.decode()] = int(n)
    return out


def _retr(c: Line, n: int) -> bytes:
    assert c.cmd(b"RETR %d" % n).startswith(b"+OK")
    lines = []
    while (ln := c.line()) != b".":
        lines.append(ln[1:] if ln.startswith(b"..") else ln)
    return b"\r\n".join(lines) + b"\r\n"


def test_kill_during_pop3_update(fi: Instance) -> None:
    user = add_cheap_user(fi, "pop@f.test")
    restart(fi, "pop3.update", "pop3")
    c = imap_login(fi, user)
    for t in ("p1", "p2", "p3"):
        append(c, msg(t))
    c.close()
    c = _pop(fi, user)
    ids = _uidl(c)
    content = {u: _retr(c, n) for u, n in ids.items()}
    assert c.cmd(b"DELE 1").startswith(b"+OK") and c.cmd(b"DELE 2").startswith(b"+OK")
    c.send(b"QUIT\r\n")
    elapsed, rest = c.closed_within(10)
    assert elapsed is not None and b"+OK" not in rest  # killed in UPDATE: no +OK for QUIT
    c.close()
    wait_dead(fi)
    restart(fi, None, "pop3")
    c = _pop(fi, user)
    left = _uidl(c)
    first = [u for u, n in ids.items() if n == 1][0]
    third = [u for u, n in ids.items() if n == 3][0]
    assert first not in left and third in left  # deleted before the kill / never marked
    for u, n in left.items():
        assert _retr(c, n) == content[u], f"UIDL {u} names different bytes after the crash"
    assert c.cmd(b"QUIT").startswith(b"+OK")
    c.close()


def test_kill_before_the_smtp_final_reply(fi: Instance) -> None:
    user = add_cheap_user(fi, "reply@f.test")
    restart(fi, "smtp.before_reply", "smtp")
    try:
        with pytest.raises((smtplib.SMTPException, OSError)), smtplib.SMTP(*fi.addr("smtp"), timeout=5) as s:
            s.sendmail("x@remote.test", [user], msg("durable"))
        wait_dead(fi, 5)
    finally:
        restart(fi, None)
    # durable before the reply: delivered once although the client saw no 250 (it will retry:
    # that duplicate is the documented window of RFC 5321 §6.1 / RFC 1047)
    assert [m for m in fi.messages(user) if b"end-durable" in m] != []
    assert len([m for m in fi.messages(user) if b"end-durable" in m]) == 1


# -- the queue ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def queue_inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Instance, Sink]]:
    sink = Sink()
    with DNSServer() as dns:
        dns.add("remote.test", "A", "127.0.0.1")  # implicit MX (RFC 5321 §5.1): the sink
        inst = Instance(tmp_path_factory.mktemp("q"), "f.test", extra_config=CONFIG + (
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {sink.port}\n'
            "[queue]\nretry_initial = 0.5\nretry_max = 0.5\n"
            "[mailauth]\nspf = false\ndkim_verify = false\ndmarc = false\n"))
        yield inst, sink
        if inst.proc is not None:
            inst.stop()
    sink.stop()


def _submit(inst: Instance, user: str, tag: str) -> None:
    with smtplib.SMTP(*inst.addr("submission"), timeout=10) as s:
        s.login(user, PASSWORD)
        s.sendmail(user, ["r@remote.test"], f"From: {user}\r\nSubject: {tag}\r\n\r\nqueued-{tag}\r\n")


def _queue_empty(inst: Instance) -> bool:
    return "-- 0 messages" in inst.cli("queue", "list").stdout


def test_kill_after_queue_commit_before_250(queue_inst: tuple[Instance, Sink]) -> None:
    inst, sink = queue_inst
    user = add_cheap_user(inst, "q1@f.test")
    restart(inst, "queue.after_commit", "submission")
    with pytest.raises((smtplib.SMTPException, OSError)):
        _submit(inst, user, "c1")  # committed, but the client never hears 250
    wait_dead(inst)
    restart(inst, None, "submission")
    wait_for(lambda: sink.count(b"queued-c1") >= 1, 40, "the committed message at the remote MX")
    wait_for(lambda: _queue_empty(inst), 40, "an empty queue", step=0.5)
    assert sink.count(b"queued-c1") == 1  # sent once (the client's retry would be the window's duplicate)


def test_kill_after_remote_250_before_queue_update(queue_inst: tuple[Instance, Sink]) -> None:
    inst, sink = queue_inst
    user = add_cheap_user(inst, "q2@f.test")
    restart(inst, "queue.after_remote_ok", "submission")
    _submit(inst, user, "r1")  # acknowledged: must arrive at least once
    wait_dead(inst)
    assert sink.count(b"queued-r1") == 1
    restart(inst, None, "submission")
    wait_for(lambda: _queue_empty(inst), 40, "an empty queue", step=0.5)
    # the documented window: the remote took it, the queue did not record it, so it goes again
    assert 1 <= sink.count(b"queued-r1") <= 2


# -- a full disk --------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            for _ in range(10_000):  # bounded: 6 MB in 64 KiB pieces is ~100 writes
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    try:
        with open(path, "ab") as f:  # the last few bytes too
            for _ in range(10_000):
                f.write(b"\0" * 512)
                f.flush()
    except OSError:
        pass


def test_disk_full_gets_4xx_never_250(small_disk: Path) -> None:
    inst = Instance(small_disk / "d", "f.test", extra_config=CONFIG)
    user = "full@f.test"
    add_cheap_user(inst, user)
    inst.start()
    try:
        for size in (2_000, 600_000):  # fails in the MDA; fails while the body is spooled
            _disk_full_once(inst, small_disk, user, size)
    finally:
        inst.stop()


def _disk_full_once(inst: Instance, small_disk: Path, user: str, size: int) -> None:
    """One full-disk round: the message gets a 4xx and is absent; once space is back, a 250."""
    filler = small_disk / "filler"
    _fill(filler)
    body = f"Subject: full-{size}\r\n\r\n".encode() + (b"y" * 998 + b"\r\n") * (size // 1000)
    code = None
    try:
        with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
            s.sendmail("a@remote.test", [user], body)
            code = 250
    except smtplib.SMTPDataError as exc:
        code = exc.smtp_code
    except smtplib.SMTPRecipientsRefused as exc:
        code = next(iter(exc.recipients.values()))[0]
    except (smtplib.SMTPServerDisconnected, OSError):
        code = -1  # dropped: not acknowledged either, but not the clean 4xx expected
    assert code != 250 and not [m for m in inst.messages(user) if f"full-{size}".encode() in m]
    assert code is not None and 400 <= code < 500, f"expected a 4xx, got {code}"
    filler.unlink()  # space again: the same server accepts without a restart
    with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
        assert s.sendmail("a@remote.test", [user], body) == {}
    assert len([m for m in inst.messages(user) if f"full-{size}".encode() in m]) == 1


# -- fsync failures (libfiu) ----------------------------------------------------------------------

@pytest.fixture
def fiu_inst(tmp_path: Path) -> Iterator[tuple[Instance, str]]:
    """A server run under Debian's fiu-run (fiu-utils), whose fsync failures fiu-ctrl switches on."""
    fiu_run = require("fiu-run")
    require("fiu-ctrl")
    with DNSServer() as dns:
        dns.servfail("defer.test")
        inst = Instance(tmp_path / "fiu", "f.test", extra_config=CONFIG + (
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
            "[mailauth]\nspf = false\ndkim_verify = false\ndmarc = false\n"
            # libfiu injects faults into one process: keep deliveries in the server's threads.
            "[mailbox]\ndelivery_agent = false\n"))
        ctrl = str(inst.root / "fiu")
        inst.logf = open(inst.log, "ab")  # noqa: SIM115 - closed by inst.stop()
        inst.proc = subprocess.Popen(
            [str(fiu_run), "-x", "-f", ctrl, PY, "-m", "postier", "--config", str(inst.config), "serve"],
            stdout=inst.logf, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=inst.root)

        def listening() -> bool:
            try:
                socket.create_connection(inst.addr("smtp"), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait_for(listening, 20, "the server under fiu-run")
        yield inst, ctrl
        inst.stop()


def _fiu(ctrl: str, inst: Instance, command: str) -> None:
    """libfiu's control reaches the processes it names: the server's, and with `[server] workers`
    (POSTIER_TEST_WORKERS) each worker's too (fiu-run's library follows the fork, one control
    FIFO per process)."""
    assert inst.proc is not None
    pids = [inst.proc.pid, *inst.worker_pids().values()]
    subprocess.run(["fiu-ctrl", "-f", ctrl, "-c", command, *map(str, pids)], check=True, timeout=10)


def test_fsync_failure_is_never_acknowledged(fiu_inst: tuple[Instance, str]) -> None:
    inst, ctrl = fiu_inst
    user = add_cheap_user(inst, "sync@f.test")
    c = imap_login(inst, user)  # before the fault: creating the default folders needs fsync too
    _fiu(ctrl, inst, "enable name=posix/io/sync/fsync")
    try:
        try:
            with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
                s.sendmail("a@remote.test", [user], msg("nosync"))  # MDA: file fsync fails
            code = 250
        except smtplib.SMTPDataError as e:
            code = e.smtp_code
        assert 400 <= code < 500, (code, inst.log.read_text()[-3000:], os.listdir(inst.root))
        with pytest.raises(smtplib.SMTPDataError) as exc, smtplib.SMTP(*inst.addr("submission"), timeout=10) as s:
            s.login(user, PASSWORD)  # queue: spool file and SQLite commit need fsync
            s.sendmail(user, ["r@defer.test"], f"From: {user}\r\nSubject: q\r\n\r\nqueued-nosync\r\n")
        assert 400 <= exc.value.smtp_code < 500
        _u, t = c.imap(b"a", b"APPEND INBOX {%d+}\r\n" % len(msg("nosync-imap")) + msg("nosync-imap"))
        assert t.startswith(b"a NO"), t
        c.close()
    finally:
        _fiu(ctrl, inst, "disable name=posix/io/sync/fsync")
    assert not [m for m in inst.messages(user) if b"nosync" in m]  # nothing half-written is visible
    assert "-- 0 messages" in inst.cli("queue", "list").stdout
    with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:  # the same process recovers by itself
        assert s.sendmail("a@remote.test", [user], msg("synced")) == {}
    assert len(inst.messages(user)) == 1
