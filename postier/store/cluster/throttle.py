"""Cluster mode's table of failed logins per client IP and node: one batched statement per exchange, so that the nodes share the login throttle.

`PGThrottleExchange` is what `server.throttle.ClusterThrottle` calls every `[cluster]
throttle_interval` seconds, off the login path: one statement writes this node's new failures
(appended to its row of each IP, the newest `ring` kept within the window), blanks the rows of the
IPs that logged in here (on every node: a success clears the IP across the cluster), and reads
back the rows changed since its last read, with each stamp's age. Another statement, at most every
SWEEP seconds, deletes up to SWEEP_LIMIT rows that left the window. So a node's statements per
second are bounded by a constant (1/interval + 1/SWEEP), whatever the rate of failed logins.

Stamps are PostgreSQL's clock (`clock_timestamp()`): a node sends each failure's age and gets ages
back, so the nodes' own clocks never meet. The read follows a cursor (updated, ip, node) over an
index; a page shorter than READ_LIMIT moves the cursor back by MARGIN seconds, so a row committed
just after a read (its stamp earlier than the cursor) is still seen at the next read.

The table is UNLOGGED: not written to the WAL (cheaper, not replicated); a PostgreSQL crash empties
it, which only forgets failed logins of the last window, as a node's restart forgets its own.
It is created at this module's first connection (it is not needed before), under an advisory lock.

PostgreSQL out of reach, or a statement that takes longer than the cluster timeout, is
`StoreUnavailable`; the connection is made again at the next exchange. A connection found lost at
its next use (PostgreSQL restarted) is replaced and the statement sent once more.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import psycopg

from ..errors import StoreUnavailable

__all__ = ["LimitBatch", "LimitRow", "PGThrottleExchange", "READ_LIMIT", "SWEEP", "SWEEP_LIMIT"]

#: (kind, key, node, process, ages of its stamps, counts, seconds the row still stands): a row another
#: node changed in `cluster_limits`. Rates: the groups' ages and counts; sessions: ([], [open
#: sessions]); logins: ([age of the last login], [1]).
LimitRow = tuple[str, str, str, int, list[float], list[int], float]


class LimitBatch(Protocol):
    """What an exchange writes of the other limits (server/limits.py `LimitBatch` is the one)."""

    reset: bool
    lease: float
    login_window: float
    rate_window: float

    def flat(self, now: float) -> tuple[list[str], list[str], list[float], list[int]]: ...
    def __bool__(self) -> bool: ...

READ_LIMIT = 5000  # rows read back per exchange (the rest at the next one)
SWEEP = 60.0  # seconds between two deletions of aged rows
SWEEP_LIMIT = 5000  # rows deleted per sweep
_LOCK_KEY = 0x706F7468  # pg_advisory_xact_lock: one node creates the table at a time
_DOWN = "login throttle database unavailable"

DDL = """
CREATE UNLOGGED TABLE IF NOT EXISTS throttle_failures (
    ip text NOT NULL,
    node text NOT NULL,
    stamps double precision[] NOT NULL,
    updated double precision NOT NULL,
    PRIMARY KEY (ip, node)
);
CREATE INDEX IF NOT EXISTS throttle_failures_updated ON throttle_failures (updated, ip, node);
CREATE UNLOGGED TABLE IF NOT EXISTS cluster_limits (
    kind text NOT NULL,
    key text NOT NULL,
    node text NOT NULL,
    proc integer NOT NULL,
    stamps double precision[] NOT NULL,
    counts integer[] NOT NULL,
    updated double precision NOT NULL,
    expires double precision NOT NULL,
    PRIMARY KEY (kind, key, node, proc)
);
CREATE INDEX IF NOT EXISTS cluster_limits_updated ON cluster_limits (updated, kind, key, node, proc);
CREATE INDEX IF NOT EXISTS cluster_limits_expires ON cluster_limits (expires);
"""

#: The exchange: %(ips)s and %(ages)s are parallel (one entry per failure, ages in seconds before
#: now); %(clears)s the IPs that logged in. A cleared IP that also failed here since is written
#: afresh on this node's row (its earlier stamps dropped) rather than blanked.
_WRITES = """
WITH now AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS t),
cleared AS (
    UPDATE throttle_failures f SET stamps = '{}', updated = now.t FROM now
    WHERE f.ip = ANY(%(clears)s::text[]) AND f.stamps <> '{}'
      AND NOT (f.node = %(node)s AND f.ip = ANY(%(ips)s::text[]))
),
fresh AS (
    SELECT n.ip, array_agg(now.t - n.age) AS stamps
    FROM unnest(%(ips)s::text[], %(ages)s::float8[]) AS n(ip, age), now GROUP BY n.ip
),
written AS (
    INSERT INTO throttle_failures AS f (ip, node, stamps, updated)
    SELECT fresh.ip, %(node)s, fresh.stamps, now.t FROM fresh, now
    ON CONFLICT (ip, node) DO UPDATE SET
        stamps = ARRAY(SELECT s FROM unnest(CASE WHEN f.ip = ANY(%(clears)s::text[]) THEN '{}'::float8[]
                                                 ELSE f.stamps END || excluded.stamps) AS s
                       WHERE s > excluded.updated - %(window)s ORDER BY s DESC LIMIT %(ring)s),
        updated = excluded.updated
)
"""

EXCHANGE = _WRITES + """
SELECT f.ip, f.node, ARRAY(SELECT now.t - s FROM unnest(f.stamps) AS s WHERE s > now.t - %(window)s), f.updated
FROM throttle_failures f, now
WHERE (f.updated, f.ip, f.node) > (%(at)s, %(after_ip)s, %(after_node)s) AND f.updated > now.t - %(window)s
ORDER BY f.updated, f.ip, f.node
LIMIT %(limit)s
"""

#: The exchange with the other limits (server/limits.py): the failures' part as above, then
#: %(kinds)s, %(keys)s, %(lages)s, %(counts)s, parallel, one entry per (kind, key) written by this
#: process (`proc`): a rate group is appended to its row (the groups within the minute kept), a
#: session count or a last login replaces it; `expires` is when the row stops counting (the writer's
#: lease or delay). With %(reset)s this process's session rows not written now are blanked (its
#: first exchange: they are a previous life's). The read returns the failures' rows (kind 'f') and
#: the other nodes' limit rows, each part after its own cursor.
EXCHANGE_LIMITS = _WRITES + """,
lfresh AS (
    SELECT * FROM unnest(%(kinds)s::text[], %(keys)s::text[], %(lages)s::float8[], %(counts)s::int[])
        AS n(kind, key, age, n)
),
lreset AS (
    UPDATE cluster_limits l SET counts = '{0}', updated = now.t, expires = now.t + %(lease)s FROM now
    WHERE %(reset)s AND l.kind = 's' AND l.node = %(node)s AND l.proc = %(proc)s AND l.counts <> '{0}'
      AND NOT EXISTS (SELECT 1 FROM lfresh WHERE lfresh.kind = 's' AND lfresh.key = l.key)
),
lwritten AS (
    INSERT INTO cluster_limits AS l (kind, key, node, proc, stamps, counts, updated, expires)
    SELECT n.kind, n.key, %(node)s, %(proc)s, ARRAY[now.t - n.age], ARRAY[n.n], now.t,
           now.t + CASE n.kind WHEN 's' THEN %(lease)s WHEN 'l' THEN %(login_window)s ELSE %(rate_window)s END
    FROM lfresh n, now
    ON CONFLICT (kind, key, node, proc) DO UPDATE SET
        stamps = CASE WHEN l.kind IN ('c', 'm') THEN ARRAY(
            SELECT g.s FROM unnest(l.stamps || excluded.stamps, l.counts || excluded.counts) WITH ORDINALITY AS g(s, c, i)
            WHERE g.s > excluded.updated - %(rate_window)s ORDER BY g.i) ELSE excluded.stamps END,
        counts = CASE WHEN l.kind IN ('c', 'm') THEN ARRAY(
            SELECT g.c FROM unnest(l.stamps || excluded.stamps, l.counts || excluded.counts) WITH ORDINALITY AS g(s, c, i)
            WHERE g.s > excluded.updated - %(rate_window)s ORDER BY g.i) ELSE excluded.counts END,
        updated = excluded.updated,
        expires = excluded.expires
)
(SELECT 'f'::text, f.ip, f.node, 0, ARRAY(SELECT now.t - s FROM unnest(f.stamps) AS s WHERE s > now.t - %(window)s),
        '{}'::int[], f.updated, 0::float8
 FROM throttle_failures f, now
 WHERE (f.updated, f.ip, f.node) > (%(at)s, %(after_ip)s, %(after_node)s) AND f.updated > now.t - %(window)s
 ORDER BY f.updated, f.ip, f.node
 LIMIT %(limit)s)
