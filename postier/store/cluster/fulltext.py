"""Cluster mode's full-text index in PostgreSQL (pg_trgm) that answers the text searches of IMAP SEARCH
(RFC 9051 §6.4.4 SUBJECT, FROM, TO, CC, BCC, BODY, TEXT), as `store.fts` does in single-machine mode.

One row of `body_text` per message body, keyed by the body's SHA-256 (the key of `messages.body`
and of the object store: a body shared by several folders or users has one row; COPY and MOVE
need nothing). The row holds the text `store.fts.row_values` extracts (the matcher's own decoding,
casefolded, chunks joined by CHUNK_SEP), so the comparison is the single-machine index's: a
casefolded needle is looked for as an exact substring (`LIKE` with its wildcards escaped, or
`strpos` for needles shorter than a trigram); the GIN trigram index only narrows the rows the
comparison runs on (pg_trgm's trigrams are lower-cased and word-split, so the index may return
more rows, never fewer; PostgreSQL rechecks each with the operator).

A body's row is committed right after its upload, before the transaction that inserts the message
rows (APPEND, MULTIAPPEND, delivery, import: `ClusterMailboxes._put_body`), so an index answer is
never behind the folder; not in that transaction itself, so that a MULTIAPPEND or an import does
not hold every message's text in memory until it commits. A message whose
body has no row of the current `VERSION` (stored before this table existed, or unreadable by the
parser), or an inexact row (`SearchText.exact`), is not covered: a search first fills the rows of
up to CATCH_UP such bodies of the folder (`catch_up`, reading them from the object store, which the
matcher would have done anyway; one above MEMORY_DATA_LIMIT into a temporary file, extracted from
it as a spooled body is), and reports the rest as unchecked, for the matcher. `postier
reindex` rewrites the rows of every body of a user (`rebuild`); `postier cluster gc` drops the
rows of the bodies it deletes.

A row is inserted only while its `bodies` row exists, share-locked (`FOR SHARE`): the collector
takes the rows it deletes `FOR UPDATE SKIP LOCKED`, so a text row is never written for a body
being collected (no orphan is left behind).
Why written here: pg_trgm ships with PostgreSQL (Debian's postgresql-15 contrib); nothing to add.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import psycopg

from ...message.textscan import ReadAt
from ...message.types import MEMORY_DATA_LIMIT
from ..errors import MessageGone
from .bodies import BodyStore, SpooledSource
from ..fts import COLUMNS, columns_of, row_values, row_values_at

__all__ = ["VERSION", "TextRow", "answer", "catch_up", "create_index", "has_row", "rebuild", "text_row", "text_row_at",
           "write_rows"]

log = logging.getLogger("postier.store")

#: `body_text.version` of the rows this code writes; rows of another version count as missing
#: (rewritten by the next search of their folder or by `postier reindex`)
VERSION = 1

type Conn = psycopg.Connection[tuple[Any, ...]]
type TextRow = tuple[str, bool, tuple[str, ...]]  # (hash, exact, COLUMNS' text)

_COLS = ", ".join(f'"{c}"' for c in COLUMNS)  # "inner" is an SQL keyword: every name quoted

# The table itself is created with the others (schema._DDL); this part needs the pg_trgm extension.
# One index per column, not one over all of them: the planner prices a multicolumn GIN scan by the
# whole index and then reads every row instead (36 ms instead of 2 for BODY over 6,000 rows).
_INDEXES = [f'CREATE INDEX IF NOT EXISTS body_text_trgm_{c} ON body_text USING gin ("{c}" gin_trgm_ops)'
            for c in COLUMNS]


def create_index(conn: Conn) -> bool:
    """The pg_trgm extension and one trigram index per column, inside the caller's schema transaction (a
    savepoint: when the extension is not installed or not allowed, searches still answer exactly,
    by reading the text column of the folder's rows; a warning says so). True when made."""
    try:
        with conn.transaction():
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
            for stmt in _INDEXES:
                conn.execute(stmt.encode())
    except psycopg.errors.DatabaseError as exc:
        log.warning("cluster full-text search without a trigram index (pg_trgm unavailable: %s)",
                    str(exc).strip())
        return False
    return True


