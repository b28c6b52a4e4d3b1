"""The outbound queue of cluster mode: shared by every node, in PostgreSQL with bodies in the object store
(RFC 5321 §4.5.4 retries; docs/scaling.md "The queue").

`ClusterSpool` is the runner's `QueueSpool` (queue/spool.py) over the cluster's tables
(`store.cluster.schema`: queue_messages, queue_recipients, queue_attempts, queue_sends) and its body
store. A message is accepted only once both halves are durable: the body (prefix + message, exactly
as it will be sent) is put in the object store under its SHA-256 and confirmed, its mark renewed in
`bodies` (`store.cluster.gc.mark`), and then the rows are committed. A large message spooled to a
file goes up from that file, in parts (`BodyStore.put_stream`), never read whole. The commit is the
acceptance; an uploaded body whose rows never committed is collected by `postier cluster gc` after
its grace.

Any node delivers any message. A recipient is handed to a node by a *lease*: `due_full()` claims due
recipients with `SELECT ... FOR UPDATE SKIP LOCKED` (concurrent claimers skip each other's rows and
never take the same one) and sets `lease_owner` (this process) and `lease_until`; a node claims the
recipients it has just accepted in the insert itself. The runner renews its leases every `lease / 3`
seconds while they wait or are delivered, and recording an outcome releases the lease. A node that
dies (kill -9, power loss) renews nothing: once `lease_until` has passed, any node claims the
recipient. Delivery is at least once: a recipient whose lease expired while its node was still
talking to the remote MX (a stalled node, a partition from PostgreSQL) can be delivered twice.
Times are the nodes' clocks (epoch seconds, as `next_attempt`): their skew shortens or lengthens a lease.

The SQL is its own (PostgreSQL's dialect, leases, a shared daily counter) rather than the SQLite
spool's: the two backends share the runner, the data types and the operation protocol, not the
statements. The optional libraries (psycopg, via the cluster store's pool) are imported only when a
`ClusterSpool` is made (server/app.py, `postier queue` in cluster mode, after `require_extra()`).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..message.types import MEMORY_DATA_LIMIT, MessageBody
from ..store.errors import MessageGone, StoreUnavailable
from .spool import (
    MAX_ATTEMPTS_KEPT, QUEUED, Attempt, MessageInfo, Op, Outcome, QueueSpool, RecipientSpec, RecipientState, Removed,
    Spool, SpoolError, valid_id,
)

if TYPE_CHECKING:
    import psycopg

    from ..store.cluster.store import ClusterStore

    type Conn = psycopg.Connection[tuple[Any, ...]]
else:
    Conn = Any

__all__ = ["ClusterSpool", "node_id", "open_spool"]

CONFLICT_RETRIES = 3  # runs of a batch that PostgreSQL rolled back for a deadlock with another node
_MSG_COLS = "id, sender, created, size, owner, envid, ret, smtputf8, eightbit, warned, tls_optional"
_RCPT_COLS = ("msg_id, address, domain, status, next_attempt, attempts, last_reply, status_code, remote_mta, notify,"
              " orcpt, dsn")


def node_id() -> str:
    """This process's name in `lease_owner`: host, pid and a random part (a restarted process is another node)."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{secrets.token_hex(4)}"


def _info(r: tuple[Any, ...]) -> MessageInfo:
    return MessageInfo(r[0], r[1], float(r[2]), int(r[3]), r[4], r[5], r[6], bool(r[7]), bool(r[8]), bool(r[9]),
                       bool(r[10]))


def _state(r: tuple[Any, ...]) -> RecipientState:
    return RecipientState(r[0], r[1], r[2], r[3], float(r[4]), int(r[5]), r[6], r[7], r[8], r[9], r[10], r[11])


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


