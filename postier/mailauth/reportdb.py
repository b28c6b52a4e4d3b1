"""Where the report stores keep their tables: one SQLite file each, or PostgreSQL in cluster mode.

The DMARC report store (`reports.ReportStore`) and the TLS report store (`tlsrpt.TLSReportStore`)
hold every rule (what is counted, the bounds, what a report covers) and run their statements,
written once with `?` placeholders in the SQL that SQLite and PostgreSQL both accept (`INSERT ...
ON CONFLICT`, `RETURNING`), on a `ReportStorage`'s connection, as `accounts.Accounts` does on an
`accounts.AccountStorage`. `SQLiteReportStorage` is a single machine's file; cluster mode's storage
(store/cluster/reports.py) keeps the same tables in PostgreSQL, shared by every node, so each
node's counts add up in one place and received reports are read the same from any node.

`ReportDB.claim` is the lease the daily report run (the report job, pipeline/jobs.py) takes on one
report, named by `claim_name(kind, day, domain)`, before it reads that report's rows and
sends it: with the rows shared, two nodes running the job at once share the reports between them
and each is sent once; a node that dies mid-send leaves its lease to run out, then another takes it.

What the two stores share is written once here, told apart by their `ReportKind` (the claims'
name, the table of counted rows): `ReportDB.mark_reported` subtracts what a report covered, and
`ReportDB.import_from` copies a single machine's file into cluster mode's tables
(store/cluster/importer.py), each store saying how its counted rows are read and added
(`_importable`, `_count_imported`) and which reports it received (`_received_all`). The source file
gets a random id of its own once (`origin`), and the target notes, per (that id, source row), what
it has copied (`imported`, `note_imported`): the counts, and each entry of the log of reports sent
(`report_out`, `kind.sent` its columns), so a second copy of the same file adds nothing; two copies
at once take turns (`importing`).
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self

from ..accounts import Connection, Cursor
from ..durable import ensure_dirs, immediate, use_wal

__all__ = ["CLAIM_SCHEMA", "Counted", "ImportTally", "ReportDB", "ReportKind", "ReportStorage", "SQLiteReportStorage",
           "claim_name"]

#: The claims of reports being sent (`ReportDB.claim`), the store's own id (`ReportDB.origin`) and
#: what was imported from other stores (`ReportDB.imported`), in every report store.
CLAIM_SCHEMA = """
CREATE TABLE IF NOT EXISTS report_claim (
    name TEXT PRIMARY KEY,
    until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS report_origin (
    id TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS report_imported (
    origin TEXT NOT NULL,
    item TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (origin, item)
);
"""

IMPORT_LOCK = 0x706F7377  # pg_advisory_xact_lock(IMPORT_LOCK, hashtext(origin)): one import from a store at a time


def claim_name(kind: str, day: int, domain: str) -> str:
    """The claim of one report: `kind` ("dmarc", "tlsrpt") about the policy domain `domain`; `day`
    (days since the epoch, UTC) is for DMARC the day the run ends at (its midnight), for TLS the
    day of the outcomes."""
    return f"{kind}/{day}/{domain}"


@dataclass(frozen=True, slots=True)
class ReportKind:
    """What tells one report store from the other where they share a mechanism (`ReportDB`)."""

    name: str       # "dmarc", "tlsrpt": its reports' claims (`claim_name`)
    counted: str    # the table of counted rows: `id`, `day` (UTC day number) and a running `count`
    keep_days: int  # recorded rows not reported within this time are dropped (`prune`)
    sent: tuple[str, ...]  # the columns of `report_out`, the log of reports sent, besides its `id`


@dataclass(frozen=True, slots=True)
class Counted[K]:
    """One counted row of a store, as `ReportDB.import_from` reads it from the source: its note in
    `report_imported`, whether it has expired, its count and the key the target counts it by
    (`_count_imported`)."""

    item: str
    expired: bool
    count: int
    key: K


@dataclass
class ImportTally:
    """What `import_from` did with one kind of row: copied, found copied before, or left out
    (expired, or over the day's bound)."""

    copied: int = 0
    unchanged: int = 0
    skipped: int = 0


class ReportStorage(Protocol):
    """Where a report store's tables live: `SQLiteReportStorage`, or PostgreSQL in cluster mode."""

    #: "sqlite" or "postgresql", for the few statements that differ
    dialect: str

    def connect(self) -> Connection:
        """A new connection (`?` placeholders); the tables exist once it is first used."""

    def write(self, conn: Connection) -> AbstractContextManager[None]:
        """A write transaction (committed on success, else rolled back)."""


class SQLiteReportStorage:
    """A report store's tables in one SQLite file (WAL), as on a single machine."""

    dialect = "sqlite"

    def __init__(self, path: Path, schema: str, synchronous: str = "FULL"):
        self.path = path
        self.schema = schema
        self.synchronous = synchronous

    def connect(self) -> Connection:
        ensure_dirs(self.path.parent)
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
        use_wal(conn)
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.executescript(self.schema + CLAIM_SCHEMA)
        return conn

    @contextmanager
    def write(self, conn: Connection) -> Iterator[None]:
        assert isinstance(conn, sqlite3.Connection)
        if conn.in_transaction:  # within an outer one (`ReportDB.importing`)
            yield
            return
        with immediate(conn):
            yield


class ReportDB[K]:
    """A report store's plumbing: one connection behind a lock (every method blocks briefly), the
    run claims, and what both stores do alike (`mark_reported`, `import_from`); `K` is the key a
    store counts a row by."""

    kind: ClassVar[ReportKind]

    def __init__(self, storage: ReportStorage):
        self.storage = storage
        self._lock = threading.RLock()
        self._db = storage.connect()

    @property
    def rowid(self) -> str:
        """The column that keeps a table's rows in the order they were inserted."""
        return "rowid" if self.storage.dialect == "sqlite" else "id"

    def _execute(self, sql: str, parameters: Any = ()) -> Cursor:
        with self._lock:
            return self._db.execute(sql, parameters)

    def _rows(self, sql: str, parameters: Any = ()) -> list[Any]:
        """Every row of a statement, read while the lock is held (the connection is shared)."""
        with self._lock:
            return list(self._db.execute(sql, parameters))

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._lock, self.storage.write(self._db):
            yield self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def claim(self, name: str, until: float, now: float) -> bool:
        """Take the lease `name` (`claim_name`) until `until`; False while another holder's lease
        runs (after `now`). A holder that dies keeps it until `until`, then anyone may take it."""
        taken = self._rows(  # every row read: SQLite ends the statement (and its write) then
            "INSERT INTO report_claim (name, until) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
            "SET until = excluded.until WHERE report_claim.until < ? RETURNING name", (name, until, now))
        return bool(taken)

    def release(self, name: str, until: float) -> None:
        """Give back the lease `name` taken until `until`: only that one (a lease that ran out and
        was taken by another holder meanwhile is theirs, and stays)."""
        self._execute("DELETE FROM report_claim WHERE name = ? AND until = ?", (name, until))

    def forget_claims(self, now: float) -> None:
        """Drop the leases that ran out (their holders died before `release`)."""
        self._execute("DELETE FROM report_claim WHERE until < ?", (now,))

    # -- importing another store's rows (`import_from` of the stores) --

    def origin(self) -> str:
        """This store's id, made at the first call: what an import from it notes its rows by."""
        with self._write() as db:
            row = db.execute("SELECT id FROM report_origin").fetchone()
            if row is not None:
                return str(row[0])
            made = secrets.token_hex(16)
            db.execute("INSERT INTO report_origin (id) VALUES (?)", (made,))
            return made

    @contextmanager
    def importing(self, origin: str) -> Iterator[None]:
        """One write transaction for an import from the store `origin`; two imports from it at once
        run one after the other (PostgreSQL: an advisory lock; SQLite: the file's write lock)."""
        with self._write() as db:
            if self.storage.dialect == "postgresql":
                db.execute("SELECT pg_advisory_xact_lock(?, hashtext(?))", (IMPORT_LOCK, origin))
            yield

    def imported(self, origin: str) -> dict[str, int]:
        """How much of each row (item) of the store `origin` was copied before (within `importing`)."""
        return {str(item): int(n) for item, n in
                self._rows("SELECT item, count FROM report_imported WHERE origin = ?", (origin,))}

    def note_imported(self, origin: str, item: str, count: int) -> None:
        """`count` of `item` of the store `origin` is copied now (within `importing`)."""
        self._execute("INSERT INTO report_imported (origin, item, count) VALUES (?, ?, ?) ON CONFLICT "
                      "(origin, item) DO UPDATE SET count = excluded.count", (origin, item, count))

    # -- what both stores do alike, by their kind --

    def prune(self, before: float) -> int:
        """Drop the counted rows older than `before` (sent or not); how many."""
        raise NotImplementedError

    def mark_reported(self, taken: Iterable[tuple[int, int]]) -> None:
        """Subtract what a report covered ((row id, count) pairs of the counted rows it was built
        from): what was counted meanwhile stays for the next report."""
        table = self.kind.counted
        with self._write() as db:
            for rid, n in taken:
                db.execute(f"UPDATE {table} SET count = count - ? WHERE id = ?", (n, rid))
            db.execute(f"DELETE FROM {table} WHERE count <= 0")

    def import_from(self, src: Self, now: float, sent: ImportTally | None = None) -> tuple[ImportTally, ImportTally]:
        """Add `src`'s counted rows not reported yet to this store's counts and copy the reports it
        received and its log of reports sent (a single machine's file into cluster mode's tables):
        (counted rows, received reports) copied, found copied before and left out, rows counted in
        what they count; the log's entries are counted in `sent`, when given. Each
        row's count is noted by `src`'s id and its row (`Counted.items`) in the same transaction,
        and a second copy adds only what the row gained since (nothing, from a stopped node): counts
        are never added twice. What `src` reported was subtracted there when it was sent, so it is
        not sent again; rows the store's retention would drop are left out (`Counted.expired`), and
        so is a new row on a day that holds the store's bound of distinct rows already
        (`_count_imported`, as the store's `record` does). A received report is kept once per
        (organization, report id), as when it arrives. An entry of the log of reports sent is noted
        by `src`'s id and its row id, and copied once (the log is kept whole, as on one machine)."""
        counted, received = ImportTally(), ImportTally()
        origin = src.origin()
        with self.importing(origin):
            done = self.imported(origin)
            # the days' numbers of distinct rows, counted once (as `record` does for each new one)
            rows_of = {int(d): int(n) for d, n in self._rows(
                f"SELECT day, COUNT(*) FROM {self.kind.counted} WHERE day IS NOT NULL GROUP BY day")}
            for row in src._importable(now):
                before = done.get(row.item, 0)
                if row.expired:
                    counted.skipped += row.count
                elif row.count <= before:
                    counted.unchanged += row.count
                elif self._count_imported(row.key, row.count - before, rows_of):
                    self.note_imported(origin, row.item, row.count)
                    counted.copied += row.count - before
                    counted.unchanged += before
                else:
                    counted.skipped += row.count - before
            for report, authenticated, at in src._received_all():
                if self.store_received(report, authenticated, at):
                    received.copied += 1
                else:
                    received.unchanged += 1
            self._import_sent(src, origin, done, ImportTally() if sent is None else sent)
        return counted, received

    def _import_sent(self, src: Self, origin: str, done: dict[str, int], tally: ImportTally) -> None:
        """Copy the entries of `src`'s log of reports sent that are not noted as copied (within
        `importing`), each with its time, so that `sent` lists them among this store's own."""
        columns = ", ".join(self.kind.sent)
        insert = f"INSERT INTO report_out ({columns}) VALUES ({', '.join('?' * len(self.kind.sent))})"
        for rid, *values in src._rows(f"SELECT id, {columns} FROM report_out ORDER BY id"):
            item = f"report_out/{rid}"
            if item in done:
                tally.unchanged += 1
                continue
            self._execute(insert, values)
            self.note_imported(origin, item, 1)
            tally.copied += 1

    def _importable(self, now: float) -> Iterable[Counted[K]]:
        """This store's counted rows not reported yet, as an import from it reads them at `now`."""
        raise NotImplementedError

    def _count_imported(self, key: K, count: int, rows_of: dict[int, int]) -> bool:
        """Add `count` to the row of `key` (made if new); False when it is new and its day holds the
        bound of distinct rows already (the days' numbers of rows are `rows_of`, kept up to date)."""
        raise NotImplementedError

    def _received_all(self) -> Sequence[tuple[Any, bool, float]]:
        """Every report received: (report, authenticated, when received), as `store_received` takes them."""
        raise NotImplementedError

    def store_received(self, report: Any, authenticated: bool, at: float) -> bool:
        """Keep a report someone sent us; False when we have it already."""
        raise NotImplementedError
