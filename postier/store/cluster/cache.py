"""The parsed-view cache of cluster mode: ENVELOPE, BODYSTRUCTURE, BODY (RFC 9051 §7.5.2) and SORT
fields of a message body, and its raw header block (RFC 5322 §2.1), in PostgreSQL and shared by
every node.

A body is immutable and named by its SHA-256 (`store.cluster.bodies`), so its views are keyed by
(body hash, kind) rather than by folder and UID: every node, folder, COPY/MOVE and user holding the
same body reads the same row, and a row can never be stale (a new VIEWS_VERSION is a new kind, and
the old kinds are simply no longer asked for). `get` maps a folder's UIDs to their bodies and the
cached views in one query; `put` inserts with ON CONFLICT DO NOTHING, so two nodes caching the same
view at once both succeed and one row is kept.

Each row refers to its `bodies` row (ON DELETE CASCADE): the collector (`store.cluster.gc`) deletes
a body's views with its row, and an insert racing with that collection waits on the collector's row
lock and then fails its foreign-key check instead of leaving a row for a deleted body. Views larger
than `index.CACHE_ITEM_LIMIT` are not kept (the same bound as the single-machine index). A large
body's MIME layout (`textscan.LAYOUT_KIND`: its header blocks and delimiter lines with their
offsets) is one more kind, written at its upload (`put_by_body`) or by the first FETCH that scans
the body: a FETCH of a section then reads only that span, by ranged GETs.

`body_heads` holds each body's header block, the bytes `ClusterMailboxes.read_header` answers (up
to and including the first empty line; the whole body when it has none), so that header-only reads
(SEARCH on header fields, FETCH BODY.PEEK[HEADER...], ENVELOPE, SORT keys) need no GET from the
object store. The row is written with the body's full-text row, right after the upload
(`ClusterMailboxes._put_body`); a body stored before the table gets it from the first GET of its
header (`head_of` on the bytes read). Header blocks over CACHE_ITEM_LIMIT are not kept: those
messages are read from the object store as before. Same keying, collection and ordering as the
views: by body hash, ON DELETE CASCADE, inserted in hash order with ON CONFLICT DO NOTHING.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg

from ...message.mime import header_end
from ..index import CACHE_ITEM_LIMIT

__all__ = ["DDL", "get", "get_heads", "has_head", "head_of", "put", "put_by_body", "put_heads"]

type Conn = psycopg.Connection[tuple[Any, ...]]

#: Created with the rest of the schema (`schema.ensure_schema`), after `bodies`.
DDL = """
CREATE TABLE IF NOT EXISTS body_views (
    body text NOT NULL REFERENCES bodies(hash) ON DELETE CASCADE,
    kind text NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (body, kind)
);
CREATE TABLE IF NOT EXISTS body_heads (
    body text PRIMARY KEY REFERENCES bodies(hash) ON DELETE CASCADE,
    head bytea NOT NULL
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


def put_by_body(conn: Conn, items: Sequence[tuple[str, str, bytes]]) -> int:
    """Store (body hash, kind, data) views of bodies (a large body's layout, written at its upload:
    ClusterMailboxes._put_body), as `put` does for a folder's messages: over the size bound or
    without a `bodies` row left out, in key order, ON CONFLICT DO NOTHING."""
    keep = sorted({(h, k): d for h, k, d in items if len(d) <= CACHE_ITEM_LIMIT}.items())
    if not keep:
        return 0
    cur = conn.execute(
        "INSERT INTO body_views (body, kind, data) SELECT i.body, i.kind, i.data "
        "FROM unnest(%s::text[], %s::text[], %s::bytea[]) AS i(body, kind, data) "
        "JOIN bodies b ON b.hash = i.body ORDER BY i.body, i.kind ON CONFLICT DO NOTHING",
        ([h for (h, _k), _d in keep], [k for (_h, k), _d in keep], [d for _key, d in keep]))
    return cur.rowcount


def head_of(data: bytes, complete: bool = True) -> bytes | None:
    """The header block of a body (CRLF octets) as `read_header` answers it: up to and including
    the first CRLF CRLF (RFC 5322 §2.1), or the whole body when it has none. `data` may be only the
    body's first bytes (`complete` False): without the empty line in them, the block is unknown
    (None). None too for a block over CACHE_ITEM_LIMIT, which is not kept."""
    end = header_end(data)
    if end < 0 and not complete:
        return None
    head = data[:end] if end >= 0 else data
    return head if len(head) <= CACHE_ITEM_LIMIT else None


def has_head(conn: Conn, digest: str) -> bool:
    """True when the body's header block is kept (an APPEND of a known body then writes nothing)."""
    return conn.execute("SELECT 1 FROM body_heads WHERE body=%s", (digest,)).fetchone() is not None


def get_heads(conn: Conn, digests: Sequence[str]) -> dict[str, bytes]:
    """body hash -> its kept header block, for those of `digests` that have one."""
    if not digests:
        return {}
    return {h: bytes(d) for h, d in conn.execute(
        "SELECT body, head FROM body_heads WHERE body = ANY(%s)", (sorted(set(digests)),))}


def put_heads(conn: Conn, items: Sequence[tuple[str, bytes]]) -> int:
    """Keep (body hash, header block) rows (blocks from `head_of`); returns how many were new.
    Bodies without a `bodies` row are left out; rows go in hash order (no deadlock between nodes)."""
    keep = sorted({h: d for h, d in items if len(d) <= CACHE_ITEM_LIMIT}.items())
    if not keep:
        return 0
    cur = conn.execute(
        "INSERT INTO body_heads (body, head) SELECT i.body, i.head "
        "FROM unnest(%s::text[], %s::bytea[]) AS i(body, head) JOIN bodies b ON b.hash = i.body "
        "ORDER BY i.body ON CONFLICT DO NOTHING",
        ([h for h, _d in keep], [d for _h, d in keep]))
    return cur.rowcount
