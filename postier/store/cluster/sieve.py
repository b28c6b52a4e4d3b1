"""Sieve scripts (RFC 5804 semantics) and vacation/duplicate tracking (RFC 5230 §4.1, RFC 7352 §3) of
cluster mode, in PostgreSQL: a script uploaded over ManageSieve on one node runs at delivery on every
node, and a vacation reply goes once per sender whichever node takes the mail in.

The same contract as the file store `store.sieve.ScriptStore` (names checked by `valid_script_name`,
the same quotas and ManageSieve response codes). Each change is one transaction that first takes a
transaction advisory lock on the user, so two sessions never interleave a rename with a SETACTIVE
or slip past the script-count quota; a partial unique index keeps one active script per user.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg_pool

from ...message.types import User
from ..errors import StoreUnavailable
from ..sieve import ScriptError, valid_script_name

__all__ = ["ClusterScripts", "ClusterSieve", "ClusterTracking"]

type Conn = psycopg.Connection[tuple[Any, ...]]


def _user_key(owner: str) -> int:
    return int.from_bytes(hashlib.sha256(b"sieve\x1f" + owner.encode()).digest()[:8], "big", signed=True)


class _Base:
    def __init__(self, pool: psycopg_pool.ConnectionPool[Any], owner: str, ready: Callable[[], None]):
        self.pool = pool
        self.owner = owner
        self._ready = ready  # creates the tables on first use (ClusterStore.ensure_schema)

    @contextmanager
    def _tx(self, lock: bool = False) -> Iterator[Conn]:
        """One transaction; with `lock`, this user's script changes wait for each other."""
        self._ready()
        try:
            with self.pool.connection() as conn:
                if lock:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_user_key(self.owner),))
                yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            raise StoreUnavailable("script storage unavailable, try again later") from exc


class ClusterScripts(_Base):
    """One user's scripts in the `sieve_scripts` table (`store.sieve.Scripts`). All methods block."""

    def __init__(self, pool: psycopg_pool.ConnectionPool[Any], owner: str, ready: Callable[[], None],
                 max_scripts: int = 20, max_script_size: int = 256 * 1024):
        super().__init__(pool, owner, ready)
        self.max_scripts = max_scripts
        self.max_script_size = max_script_size

    @staticmethod
    def _check_name(name: str) -> None:
        if not valid_script_name(name):  # RFC 5804 §1.6
            raise ScriptError(f"invalid script name {name!r}", "")

    # -- queries --------------------------------------------------------------------------------

    def active(self) -> str | None:
        with self._tx() as conn:
            r = conn.execute("SELECT name FROM sieve_scripts WHERE owner=%s AND active", (self.owner,)).fetchone()
        return None if r is None else str(r[0])

    def list(self) -> list[tuple[str, bool]]:
        with self._tx() as conn:
            return [(n, a) for n, a in conn.execute(
                "SELECT name, active FROM sieve_scripts WHERE owner=%s ORDER BY name", (self.owner,))]

    def get(self, name: str) -> bytes:
        self._check_name(name)
        with self._tx() as conn:
            r = conn.execute("SELECT body FROM sieve_scripts WHERE owner=%s AND name=%s", (self.owner, name)).fetchone()
        if r is None:
            raise ScriptError(f"no script {name!r}", "NONEXISTENT")
        return bytes(r[0])

    def _have_space(self, conn: Conn, name: str, size: int) -> None:
        if size > self.max_script_size:
            raise ScriptError("script too large", "QUOTA/MAXSIZE")
        r = conn.execute("SELECT count(*), count(*) FILTER (WHERE name=%s) FROM sieve_scripts WHERE owner=%s",
                         (name, self.owner)).fetchone()
        assert r is not None
        if not r[1] and r[0] >= self.max_scripts:
            raise ScriptError("too many scripts", "QUOTA/MAXSCRIPTS")

    def have_space(self, name: str, size: int) -> None:
        """RFC 5804 §2.5 HAVESPACE; raises ScriptError with QUOTA/MAXSIZE or QUOTA/MAXSCRIPTS."""
        self._check_name(name)
        with self._tx() as conn:
            self._have_space(conn, name, size)

    # -- changes --------------------------------------------------------------------------------

    def put(self, name: str, data: bytes, check: Callable[[bytes], None] | None = None) -> None:
        """RFC 5804 §2.6 PUTSCRIPT: `check` raises to refuse the script before anything is written; a
        script of that name is replaced (it stays active if it was)."""
        self.have_space(name, len(data))
        if check is not None:
            check(data)
        with self._tx(lock=True) as conn:
            self._have_space(conn, name, len(data))
            conn.execute("INSERT INTO sieve_scripts (owner, name, body) VALUES (%s, %s, %s) "
                         "ON CONFLICT (owner, name) DO UPDATE SET body = excluded.body", (self.owner, name, data))

    def delete(self, name: str) -> None:
        """RFC 5804 §2.10: the active script cannot be deleted (ACTIVE)."""
        self._check_name(name)
        with self._tx(lock=True) as conn:
            r = conn.execute("SELECT active FROM sieve_scripts WHERE owner=%s AND name=%s", (self.owner, name)).fetchone()
            if r is None:
                raise ScriptError(f"no script {name!r}", "NONEXISTENT")
            if r[0]:
                raise ScriptError("script is active", "ACTIVE")
            conn.execute("DELETE FROM sieve_scripts WHERE owner=%s AND name=%s", (self.owner, name))

    def rename(self, old: str, new: str) -> None:
        """RFC 5804 §2.11.1 RENAMESCRIPT: the active script stays active under its new name."""
        self._check_name(old)
        self._check_name(new)
        with self._tx(lock=True) as conn:
            if conn.execute("SELECT 1 FROM sieve_scripts WHERE owner=%s AND name=%s", (self.owner, old)).fetchone() is None:
                raise ScriptError(f"no script {old!r}", "NONEXISTENT")
            if conn.execute("SELECT 1 FROM sieve_scripts WHERE owner=%s AND name=%s", (self.owner, new)).fetchone():
                raise ScriptError(f"script {new!r} exists", "ALREADYEXISTS")
            conn.execute("UPDATE sieve_scripts SET name=%s WHERE owner=%s AND name=%s", (new, self.owner, old))

    def set_active(self, name: str) -> None:
        """RFC 5804 §2.8 SETACTIVE; "" deactivates."""
        if name:
            self._check_name(name)
        with self._tx(lock=True) as conn:
            if name and conn.execute("SELECT 1 FROM sieve_scripts WHERE owner=%s AND name=%s",
                                     (self.owner, name)).fetchone() is None:
                raise ScriptError(f"no script {name!r}", "NONEXISTENT")
            conn.execute("UPDATE sieve_scripts SET active = false WHERE owner=%s AND active", (self.owner,))
            if name:
                conn.execute("UPDATE sieve_scripts SET active = true WHERE owner=%s AND name=%s", (self.owner, name))

    def active_script(self) -> tuple[str, bytes] | None:
        """The active script's name and text, for delivery (one query)."""
        with self._tx() as conn:
            r = conn.execute("SELECT name, body FROM sieve_scripts WHERE owner=%s AND active", (self.owner,)).fetchone()
        return None if r is None else (str(r[0]), bytes(r[1]))


