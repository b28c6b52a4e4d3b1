"""Power cuts under load: postier on cutfs from an empty data directory, killed and cut repeatedly.

Every round: start `postier serve` (on the cut state of the last round), check through IMAP that
every message acknowledged so far is there exactly once, byte for byte, with the UID it had before;
then a mixed load (SMTP deliveries on port 25 to a local user, IMAP APPENDs into INBOX and a folder
made by IMAP CREATE, submissions on 587 to a domain whose DNS fails so that they stay queued); kill -9
every postier process in the middle of it and cut the power. On the cut state, with nothing
running: every acknowledged message is in the Maildir exactly once and complete, every acknowledged
submission is queued exactly once with its spool file, and every SQLite database passes
`PRAGMA integrity_check`.

The same scenario with `POSTIER_TEST_SKIP_DIR_FSYNC=1` (the server skips the parent fsyncs of the
directories it makes: the bug of ensure_dirs coming back) must report losses, or the check proves
nothing.
"""

from __future__ import annotations

import contextlib
import imaplib
import os
import random
import re
import shutil
import signal
import smtplib
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.dnsserver import DNSServer
from tests.harness import Instance

from .mount import CutMount

USER = "u@example.org"
PASSWORD = "password123"
FOLDER = "Saved"
TOKEN_RE = re.compile(rb"^X-Token: (\S+)\r$", re.MULTILINE)


def message(token: str, rng: random.Random) -> bytes:
    lines = [f"{token} line {i} {rng.getrandbits(64):016x}" for i in range(rng.randrange(5, 120))]
    head = (f"From: <{USER}>\r\nTo: <{USER}>\r\nSubject: power cut {token}\r\n"
            f"Message-ID: <{token}@powercut.test>\r\nDate: Fri, 04 Dec 2026 12:00:00 +0000\r\n"
            f"X-Token: {token}\r\n\r\n")
    return (head + "\r\n".join(lines) + "\r\n").encode()


