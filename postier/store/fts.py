"""The per-user full-text index (SQLite FTS5, trigram tokenizer) that answers the text searches of IMAP
SEARCH (RFC 9051 §6.4.4 SUBJECT, FROM, TO, CC, BCC, BODY, TEXT) and of the webmail.

It is a cache beside the mailbox index (`postier-fts.sqlite`, attached to the index connection as
schema ``fts``), keyed by the Maildir base name of a message: a Maildir file's contents never change
(flag changes rename it, the base stays), so one entry serves every folder holding that file (COPY
makes hard links with the same base). Each entry holds the text `message.matching.search_text`
extracts (the same decoding as the matcher: RFC 2047 words, transfer encodings, charsets), casefolded,
and the trigram tokenizer runs case-sensitive over it, so a phrase query for a casefolded needle of
three or more characters finds exactly the messages whose text contains it (IMAP's case-insensitive
substring); shorter needles are looked up with ``instr`` over the stored columns.

Consistency does not depend on the index being complete: a message whose base has no entry, or whose
entry is not exact (text cut at the bound, see `SearchText.exact`), is reported as not covered and
evaluated by the matcher as before (`UserMailbox.text_search` answers per (field, needle);
`server.imapfetch.narrow` turns the answers into rewritten SEARCH criteria and candidate UIDs, so
the store knows nothing of IMAP). An exact entry's answer is not confirmed by the matcher again: it
is the matcher's own text and comparison (casefolded substring, chunk by chunk), so confirming would
only re-parse every hit (a second per thousand hits on 100,000 messages); `tests/imap/test_fts.py`
asserts index and matcher give the same UIDs.
The index answers with entry ids; a per-folder map from exact entry id to UID, held in memory while
the user's mailboxes are open and kept up to date with the sets of uncovered messages (`_gaps`:
built by the folder's first search, one pass over its messages; 4 bytes per entry of the user), turns
10,000 hits into UIDs with array look-ups instead of two index searches per hit.
Entries are written by APPEND (in the same user-locked step), by a search for up to
`CATCH_UP` unindexed messages of the folder (deliveries go through the delivery agent, which does
not touch the index: their messages are indexed by the next search, and evaluated by the matcher
until then), and rebuilt by `postier reindex`; EXPUNGE removes the entries no folder uses any more.
The catch-up and the rebuild read a message file above MEMORY_DATA_LIMIT in pieces
(`file_row_values`: `message.textscan`, holding about TEXT_LIMIT octets of it, not the file).
Why written here: FTS5 is in the sqlite3 module already; nothing to add.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..message.matching import CHUNK_SEP, INDEXED_FIELDS, SearchText, search_text
from ..message.textscan import ReadAt, search_text_at
from ..message.types import MEMORY_DATA_LIMIT
from ..proto.crlf import to_crlf
from .index import parse_file_name

__all__ = ["CATCH_UP", "COLUMNS", "FTS_NAME", "Source", "TextIndex", "build_file", "build_from_maildir", "columns_of",
           "file_row_values", "row_values", "row_values_at", "searchable"]

log = logging.getLogger("postier.store")

FTS_NAME = "postier-fts.sqlite"
_VERSION = 1  # PRAGMA user_version of the file; another version: the cache is dropped and rebuilt
CATCH_UP = 1000  # unindexed messages a search indexes at most (the rest go through the matcher)
CATCH_UP_HELD = 16 << 20  # octets of messages a catch-up holds at once (it indexes them, then reads on)
#: The longest needle the index answers for. A phrase query holds one iterator (and its doclist)
#: per trigram: a 60,000-character SEARCH TEXT over 1,700 messages took 380 MB and 2.3 s (found by
#: a chaos run); longer needles go to the matcher, which scans in bounded memory.
MAX_NEEDLE = 1000
_COLUMNS = {"SUBJECT": "subject", "FROM": "hfrom", "TO": "hto", "CC": "hcc", "BCC": "hbcc"}
# BODY searches text parts and encapsulated headers; TEXT text parts and every part's header.
_SCOPES = {"BODY": ("leaves", "inner"), "TEXT": ("leaves", "headers")}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS fts.docs (
    id INTEGER PRIMARY KEY,
    base TEXT NOT NULL UNIQUE,
    exact INTEGER NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS fts.ftext USING fts5(
    subject, hfrom, hto, hcc, hbcc, leaves, headers, inner, tokenize = 'trigram case_sensitive 1'
);
-- base -> (id, exact) in one B-tree search (the UNIQUE index needs a second one in the table):
-- a folder's first search looks up every message's base (100,000: 90 ms instead of 240)
CREATE INDEX IF NOT EXISTS fts.docs_base ON docs(base, exact);
CREATE TRIGGER IF NOT EXISTS fts.docs_gone AFTER DELETE ON docs BEGIN
    DELETE FROM ftext WHERE rowid = old.id;
END;
"""