def _unknown(digest: str) -> TextRow:
    """The row of a body whose text is not known (an inexact row: the matcher checks its messages),
    so that the catch-up does not pick it again at every search."""
    return digest, False, ("",) * len(COLUMNS)


def text_row(digest: str, data: bytes) -> TextRow:
    """The row of one body (CRLF octets); an inexact empty one when the parser cannot read it (the
    matcher decides). PostgreSQL text holds neither NUL nor lone surrogates: a column with one is
    stored without it and the row marked inexact, so the matcher checks that message."""
    try:
        exact_i, values = row_values(data)
    except Exception:  # as store.fts: a message the parser cannot read is left to the matcher
        log.exception("full-text row: cannot extract %s", digest)
        return _unknown(digest)
    return _stored(digest, exact_i, values)


def text_row_at(digest: str, read_at: ReadAt, size: int) -> TextRow:
    """`text_row` of a body of `size` bytes read by offset (a spooled message), holding at most about
    TEXT_LIMIT octets of it (`store.fts.row_values_at`: the row is inexact and empty when its
    searched text is larger, and the matcher checks that message). A file that cannot be read
    raises (OSError), as reading it to upload it would."""
    try:
        exact_i, values = row_values_at(read_at, size)
    except OSError:
        raise
    except Exception:
        log.exception("full-text row: cannot extract %s", digest)
        return _unknown(digest)
    return _stored(digest, exact_i, values)


def _stored(digest: str, exact_i: int, values: tuple[str, ...]) -> TextRow:
    exact = bool(exact_i)
    out: list[str] = []
    for v in values:
        if "\x00" in v:
            v, exact = v.replace("\x00", ""), False
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            v, exact = v.encode("utf-8", "replace").decode("utf-8"), False
        out.append(v)
    return digest, exact, tuple(out)


def write_rows(conn: Conn, rows: Sequence[TextRow], replace: bool = False) -> int:
    """Insert the rows of bodies whose `bodies` row exists (share-locked until commit), replacing
    rows of another VERSION (every row with `replace`); returns how many bodies were written."""
    if not rows:
        return 0
    live = {h for (h,) in conn.execute("SELECT hash FROM bodies WHERE hash = ANY(%s) ORDER BY hash FOR SHARE",
                                       (sorted({r[0] for r in rows}),))}
    # one row per body, in hash order: two transactions writing the same bodies wait, never deadlock
    todo = sorted({r[0]: r for r in rows if r[0] in live}.values())
    if not todo:
        return 0
    sets = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in ("version", "exact", *COLUMNS))
    only = "" if replace else " WHERE body_text.version <> EXCLUDED.version"
    marks = ", ".join(["%s"] * (3 + len(COLUMNS)))
    with conn.cursor() as cur:
        cur.executemany(f"INSERT INTO body_text (hash, version, exact, {_COLS}) VALUES ({marks}) "
                        f"ON CONFLICT (hash) DO UPDATE SET {sets}{only}".encode(),
                        [(h, VERSION, exact, *values) for h, exact, values in todo])
    return len(todo)


def has_row(conn: Conn, digest: str) -> bool:
    """True when the body has a row of the current VERSION (an APPEND then extracts nothing)."""
    return conn.execute("SELECT 1 FROM body_text WHERE hash=%s AND version=%s", (digest, VERSION)).fetchone() is not None


