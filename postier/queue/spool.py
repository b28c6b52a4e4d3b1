"""The durable outbound queue: one spool file per message plus SQLite (WAL) state (RFC 5321 §4.5.4).

A message is accepted ("250") only after both halves are on disk: the spool file (prefix + body,
exactly as it will be sent) is created, written and fsynced, its directory fsynced, and then the
SQLite rows (message, recipients, the sender's daily counter) are committed with
`synchronous=FULL`. The commit is the point of acceptance: a spool file without rows is debris of a
crash before the 250 and is removed by `recover()`.

Each recipient has a status: `queued` (waiting for its next attempt), `delivered` or `failed`; a
recipient may also owe a DSN (`dsn` column: "failed", "delayed", "delivered", "relayed"). A message
leaves the queue (rows and file) once no recipient is queued and no DSN is owed. Every attempt is
recorded (time, MX tried, TLS, reply) for `postier queue show`.

Every method here blocks on the disk; the runner calls them from worker threads. Writes run as
*operations* (functions of a connection) so that the runner can commit many in one transaction
(group commit: one fsync for all the deliveries that finished meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..durable import ensure_dirs, fsync_dir, use_wal
from ..message.received import queue_id
from ..message.types import Envelope, MessageBody

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    user TEXT NOT NULL DEFAULT '',
    envid TEXT NOT NULL DEFAULT '',
    ret TEXT NOT NULL DEFAULT '',
    smtputf8 INTEGER NOT NULL DEFAULT 0,
    eightbit INTEGER NOT NULL DEFAULT 0,
    warned INTEGER NOT NULL DEFAULT 0,
    tls_optional INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS recipients (
    msg_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    domain TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_reply TEXT NOT NULL DEFAULT '',
    status_code TEXT NOT NULL DEFAULT '',
    remote_mta TEXT NOT NULL DEFAULT '',
    notify TEXT NOT NULL DEFAULT '',
    orcpt TEXT NOT NULL DEFAULT '',
    dsn TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (msg_id, address)
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(status, next_attempt);
CREATE INDEX IF NOT EXISTS recipients_dsn ON recipients(dsn) WHERE dsn != '';
CREATE TABLE IF NOT EXISTS attempts (
    msg_id TEXT NOT NULL REFERENCES messages(id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    time REAL NOT NULL,
    mx TEXT NOT NULL,
    tls TEXT NOT NULL,
    reply TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_msg ON attempts(msg_id);
CREATE TABLE IF NOT EXISTS sends (
    user TEXT NOT NULL,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS sends_user ON sends(user, time);
"""

#: Queue ids are ours (`message.received.queue_id`): upper-case hex. Anything else given on the
#: command line is refused before it can become part of a path.
_ID_RE = re.compile(r"^[0-9A-F]{6,40}$")
MAX_ATTEMPTS_KEPT = 50  # per recipient, for `queue show`; older attempts are dropped

QUEUED, DELIVERED, FAILED = "queued", "delivered", "failed"
#: The envelope role of a TLS report (pipeline/jobs.py): the queue delivers it despite TLS failures.
TLS_REPORT_ROLE = "tls-report"


class SpoolError(Exception):
    """A queue operation failed (bad id, missing message, disk trouble)."""


def valid_id(msg_id: str) -> bool:
    return bool(_ID_RE.match(msg_id))


@dataclass(frozen=True)
class RecipientSpec:
    """A recipient as queued: the address and its RFC 3461 parameters (NOTIFY words, ORCPT)."""

    address: str
    notify: str = ""  # "" (default: FAILURE), "NEVER", or a comma list of SUCCESS,FAILURE,DELAY
    orcpt: str = ""  # "rfc822;alice@example.org" as given, xtext-decoded


@dataclass(frozen=True)
class MessageInfo:
    id: str
    sender: str
    created: float
    size: int
    user: str = ""
    envid: str = ""
    ret: str = ""  # "FULL" | "HDRS" | "" (RFC 3461 §4.3)
    smtputf8: bool = False
    eightbit: bool = False
    warned: bool = False
    #: A TLS report (RFC 8460 §5.3): delivered despite TLS failures, with opportunistic TLS only.
    tls_optional: bool = False