#: The stored text columns, in the order of `row_values` (also cluster mode's, store.cluster.fulltext).
COLUMNS = ("subject", "hfrom", "hto", "hcc", "hbcc", "leaves", "headers", "inner")


def row_values(raw: bytes) -> tuple[int, tuple[str, ...]]:
    """(exact, the COLUMNS' text) of a message: `search_text`, casefolded, chunks joined by CHUNK_SEP."""
    return _values(search_text(raw))


def row_values_at(read_at: ReadAt, size: int) -> tuple[int, tuple[str, ...]]:
    """`row_values` of a message of `size` bytes read by offset (a file), holding a bounded part
    of it (`message.textscan.search_text_at`: inexact and empty when its text is not had within
    TEXT_LIMIT octets)."""
    return _values(search_text_at(read_at, size))


#: A message `TextIndex.add` indexes: its CRLF octets, or the path of its Maildir file (`file_row_values`).
type Source = bytes | Path


def file_row_values(path: Path) -> tuple[int, tuple[str, ...]]:
    """`row_values` of a Maildir message file: up to MEMORY_DATA_LIMIT read whole (line ends made
    CRLF, as the store serves it); above it read in pieces (`row_values_at`), so a 30 MiB message
    holds about TEXT_LIMIT octets, not 30 MiB (its row inexact and empty when its text is not had
    within TEXT_LIMIT: left to the matcher, as a message whose text was cut at the bound).
    OSError when the file cannot be read."""
    with open(path, "rb") as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        if size <= MEMORY_DATA_LIMIT:
            return row_values(to_crlf(f.read()))
        return row_values_at(lambda offset, n: os.pread(fd, n, offset), size)


def _values(t: SearchText) -> tuple[int, tuple[str, ...]]:
    return int(t.exact), (*(t.fields[f] for f in INDEXED_FIELDS), t.leaves, t.headers, t.inner)


def columns_of(field: str) -> tuple[str, ...]:
    """The COLUMNS a `searchable` field's text is in."""
    return (_COLUMNS[field],) if field in _COLUMNS else _SCOPES[field]


def searchable(field: str, needle: str) -> bool:
    """True when the index can answer "the `field` text contains `needle`": `field` one of
    INDEXED_FIELDS (a header field), "BODY" or "TEXT" (as `message.matching` scopes them)."""
    return ((field in _COLUMNS or field in _SCOPES) and bool(needle) and len(needle) <= MAX_NEEDLE
            and CHUNK_SEP not in needle)


