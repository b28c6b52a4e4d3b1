"""Collection of unreferenced message bodies in cluster mode (`postier cluster gc`).

Every upload first renews its body's row in `bodies` (last_put = now(), its own committed
transaction; `mark`, called by `ClusterMailboxes.append` and the cluster queue). A body is referenced
by a mailbox message or by a queued message (`queue_messages`). The collector takes, row-locked (`FOR UPDATE SKIP LOCKED`,
so several nodes may run it at once), bodies that no message refers to and that were last uploaded
more than `grace` seconds ago, deletes their objects and then their rows (and their full-text rows,
`body_text`) in the same transaction; their parsed views and header blocks go with the rows (ON
DELETE CASCADE, store.cluster.cache).
An upload of the same body meanwhile waits on that row lock and then uploads again, so a committed
message never refers to a deleted object. `grace` must exceed the longest time between an upload
and the commit of its message (seconds in practice; the default is a day).
"""

from __future__ import annotations

from typing import Any

import psycopg

from .bodies import BodyStore

__all__ = ["collect", "mark"]


def mark(conn: psycopg.Connection[tuple[Any, ...]], digest: str) -> None:
    """Renew a body's mark before its upload (committed on its own): the collector holds this row
    while it deletes an unreferenced body, so an upload cannot be deleted under its writer."""
    conn.execute("INSERT INTO bodies (hash) VALUES (%s) ON CONFLICT (hash) DO UPDATE SET last_put = now()",
                 (digest,))


def collect(conn: psycopg.Connection[tuple[Any, ...]], bodies: BodyStore, grace: float = 86400.0,
            batch: int = 500, max_batches: int = 10_000) -> int:
    """Delete unreferenced bodies older than `grace` seconds; returns how many were deleted."""
    total = 0
    for _ in range(max_batches):
        with conn.transaction():
            found = [h for (h,) in conn.execute(
                "SELECT hash FROM bodies b WHERE last_put < now() - make_interval(secs => %s) "
                "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.body = b.hash) "
                "AND NOT EXISTS (SELECT 1 FROM queue_messages q WHERE q.body = b.hash) "
                "ORDER BY hash LIMIT %s FOR UPDATE SKIP LOCKED", (grace, batch))]
            if not found:
                break
            for digest in found:
                bodies.delete(digest)
            conn.execute("DELETE FROM body_text WHERE hash = ANY(%s)", (found,))  # store.cluster.fulltext
            conn.execute("DELETE FROM bodies WHERE hash = ANY(%s)", (found,))
        total += len(found)
    return total