@dataclass(frozen=True)
class RecipientState:
    msg_id: str
    address: str
    domain: str
    status: str
    next_attempt: float
    attempts: int
    last_reply: str
    status_code: str
    remote_mta: str
    notify: str
    orcpt: str
    dsn: str


@dataclass(frozen=True)
class Attempt:
    address: str
    time: float
    mx: str
    tls: str
    reply: str


@dataclass(frozen=True)
class Outcome:
    """The result of one attempt for one recipient, as the runner decided it."""

    address: str
    status: str  # QUEUED (deferred), DELIVERED or FAILED
    reply: str  # "250 2.0.0 Ok" or a local reason ("DNS: temporary failure")
    status_code: str  # RFC 3463 code for the DSN
    mx: str = ""  # the host (and address) tried, "" if none was reached
    tls: str = ""  # "TLSv1.3 ... verified" / "none"
    next_attempt: float = 0.0
    dsn: str = ""  # the DSN this outcome owes ("" none)
    remote_mta: str = ""  # the MX host whose reply `reply` is ("" for local decisions)


@dataclass(frozen=True)
class Removed:
    """What an operation returns when it deleted a message: `run()` unlinks the file after COMMIT."""

    msg_id: str


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


#: An operation of a queue backend: a function of its connection, run in a transaction by `run()`.
type Op[T] = Callable[[Any], T]


class QueueSpool(Protocol):
    """What the runner (`queue.runner.Queue`) needs of a queue backend: `Spool` (this module: one
    node, SQLite and files) and `queue.cluster.ClusterSpool` (PostgreSQL and the object store).

    Writes are operations (`op_*`) run by `run()` in one transaction. `due_full()` hands out due
    recipients; a backend shared by several nodes *claims* them (`lease` > 0 seconds: the runner
    then calls `renew()` every `lease / 3` seconds for what it holds, and `release()` at stop).
    """

    lease: float

    def run(self, ops: Iterable[Op[Any]], unlink: bool = True) -> list[Any]: ...
    def close(self) -> None: ...
    def write_file(self, msg_id: str, prefix: bytes, body: MessageBody | bytes) -> int: ...
    def read_file(self, msg_id: str) -> bytes: ...
    def read_many(self, ids: list[str]) -> list[bytes | None]: ...
    def read_head(self, msg_id: str, limit: int) -> bytes: ...
    def source(self, msg_id: str) -> bytes | Path: ...
    def release_source(self, source: bytes | Path) -> None: ...
    def remove_file(self, msg_id: str) -> None: ...
    def remove_many(self, ids: list[str]) -> None: ...
    def op_insert(self, info: MessageInfo, recipients: list[RecipientSpec], now: float,
                  claim: bool = False) -> Op[None]: ...
    def op_add_recipients(self, msg_id: str, addresses: list[str], now: float) -> Op[None]: ...
    def op_complete(self, msg_id: str, outcomes: list[Outcome], now: float, last: bool
                    ) -> Op[bool | Removed | None]: ...
    def op_dsn_done(self, msg_id: str, addresses: list[str], warned: bool = False) -> Op[None]: ...
    def op_finish(self, msg_id: str) -> Op[bool | Removed]: ...
    def due_full(self, now: float, limit: int) -> list[tuple[MessageInfo, RecipientState]]: ...
    def renew(self, keys: list[tuple[str, str]], now: float) -> list[tuple[str, str]]: ...
    def claim_dsn(self, msg_id: str, now: float) -> bool: ...
    def release(self, keys: list[tuple[str, str]]) -> None: ...
    def next_due(self) -> float | None: ...
    def owing_dsn(self) -> list[str]: ...
    def message(self, msg_id: str) -> MessageInfo | None: ...
    def recipients(self, msg_id: str) -> list[RecipientState]: ...
    def attempts(self, msg_id: str) -> list[Attempt]: ...
    def list_messages(self, limit: int = 10000) -> list[tuple[MessageInfo, list[RecipientState]]]: ...
    def count(self) -> int: ...
    def summary(self) -> tuple[int, float | None]: ...
    def sends_since(self, user: str, since: float) -> int: ...
    def retry(self, msg_id: str | None, now: float) -> int: ...
    def delete(self, msg_id: str) -> bool: ...
    def prune_sends(self, before: float) -> None: ...
    def recover(self) -> tuple[int, int]: ...