UNION ALL
(SELECT l.kind, l.key, l.node, l.proc, ARRAY(SELECT now.t - s FROM unnest(l.stamps) AS s), l.counts, l.updated,
        l.expires - now.t
 FROM cluster_limits l, now
 WHERE (l.updated, l.kind, l.key, l.node, l.proc) > (%(lat)s, %(lkind)s, %(lkey)s, %(lnode)s, %(lproc)s)
   AND l.node <> %(node)s AND l.expires > now.t
 ORDER BY l.updated, l.kind, l.key, l.node, l.proc
 LIMIT %(limit)s)
"""

SWEEP_SQL = """
WITH failures AS (
    DELETE FROM throttle_failures WHERE (ip, node) IN (
        SELECT ip, node FROM throttle_failures
        WHERE updated < extract(epoch FROM clock_timestamp()) - %(window)s
        ORDER BY updated LIMIT %(limit)s)
)
DELETE FROM cluster_limits WHERE (kind, key, node, proc) IN (
    SELECT kind, key, node, proc FROM cluster_limits
    WHERE expires < extract(epoch FROM clock_timestamp())
    ORDER BY expires LIMIT %(limit)s)
"""

#: (ip, node, ages of its stamps within the window: empty once cleared)
Row = tuple[str, str, list[float]]


class PGThrottleExchange:
    """One worker's connection to `throttle_failures` and `cluster_limits`
    (`server.throttle.ThrottleExchange`); `proc`: the worker's index (its rows of the other limits)."""

    def __init__(self, dsn: str, node: str, window: float, ring: int, timeout: float = 5.0,
                 interval: float = 1.0, clock: Callable[[], float] = time.monotonic, proc: int = 0):
        self.dsn = dsn
        self.node = node
        self.proc = proc
        self.window = window
        self.ring = ring
        self.timeout = timeout
        self.margin = 2.0 + 2 * interval  # seconds read again: rows committed after a read that began earlier
        self.clock = clock
        self.cursor: tuple[float, str, str] = (0.0, "", "")
        self.limits_cursor: tuple[float, str, str, str, int] = (0.0, "", "", "", -1)
        self.statements = 0  # sent by this object (the exchanges, the sweeps, the table's creation)
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._swept = clock()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        self._conn = None
        ms = int(self.timeout * 1000)
        conn = await psycopg.AsyncConnection.connect(
            self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout)),
            application_name="postier-throttle", options=f"-c statement_timeout={ms}",
            keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                for stmt in DDL.split(";"):
                    if stmt.strip():
                        await conn.execute(stmt.encode())
                        self.statements += 1
            self.statements += 1
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        return conn

    async def _run(self, ips: Sequence[str], ages: Sequence[float], clears: Sequence[str],
                   limits: LimitBatch | None) -> tuple[list[Row], list[LimitRow]]:
        if self._conn is not None:
            try:
                return await self._once(ips, ages, clears, limits)
            except (psycopg.OperationalError, psycopg.InterfaceError):
                # lost since its last use (PostgreSQL restarted, a failover): once more on a new
                # one (should the lost statement have been applied, its failures count twice: stricter)
                await self.close()
        return await self._once(ips, ages, clears, limits)

    async def _once(self, ips: Sequence[str], ages: Sequence[float], clears: Sequence[str],
                    limits: LimitBatch | None) -> tuple[list[Row], list[LimitRow]]:
        conn = await self._connect()
        at, after_ip, after_node = self.cursor
        params: dict[str, Any] = {
            "node": self.node, "ips": list(ips), "ages": list(ages), "clears": list(clears),
            "window": self.window, "ring": self.ring, "at": at, "after_ip": after_ip,
            "after_node": after_node, "limit": READ_LIMIT}
        self.statements += 1
        if limits is None:
            cur = await conn.execute(EXCHANGE, params)
            rows = await cur.fetchall()
            limit_rows: list[LimitRow] = []
        else:
            kinds, keys, lages, counts = limits.flat(self.clock())
            lat, lkind, lkey, lnode, lproc = self.limits_cursor
            params.update(proc=self.proc, kinds=kinds, keys=keys, lages=lages, counts=counts, reset=limits.reset,
                          lease=limits.lease, login_window=limits.login_window, rate_window=limits.rate_window,
                          lat=lat, lkind=lkind, lkey=lkey, lnode=lnode, lproc=lproc)
            cur = await conn.execute(EXCHANGE_LIMITS, params)
            both = await cur.fetchall()
            rows = [(ip, node, stamps_, updated) for kind, ip, node, _p, stamps_, _c, updated, _l in both if kind == "f"]
            lrows = [r for r in both if r[0] != "f"]
            if len(lrows) >= READ_LIMIT:
                last = lrows[-1]
                self.limits_cursor = (last[6], last[0], last[1], last[2], last[3])
            elif lrows:
                self.limits_cursor = (max(lat, lrows[-1][6] - self.margin), "", "", "", -1)
            limit_rows = [(kind, key, node, proc, list(ages_), list(counts_), left)
                          for kind, key, node, proc, ages_, counts_, _updated, left in lrows]
        if len(rows) >= READ_LIMIT:  # more to read: from the last one, at the next exchange
            self.cursor = (rows[-1][3], rows[-1][0], rows[-1][1])
        elif rows:
            self.cursor = (max(at, rows[-1][3] - self.margin), "", "")
        if self.clock() - self._swept >= SWEEP:
            self._swept = self.clock()
            self.statements += 1
            await conn.execute(SWEEP_SQL, {"window": self.window, "limit": SWEEP_LIMIT})
        return [(ip, node, list(ages_)) for ip, node, ages_, _updated in rows], limit_rows

    async def exchange(self, ips: Sequence[str], ages: Sequence[float], clears: Sequence[str],
                       limits: LimitBatch | None = None) -> tuple[list[Row], list[LimitRow]]:
        """Write this node's new failures and clears (and with `limits` this process's limit
        events), read the rows changed since the last read (StoreUnavailable when PostgreSQL does
        not answer within the timeout)."""
        try:
            # a connection (connect_timeout) then a statement (statement_timeout), perhaps twice
            return await asyncio.wait_for(self._run(ips, ages, clears, limits), 4 * self.timeout + 1)
        except (psycopg.Error, OSError, TimeoutError) as exc:
            await self.close()
            raise StoreUnavailable(_DOWN) from exc

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError, TimeoutError):
                await asyncio.wait_for(conn.close(), 1.0)