def descendants(pid: int) -> list[int]:
    """Every process below pid (the delivery agent), from /proc."""
    parents: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{d}/stat").read_text()
                parents[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        todo += kids
    return out


def kill_all(inst: Instance) -> None:
    """kill -9 the server and its children at once: nothing they had not made durable may count."""
    assert inst.proc is not None
    for pid in [inst.proc.pid, *descendants(inst.proc.pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    inst.kill()


@dataclass
class Ledger:
    """What postier acknowledged: token -> (where, bytes sent); UIDs as first learned."""

    delivered: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # token -> (folder, message)
    queued: dict[str, bytes] = field(default_factory=dict)
    uids: dict[str, tuple[int, int]] = field(default_factory=dict)  # token -> (uidvalidity, uid)
    lock: threading.Lock = field(default_factory=threading.Lock)
    counter: int = 0

    def token(self, kind: str) -> str:
        with self.lock:
            self.counter += 1
            return f"{kind}{self.counter:05d}"


class Load:
    """Three clients (SMTP in, IMAP APPEND, submission), each a bounded number of operations."""

    def __init__(self, inst: Instance, ledger: Ledger, per_client: int, seed: int) -> None:
        self.inst = inst
        self.ledger = ledger
        self.per_client = per_client
        self.rng = random.Random(seed)
        self.acks = 0
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(fn,), daemon=True)
                        for fn in (self._smtp, self._append, self._submit)]

    def _ack(self) -> None:
        with self.cond:
            self.acks += 1
            self.cond.notify_all()

    def _run(self, fn: Callable[[int], None]) -> None:
        for i in range(self.per_client):
            if self.stop.is_set():
                return
            try:
                fn(i)
            except (OSError, smtplib.SMTPException, imaplib.IMAP4.error, EOFError):
                if self.stop.is_set():
                    return  # the server was killed under us: this one was never acknowledged
                raise

    def _smtp(self, i: int) -> None:
        token = self.ledger.token("smtp")
        msg = message(token, self.rng)
        with smtplib.SMTP(*self.inst.addr("smtp"), timeout=15) as s:
            if s.sendmail("sender@elsewhere.test", [USER], msg) == {}:
                self.ledger.delivered[token] = ("INBOX", msg)
                self._ack()

    def _append(self, i: int) -> None:
        token = self.ledger.token("imap")
        msg = message(token, self.rng)
        folder = FOLDER if i % 2 else "INBOX"
        host, port = self.inst.addr("imaps")
        with imaplib.IMAP4_SSL(host, port, ssl_context=self.inst.client_ssl_context(), timeout=15) as c:
            c.login(USER, PASSWORD)
            typ, data = c.append(folder, "", None, msg)
            if typ == "OK":
                m = re.search(rb"APPENDUID (\d+) (\d+)", data[0] or b"")
                assert m, data
                self.ledger.delivered[token] = (folder, msg)
                self.ledger.uids[token] = (int(m.group(1)), int(m.group(2)))
                self._ack()

    def _submit(self, i: int) -> None:
        token = self.ledger.token("sub")
        msg = message(token, self.rng)
        with smtplib.SMTP(*self.inst.addr("submission"), timeout=15) as s:
            s.starttls(context=self.inst.client_ssl_context())
            s.login(USER, PASSWORD)
            if s.sendmail(USER, ["someone@remote.test"], msg) == {}:
                self.ledger.queued[token] = msg
                self._ack()

    def run_until_kill(self, kill_after: int, kill: Callable[[], None]) -> None:
        """Run the clients; kill once `kill_after` operations were acknowledged (or all are done)."""
        for t in self.threads:
            t.start()
        with self.cond:
            self.cond.wait_for(lambda: self.acks >= kill_after or not any(t.is_alive() for t in self.threads),
                               timeout=120)
        self.stop.set()
        kill()
        for t in self.threads:
            t.join(60)
            assert not t.is_alive(), "a client hung"


# -- checks ----------------------------------------------------------------------------------------

def _check_exactly_once(ledger: Ledger, found: dict[str, list[tuple[str, bytes]]], where: str) -> list[str]:
    problems = []
    for token, (folder, msg) in sorted(ledger.delivered.items()):
        copies = found.get(token, [])
        if not copies:
            problems.append(f"{where}: acknowledged {token} is lost")
        elif len(copies) > 1:
            problems.append(f"{where}: {token} is there {len(copies)} times")
        elif copies[0][0] != folder:
            problems.append(f"{where}: {token} is in {copies[0][0]}, not {folder}")
        elif not copies[0][1].endswith(msg):
            problems.append(f"{where}: {token} is damaged ({len(copies[0][1])} bytes)")
    return problems


def check_cut_state(data: Path, ledger: Ledger, scratch: Path) -> list[str]:
    """The data directory after a power cut, read directly (nothing running)."""
    found: dict[str, list[tuple[str, bytes]]] = {}
    md = data / "mail" / "example.org" / "u" / "Maildir"
    for folder, root in (("INBOX", md), (FOLDER, md / f".{FOLDER}")):
        for sub in ("new", "cur"):
            d = root / sub
            for f in sorted(d.iterdir()) if d.is_dir() else []:
                content = f.read_bytes()
                m = TOKEN_RE.search(content)
                if m:
                    found.setdefault(m.group(1).decode(), []).append((folder, content))
    problems = _check_exactly_once(ledger, found, "after the cut")
    # Every SQLite database: integrity_check on a copy (opening it here would recover its WAL in place).
    dbs = sorted(data.rglob("*.sqlite"))
    for db in dbs:
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        for suffix in ("", "-wal"):
            if Path(f"{db}{suffix}").exists():
                shutil.copyfile(f"{db}{suffix}", scratch / f"db.sqlite{suffix}")
        try:
            conn = sqlite3.connect(scratch / "db.sqlite")
            res = conn.execute("PRAGMA integrity_check").fetchall()
            conn.close()
        except sqlite3.DatabaseError as exc:
            res = [(str(exc),)]
        if res != [("ok",)]:
            problems.append(f"after the cut: {db.relative_to(data)} fails integrity_check: {res}")
    # The queue: every acknowledged submission queued exactly once, with its spool file.
    spool = data / "spool" / "queue"
    queued: dict[str, int] = {}
    qdb = scratch / "db.sqlite"
    if (spool / "queue.sqlite").exists():
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir()
        for suffix in ("", "-wal"):
            if Path(f"{spool / 'queue.sqlite'}{suffix}").exists():
                shutil.copyfile(f"{spool / 'queue.sqlite'}{suffix}", f"{qdb}{suffix}")
        conn = sqlite3.connect(qdb)
        ids = [r[0] for r in conn.execute(
            "SELECT DISTINCT msg_id FROM recipients WHERE status = 'queued' AND address = 'someone@remote.test'")]
        conn.close()
        for msg_id in ids:
            try:
                content = (spool / "msg" / msg_id).read_bytes()
            except OSError:
                problems.append(f"after the cut: queued {msg_id} has no spool file")
                continue
            m = TOKEN_RE.search(content)
            if m:
                token = m.group(1).decode()
                queued[token] = queued.get(token, 0) + 1
                sent = ledger.queued.get(token)
                if sent is not None and not content.endswith(sent):
                    problems.append(f"after the cut: queued {token} is damaged")
    for token in sorted(ledger.queued):
        n = queued.get(token, 0)
        if n != 1:
            problems.append(f"after the cut: acknowledged submission {token} is queued {n} times")
    return problems


def check_imap(inst: Instance, ledger: Ledger) -> list[str]:
    """Through IMAP after a restart: every acknowledged message once, complete, UIDs as before."""
    found: dict[str, list[tuple[str, bytes]]] = {}
    uids: dict[str, tuple[int, int]] = {}
    host, port = inst.addr("imaps")
    with imaplib.IMAP4_SSL(host, port, ssl_context=inst.client_ssl_context(), timeout=30) as c:
        c.login(USER, PASSWORD)
        for folder in ("INBOX", FOLDER):
            typ, _ = c.select(folder, readonly=True)
            if typ != "OK":
                continue
            uidvalidity = int(c.response("UIDVALIDITY")[1][0] or 0)
            typ, data = c.uid("FETCH", "1:*", "(UID BODY.PEEK[])")
            for item in data:
                if not isinstance(item, tuple):
                    continue
                m_uid = re.search(rb"UID (\d+)", item[0])
                m_tok = TOKEN_RE.search(item[1])
                if m_uid and m_tok:
                    token = m_tok.group(1).decode()
                    found.setdefault(token, []).append((folder, item[1]))
                    uids[token] = (uidvalidity, int(m_uid.group(1)))
    problems = _check_exactly_once(ledger, found, "through IMAP")
    for token, before in sorted(ledger.uids.items()):
        now = uids.get(token)
        if now is not None and now != before:
            problems.append(f"through IMAP: {token} had UID {before}, now {now}")
    for token, now in uids.items():
        ledger.uids.setdefault(token, now)  # seen once: must keep this UID from now on
    return problems


# -- the scenario ---------------------------------------------------------------------------------

@pytest.fixture
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        server.servfail("remote.test")  # submissions to remote.test wait in the queue
        yield server


def scenario(cutfs: CutMount, dns: DNSServer, cuts: int, per_client: int, kill_after: int,
             stop_at_first_loss: bool = False, server_env: dict[str, str] | None = None) -> list[str]:
    """Run the rounds; return the problems found (empty: nothing acknowledged was lost)."""
    data = cutfs.mnt / "data"  # does not exist yet: quickstart makes the whole data directory
    inst = Instance(data, "example.org", mailauth=False, extra_config=(
        f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 2.0\n'
        "[auth]\nfailure_delay = 0.0\n"))
    inst.lmtp_over_tcp()  # the cut filesystem has no mknod, so no Unix socket can live in the data directory
    inst.add_user(USER, PASSWORD)
    # The harness appended to postier.toml without fsync: that is test set-up, made durable here.
    with open(inst.config, "rb+") as f:
        os.fsync(f.fileno())
    inst.log = cutfs.base / "server.log"  # outside the mount: the log survives the cuts
    ledger = Ledger()
    problems: list[str] = []
    saved_env = {k: os.environ.get(k) for k in (server_env or {})}
    try:
        for rnd in range(cuts):
            os.environ.update(server_env or {})
            try:
                inst.start(wait_role="imaps", timeout=60)
            finally:
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            if rnd == 0:
                host, port = inst.addr("imaps")
                with imaplib.IMAP4_SSL(host, port, ssl_context=inst.client_ssl_context(), timeout=30) as c:
                    c.login(USER, PASSWORD)
                    typ, _ = c.create(FOLDER)  # RFC 9051 §6.3.4: durable before OK
                    assert typ == "OK"
            else:
                problems += check_imap(inst, ledger)
            load = Load(inst, ledger, per_client, seed=rnd)
            load.run_until_kill(kill_after, lambda: kill_all(inst))
            cutfs.cut()
            problems += check_cut_state(cutfs.backing / "data", ledger, cutfs.base / "scratch")
            cutfs.start()
            if problems and stop_at_first_loss:
                break
        if not problems:
            inst.start(wait_role="imaps", timeout=60)
            problems += check_imap(inst, ledger)
            inst.stop()
    finally:
        if inst.proc is not None:
            kill_all(inst)
    acked = len(ledger.delivered) + len(ledger.queued)
    assert acked >= kill_after, f"only {acked} operations were acknowledged: {inst.log.read_text()[-3000:]}"
    return problems


@pytest.mark.slow
def test_nothing_acknowledged_is_lost_across_power_cuts(cutfs: CutMount, dns: DNSServer) -> None:
    problems = scenario(cutfs, dns, cuts=4, per_client=12, kill_after=24)
    assert problems == [], "\n".join(problems)
    assert cutfs.cuts == 4


@pytest.mark.slow
def test_the_check_catches_directories_made_without_parent_fsync(cutfs: CutMount, dns: DNSServer) -> None:
    problems = scenario(cutfs, dns, cuts=1, per_client=4, kill_after=6, stop_at_first_loss=True,
                        server_env={"POSTIER_TEST_SKIP_DIR_FSYNC": "1"})
    assert any("is lost" in p for p in problems), problems