class Spool:
    """The queue's files and database under `root` (thread-safe: one connection, one lock)."""

    lease = 0.0  # one node: nothing to claim (the runner's own bookkeeping keeps jobs apart)

    def __init__(self, root: Path) -> None:
        self.root = root
        self.msg_dir = root / "msg"
        self.db_path = root / "queue.sqlite"
        ensure_dirs(self.msg_dir)  # spool/, the queue's directory and msg/: durable before any 250
        new = not self.db_path.exists()
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        use_wal(self._conn)
        self._conn.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.executescript(_SCHEMA)
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(messages)")}
        if "tls_optional" not in columns:  # a spool made before TLS reports
            self._conn.execute("ALTER TABLE messages ADD COLUMN tls_optional INTEGER NOT NULL DEFAULT 0")
        if new:  # SQLite fsyncs the directory for its journals, not for a new database file
            fsync_dir(root)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- transactions ---------------------------------------------------------------------------

    def run(self, ops: Iterable[Callable[[sqlite3.Connection], Any]], unlink: bool = True) -> list[Any]:
        """Run operations in one transaction; if one raises, they run again each in a savepoint, so
        that one failure spares the others.

        Returns one entry per operation: its result, or the exception it raised. An operation that
        returns `Removed` has its spool file unlinked once the deletion is committed (result True),
        unless `unlink` is False: then the caller gets the `Removed` and unlinks the file itself.
        """
        ops = list(ops)
        results: list[Any] = []
        with self._lock:
            conn = self._conn
            try:  # the common case: every operation succeeds, one transaction, no savepoints
                conn.execute("BEGIN IMMEDIATE")
                results = [op(conn) for op in ops]
                conn.execute("COMMIT")
            except sqlite3.OperationalError:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise  # the database itself is in trouble (locked, disk full): every caller learns it
            except Exception:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                results = self._run_isolated(ops)
        for i, r in enumerate(results):
            if unlink and isinstance(r, Removed):
                self.remove_file(r.msg_id)  # after the commit: a crash leaves debris, never a loss
                results[i] = True
        return results

    def _run_isolated(self, ops: list[Callable[[sqlite3.Connection], Any]]) -> list[Any]:
        """One operation failed: run them again, each in a savepoint, so the failure spares the others."""
        results: list[Any] = []
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            for i, op in enumerate(ops):
                conn.execute(f"SAVEPOINT op{i}")
                try:
                    results.append(op(conn))
                except Exception as exc:  # noqa: BLE001 - handed back to the op's caller
                    conn.execute(f"ROLLBACK TO op{i}")
                    results.append(exc)
                conn.execute(f"RELEASE op{i}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return results

    def execute(self, op: Callable[[sqlite3.Connection], Any]) -> Any:
        """One operation in its own transaction; its exception is raised."""
        (result,) = self.run([op])
        if isinstance(result, Exception):
            raise result
        return result

    def read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- spool files ----------------------------------------------------------------------------

    def path(self, msg_id: str) -> Path:
        if not valid_id(msg_id):  # the id is the file name: never a path from outside
            raise SpoolError(f"invalid queue id {msg_id!r}")
        return self.msg_dir / msg_id

    def write_file(self, msg_id: str, prefix: bytes, body: MessageBody | bytes) -> int:
        """Create the spool file durably (file fsynced, then the directory). FileExistsError if taken."""
        path = self.path(msg_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(prefix)
                if isinstance(body, MessageBody):
                    body.copy_to(out)
                else:
                    out.write(body)
                out.flush()
                os.fsync(out.fileno())
                size = out.tell()
            fsync_dir(self.msg_dir)
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return size

    def read_file(self, msg_id: str) -> bytes:
        return self.path(msg_id).read_bytes()

    def remove_file(self, msg_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(msg_id).unlink()

    def remove_many(self, ids: list[str]) -> None:
        for i in ids:
            self.remove_file(i)

    def read_many(self, ids: list[str]) -> list[bytes | None]:
        """The spool files of several messages (None for one that is gone: deleted by an admin)."""
        out: list[bytes | None] = []
        for i in ids:
            try:
                out.append(self.path(i).read_bytes())
            except OSError:
                out.append(None)
        return out

    def read_head(self, msg_id: str, limit: int) -> bytes:
        try:
            with open(self.path(msg_id), "rb") as f:
                return f.read(limit)
        except FileNotFoundError:
            return b""

    def source(self, msg_id: str) -> bytes | Path:
        """What a large message is sent from: its spool file, streamed."""
        return self.path(msg_id)

    def release_source(self, source: bytes | Path) -> None:
        pass  # the spool file stays until the message leaves the queue

    # -- operations (run inside a transaction) ----------------------------------------------------

    @staticmethod
    def op_insert(info: MessageInfo, recipients: list[RecipientSpec], now: float, claim: bool = False
                  ) -> Callable[[sqlite3.Connection], None]:
        """The message's rows (`claim` is for backends shared by several nodes)."""
        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO messages(id, sender, created, size, user, envid, ret, smtputf8, eightbit, tls_optional)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (info.id, info.sender, info.created, info.size, info.user, info.envid, info.ret,
                 int(info.smtputf8), int(info.eightbit), int(info.tls_optional)))
            conn.executemany(
                "INSERT OR IGNORE INTO recipients(msg_id, address, domain, next_attempt, notify, orcpt)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(info.id, r.address, _domain_of(r.address), now, r.notify, r.orcpt) for r in recipients])
            if info.user:
                conn.execute("INSERT INTO sends(user, time) VALUES (?, ?)", (info.user, info.created))
        return op

    @staticmethod
    def op_add_recipients(msg_id: str, addresses: list[str], now: float) -> Callable[[sqlite3.Connection], None]:
        """New recipients of a queued message (alias targets found at local delivery)."""
        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT OR IGNORE INTO recipients(msg_id, address, domain, next_attempt) VALUES (?, ?, ?, ?)",
                             [(msg_id, a, _domain_of(a), now) for a in addresses])
        return op

    @staticmethod
    def op_record(msg_id: str, outcomes: list[Outcome], now: float) -> Callable[[sqlite3.Connection], None]:
        def op(conn: sqlite3.Connection) -> None:
            for o in outcomes:
                cur = conn.execute(
                    "UPDATE recipients SET status=?, next_attempt=?, attempts=attempts+1, last_reply=?,"
                    " status_code=?, remote_mta=?, dsn=CASE WHEN ?='' THEN dsn ELSE ? END"
                    " WHERE msg_id=? AND address=? AND status='queued'",
                    (o.status, o.next_attempt, o.reply[:1000], o.status_code, o.remote_mta[:255], o.dsn, o.dsn,
                     msg_id, o.address))
                if cur.rowcount:
                    conn.execute("INSERT INTO attempts(msg_id, address, time, mx, tls, reply) VALUES (?, ?, ?, ?, ?, ?)",
                                 (msg_id, o.address, now, o.mx[:300], o.tls[:200], o.reply[:1000]))
                    if o.status == QUEUED and o.next_attempt:  # only retried recipients pile attempts up
                        conn.execute(
                            "DELETE FROM attempts WHERE rowid IN (SELECT rowid FROM attempts WHERE msg_id=? AND"
                            " address=? ORDER BY time DESC LIMIT -1 OFFSET ?)", (msg_id, o.address, MAX_ATTEMPTS_KEPT))
        return op

    @staticmethod
    def op_complete(msg_id: str, outcomes: list[Outcome], now: float, last: bool
                    ) -> Callable[[sqlite3.Connection], bool | Removed | None]:
        """Record outcomes; when this was the message's last job in flight, delete it if it is done.

        The common case (every recipient of this job delivered, nothing else pending) is one check
        and one DELETE: the rows would be deleted right after being written anyway.
        """
        record = Spool.op_record(msg_id, outcomes, now)

        def op(conn: sqlite3.Connection) -> bool | Removed | None:
            if last and outcomes and all(o.status != QUEUED and not o.dsn for o in outcomes):
                marks = ",".join("?" * len(outcomes))
                other = conn.execute(
                    f"SELECT 1 FROM recipients WHERE msg_id=? AND address NOT IN ({marks})"
                    " AND (status='queued' OR dsn!='') LIMIT 1", (msg_id, *[o.address for o in outcomes])).fetchone()
                if not other:
                    conn.execute("DELETE FROM messages WHERE id=?", (msg_id,))
                    return Removed(msg_id)
            record(conn)
            if not last:
                return None
            return Spool.op_finish(msg_id)(conn)
        return op

    @staticmethod
    def op_dsn_done(msg_id: str, addresses: list[str], warned: bool = False
                    ) -> Callable[[sqlite3.Connection], None]:
        def op(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE recipients SET dsn='' WHERE msg_id=? AND address=?",
                             [(msg_id, a) for a in addresses])
            if warned:
                conn.execute("UPDATE messages SET warned=1 WHERE id=?", (msg_id,))
        return op

    @staticmethod
    def op_finish(msg_id: str) -> Callable[[sqlite3.Connection], bool | Removed]:
        """Delete the message if nothing is left to do for it (`run()` then removes its file)."""
        def op(conn: sqlite3.Connection) -> bool | Removed:
            left = conn.execute("SELECT 1 FROM recipients WHERE msg_id=? AND (status='queued' OR dsn!='')"
                                " LIMIT 1", (msg_id,)).fetchone()
            if left:
                return False
            conn.execute("DELETE FROM messages WHERE id=?", (msg_id,))
            return Removed(msg_id)
        return op

    # -- queries --------------------------------------------------------------------------------

    def due(self, now: float, limit: int) -> list[tuple[str, str, str]]:
        """(msg_id, address, domain) of queued recipients whose time has come, oldest first."""
        rows = self.read("SELECT msg_id, address, domain FROM recipients WHERE status='queued' AND next_attempt<=?"
                         " ORDER BY next_attempt LIMIT ?", (now, limit))
        return [(r[0], r[1], r[2]) for r in rows]

    def due_full(self, now: float, limit: int) -> list[tuple[MessageInfo, RecipientState]]:
        """Like `due()`, with each recipient's state and its message (one query, for the dispatcher)."""
        rows = self.read(
            "SELECT m.id, m.sender, m.created, m.size, m.user, m.envid, m.ret, m.smtputf8, m.eightbit, m.warned,"
            " m.tls_optional, r.msg_id, r.address, r.domain, r.status, r.next_attempt, r.attempts, r.last_reply, r.status_code,"
            " r.remote_mta, r.notify, r.orcpt, r.dsn FROM recipients r JOIN messages m ON m.id = r.msg_id"
            " WHERE r.status='queued' AND r.next_attempt<=? ORDER BY r.next_attempt LIMIT ?", (now, limit))
        infos: dict[str, MessageInfo] = {}
        out = []
        for r in rows:
            info = infos.get(r[0])
            if info is None:
                info = infos[r[0]] = MessageInfo(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), bool(r[8]),
                                                 bool(r[9]), bool(r[10]))
            out.append((info, RecipientState(*r[11:])))
        return out

    def renew(self, keys: list[tuple[str, str]], now: float) -> list[tuple[str, str]]:
        return []  # no leases: nothing is ever lost

    def release(self, keys: list[tuple[str, str]]) -> None:
        pass

    def claim_dsn(self, msg_id: str, now: float) -> bool:
        return True  # one runner: `Queue._inflight` already keeps its jobs from sending one twice

    def next_due(self) -> float | None:
        row = self.read("SELECT MIN(next_attempt) FROM recipients WHERE status='queued'")
        return row[0][0] if row and row[0][0] is not None else None

    def owing_dsn(self) -> list[str]:
        return [r[0] for r in self.read("SELECT DISTINCT msg_id FROM recipients WHERE dsn!=''")]

    def message(self, msg_id: str) -> MessageInfo | None:
        rows = self.read("SELECT id, sender, created, size, user, envid, ret, smtputf8, eightbit, warned, tls_optional"
                         " FROM messages WHERE id=?", (msg_id,))
        if not rows:
            return None
        r = rows[0]
        return MessageInfo(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), bool(r[8]), bool(r[9]), bool(r[10]))

    def recipients(self, msg_id: str) -> list[RecipientState]:
        rows = self.read("SELECT msg_id, address, domain, status, next_attempt, attempts, last_reply, status_code,"
                         " remote_mta, notify, orcpt, dsn FROM recipients WHERE msg_id=? ORDER BY address",
                         (msg_id,))
        return [RecipientState(*r) for r in rows]

    def attempts(self, msg_id: str) -> list[Attempt]:
        rows = self.read("SELECT address, time, mx, tls, reply FROM attempts WHERE msg_id=? ORDER BY time, rowid",
                         (msg_id,))
        return [Attempt(*r) for r in rows]

    def list_messages(self, limit: int = 10000) -> list[tuple[MessageInfo, list[RecipientState]]]:
        ids = [r[0] for r in self.read("SELECT id FROM messages ORDER BY created LIMIT ?", (limit,))]
        out = []
        for i in ids:
            info = self.message(i)
            if info is not None:
                out.append((info, self.recipients(i)))
        return out

    def count(self) -> int:
        return int(self.read("SELECT COUNT(*) FROM messages")[0][0])

    def summary(self) -> tuple[int, float | None]:
        """(messages queued, creation time of the oldest or None): the queue's size and age for the metrics."""
        n, oldest = self.read("SELECT COUNT(*), MIN(created) FROM messages")[0]
        return int(n), None if oldest is None else float(oldest)

    def sends_since(self, user: str, since: float) -> int:
        return int(self.read("SELECT COUNT(*) FROM sends WHERE user=? AND time>?", (user, since))[0][0])

    # -- admin ----------------------------------------------------------------------------------

    def retry(self, msg_id: str | None, now: float) -> int:
        """Make queued recipients of one message (None: all) due now; returns how many."""
        def op(conn: sqlite3.Connection) -> int:
            if msg_id is None:
                return conn.execute("UPDATE recipients SET next_attempt=? WHERE status='queued'", (now,)).rowcount
            return conn.execute("UPDATE recipients SET next_attempt=? WHERE status='queued' AND msg_id=?",
                                (now, msg_id)).rowcount
        return int(self.execute(op))

    def delete(self, msg_id: str) -> bool:
        """Remove a message without any DSN (admin action)."""
        self.path(msg_id)  # validates the id
        deleted = self.execute(lambda c: c.execute("DELETE FROM messages WHERE id=?", (msg_id,)).rowcount)
        self.remove_file(msg_id)
        return bool(deleted)

    def prune_sends(self, before: float) -> None:
        self.execute(lambda c: c.execute("DELETE FROM sends WHERE time<?", (before,)))

    def recover(self) -> tuple[int, int]:
        """After a crash: drop spool files without rows, and rows without files. (files, rows) removed."""
        known = {r[0] for r in self.read("SELECT id FROM messages")}
        files = 0
        for entry in os.scandir(self.msg_dir):
            if entry.name not in known:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    files += 1
        present = {e.name for e in os.scandir(self.msg_dir)}
        lost = [i for i in known if i not in present]
        if lost:
            self.execute(lambda c: c.executemany("DELETE FROM messages WHERE id=?", [(i,) for i in lost]))
        return files, len(lost)


class SpoolEnqueuer:
    """The `Enqueuer` for admin commands (`postier tls report-now`): the message goes into the spool as
    `Queue.store` puts it there (file fsynced, then the committed rows); the running server picks it
    up at its next scan of the database (runner.POLL_INTERVAL), as it does after `postier queue retry`."""

    def __init__(self, spool: QueueSpool) -> None:
        self.spool = spool

    async def enqueue(self, env: Envelope, recipients: list[str], prefix: bytes, body: MessageBody) -> str:
        def put() -> str:
            for _ in range(5):
                mid = queue_id()
                try:
                    size = self.spool.write_file(mid, prefix, body)
                except FileExistsError:
                    continue
                now = time.time()
                info = MessageInfo(mid, env.mail_from, now, size, eightbit=not prefix.isascii(),
                                   tls_optional=env.role == TLS_REPORT_ROLE)
                [result] = self.spool.run([self.spool.op_insert(info, [RecipientSpec(r) for r in recipients], now)])
                if isinstance(result, Exception):
                    self.spool.remove_file(mid)
                    raise result
                return mid
            raise RuntimeError("could not allocate a queue id")

        return await asyncio.to_thread(put)

    async def sends_today(self, user: str) -> int:
        return 0
