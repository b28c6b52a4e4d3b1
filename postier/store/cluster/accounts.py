"""Cluster mode's accounts and DKIM keys in PostgreSQL, so that every node logs in, routes and signs alike.

`PGAccountStorage` is the `accounts.AccountStorage` of cluster mode: `accounts.Accounts` keeps every
rule (addresses, aliases, catch-all, argon2 and SCRAM, quotas) and runs its statements on the tables
of schema.py through one psycopg connection per thread (autocommit: a lookup never holds a
transaction open). Account writers are serialized by `pg_advisory_xact_lock(ACCOUNTS_LOCK)`, as
SQLite's `BEGIN IMMEDIATE` serializes them on one machine, and bump `account_version`, which each
node's resolution cache compares at most every `accounts.CACHE_CHECK` seconds: a user, alias or
domain added on one node routes mail on every other node within that time, with no restart.
Password checks read the stored hash at every login (accounts.py), so `user passwd` on one node
ends the old password on all of them at once, whatever their login caches hold.

`ClusterKeyStore` is `mailauth.keys.KeyStore` with its storage methods on the `dkim_keys` table: a
key generated or activated on one node signs the next message submitted on any node.

PostgreSQL out of reach is `StoreUnavailable` (4xx for SMTP, NO [UNAVAILABLE] for IMAP); each
connection is made again at its next use.
"""

from __future__ import annotations

import atexit
import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool

from ...accounts import Connection, Cursor
from ...config import Config
from ...mailauth.keys import DKIMKey, KeyStore
from ..errors import StoreUnavailable
from .schema import ACCOUNTS_LOCK, ensure_schema

__all__ = ["ClusterKeyStore", "PGAccountStorage", "open_accounts_storage", "open_key_store"]

_DOWN = "account database unavailable, try again later"
_LOST = (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout)


@functools.lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """sqlite3's `?` placeholders as psycopg's `%s` (the account statements hold no other `?` or `%`)."""
    return sql.replace("?", "%s")


class _Schema:
    """Creates the tables once per process, at the first connection that reaches PostgreSQL."""

    def __init__(self) -> None:
        self.done = False
        self.lock = threading.Lock()

    def ensure(self, conn: psycopg.Connection[Any]) -> None:
        if not self.done:
            with self.lock:
                if not self.done:
                    ensure_schema(conn)
                    self.done = True


class _PGConnection:
    """One thread's connection to the account tables (`accounts.Connection`): `?` placeholders,
    connected at first use and again after a loss."""

    def __init__(self, dsn: str, timeout: float, schema: _Schema):
        self.dsn = dsn
        self.timeout = timeout
        self.schema = schema
        self._conn: psycopg.Connection[Any] | None = None
        self.in_transaction = False

    def _stale(self) -> bool:
        return self._conn is None or self._conn.closed or self._conn.broken

    def raw(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or self._stale():
            try:
                conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout)))
                self.schema.ensure(conn)
            except psycopg.Error as exc:
                raise StoreUnavailable(_DOWN) from exc
            self._conn = conn
        return conn

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor:
        for retry in (True, False):
            fresh = self._stale()
            try:
                return self.raw().execute(_pg(sql), parameters)
            except _LOST as exc:
                # a connection lost since its last use (PostgreSQL restarted, a failover): once more
                # on a new one, unless a transaction was under way on it
                if fresh or self.in_transaction or not retry:
                    raise StoreUnavailable(_DOWN) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @contextmanager
    def transaction(self, down: str = _DOWN) -> Iterator[psycopg.Connection[Any]]:
        """One transaction on a live connection (made again if it was lost before it began); a
        connection lost during it is StoreUnavailable(down) (the storages' `write`)."""
        outer = self.in_transaction  # nested (a savepoint): the outer one is still under way after it
        self.execute("SELECT 1")
        raw = self.raw()
        try:
            with raw.transaction():
                self.in_transaction = True
                yield raw
        except _LOST as exc:
            raise StoreUnavailable(down) from exc
        finally:
            self.in_transaction = outer

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PGAccountStorage:
    """The account tables in PostgreSQL (`accounts.AccountStorage`)."""

    #: no rowid in PostgreSQL: users created in the same instant are ordered by address
    first_user_sql = "SELECT address FROM users ORDER BY created, address LIMIT 1"

    def __init__(self, dsn: str, timeout: float = 5.0):
        self.dsn = dsn
        self.timeout = timeout
        self._schema = _Schema()

    def connect(self) -> Connection:
        return _PGConnection(self.dsn, self.timeout, self._schema)

    @contextmanager
    def write(self, conn: Connection) -> Iterator[None]:
        assert isinstance(conn, _PGConnection)
        with conn.transaction() as raw:
            raw.execute("SELECT pg_advisory_xact_lock(%s)", (ACCOUNTS_LOCK,))
            yield
            raw.execute("UPDATE account_version SET n = n + 1")  # the other nodes' caches

    def data_version(self, conn: Connection) -> int:
        row = conn.execute("SELECT n FROM account_version").fetchone()
        return int(row[0]) if row else 0