class ClusterSpool:
    """The queue of every node of a cluster (thread-safe: each call takes a pooled connection)."""

    def __init__(self, store: ClusterStore, lease: float = 300.0, node: str | None = None,
                 clock: Callable[[], float] = time.time, owns_store: bool = False,
                 tmp_dir: Path | None = None) -> None:
        import psycopg
        import psycopg_pool

        self.store = store
        self.pool = store.pool
        self.bodies = store.bodies
        self.lease = lease
        self.node = node or node_id()
        self.clock = clock
        self.owns_store = owns_store  # `postier queue`: closing the spool closes the store it opened
        #: where large messages are downloaded to be sent (`source`); None: they are read into memory
        self.tmp_dir = tmp_dir
        self._down: tuple[type[Exception], ...] = (psycopg.OperationalError, psycopg.InterfaceError,
                                                   psycopg_pool.PoolTimeout)
        #: PostgreSQL rolled the transaction back for another's sake (a deadlock between two nodes'
        #: batches locking the same messages in another order): run it again
        self._conflict: tuple[type[Exception], ...] = (psycopg.errors.TransactionRollback,
                                                       psycopg.errors.DeadlockDetected)
        self._pending: dict[str, str] = {}  # msg_id -> body digest, uploaded, rows not yet inserted
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.owns_store:  # otherwise the pool and body store are the App's mail store's
            self.store.close()

    # -- transactions ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Conn]:
        """One transaction on a pooled connection; an unreachable database is StoreUnavailable."""
        try:
            self.store.ensure_schema()
            with self.pool.connection() as conn, conn.transaction():
                yield conn
        except self._conflict:
            raise
        except self._down as exc:
            raise StoreUnavailable("queue storage unavailable, try again later") from exc

    def run(self, ops: Iterable[Op[Any]], unlink: bool = True) -> list[Any]:
        """Run operations in one transaction; if one raises, they run again each in a savepoint, so
        that one failure spares the others (as `Spool.run`). Bodies are never deleted here: a body
        may be shared, and the collector removes it once nothing refers to it."""
        ops = list(ops)
        results: list[Any] = []
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                with self._tx() as conn:
                    results = [op(conn) for op in ops]
                break
            except self._conflict as exc:
                if attempt == CONFLICT_RETRIES:
                    raise StoreUnavailable("queue storage busy, try again later") from exc
            except StoreUnavailable:
                raise
            except Exception:  # noqa: BLE001 - one operation failed: isolate it
                results = self._run_isolated(ops)
                break
        if unlink:
            results = [True if isinstance(r, Removed) else r for r in results]
        return results

    def _run_isolated(self, ops: list[Op[Any]]) -> list[Any]:
        results: list[Any] = []
        with self._tx() as conn:
            for op in ops:
                try:
                    with conn.transaction():  # a savepoint
                        results.append(op(conn))
                except self._down:
                    raise
                except Exception as exc:  # noqa: BLE001 - handed back to the op's caller
                    results.append(exc)
        return results

    def _read(self, sql: str, args: tuple[Any, ...] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        with self._tx() as conn:
            return conn.execute(sql.encode(), args).fetchall()

    # -- bodies ---------------------------------------------------------------------------------

    def write_file(self, msg_id: str, prefix: bytes, body: MessageBody | bytes) -> int:
        """Put the body in the object store and wait for its confirmation (the 250 depends on it).
        FileExistsError if the id is taken. A body spooled to a file (SMTP DATA spills past its
        memory limit) and larger than the runner's in-memory limit is uploaded from its file
        (`BodyStore.put_stream`: hashed, then sent in windows) without being read whole."""
        if not valid_id(msg_id):
            raise SpoolError(f"invalid queue id {msg_id!r}")
        from ..store.cluster.bodies import SpooledSource

        with self._lock:
            if msg_id in self._pending:
                raise FileExistsError(msg_id)
        if isinstance(body, MessageBody) and body.spool_path is not None and (
                len(prefix) + body.size > MEMORY_DATA_LIMIT):
            with SpooledSource(prefix, body.spool_path, len(prefix) + body.size) as src:
                digest = self.bodies.digest_stream(src.read_at, src.size)
                self._mark(msg_id, digest)
                self.bodies.put_stream(src.read_at, src.size, digest)  # StoreUnavailable unless confirmed
                size = src.size
        else:
            data = prefix + (body if isinstance(body, bytes) else body.getvalue())
            digest = self.bodies.digest(data)
            self._mark(msg_id, digest)
            self.bodies.put(data, digest)  # StoreUnavailable unless the object store confirmed it
            size = len(data)
        with self._lock:
            self._pending[msg_id] = digest
        return size

    def _mark(self, msg_id: str, digest: str) -> None:
        """FileExistsError if the id is taken; else renew the body's mark before its upload (store.cluster.gc)."""
        from ..store.cluster.gc import mark

        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM queue_messages WHERE id=%s", (msg_id,)).fetchone():
                raise FileExistsError(msg_id)
            mark(conn, digest)

    def _digests(self, ids: list[str]) -> dict[str, str]:
        return {r[0]: r[1] for r in self._read("SELECT id, body FROM queue_messages WHERE id = ANY(%s)", (ids,))}

    def read_file(self, msg_id: str) -> bytes:
        digest = self._digests([msg_id]).get(msg_id)
        if digest is None:
            raise FileNotFoundError(f"no such message in the queue: {msg_id}")
        return self.bodies.get(digest)

    def read_many(self, ids: list[str]) -> list[bytes | None]:
        digests = self._digests(ids)
        out: list[bytes | None] = []
        for i in ids:
            d = digests.get(i)
            try:
                out.append(self.bodies.get(d) if d is not None else None)
            except MessageGone:
                out.append(None)
        return out

    def read_head(self, msg_id: str, limit: int) -> bytes:
        digest = self._digests([msg_id]).get(msg_id)
        if digest is None:
            return b""
        try:
            return self.bodies.get(digest, limit)
        except MessageGone:
            return b""

    def source(self, msg_id: str) -> bytes | Path:
        """What a large message is sent from: its body streamed from the object store into a file
        of its own under `tmp_dir`, which the runner then reads in chunks as it reads a spool file
        (memory bounded whatever the size) and hands back to `release_source`."""
        if self.tmp_dir is None:
            return self.read_file(msg_id)
        digest = self._digests([msg_id]).get(msg_id)
        if digest is None:
            raise FileNotFoundError(f"no such message in the queue: {msg_id}")
        self.tmp_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.tmp_dir / f"{msg_id}.{secrets.token_hex(6)}"
        try:
            self.bodies.download(digest, path)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def release_source(self, source: bytes | Path) -> None:
        """The runner is done with what `source` returned: its downloaded file goes."""
        if isinstance(source, Path) and self.tmp_dir is not None and source.parent == self.tmp_dir:
            source.unlink(missing_ok=True)

    def remove_file(self, msg_id: str) -> None:
        with self._lock:
            self._pending.pop(msg_id, None)  # the object stays until the collector finds it unreferenced

    def remove_many(self, ids: list[str]) -> None:
        pass

    # -- operations -----------------------------------------------------------------------------

    def _claim(self, claim: bool, now: float) -> tuple[str, float]:
        return (self.node, now + self.lease) if claim else ("", 0.0)

    def op_insert(self, info: MessageInfo, recipients: list[RecipientSpec], now: float,
                  claim: bool = False) -> Op[None]:
        """The message's rows, its recipients leased to this node when it delivers them itself (`claim`)."""
        with self._lock:
            digest = self._pending.pop(info.id, None)
        owner, until = self._claim(claim, now)

        def op(conn: Conn) -> None:
            if digest is None:
                raise SpoolError(f"{info.id}: the body was not stored")
            conn.execute(
                f"INSERT INTO queue_messages (body, {_MSG_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
                " %s, %s)".encode(),
                (digest, info.id, info.sender, info.created, info.size, info.user, info.envid, info.ret,
                 info.smtputf8, info.eightbit, info.warned, info.tls_optional))
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO queue_recipients (msg_id, address, domain, next_attempt, notify, orcpt, lease_owner,"
                    " lease_until) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [(info.id, r.address, _domain_of(r.address), now, r.notify, r.orcpt, owner, until)
                     for r in recipients])
            if info.user:  # the daily sending limit counts across every node
                conn.execute("INSERT INTO queue_sends (owner, time) VALUES (%s, %s)", (info.user, info.created))
        return op

    def op_add_recipients(self, msg_id: str, addresses: list[str], now: float) -> Op[None]:
        owner, until = self._claim(True, now)  # the runner schedules them at once

        def op(conn: Conn) -> None:
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO queue_recipients (msg_id, address, domain, next_attempt, lease_owner, lease_until)"
                    " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [(msg_id, a, _domain_of(a), now, owner, until) for a in addresses])
        return op

    @staticmethod
    def _record(conn: Conn, msg_id: str, outcomes: list[Outcome], now: float) -> None:
        """Each outcome, and the end of its lease (a recipient still queued is claimable when due)."""
        for o in outcomes:
            cur = conn.execute(
                "UPDATE queue_recipients SET status=%s, next_attempt=%s, attempts=attempts+1, last_reply=%s,"
                " status_code=%s, remote_mta=%s, dsn=CASE WHEN %s='' THEN dsn ELSE %s END, lease_owner='',"
                " lease_until=0 WHERE msg_id=%s AND address=%s AND status='queued'",
                (o.status, o.next_attempt, o.reply[:1000], o.status_code, o.remote_mta[:255], o.dsn, o.dsn,
                 msg_id, o.address))
            if cur.rowcount:
                conn.execute("INSERT INTO queue_attempts (msg_id, address, time, mx, tls, reply)"
                             " VALUES (%s, %s, %s, %s, %s, %s)",
                             (msg_id, o.address, now, o.mx[:300], o.tls[:200], o.reply[:1000]))
                if o.status == QUEUED and o.next_attempt:
                    conn.execute("DELETE FROM queue_attempts WHERE id IN (SELECT id FROM queue_attempts WHERE"
                                 " msg_id=%s AND address=%s ORDER BY time DESC, id DESC OFFSET %s)",
                                 (msg_id, o.address, MAX_ATTEMPTS_KEPT))

    @staticmethod
    def _hold(conn: Conn, msg_id: str) -> None:
        """Hold the message's row until commit: nodes finishing different recipients of one message
        take turns, so the last of them sees every other outcome and removes the message (without
        it, two concurrent transactions could each see the other's recipient still queued)."""
        conn.execute("SELECT 1 FROM queue_messages WHERE id=%s FOR UPDATE", (msg_id,))

    @staticmethod
    def _finish(conn: Conn, msg_id: str) -> bool | Removed:
        left = conn.execute("SELECT 1 FROM queue_recipients WHERE msg_id=%s AND (status='queued' OR dsn<>'')"
                            " LIMIT 1", (msg_id,)).fetchone()
        if left:
            return False
        conn.execute("DELETE FROM queue_messages WHERE id=%s", (msg_id,))
        return Removed(msg_id)

    def op_complete(self, msg_id: str, outcomes: list[Outcome], now: float, last: bool
                    ) -> Op[bool | Removed | None]:
        """Record outcomes; when this was the message's last job in flight here, delete it if it is
        done (recipients claimed by other nodes are still queued, so it stays for them)."""
        def op(conn: Conn) -> bool | Removed | None:
            if last:
                self._hold(conn, msg_id)
            self._record(conn, msg_id, outcomes, now)
            return self._finish(conn, msg_id) if last else None
        return op

    def op_dsn_done(self, msg_id: str, addresses: list[str], warned: bool = False) -> Op[None]:
        def op(conn: Conn) -> None:
            self._hold(conn, msg_id)  # before `op_finish` in the same transaction (runner.send_dsns)
            conn.execute("UPDATE queue_recipients SET dsn='' WHERE msg_id=%s AND address = ANY(%s)",
                         (msg_id, addresses))
            conn.execute("UPDATE queue_messages SET dsn_until=0, warned=warned OR %s WHERE id=%s", (warned, msg_id))
        return op

    def op_finish(self, msg_id: str) -> Op[bool | Removed]:
        def op(conn: Conn) -> bool | Removed:
            self._hold(conn, msg_id)
            return self._finish(conn, msg_id)
        return op

    # -- claims ---------------------------------------------------------------------------------

    def due_full(self, now: float, limit: int) -> list[tuple[MessageInfo, RecipientState]]:
        """Claim queued recipients whose time has come and whose lease (if any) has run out, oldest
        first; each comes with its message. Rows another node is claiming right now are skipped."""
        with self._tx() as conn:
            rows = conn.execute(
                f"WITH due AS (SELECT msg_id, address FROM queue_recipients WHERE status='queued'"
                f" AND next_attempt <= %(now)s AND lease_until < %(now)s ORDER BY next_attempt LIMIT %(limit)s"
                f" FOR UPDATE SKIP LOCKED)"
                f" UPDATE queue_recipients r SET lease_owner=%(node)s, lease_until=%(until)s FROM due"
                f" WHERE r.msg_id = due.msg_id AND r.address = due.address"
                f" RETURNING {', '.join('r.' + c.strip() for c in _RCPT_COLS.split(','))}".encode(),
                {"now": now, "limit": limit, "node": self.node, "until": now + self.lease}).fetchall()
            if not rows:
                return []
            infos = {r[0]: _info(r) for r in conn.execute(
                f"SELECT {_MSG_COLS} FROM queue_messages WHERE id = ANY(%s)".encode(),
                (list({r[0] for r in rows}),)).fetchall()}
        states = sorted((_state(r) for r in rows), key=lambda s: (s.next_attempt, s.msg_id, s.address))
        return [(infos[s.msg_id], s) for s in states if s.msg_id in infos]

    def renew(self, keys: list[tuple[str, str]], now: float) -> list[tuple[str, str]]:
        """Extend this node's leases on `keys`; returns those it no longer holds (recorded meanwhile,
        or expired and claimed by another node)."""
        if not keys:
            return []
        with self._tx() as conn:
            kept = conn.execute(
                "UPDATE queue_recipients SET lease_until=%s WHERE lease_owner=%s AND status='queued'"
                " AND (msg_id, address) IN (SELECT * FROM unnest(%s::text[], %s::text[])) RETURNING msg_id, address",
                (now + self.lease, self.node, [k[0] for k in keys], [k[1] for k in keys])).fetchall()
        held = {(r[0], r[1]) for r in kept}
        return [k for k in keys if k not in held]

    def claim_dsn(self, msg_id: str, now: float) -> bool:
        """Take the duty of sending the DSN a message owes for `lease` seconds (or until it is sent,
        `op_dsn_done`): two nodes finishing recipients of one message do not both send it."""
        with self._tx() as conn:
            return conn.execute("UPDATE queue_messages SET dsn_until=%s WHERE id=%s AND dsn_until<%s RETURNING 1",
                                (now + self.lease, msg_id, now)).fetchone() is not None

    def release(self, keys: list[tuple[str, str]]) -> None:
        """Give up this node's leases on `keys` (stopping): any node may claim them at once."""
        if not keys:
            return
        with self._tx() as conn:
            conn.execute(
                "UPDATE queue_recipients SET lease_owner='', lease_until=0 WHERE lease_owner=%s"
                " AND (msg_id, address) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                (self.node, [k[0] for k in keys], [k[1] for k in keys]))

    # -- queries --------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """When the next recipient becomes claimable: due, and its lease (if any) run out."""
        row = self._read("SELECT MIN(GREATEST(next_attempt, lease_until)) FROM queue_recipients WHERE status='queued'")
        return float(row[0][0]) if row and row[0][0] is not None else None

    def owing_dsn(self) -> list[str]:
        """Messages owing a DSN that no node is delivering (no live lease): their DSN is due now."""
        return [r[0] for r in self._read(
            "SELECT DISTINCT r.msg_id FROM queue_recipients r WHERE r.dsn<>'' AND NOT EXISTS (SELECT 1 FROM"
            " queue_recipients o WHERE o.msg_id = r.msg_id AND o.status='queued' AND o.lease_until >= %s)",
            (self.clock(),))]

    def message(self, msg_id: str) -> MessageInfo | None:
        rows = self._read(f"SELECT {_MSG_COLS} FROM queue_messages WHERE id=%s", (msg_id,))
        return _info(rows[0]) if rows else None

    def recipients(self, msg_id: str) -> list[RecipientState]:
        return [_state(r) for r in self._read(
            f"SELECT {_RCPT_COLS} FROM queue_recipients WHERE msg_id=%s ORDER BY address", (msg_id,))]

    def attempts(self, msg_id: str) -> list[Attempt]:
        return [Attempt(r[0], float(r[1]), r[2], r[3], r[4]) for r in self._read(
            "SELECT address, time, mx, tls, reply FROM queue_attempts WHERE msg_id=%s ORDER BY time, id", (msg_id,))]

    def list_messages(self, limit: int = 10000) -> list[tuple[MessageInfo, list[RecipientState]]]:
        with self._tx() as conn:
            infos = [_info(r) for r in conn.execute(
                f"SELECT {_MSG_COLS} FROM queue_messages ORDER BY created LIMIT %s".encode(), (limit,)).fetchall()]
            by_msg: dict[str, list[RecipientState]] = {i.id: [] for i in infos}
            for r in conn.execute(f"SELECT {_RCPT_COLS} FROM queue_recipients WHERE msg_id = ANY(%s)"
                                  " ORDER BY address".encode(), (list(by_msg),)).fetchall():
                by_msg[r[0]].append(_state(r))
        return [(i, by_msg[i.id]) for i in infos]

    def count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM queue_messages")[0][0])

    def summary(self) -> tuple[int, float | None]:
        n, oldest = self._read("SELECT COUNT(*), MIN(created) FROM queue_messages")[0]
        return int(n), None if oldest is None else float(oldest)

    def sends_since(self, user: str, since: float) -> int:
        """Messages `user` submitted since `since` through any node (submission.max_messages_per_day)."""
        return int(self._read("SELECT COUNT(*) FROM queue_sends WHERE owner=%s AND time>%s", (user, since))[0][0])

    # -- admin ----------------------------------------------------------------------------------

    def retry(self, msg_id: str | None, now: float) -> int:
        with self._tx() as conn:
            if msg_id is None:
                cur = conn.execute("UPDATE queue_recipients SET next_attempt=%s WHERE status='queued'", (now,))
            else:
                cur = conn.execute("UPDATE queue_recipients SET next_attempt=%s WHERE status='queued' AND msg_id=%s",
                                   (now, msg_id))
            return int(cur.rowcount)

    def delete(self, msg_id: str) -> bool:
        """Remove a message without any DSN (admin action); a node delivering it right now finishes
        that attempt, and its outcome then finds no row to record."""
        if not valid_id(msg_id):
            raise SpoolError(f"invalid queue id {msg_id!r}")
        with self._tx() as conn:
            return bool(conn.execute("DELETE FROM queue_messages WHERE id=%s", (msg_id,)).rowcount)

    def prune_sends(self, before: float) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM queue_sends WHERE time<%s", (before,))

    def recover(self) -> tuple[int, int]:
        """Nothing to repair after a crash: uploads without rows are the collector's, and the leases
        of a dead process run out by themselves. Downloads a crash left in `tmp_dir` are removed
        (the runner recovers at its start, before it sends anything)."""
        if self.tmp_dir is not None and self.tmp_dir.is_dir():
            for leftover in self.tmp_dir.iterdir():
                leftover.unlink(missing_ok=True)
        return 0, 0


def open_spool(config: Config) -> QueueSpool:
    """The queue as the admin commands open it (`postier queue`, the web admin, `tls report-now`):
    this machine's spool, or in cluster mode the queue every node shares (a `ClusterSpool` over a
    mail store of its own, which its `close()` closes)."""
    if not config.cluster.dsn:
        return Spool(config.spool_dir / "queue")
    from ..store.cluster import require_extra
    require_extra()
    from ..store.cluster.store import open_store
    return ClusterSpool(open_store(config, workers=1), config.cluster.queue_lease, owns_store=True)