class ClusterTracking(_Base):
    """Who got a vacation reply and which message ids were seen, per user (`store.sieve.Tracking`), in
    the `sieve_tracking` table; expired rows of the user are pruned as new ones are written."""

    def __init__(self, pool: psycopg_pool.ConnectionPool[Any], owner: str, ready: Callable[[], None],
                 max_rows: int = 100_000):
        super().__init__(pool, owner, ready)
        self.max_rows = max_rows
        self._held: Conn | None = None  # the transaction of `exclusive`, while it lasts

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """`store.sieve.Tracking.exclusive`: one transaction holding the user's tracking lock (an
        advisory lock of its own, not the scripts'), in which `seen` and `record` run, committed at
        the end of the block; released by PostgreSQL if the node dies."""
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_user_key("tracking\0" + self.owner),))
            self._held = conn
            try:
                yield
            finally:
                self._held = None

    @contextmanager
    def _step(self, lock: bool = False) -> Iterator[Conn]:
        """The transaction of `exclusive` while it is held, else one of its own."""
        if self._held is not None:
            yield self._held
            return
        with self._tx(lock=lock) as conn:
            yield conn

    def seen(self, key: str, now: float) -> bool:
        with self._step() as conn:
            r = conn.execute("SELECT until FROM sieve_tracking WHERE owner=%s AND key=%s", (self.owner, key.encode())).fetchone()
        return r is not None and float(r[0]) > now

    def record(self, key: str, until: float) -> None:
        with self._step(lock=True) as conn:
            conn.execute("INSERT INTO sieve_tracking (owner, key, until) VALUES (%s, %s, %s) ON CONFLICT (owner, key) "
                         "DO UPDATE SET until = greatest(sieve_tracking.until, excluded.until)", (self.owner, key.encode(), until))
            conn.execute("DELETE FROM sieve_tracking WHERE owner=%s AND until < %s", (self.owner, time.time()))
            r = conn.execute("SELECT count(*) FROM sieve_tracking WHERE owner=%s", (self.owner,)).fetchone()
            assert r is not None
            if r[0] > self.max_rows:  # bounded: the oldest entries go first
                conn.execute("DELETE FROM sieve_tracking WHERE owner=%s AND key IN (SELECT key FROM sieve_tracking "
                             "WHERE owner=%s AND key != %s ORDER BY until LIMIT %s)",
                             (self.owner, self.owner, key.encode(), r[0] - self.max_rows))

    def close(self) -> None:
        return None  # the connection went back to the pool after each call


class ClusterSieve:
    """Cluster mode's `store.sieve.SieveStorage`: each user's scripts and tracking in PostgreSQL,
    through the node's mail-store pool."""

    def __init__(self, pool: psycopg_pool.ConnectionPool[Any], ready: Callable[[], None],
                 max_scripts: int = 20, max_script_size: int = 256 * 1024):
        self.pool = pool
        self.ready = ready
        self.max_scripts = max_scripts
        self.max_script_size = max_script_size

    def scripts(self, user: User) -> ClusterScripts:
        return ClusterScripts(self.pool, user.address, self.ready, self.max_scripts, self.max_script_size)

    def tracking(self, user: User) -> ClusterTracking:
        return ClusterTracking(self.pool, user.address, self.ready)