class ClusterKeyStore(KeyStore):
    """DKIM keys in the `dkim_keys` table (the rules are `KeyStore`'s; see mailauth/keys.py)."""

    def __init__(self, dsn: str, timeout: float = 5.0):  # no super().__init__: there is no key directory
        self._schema = _Schema()
        self.pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
            dsn, min_size=0, max_size=4, open=False, timeout=timeout,
            kwargs={"connect_timeout": max(1, int(timeout)), "autocommit": True},
            check=psycopg_pool.ConnectionPool.check_connection)
        self.pool.open(wait=False)
        self._tx = threading.local()  # the connection of the `_locked` block running in this thread

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        held: psycopg.Connection[Any] | None = getattr(self._tx, "conn", None)
        if held is not None:
            yield held
            return
        try:
            with self.pool.connection() as conn:
                self._schema.ensure(conn)
                yield conn
        except _LOST as exc:
            raise StoreUnavailable(_DOWN) from exc

    @contextmanager
    def _locked(self, domain: str) -> Iterator[None]:
        with self._connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (ACCOUNTS_LOCK, domain))
            self._tx.conn = conn
            try:
                yield
            finally:
                self._tx.conn = None

    def _dir(self, domain: str) -> Path:
        raise AssertionError("ClusterKeyStore keeps no files")

    def _read_state(self, domain: str) -> dict[str, dict[str, object]]:
        with self._connection() as conn:
            rows = conn.execute("SELECT selector, algorithm, created, state FROM dkim_keys WHERE domain = %s",
                                (domain,)).fetchall()
        return {r[0]: {"algorithm": r[1], "created": r[2], "state": r[3]} for r in rows}

    def _write_state(self, domain: str, state: dict[str, dict[str, object]]) -> None:
        with self._connection() as conn:
            for selector, meta in state.items():
                conn.execute("UPDATE dkim_keys SET state = %s WHERE domain = %s AND selector = %s",
                             (str(meta.get("state")), domain, selector))

    def _txt(self, domain: str, selector: str) -> str:
        with self._connection() as conn:
            row = conn.execute("SELECT txt FROM dkim_keys WHERE domain = %s AND selector = %s",
                               (domain, selector)).fetchone()
        if row is None:
            raise OSError(f"no key {selector} for {domain}")
        return str(row[0])

    def _exists(self, domain: str, selector: str) -> bool:
        with self._connection() as conn:
            return conn.execute("SELECT 1 FROM dkim_keys WHERE domain = %s AND selector = %s",
                                (domain, selector)).fetchone() is not None

    def _add_key(self, domain: str, selector: str, pem: bytes, txt: str, state: dict[str, dict[str, object]]
                 ) -> None:
        meta = state[selector]
        with self._connection() as conn:
            conn.execute("INSERT INTO dkim_keys (domain, selector, algorithm, state, created, private_key, txt)"
                         " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                         (domain, selector, str(meta["algorithm"]), str(meta["state"]), meta["created"], pem, txt))
        self._write_state(domain, state)

    def private_key(self, key: DKIMKey) -> bytes:
        with self._connection() as conn:
            row = conn.execute("SELECT private_key FROM dkim_keys WHERE domain = %s AND selector = %s",
                               (key.domain, key.selector)).fetchone()
        if row is None:
            raise OSError(f"no private key for {key.dns_name}")
        return bytes(row[0])

    def domains(self) -> list[str]:
        with self._connection() as conn:
            return [r[0] for r in conn.execute("SELECT DISTINCT domain FROM dkim_keys ORDER BY domain")]

    def close(self) -> None:
        self.pool.close()


def open_accounts_storage(config: Config) -> PGAccountStorage:
    """The account storage of `[cluster]`."""
    return PGAccountStorage(config.cluster.dsn, config.cluster.timeout)


def open_key_store(config: Config) -> ClusterKeyStore:
    """The DKIM key store of `[cluster]` (one per process: its connection pool is shared)."""
    return _key_store(config.cluster.dsn, config.cluster.timeout)


@functools.lru_cache(maxsize=4)
def _key_store(dsn: str, timeout: float) -> ClusterKeyStore:
    store = ClusterKeyStore(dsn, timeout)
    # Closed at exit while its pool's threads still run: left to the pool's finalizer, each thread is
    # waited for (5 s) after the interpreter has stopped running threads, 15-20 s for every process
    # that used a key (`postier dkim list`, a node's shutdown).
    atexit.register(store.close)
    return store
