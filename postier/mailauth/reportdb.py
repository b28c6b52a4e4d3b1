"""Where the report stores keep their tables: one SQLite file each, or PostgreSQL in cluster mode.

The DMARC report store (`reports.ReportStore`) and the TLS report store (`tlsrpt.TLSReportStore`)
hold every rule (what is counted, the bounds, what a report covers) and run their statements,
written once with `?` placeholders in the SQL that SQLite and PostgreSQL both accept (`INSERT ...
ON CONFLICT`, `RETURNING`), on a `ReportStorage`'s connection, as `accounts.Accounts` does on an
`accounts.AccountStorage`. `SQLiteReportStorage` is a single machine's file; cluster mode's storage
(store/cluster/reports.py) keeps the same tables in PostgreSQL, shared by every node, so each
node's counts add up in one place and received reports are read the same from any node.

`ReportDB.claim` is the lease one daily report run takes before it reads what to report (the
report job, pipeline/jobs.py): with the rows shared, two nodes running the job at once would
otherwise both send the same reports.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from ..accounts import Connection, Cursor
from ..durable import ensure_dirs, immediate, use_wal

__all__ = ["CLAIM_SCHEMA", "ReportDB", "ReportStorage", "SQLiteReportStorage"]

#: The claims of report runs (`ReportDB.claim`), in every report store.
CLAIM_SCHEMA = """
CREATE TABLE IF NOT EXISTS report_claim (
    name TEXT PRIMARY KEY,
    until REAL NOT NULL
);
"""


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
        with immediate(conn):
            yield


class ReportDB:
    """A report store's plumbing: one connection behind a lock (every method blocks briefly), and
    the run claims."""

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
        """Take the lease `name` until `until`; False while another holder's lease runs (after `now`)."""
        taken = self._rows(  # every row read: SQLite ends the statement (and its write) then
            "INSERT INTO report_claim (name, until) VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
            "SET until = excluded.until WHERE report_claim.until < ? RETURNING name", (name, until, now))
        return bool(taken)

    def release(self, name: str) -> None:
        self._execute("DELETE FROM report_claim WHERE name = ?", (name,))
