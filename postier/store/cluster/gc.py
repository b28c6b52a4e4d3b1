"""Collection of unreferenced message bodies in cluster mode (`postier cluster gc`).

Every upload first renews its body's row in `bodies` (last_put = now(), its own committed
transaction; `mark`, called by `ClusterMailboxes._put_body` and the cluster queue), then PUTs the
object, then commits the message rows that refer to it. A body is referenced by a mailbox message
or by a queued message (`queue_messages`).

`collect` works from the table: it takes, row-locked (`FOR UPDATE SKIP LOCKED`, so several nodes may
run it at once), bodies that no message refers to and that were last uploaded more than `grace`
seconds ago, deletes their objects and then their rows in the same transaction; their full-text rows
(`body_text`, store.cluster.fulltext), parsed views and header blocks (store.cluster.cache) go with
the rows (ON DELETE CASCADE, store.cluster.schema). An upload of the same body meanwhile waits on that row lock in `mark`, then
inserts a new row and uploads again, so a committed message never refers to a deleted object; an
upload whose mark committed first has renewed `last_put`, which the locking SELECT rechecks. `grace`
must exceed the longest time between a mark and the commit of its message (seconds in practice; the
default is a day).

`collect_orphans` works from a listing of the bucket (ListObjectsV2, a bounded number of keys per
run, resumed after the last key seen by the previous run; `gc_state` keeps that key): the objects
that no `bodies` row names, last modified more than `grace` ago: uploads whose row was lost, and
bodies uploaded before the `bodies` table existed. For those it inserts their row itself (ON CONFLICT
DO NOTHING, so a row that appeared meanwhile is left to `collect`) and, holding that uncommitted row,
checks the message and queue tables: a body a message refers to keeps the row (adopted, from then on
`collect`'s); the others lose their object, then the row, in the same transaction. An upload of the
same body meanwhile waits in `mark` on that uncommitted row, exactly as it waits on `collect`'s lock,
and uploads after the delete; an upload whose mark committed before the insert makes it do nothing.

Both passes work a batch at a time (up to 1,000 bodies, S3's limit for one DeleteObjects request):
one transaction holds the batch's rows, one DeleteObjects request (Quiet: the answer names only
the keys not deleted) removes their objects, then the rows of the objects actually deleted are
deleted and the transaction commits. So the safety argument above holds per batch: every object is
deleted while its row is held, every row goes only after its object, and an upload of one of the
batch's bodies waits at most one request. A body whose object the store refused keeps its row
(the listing pass's own row is committed: `collect`'s from then on, once `grace` has passed) and
is tried again by a later run. A request that fails as a whole rolls its batch back (the run stops with StoreUnavailable): an
object it did delete leaves, in the table pass, a row without its object, which an upload renews and
uploads again (its HEAD finds nothing) and the next run deletes (deleting a missing key succeeds).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any

import psycopg

from ..errors import StoreUnavailable
from .bodies import BodiesNotDeleted, BodyStore, body_digest

__all__ = ["GcRun", "collect", "collect_orphans", "mark", "run"]

type Conn = psycopg.Connection[tuple[Any, ...]]

log = logging.getLogger("postier.cluster")


def mark(conn: Conn, digest: str) -> None:
    """Renew a body's mark before its upload (committed on its own): the collector holds this row
    while it deletes an unreferenced body, so an upload cannot be deleted under its writer."""
    conn.execute("INSERT INTO bodies (hash) VALUES (%s) ON CONFLICT (hash) DO UPDATE SET last_put = now()",
                 (digest,))


def collect(conn: Conn, bodies: BodyStore, grace: float = 86400.0,
            batch: int = 1000, max_batches: int = 10_000) -> int:
    """Delete unreferenced bodies older than `grace` seconds, `batch` a transaction (one
    DeleteObjects request); returns how many were deleted. A body whose object the store refused to
    delete keeps its row (the next run tries again) and is not tried again in this run."""
    return _collect(conn, bodies, grace, batch, max_batches)[0]


_UNREFERENCED = ("last_put < now() - make_interval(secs => %(grace)s) "
                 "AND NOT EXISTS (SELECT 1 FROM messages m WHERE m.body = b.hash) "
                 "AND NOT EXISTS (SELECT 1 FROM queue_messages q WHERE q.body = b.hash)")


def _collect(conn: Conn, bodies: BodyStore, grace: float, batch: int = 1000,
             max_batches: int = 10_000) -> tuple[int, int]:
    """`collect`: (bodies deleted, bodies whose object the store refused to delete).

    One query finds the candidates, in hash order, through a cursor WITH HOLD (the server keeps its
    result; this process reads a batch at a time); each batch then locks its rows with every
    condition checked again on them, so a candidate uploaded again or referenced meanwhile is
    skipped. Finding each batch by a query of its own would scan the table (an anti-join with
    `messages`) once per batch: a run's time would grow with the unreferenced bodies times the
    table (docs/scaling.md, "Body collection at a million objects")."""
    total = refused = 0
    with conn.cursor(name="gc_candidates", withhold=True) as candidates:
        candidates.execute(f"SELECT hash FROM bodies b WHERE {_UNREFERENCED} ORDER BY hash".encode(),
                           {"grace": grace})
        for _ in range(max_batches):
            hint = [h for (h,) in candidates.fetchmany(max(1, batch))]
            if not hint:
                break
            with conn.transaction():
                found = [h for (h,) in conn.execute(
                    f"SELECT hash FROM bodies b WHERE hash = ANY(%(hint)s) AND {_UNREFERENCED} "
                    "ORDER BY hash FOR UPDATE SKIP LOCKED".encode(), {"grace": grace, "hint": hint})]
                if not found:
                    continue
                gone = _delete(conn, bodies, found)
            total += len(gone)
            refused += len(found) - len(gone)
    return total, refused


def _delete(conn: Conn, bodies: BodyStore, found: list[str]) -> set[str]:
    """The objects (one DeleteObjects request for up to 1,000), then the rows of those the store
    deleted: in the caller's transaction, which holds the rows. Returns the bodies deleted; a body
    whose object the store refused keeps its row, still held until the caller commits."""
    refused: dict[str, str] = {}
    try:
        bodies.delete(found)
    except BodiesNotDeleted as exc:
        refused = exc.failed
        log.warning("gc: %s", exc)
    gone = {h for h in found if h not in refused}
    # body_text, body_views and body_heads go with them (ON DELETE CASCADE)
    conn.execute("DELETE FROM bodies WHERE hash = ANY(%s)", (sorted(gone),))
    return gone


@dataclass(frozen=True)
class GcRun:
    """What one `postier cluster gc` did: bodies collected from the table, then the listing pass's
    objects listed, adopted (no row, a message refers to them) and deleted (no row, no reference);
    `end` when the listing reached the bucket's end (the next run starts over); `refused`: bodies of
    either pass whose object the store refused to delete (rows kept, tried again by the next run)."""

    collected: int = 0
    listed: int = 0
    adopted: int = 0
    deleted: int = 0
    end: bool = False
    refused: int = 0


def collect_orphans(conn: Conn, bodies: BodyStore, grace: float = 86400.0, limit: int = 100_000,
                    page: int = 1000, batch: int = 1000) -> GcRun:
    """List up to `limit` body objects, `page` per request (S3 answers at most 1,000), after the
    previous run's last key; adopt or delete those no row names that are older than `grace` seconds
    (the module docstring says how), one transaction per `batch` of them (as `collect`'s: what an
    upload of one of them may wait)."""
    with conn.transaction():
        row = conn.execute("SELECT cursor, now() FROM gc_state").fetchone()
    if row is None:
        raise StoreUnavailable("gc_state has no row: run `postier cluster init`")
    cursor: str = row[0]
    before: datetime.datetime = row[1] - datetime.timedelta(seconds=grace)
    limit = max(1, limit)
    listed = adopted = deleted = refused = 0
    end = False
    while listed < limit:
        got, more = bodies.list_page(cursor, min(page, limit - listed))
        listed += len(got)
        if got:
            cursor = got[-1][0]
        old = sorted(d for key, modified in got if (d := body_digest(key)) is not None and modified < before)
        for i in range(0, len(old), max(1, batch)):
            took, dropped, kept = _settle(conn, bodies, old[i:i + max(1, batch)])
            adopted += took
            deleted += dropped
            refused += kept
        if not more or not got:
            cursor, end = "", True
            break
    with conn.transaction():
        conn.execute("UPDATE gc_state SET cursor = %s", (cursor,))
    return GcRun(0, listed, adopted, deleted, end, refused)


def _settle(conn: Conn, bodies: BodyStore, digests: list[str]) -> tuple[int, int, int]:
    """Adopt or delete the listed bodies that no row names; returns (adopted, deleted, refused by
    the store)."""
    with conn.transaction():
        missing = [h for (h,) in conn.execute(
            "SELECT h FROM unnest(%s::text[]) AS h WHERE NOT EXISTS (SELECT 1 FROM bodies WHERE hash = h)",
            (digests,))]
        if not missing:
            return 0, 0, 0
        # Our own rows, uncommitted: a concurrent `mark` of one of them waits until we commit.
        ours = [h for (h,) in conn.execute(
            "INSERT INTO bodies (hash) SELECT h FROM unnest(%s::text[]) AS h ORDER BY h "
            "ON CONFLICT (hash) DO NOTHING RETURNING hash", (missing,))]
        if not ours:
            return 0, 0, 0
        used = {h for (h,) in conn.execute(
            "SELECT h FROM unnest(%s::text[]) AS h WHERE EXISTS (SELECT 1 FROM messages m WHERE m.body = h) "
            "OR EXISTS (SELECT 1 FROM queue_messages q WHERE q.body = h)", (ours,))}
        unused = sorted(h for h in ours if h not in used)
        # a body whose object the store refused keeps this row: `collect`'s from then on
        gone = _delete(conn, bodies, unused) if unused else set()
    return len(used), len(gone), len(unused) - len(gone)


def run(conn: Conn, bodies: BodyStore, grace: float = 86400.0, orphans: bool = True,
        limit: int = 100_000) -> GcRun:
    """`postier cluster gc`: `collect`, then (unless `orphans` is False) `collect_orphans`; the
    counts are kept in `gc_state` for `postier cluster status`."""
    collected, refused = _collect(conn, bodies, grace)
    listing = collect_orphans(conn, bodies, grace, limit) if orphans else GcRun()
    out = GcRun(collected, listing.listed, listing.adopted, listing.deleted, listing.end,
                refused + listing.refused)
    with conn.transaction():
        conn.execute("UPDATE gc_state SET finished = now(), collected = %s, listed = %s, adopted = %s, "
                     "deleted = %s, refused = %s",
                     (out.collected, out.listed, out.adopted, out.deleted, out.refused))
    return out