def _fill(bodies: BodyStore, items: Iterable[tuple[str, int]]) -> list[TextRow]:
    """The rows of (hash, size) bodies read from the object store: up to MEMORY_DATA_LIMIT whole,
    larger ones downloaded into a temporary file (`BodyStore.download`, in pieces) and extracted
    from it (`text_row_at`), so a catch-up over large messages holds a bounded part of each."""
    out = []
    with tempfile.TemporaryDirectory(prefix="postier-text-") as work:
        for d, size in items:
            try:
                if size > MEMORY_DATA_LIMIT:
                    path = Path(work) / d
                    try:
                        size = bodies.download(d, path)
                        with SpooledSource(b"", str(path), size) as src:
                            out.append(text_row_at(d, src.read_at, size))
                    finally:
                        path.unlink(missing_ok=True)
                else:
                    out.append(text_row(d, bodies.get(d)))
            except MessageGone as exc:  # its object is gone for good: the matcher decides, once a search
                log.warning("full-text row: body %s is gone: %s", d, exc)
                out.append(_unknown(d))
            except Exception as exc:  # out of reach now (the object store down): a later search tries again
                log.warning("full-text row: cannot read body %s: %s", d, exc)
    return out


def catch_up(tx: Callable[[], Any], bodies: BodyStore, fid: int, limit: int) -> int:
    """Write the rows of up to `limit` bodies of folder `fid` that have none of this VERSION (the
    folder's oldest first); `tx()` gives a transaction's connection."""
    with tx() as conn:
        todo = [(h, int(n)) for h, n in conn.execute(
            "SELECT m.body, max(m.size) FROM messages m LEFT JOIN body_text t ON t.hash = m.body WHERE m.folder=%s "
            "AND (t.hash IS NULL OR t.version <> %s) GROUP BY m.body ORDER BY min(m.uid) LIMIT %s",
            (fid, VERSION, limit))]
    if not todo:
        return 0
    rows = _fill(bodies, todo)
    with tx() as conn:
        return write_rows(conn, rows)


def rebuild(tx: Callable[[], Any], bodies: BodyStore, owner: str, batch: int = 200) -> int:
    """Rewrite the rows of every body of `owner`'s messages (`postier reindex`); returns the count."""
    with tx() as conn:
        items = [(h, int(n)) for h, n in conn.execute(
            "SELECT m.body, max(m.size) FROM messages m JOIN folders f ON f.id = m.folder WHERE f.owner=%s "
            "GROUP BY m.body ORDER BY 1", (owner,))]
    total = 0
    for i in range(0, len(items), batch):
        rows = _fill(bodies, items[i:i + batch])
        with tx() as conn:
            total += write_rows(conn, rows, replace=True)
    return total


def _pattern(needle: str) -> str:
    """A LIKE pattern matching any text that contains `needle` (its wildcards and escapes escaped)."""
    return "%" + needle.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def answer(conn: Conn, fid: int, queries: Sequence[tuple[str, str]]) -> tuple[list[set[int]], set[int]]:
    """For each (field, needle) (`store.fts.searchable`), the UIDs of folder `fid` whose exact row
    of this VERSION has `field` text containing `needle`; and the UIDs not covered (no such row).
    Run in one REPEATABLE READ transaction (the caller's), so both come from one snapshot."""
    answers: list[set[int]] = []
    for field, needle in queries:
        cols = columns_of(field)
        folded = needle.casefold()
        # RFC 9051 §6.4.4: case-insensitive substring, both sides casefolded (as message.matching)
        if len(folded) >= 3:  # LIKE: the trigram index narrows, the operator compares exactly
            cond = " OR ".join(f't."{c}" LIKE %s' for c in cols)
            args = [_pattern(folded)] * len(cols)
        else:  # shorter than a trigram: the stored text of the folder's rows, read through
            cond = " OR ".join(f'strpos(t."{c}", %s) > 0' for c in cols)
            args = [folded] * len(cols)
        answers.append({u for (u,) in conn.execute(
            "SELECT m.uid FROM messages m JOIN body_text t ON t.hash = m.body "
            f"WHERE m.folder=%s AND t.exact AND t.version=%s AND ({cond})".encode(), (fid, VERSION, *args))})
    unchecked = {u for (u,) in conn.execute(
        "SELECT m.uid FROM messages m LEFT JOIN body_text t ON t.hash = m.body "
        "WHERE m.folder=%s AND NOT coalesce(t.exact AND t.version = %s, false)", (fid, VERSION))}
    return answers, unchecked
