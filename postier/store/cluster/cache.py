"""The parsed-view cache of cluster mode: ENVELOPE, BODYSTRUCTURE, BODY (RFC 9051 §7.5.2) and SORT
fields of a message body, in PostgreSQL and shared by every node.

A body is immutable and named by its SHA-256 (`store.cluster.bodies`), so its views are keyed by
(body hash, kind) rather than by folder and UID: every node, folder, COPY/MOVE and user holding the
same body reads the same row, and a row can never be stale (a new VIEWS_VERSION is a new kind, and
the old kinds are simply no longer asked for). `get` maps a folder's UIDs to their bodies and the
cached views in one query; `put` inserts with ON CONFLICT DO NOTHING, so two nodes caching the same
view at once both succeed and one row is kept.

Each row refers to its `bodies` row (ON DELETE CASCADE): the collector (`store.cluster.gc`) deletes
a body's views with its row, and an insert racing with that collection waits on the collector's row
lock and then fails its foreign-key check instead of leaving a row for a deleted body. Views larger
than `index.CACHE_ITEM_LIMIT` are not kept (the same bound as the single-machine index).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ..index import CACHE_ITEM_LIMIT

__all__ = ["DDL", "get", "put"]

type Conn = psycopg.Connection[tuple[Any, ...]]

#: Created with the rest of the schema (`schema.ensure_schema`), after `bodies`.
DDL = """
CREATE TABLE IF NOT EXISTS body_views (
    body text NOT NULL REFERENCES bodies(hash) ON DELETE CASCADE,
    kind text NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (body, kind)
);
"""


def get(conn: Conn, fid: int, uids: Sequence[int], kind: str) -> dict[int, bytes]:
    """uid -> cached view of `kind`, for the UIDs of folder `fid` whose body has one."""
    if not uids:
        return {}
    return {int(u): bytes(d) for u, d in conn.execute(
        "SELECT m.uid, v.data FROM messages m JOIN body_views v ON v.body = m.body AND v.kind = %s "
        "WHERE m.folder = %s AND m.uid = ANY(%s)", (kind, fid, list(uids)))}


def put(conn: Conn, fid: int, items: Sequence[tuple[int, str, bytes]]) -> int:
    """Store (uid, kind, data) views of folder `fid`'s messages; returns how many rows were new.
    Views over the size bound, of messages expunged meanwhile, or of bodies without a `bodies` row
    (uploaded before that table existed) are left out. Rows are inserted in key order, so two
    nodes inserting overlapping sets at once cannot deadlock."""
    keep = [(u, k, d) for u, k, d in items if len(d) <= CACHE_ITEM_LIMIT]
    if not keep:
        return 0
    cur = conn.execute(
        "INSERT INTO body_views (body, kind, data) "
        "SELECT DISTINCT ON (m.body, i.kind) m.body, i.kind, i.data "
        "FROM unnest(%s::bigint[], %s::text[], %s::bytea[]) AS i(uid, kind, data) "
        "JOIN messages m ON m.folder = %s AND m.uid = i.uid JOIN bodies b ON b.hash = m.body "
        "ORDER BY m.body, i.kind ON CONFLICT DO NOTHING",
        ([u for u, _k, _d in keep], [k for _u, k, _d in keep], [d for _u, _k, d in keep], fid))
    return cur.rowcount