@dataclass
class _Gaps:
    stamp: tuple[int, int]
    last: int = 0  # UIDs up to this one were looked at
    missing: set[int] = field(default_factory=set)  # no entry
    unchecked: set[int] = field(default_factory=set)  # no exact entry (missing included)
    # the UID of each exact entry's message in the folder, indexed by entry id (0: none); an array,
    # not a dict: 4 bytes an entry, and 10,000 look-ups in 1 ms instead of 5 (no scattered objects)
    uid_of: array[int] = field(default_factory=lambda: array("I"))
    exact: int = 0  # non-zero slots of uid_of

    def reserve(self, doc: int) -> None:
        a = self.uid_of
        if doc >= len(a):
            a.frombytes(bytes(a.itemsize * max(doc + 1 - len(a), len(a) // 2, 1024)))

    def map(self, doc: int, uid: int) -> None:
        a = self.uid_of
        if doc >= len(a):
            self.reserve(doc)
        if not a[doc]:
            self.exact += 1
        a[doc] = uid

    def unmap(self, doc: int, uid: int) -> None:
        a = self.uid_of
        if doc < len(a) and a[doc] == uid:
            a[doc] = 0
            self.exact -= 1

    def note(self, uid: int, doc: int | None, exact: bool) -> None:
        if doc is None:
            self.missing.add(uid)
            self.unchecked.add(uid)
            return
        self.missing.discard(uid)
        if exact:
            self.unchecked.discard(uid)
            self.map(doc, uid)
        else:
            self.unchecked.add(uid)


class TextIndex:
    """The FTS file attached to one user's index connection. Not thread-safe: the caller holds the
    user lock, as for the index itself."""

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path
        self._clears = 0  # bumped by clear() (data_version only counts other connections' writes)
        self._gap_cache: dict[int, _Gaps] = {}
        conn.execute("ATTACH DATABASE ? AS fts", (str(path),))
        try:
            conn.execute("PRAGMA fts.journal_mode=WAL")
            conn.execute("PRAGMA fts.synchronous=NORMAL")  # a cache: a lost entry is only re-read
            (version,) = conn.execute("PRAGMA fts.user_version").fetchone()
            if version not in (0, _VERSION):
                for stmt in ("DROP TRIGGER IF EXISTS fts.docs_gone", "DROP TABLE IF EXISTS fts.ftext",
                             "DROP TABLE IF EXISTS fts.docs"):
                    conn.execute(stmt)
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA fts.user_version={_VERSION}")
        except BaseException:
            conn.execute("DETACH DATABASE fts")
            raise

    def detach(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("DETACH DATABASE fts")

    # -- writing ---------------------------------------------------------------------------------

    def add(self, items: Iterable[tuple[str, Source]]) -> int:
        """Index (base, message) pairs not indexed yet (the message's CRLF octets, or its file's
        path: `file_row_values`); returns how many were added."""
        c = self.conn
        n = 0
        c.execute("BEGIN IMMEDIATE")
        try:
            for base, src in items:
                if c.execute("SELECT 1 FROM fts.docs WHERE base=?", (base,)).fetchone():
                    continue
                try:
                    exact, values = row_values(src) if isinstance(src, bytes) else file_row_values(src)
                except OSError as exc:  # the file gone meanwhile (expunged, renamed): left unindexed
                    log.info("text index: cannot read %s: %s", base, exc)
                    continue
                except Exception:  # a message the parser cannot read: the matcher decides
                    log.exception("text index: cannot extract %s", base)
                    continue
                cur = c.execute("INSERT INTO fts.docs (base, exact) VALUES (?, ?)", (base, exact))
                c.execute("INSERT INTO fts.ftext (rowid, subject, hfrom, hto, hcc, hbcc, leaves, headers, inner)"
                          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (cur.lastrowid, *values))
                n += 1
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
        return n

    def forget(self, fid: int, gone: Sequence[tuple[int, str]]) -> None:
        """Messages (uid, base) left folder `fid` (EXPUNGE, MOVE): drop the entries of files no
        folder holds any more."""
        if not gone:
            return
        g = self._gap_cache.get(fid)
        if g is not None:
            g.missing.difference_update(u for u, _b in gone)
            g.unchecked.difference_update(u for u, _b in gone)
        bases = [b for _u, b in gone]
        c = self.conn
        if g is not None:
            for i in range(0, len(gone), 500):
                part = gone[i:i + 500]
                uid_at = {b: u for u, b in part}
                for doc, base in c.execute(f"SELECT id, base FROM fts.docs WHERE base IN ({','.join('?' * len(part))})",
                                           [b for _u, b in part]):
                    g.unmap(doc, uid_at[base])
        fids = [f for (f,) in c.execute("SELECT id FROM folders")]
        c.execute("BEGIN IMMEDIATE")
        try:
            for b in bases:
                if not any(c.execute("SELECT 1 FROM msgs WHERE folder=? AND base=?", (f, b)).fetchone()
                           for f in fids):
                    c.execute("DELETE FROM fts.docs WHERE base=?", (b,))
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")

    def clear(self) -> None:
        self._clears += 1
        self.conn.execute("DELETE FROM fts.docs")
        self.conn.execute("DELETE FROM fts.ftext")

    # -- reading ---------------------------------------------------------------------------------

    def _gaps(self, fid: int) -> _Gaps:
        """The folder's messages the index cannot answer for, and the UID of each exact entry's
        message (a hit's entry id -> UID without a lookup by base per hit: 10,000 hits cost a
        dictionary look-up each, not two index searches), kept up to date incrementally: UIDs only
        grow, so each call looks at the UIDs above the last one seen; catch-up indexing rechecks
        what it indexed (`_recheck`); `forget` takes expunged UIDs out (an entry it drops belongs
        to no message any more). Recomputed when another connection wrote the file (data_version)
        or it was cleared here. UIDs removed by other programs stay until then: the caller keeps
        only the folder's current UIDs (`UserMailbox.text_search`)."""
        (dv,) = self.conn.execute("PRAGMA fts.data_version").fetchone()
        stamp = (self._clears, dv)
        g = self._gap_cache.get(fid)
        if g is None or g.stamp != stamp:
            g = self._gap_cache[fid] = _Gaps(stamp)
        (top,) = self.conn.execute("SELECT ifnull(max(uid), 0) FROM msgs WHERE folder=?", (fid,)).fetchone()
        if top > g.last:
            if not g.last:  # the folder's first pass: the array sized once
                (most,) = self.conn.execute("SELECT ifnull(max(id), 0) FROM fts.docs").fetchone()
                g.reserve(most)
            mapping, missing, unchecked = g.map, g.missing, g.unchecked
            for uid, doc, exact in self.conn.execute(
                    "SELECT m.uid, d.id, d.exact FROM msgs m LEFT JOIN fts.docs d INDEXED BY docs_base"
                    " ON d.base=m.base WHERE m.folder=? AND m.uid > ? AND m.uid <= ?", (fid, g.last, top)):
                if exact:  # UIDs not seen before: `note` without its discards
                    mapping(doc, uid)
                else:
                    unchecked.add(uid)
                    if doc is None:
                        missing.add(uid)
            g.last = top
        return g

    def _recheck(self, fid: int, uids: Sequence[int]) -> None:
        g = self._gap_cache.get(fid)
        if g is None:
            return
        for i in range(0, len(uids), 500):
            part = uids[i:i + 500]
            marks = ",".join("?" * len(part))
            for uid, doc, exact in self.conn.execute(
                    "SELECT m.uid, d.id, d.exact FROM msgs m LEFT JOIN fts.docs d INDEXED BY docs_base"
                    f" ON d.base=m.base WHERE m.folder=? AND m.uid IN ({marks})",
                    (fid, *part)):
                g.note(uid, doc, bool(exact))

    def unindexed(self, fid: int, limit: int) -> list[int]:
        """UIDs of the folder's messages with no entry (the lowest `limit`)."""
        missing = self._gaps(fid).missing
        return sorted(missing)[:limit] if missing else []

    def index_messages(self, fid: int, items: Sequence[tuple[int, str, Source]]) -> None:
        """Index (uid, base, message: `add`) of messages of one folder (catch-up) and note them indexed."""
        self.add([(base, raw) for _u, base, raw in items])
        self._recheck(fid, [u for u, _b, _r in items])

    def known(self, fid: int) -> int:
        """How many UIDs of the folder the index accounts for (exact entries and unchecked): more
        than the folder holds when other programs removed some (`_gaps`)."""
        g = self._gaps(fid)
        return g.exact + len(g.unchecked)

    def unchecked(self, fid: int) -> set[int]:
        """UIDs the index cannot answer for: no entry, or an entry that is not exact."""
        return self._gaps(fid).unchecked

    def hits(self, fid: int, field: str, needle: str) -> set[int]:
        """UIDs of the folder whose exact entries' `field` text contains `needle` (`searchable`);
        may name UIDs other programs removed meanwhile (see `_gaps`)."""
        cols = columns_of(field)
        uid_of = self._gaps(fid).uid_of
        needle = needle.casefold()
        # RFC 9051 §6.4.4: case-insensitive substring (both sides casefolded, as message.matching)
        if len(needle) >= 3:  # the trigram index: a phrase of the needle's trigrams is a substring
            phrase = needle.replace('"', '""')
            rows = self.conn.execute("SELECT rowid FROM fts.ftext WHERE ftext MATCH ?",
                                     (f'{{{" ".join(cols)}}} : "{phrase}"',))
        else:  # shorter than a trigram: one pass over the stored text (in C), entry by entry
            cond = " OR ".join(f"instr({c}, ?) > 0" for c in cols)
            rows = self.conn.execute(f"SELECT rowid FROM fts.ftext WHERE {cond}", [needle] * len(cols))
        n = len(uid_of)
        found = {uid_of[doc] for (doc,) in rows if doc < n}
        found.discard(0)  # not an exact entry of this folder's messages
        return found


def build_from_maildir(index: TextIndex, folders: Iterable[Path], batch: int = 500) -> int:
    """Index every message file of the given folder directories (cur/ and new/) not indexed yet,
    reading the files directly, without the mailbox index (`postier reindex`; a Maildir copied in
    from elsewhere, before a server first opens it), one at a time (`file_row_values`: a file above
    MEMORY_DATA_LIMIT in pieces)."""
    total = 0
    pending: list[tuple[str, Source]] = []
    for folder in folders:
        for sub in ("cur", "new"):
            try:
                names = os.listdir(folder / sub)
            except OSError:
                continue
            for name in names:
                if name.startswith("."):
                    continue
                pending.append((parse_file_name(name)[0], folder / sub / name))
                if len(pending) >= batch:
                    total += index.add(pending)
                    pending = []
    if pending:
        total += index.add(pending)
    return total


def build_file(path: Path, folders: Iterable[Path]) -> int:
    """`build_from_maildir` into the FTS file at `path`, with no mailbox index open."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        return build_from_maildir(TextIndex(conn, path), folders)
    finally:
        conn.close()
