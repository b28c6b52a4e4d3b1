"""The per-user mailbox index (SQLite) over Maildir++ folders: UIDs, flags, MODSEQs (RFC 9051 §2.3.1,
RFC 7162 §3.1), kept in step with the files on disk.

The Maildir stays the source of truth for *which messages exist* and their system flags (the
maildir(5) `:2,` letters). The index adds what a Maildir cannot hold: UIDs and UIDVALIDITY
(RFC 9051 §2.3.1.1), MODSEQs (RFC 7162), keywords beyond the 26 file-name letters, internal dates,
and cached ENVELOPE/BODYSTRUCTURE. It is one SQLite file per user (`postier-index.sqlite`, next to
the `Maildir` directory, outside it so Maildir tools never see it).

Why UIDs survive losing the index: each folder directory holds `postier-uidlist`, an append-only
journal in the spirit of Dovecot's `dovecot-uidlist`. Its first line records UIDVALIDITY, UIDNEXT,
the highest MODSEQ and the folder's special-use attribute; each further line maps one UID to a file's
base name (the name up to `:2,`, which never changes when flags do). Lines are appended (and
fdatasync'ed) *before* the index commits, so every UID the index knows is in the journal; the file
is compacted (rewritten atomically) when dead lines outnumber live ones. Rebuilding an index
(`postier reindex`) reads the journal back: every file it names keeps its UID, other files get UIDs
above every UID ever recorded, so (UIDVALIDITY, UID) never names two messages. Because the journal
travels with the directory, RENAME (and an `mv` by the administrator) keeps UIDs too.

MODSEQs are microsecond-clock based: each change gets `max(highest + 1, now in µs)`. A rebuilt index
therefore starts above every MODSEQ handed out before (RFC 7162 §3.1.1: it must never go back),
without the journal having to record each flag change. Messages changed by one operation share one
MODSEQ (clients compare with ">", RFC 7162 §3.1.4).

Keywords (RFC 9051 §2.3.2) use Dovecot's convention: the folder's `dovecot-keywords` file maps the
first 26 keywords to the letters a-z in the file-name flags, so keywords survive a rebuild and other
Maildir tools keep them; further keywords live in the index only.

Change detection is incremental and never reads message contents: the `new/` and `cur/` directory
mtimes are compared first (trusted only when older than two seconds, since several changes may share
one timestamp); when they moved, the directory listings are compared with the index by name.
Everything here blocks on the disk and runs in worker threads; the caller serialises calls per user.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sqlite3
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..durable import fsync_dir, together, use_wal
from ..proto.crlf import bare_lf
from . import quota
from .errors import InvalidKeyword, MailboxNotFound, StoreLimit

__all__ = [
    "CACHE_ITEM_LIMIT", "FLAG_ANSWERED", "FLAG_DELETED", "FLAG_DRAFT", "FLAG_FLAGGED", "FLAG_SEEN", "INDEX_NAME",
    "KEYWORDS_FILE", "SYSTEM_FLAGS", "UIDLIST_NAME", "FolderRow", "MessageRow",
    "SyncResult", "UserIndex", "encode_suffix", "flags_to_names", "names_to_flags", "parse_file_name",
]

INDEX_NAME = quota.INDEX_NAME  # "postier-index.sqlite" (store/quota.py reads indexes too)
UIDLIST_NAME = "postier-uidlist"
KEYWORDS_FILE = "dovecot-keywords"  # Dovecot's name and format: "<n> <keyword>" lines
_UIDLIST_MAGIC = "postier-uidlist"
_UIDLIST_VERSION = "1"

# System flags as bits (RFC 9051 §2.3.2); \Recent is per session, not stored.
FLAG_SEEN = 1
FLAG_ANSWERED = 2
FLAG_FLAGGED = 4
FLAG_DELETED = 8
FLAG_DRAFT = 16
SYSTEM_FLAGS: dict[str, int] = {
    "\\Seen": FLAG_SEEN, "\\Answered": FLAG_ANSWERED, "\\Flagged": FLAG_FLAGGED,
    "\\Deleted": FLAG_DELETED, "\\Draft": FLAG_DRAFT,
}
_SYSTEM_BY_UPPER = {k.upper(): (k, v) for k, v in SYSTEM_FLAGS.items()}
# maildir(5) info letters, in the ASCII order they must be written in.
_LETTERS: tuple[tuple[str, int], ...] = (
    ("D", FLAG_DRAFT), ("F", FLAG_FLAGGED), ("R", FLAG_ANSWERED), ("S", FLAG_SEEN), ("T", FLAG_DELETED),
)
_LETTER_FLAG = dict(_LETTERS)
_MAX_LETTER_KEYWORDS = 26
_MAX_KEYWORDS = 1000  # per folder; more is refused (RFC 9051 §2.3.2 lets a server limit them)
_KEYWORD_RE = re.compile(r"^[^\x00-\x20\x7f-\uffff(){%*\"\\\]]{1,100}$")
_DIGITS_RE = re.compile(r"\d{1,15}")
_TRUST_AGE_NS = 2_000_000_000  # a directory mtime younger than this may hide a same-tick change
_MAX_UIDLIST_LINE = 4096
_SUBDIR = ("new", "cur")  # MessageRow.sub 0 and 1


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS folders (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: in-memory caches are keyed by it
    name TEXT NOT NULL UNIQUE,
    uidvalidity INTEGER NOT NULL,
    uidnext INTEGER NOT NULL,
    highestmodseq INTEGER NOT NULL,
    recent_uid INTEGER NOT NULL,
    tomb_floor INTEGER NOT NULL DEFAULT 0,
    special_use TEXT NOT NULL DEFAULT '',
    keywords TEXT NOT NULL DEFAULT '[]',
    new_mtime INTEGER NOT NULL DEFAULT -1,
    cur_mtime INTEGER NOT NULL DEFAULT -1,
    trusted INTEGER NOT NULL DEFAULT 0,
    journal_lines INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS msgs (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    base TEXT NOT NULL,
    sub INTEGER NOT NULL,
    suffix TEXT NOT NULL,
    flags INTEGER NOT NULL,
    keywords TEXT NOT NULL DEFAULT '',
    modseq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    idate INTEGER,
    lf INTEGER,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS msgs_base ON msgs(folder, base);
CREATE INDEX IF NOT EXISTS msgs_modseq ON msgs(folder, modseq);
CREATE TABLE IF NOT EXISTS tombs (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    modseq INTEGER NOT NULL,
    PRIMARY KEY (folder, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cache (
    folder INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    kind TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (folder, uid, kind)
) WITHOUT ROWID;
-- the user's last renames (IMAP NOTIFY, `UserMailbox.names_since`); meta 'rename_seq' is the last number
CREATE TABLE IF NOT EXISTS renames (
    seq INTEGER PRIMARY KEY,
    old TEXT NOT NULL,
    new TEXT NOT NULL
);
"""
#: The largest cached view (ENVELOPE, BODYSTRUCTURE...) kept, here and in cluster mode's shared
#: cache (store/cluster/cache.py); a larger one (a message of some hundreds of parts) is recomputed.
CACHE_ITEM_LIMIT = 64 * 1024
_MAX_TOMBS = 50_000  # per folder; older tombstones are dropped and tomb_floor records how far


# -- names and flags ------------------------------------------------------------------------------

def parse_file_name(name: str) -> tuple[str, str]:
    """Split a Maildir file name into (base, suffix): suffix is ":2,FLAGS" (maildir(5) info) or ""."""
    i = name.find(":")
    if i < 0:
        return name, ""
    return name[:i], name[i:]


def size_of(base: str) -> int | None:
    """The RFC822.SIZE recorded in the name: Dovecot's virtual (CRLF) size ",W=", else ",S="."""
    i = base.find(",W=")
    if i < 0:
        i = base.find(",S=")
        if i < 0:
            return None
    m = _DIGITS_RE.match(base, i + 3)
    return int(m.group()) if m else None


def flags_to_names(flags: int, keywords: str) -> list[str]:
    out = [name for name, bit in SYSTEM_FLAGS.items() if flags & bit]
    if keywords:
        out.extend(keywords.split(" "))
    return out


def plan_store(rows: Mapping[int, MessageRow], mode: str, bits: int, kws: Sequence[str],
               unchangedsince: int | None) -> tuple[list[tuple[MessageRow, int, list[str]]], dict[int, MessageRow],
                                                     list[int]]:
    """What a STORE (RFC 9051 §6.4.6; UNCHANGEDSINCE, RFC 7162 §3.1.3) does to each row, whatever holds
    the rows: (changes as (row, new flag bits, new keywords), rows left as they were, conflicting UIDs)."""
    kl = {k.lower() for k in kws}
    changes: list[tuple[MessageRow, int, list[str]]] = []
    unchanged: dict[int, MessageRow] = {}
    conflicts: list[int] = []
    for uid in sorted(rows):
        m = rows[uid]
        if unchangedsince is not None and m.modseq > unchangedsince:
            conflicts.append(uid)
            continue
        old_k = m.keywords.split(" ") if m.keywords else []
        if mode == "FLAGS":
            nb, nk = bits, list(kws)
        elif mode == "+FLAGS":
            nb = m.flags | bits
            nk = old_k + [k for k in kws if k.lower() not in {x.lower() for x in old_k}]
        else:
            nb = m.flags & ~bits
            nk = [k for k in old_k if k.lower() not in kl]
        if nb == m.flags and sorted(x.lower() for x in nk) == sorted(x.lower() for x in old_k):
            unchanged[uid] = m
            continue
        changes.append((m, nb, nk))
    return changes, unchanged, conflicts


def names_to_flags(names: Iterable[str]) -> tuple[int, list[str]]:
    """Split flag names into system-flag bits and keywords (\\Recent and unknown \\X are ignored)."""
    bits = 0
    kws: list[str] = []
    for n in names:
        if n.startswith("\\"):
            hit = _SYSTEM_BY_UPPER.get(n.upper())
            if hit:
                bits |= hit[1]
            continue
        if not _KEYWORD_RE.match(n):
            raise InvalidKeyword(f"invalid keyword {n[:40]!r}")
        if n.lower() not in (k.lower() for k in kws):
            kws.append(n)
    return bits, kws


def _decode_suffix(suffix: str, letters: Sequence[str]) -> tuple[int, list[str]]:
    """Flags and keywords from ":2,DFRS..." (lower-case letters index the keywords file)."""
    if not suffix.startswith(":2,"):
        return 0, []
    bits = 0
    kws: list[str] = []
    for ch in suffix[3:]:
        if "A" <= ch <= "Z":
            bits |= _LETTER_FLAG.get(ch, 0)
        elif "a" <= ch <= "z":
            i = ord(ch) - 97
            if i < len(letters) and letters[i] not in kws:
                kws.append(letters[i])
    return bits, kws


def encode_suffix(old_suffix: str, flags: int, keywords: Sequence[str], letters: Sequence[str]) -> str:
    """The new ":2,..." suffix: known flag letters from `flags`, unknown upper-case letters kept."""
    keep = {ch for ch in old_suffix[3:] if "A" <= ch <= "Z" and ch not in _LETTER_FLAG} \
        if old_suffix.startswith(":2,") else set()
    chars = keep | {ch for ch, bit in _LETTERS if flags & bit}
    lower = {k.lower(): i for i, k in enumerate(letters[:_MAX_LETTER_KEYWORDS])}
    for k in keywords:
        i = lower.get(k.lower())
        if i is not None:
            chars.add(chr(97 + i))
    return ":2," + "".join(sorted(chars))  # maildir(5): flags in ASCII order


def _new_modseq(highest: int) -> int:
    return max(highest + 1, time.time_ns() // 1000)


# -- journal and keyword files --------------------------------------------------------------------

@dataclass
class Journal:
    uidvalidity: int = 0
    uidnext: int = 1
    modseq: int = 0
    special_use: str = ""
    uids: dict[str, int] = field(default_factory=dict)  # base -> uid (last line wins)
    lines: int = 0


def read_journal(path: Path, header_only: bool = False) -> Journal | None:
    """Read a folder's postier-uidlist; None when missing or unreadable (the header is checked)."""
    try:
        f = open(path / UIDLIST_NAME, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError:
        return None
    with f:
        header = f.readline(_MAX_UIDLIST_LINE).split()
        if len(header) < 4 or header[0] != _UIDLIST_MAGIC or header[1] != _UIDLIST_VERSION:
            return None
        j = Journal()
        for field_ in header[2:]:
            key, val = field_[:1], field_[1:]
            try:
                if key == "V":
                    j.uidvalidity = int(val)
                elif key == "N":
                    j.uidnext = int(val)
                elif key == "M":
                    j.modseq = int(val)
            except ValueError:
                return None
            if key == "U":
                j.special_use = val
        if not 0 < j.uidvalidity < 1 << 32:
            return None
        if header_only:
            return j
        by_uid: dict[int, str] = {}
        for line in f:
            j.lines += 1
            uid_s, _, base = line.rstrip("\n").partition(" ")
            if not uid_s.isdigit() or not base or len(line) > _MAX_UIDLIST_LINE:
                continue
            uid = int(uid_s)
            if not 0 < uid < 1 << 32:
                continue
            old = by_uid.get(uid)
            if old is not None and j.uids.get(old) == uid:
                del j.uids[old]  # a UID names one file: the later line wins
            prev = j.uids.get(base)
            if prev is not None:
                by_uid.pop(prev, None)
            j.uids[base] = uid
            by_uid[uid] = base
            j.uidnext = max(j.uidnext, uid + 1)
    return j


def _journal_header(uidvalidity: int, uidnext: int, modseq: int, special_use: str) -> str:
    out = f"{_UIDLIST_MAGIC} {_UIDLIST_VERSION} V{uidvalidity} N{uidnext} M{modseq}"
    if special_use:
        out += f" U{special_use}"
    return out + "\n"


def write_journal(path: Path, uidvalidity: int, uidnext: int, modseq: int, special_use: str,
                  entries: Iterable[tuple[int, str]]) -> int:
    """Rewrite the journal atomically (tmp, fsync, rename); return the number of entry lines."""
    tmp = path / (UIDLIST_NAME + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
        f.write(_journal_header(uidvalidity, uidnext, modseq, special_use))
        for uid, base in entries:
            f.write(f"{uid} {base}\n")
            n += 1
        f.flush()
        os.fdatasync(f.fileno())
    os.replace(tmp, path / UIDLIST_NAME)
    return n


def append_journal(path: Path, entries: Sequence[tuple[int, str]],
                   alongside: Sequence[Callable[[], None]] = ()) -> None:
    """Journal UIDs; `alongside`: other fsyncs (the folder's directory after an APPEND's renames)
    run at the same time as the journal's (`durable.together`: one disk flush)."""
    if not entries:
        together(alongside)
        return
    data = "".join(f"{uid} {base}\n" for uid, base in entries).encode("utf-8", "surrogateescape")
    fd = os.open(path / UIDLIST_NAME, os.O_WRONLY | os.O_APPEND)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        # the UIDs are durable before the index (and a client) sees them
        together([*alongside, functools.partial(os.fdatasync, fd)])
    finally:
        os.close(fd)


def read_keywords(path: Path) -> list[str]:
    """Dovecot's dovecot-keywords: "<index> <keyword>" lines; index i is the letter chr(97 + i)."""
    out: list[str] = []
    try:
        text = (path / KEYWORDS_FILE).read_text("utf-8", errors="replace")
    except OSError:
        return out
    slots: dict[int, str] = {}
    for line in text.splitlines()[:_MAX_LETTER_KEYWORDS * 4]:
        num, _, kw = line.partition(" ")
        if num.isdigit() and int(num) < _MAX_LETTER_KEYWORDS and _KEYWORD_RE.match(kw):
            slots[int(num)] = kw
    for i in range(_MAX_LETTER_KEYWORDS):
        if i not in slots:
            break
        out.append(slots[i])
    return out


def write_keywords(path: Path, keywords: Sequence[str]) -> None:
    tmp = path / (KEYWORDS_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, kw in enumerate(keywords[:_MAX_LETTER_KEYWORDS]):
            f.write(f"{i} {kw}\n")
        f.flush()
        os.fdatasync(f.fileno())
    os.replace(tmp, path / KEYWORDS_FILE)


# -- rows -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class FolderRow:
    id: int
    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    recent_uid: int
    tomb_floor: int
    special_use: str
    keywords: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class MessageRow:
    uid: int
    base: str
    sub: int  # 0 new/, 1 cur/
    suffix: str
    flags: int
    keywords: str  # space-separated
    modseq: int
    size: int
    idate: int | None
    lf: int | None  # None unknown, 0 CRLF file, 1 bare-LF file (converted when served)

    @property
    def file_name(self) -> str:
        return self.base + self.suffix

    def relpath(self) -> str:
        return _SUBDIR[self.sub] + "/" + self.base + self.suffix

    @property
    def flag_names(self) -> list[str]:
        return flags_to_names(self.flags, self.keywords)


_MSG_COLS = "uid, base, sub, suffix, flags, keywords, modseq, size, idate, lf"
_FOLDER_COLS = "id, name, uidvalidity, uidnext, highestmodseq, recent_uid, tomb_floor, special_use, keywords"


def _folder_row(r: tuple) -> FolderRow:  # type: ignore[type-arg]
    return FolderRow(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], tuple(json.loads(r[8])))


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What a sync found: whether the UID list changed (appends or expunges) and the new state."""

    folder: FolderRow
    uids_changed: bool
    added: int = 0
    removed: int = 0
    flags_changed: int = 0


# -- the index ------------------------------------------------------------------------------------

class UserIndex:
    """One user's index database. Not thread-safe: the owner serialises calls (one lock per user)."""

    def __init__(self, db_path: Path):
        self.db_path = db_path
        self.conn = sqlite3.connect(db_path, timeout=30, isolation_level=None, check_same_thread=False)
        use_wal(self.conn)
        # FULL: a UID handed to a client must survive a power loss (UIDNEXT never goes back).
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA cache_size=-4000")
        self.conn.executescript(_SCHEMA)
        quota.init_schema(self.conn)  # usage kept by triggers on msgs (store/quota.py)
        #: UIDs read from a journal while attaching a folder, applied by its next sync.
        self._pending_journal: dict[int, dict[str, int]] = {}
        self._listing: dict[int, tuple[set[str], set[str]]] = {}
        self._meta: list[tuple[str, tuple[int, ...]]] = []

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self.flush_meta()
        self.conn.close()

    @contextlib.contextmanager
    def tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """One write transaction. `durable=False` for what a power loss may take back harmlessly
        (a directory's recorded mtimes, a \\Recent claim): its commit is not fsynced (WAL with
        synchronous=NORMAL keeps the database consistent); the next durable commit's fsync covers it."""
        c = self.conn
        if not durable:
            c.execute("PRAGMA synchronous=NORMAL")
        try:
            c.execute("BEGIN IMMEDIATE")
            try:
                self._write_meta(c)
                yield c
            except BaseException:
                c.execute("ROLLBACK")
                raise
            else:
                c.execute("COMMIT")
        finally:
            if not durable:
                c.execute("PRAGMA synchronous=FULL")

    # -- folders ----------------------------------------------------------------------------------

    def _next_uidvalidity(self, c: sqlite3.Connection) -> int:
        # RFC 9051 §2.3.1.1: a re-created mailbox must not reuse an earlier UIDVALIDITY.
        row = c.execute("SELECT value FROM meta WHERE key='last_uidvalidity'").fetchone()
        last = row[0] if row else 0
        v = max(int(time.time()), last + 1) & 0xFFFFFFFF or 1
        c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_uidvalidity', ?)", (v,))
        return v

    def folder(self, name: str) -> FolderRow | None:
        r = self.conn.execute(f"SELECT {_FOLDER_COLS} FROM folders WHERE name=?", (name,)).fetchone()
        return _folder_row(r) if r else None

    def folder_names(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT name FROM folders")]

    def attach_folder(self, name: str, path: Path, special_use: str = "") -> FolderRow:
        """The folder's row, created from its journal (or fresh) when the index lacks it.

        The journal decides: when the index row and the journal disagree on UIDVALIDITY (the
        directory was replaced or moved), the row is dropped and rebuilt from the journal.
        """
        row = self.folder(name)
        journal = read_journal(path, header_only=True)
        if row is not None and journal is not None and journal.uidvalidity == row.uidvalidity:
            return row
        if journal is not None:
            journal = read_journal(path)
        if row is not None and journal is None:
            self._rewrite_journal(row, path)  # someone removed it: write it back from the index
            return row
        with self.tx() as c:
            if row is not None:
                self._drop_folder_rows(c, row.id)
            letters = read_keywords(path)
            if journal is not None:
                uv, nxt, ms, su = journal.uidvalidity, journal.uidnext, journal.modseq, journal.special_use
                last = c.execute("SELECT value FROM meta WHERE key='last_uidvalidity'").fetchone()
                if not last or last[0] < uv:
                    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_uidvalidity', ?)", (uv,))
            else:
                uv, nxt, ms, su = self._next_uidvalidity(c), 1, 0, special_use
            ms = _new_modseq(ms)  # above anything handed out before a rebuild
            c.execute(
                "INSERT INTO folders(name, uidvalidity, uidnext, highestmodseq, recent_uid, tomb_floor,"
                " special_use, keywords, journal_lines) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                # Tombstones from before a rebuild are unknown: VANISHED asks below that are answered
                # from the UID list instead (tomb_floor).
                (name, uv, nxt, ms, nxt, ms if journal else 0, su, json.dumps(letters),
                 journal.lines if journal else 0))
        if journal is None:
            write_journal(path, uv, nxt, ms, su, ())
        row = self.folder(name)
        assert row is not None
        if journal is not None and journal.uids:
            self._pending_journal[row.id] = journal.uids
        return row

    def _drop_folder_rows(self, c: sqlite3.Connection, fid: int) -> None:
        self._listing.pop(fid, None)
        self._pending_journal.pop(fid, None)
        for table in ("msgs", "tombs", "cache"):
            c.execute(f"DELETE FROM {table} WHERE folder=?", (fid,))  # noqa: S608 (constant names)
        c.execute("DELETE FROM folders WHERE id=?", (fid,))

    def forget_folder(self, name: str) -> None:
        row = self.folder(name)
        if row is not None:
            with self.tx() as c:
                self._drop_folder_rows(c, row.id)

    def log_rename(self, old: str, new: str, keep: int) -> None:
        """Number the rename of mailbox `old` to `new` (children included) in the rename log, which
        keeps the last `keep` (RFC 5465 §5.4 OLDNAME, `UserMailbox.names_since`)."""
        with self.tx(durable=False) as c:  # lost to a power cut: a later NOTIFY diff without OLDNAME
            r = c.execute("SELECT value FROM meta WHERE key='rename_seq'").fetchone()
            seq = (r[0] if r else 0) + 1
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('rename_seq', ?)", (seq,))
            c.execute("INSERT OR REPLACE INTO renames VALUES (?, ?, ?)", (seq, old, new))
            c.execute("DELETE FROM renames WHERE seq <= ?", (seq - keep,))

    def renames(self, after: int | None) -> tuple[int, list[tuple[int, str, str]]]:
        """The rename log's last number, and its kept rows after number `after` (none when None)."""
        r = self.conn.execute("SELECT value FROM meta WHERE key='rename_seq'").fetchone()
        if after is None:
            return (r[0] if r else 0), []
        rows = self.conn.execute("SELECT seq, old, new FROM renames WHERE seq > ? ORDER BY seq", (after,)).fetchall()
        return (r[0] if r else 0), [(a, b, c) for a, b, c in rows]

    def rename_folder(self, old: str, new: str) -> None:
        with self.tx() as c:
            c.execute("DELETE FROM folders WHERE name=?", (new,))
            c.execute("UPDATE folders SET name=? WHERE name=?", (new, old))

    def set_special_use(self, name: str, path: Path, use: str) -> None:
        row = self.folder(name)
        if row is None:
            raise MailboxNotFound("no such mailbox")
        with self.tx() as c:
            c.execute("UPDATE folders SET special_use=? WHERE id=?", (use, row.id))
        self._rewrite_journal(self.folder(name), path)  # type: ignore[arg-type]

    def _rewrite_journal(self, row: FolderRow, path: Path) -> None:
        entries = self.conn.execute("SELECT uid, base FROM msgs WHERE folder=? ORDER BY uid", (row.id,))
        n = write_journal(path, row.uidvalidity, row.uidnext, row.highestmodseq, row.special_use, entries)
        with self.tx() as c:
            c.execute("UPDATE folders SET journal_lines=? WHERE id=?", (n, row.id))

    def _maybe_compact(self, row: FolderRow, path: Path) -> None:
        r = self.conn.execute("SELECT journal_lines, (SELECT COUNT(*) FROM msgs WHERE folder=?) FROM folders"
                              " WHERE id=?", (row.id, row.id)).fetchone()
        if r and r[0] > 2 * r[1] + 1000:
            self._rewrite_journal(row, path)

    # -- sync with the disk -----------------------------------------------------------------------

    def needs_sync(self, row_id: int, path: Path) -> bool:
        """Cheap check (two stats): could the directories hold changes the index has not seen?"""
        r = self.conn.execute("SELECT new_mtime, cur_mtime, trusted FROM folders WHERE id=?", (row_id,)).fetchone()
        if r is None:
            return True
        try:
            mn = os.stat(path / "new").st_mtime_ns
            mc = os.stat(path / "cur").st_mtime_ns
        except OSError:
            return True
        return not (r[2] and mn == r[0] and mc == r[1])

    def forget_listings(self) -> None:
        """Another process changed the index: the in-memory listings are re-read when next used."""
        self._listing.clear()

    def _listing_of(self, fid: int) -> tuple[set[str], set[str]]:
        """The file names the index holds, (new/, cur/): kept in memory while the folder is in use
        and updated by every change made here, so a rescan only diffs two listings."""
        lst = self._listing.get(fid)
        if lst is None:
            new: set[str] = set()
            cur: set[str] = set()
            for b, s, x in self.conn.execute("SELECT base, sub, suffix FROM msgs WHERE folder=?", (fid,)):
                (cur if s else new).add(b + x)
            lst = self._listing[fid] = (new, cur)
        return lst

    def _lookup(self, fid: int, bases: Iterable[str]) -> dict[str, tuple[int, int, str]]:
        """base -> (uid, sub, suffix) for the bases the index knows."""
        bl = list(bases)
        out: dict[str, tuple[int, int, str]] = {}
        if len(bl) > 2000:
            want = set(bl)
            for u, b, s, x in self.conn.execute("SELECT uid, base, sub, suffix FROM msgs WHERE folder=?", (fid,)):
                if b in want:
                    out[b] = (u, s, x)
            return out
        q = "SELECT uid, sub, suffix FROM msgs WHERE folder=? AND base=?"
        for b in bl:
            r = self.conn.execute(q, (fid, b)).fetchone()
            if r:
                out[b] = (r[0], r[1], r[2])
        return out

    def sync(self, row: FolderRow, path: Path, force: bool = False) -> SyncResult:
        """Bring the index in line with the folder's new/ and cur/ (never reads message contents)."""
        fid = row.id
        try:
            st_new = os.stat(path / "new")
            st_cur = os.stat(path / "cur")
        except FileNotFoundError:
            raise MailboxNotFound("mailbox directory vanished") from None
        pending = self._pending_journal.pop(fid, None)
        if not force and pending is None:
            r = self.conn.execute("SELECT new_mtime, cur_mtime, trusted FROM folders WHERE id=?", (fid,)).fetchone()
            if r and r[2] and r[0] == st_new.st_mtime_ns and r[1] == st_cur.st_mtime_ns:
                return SyncResult(row, False)
        now = time.time_ns()
        trusted = int(now - max(st_new.st_mtime_ns, st_cur.st_mtime_ns) > _TRUST_AGE_NS)
        # Dot files are not messages (maildir(5)); a name with a line break is refused (it would
        # break the listing parser and the journal's line format).
        disk_new = {n for n in os.listdir(path / "new") if n[0] != "." and "\n" not in n}
        disk_cur = {n for n in os.listdir(path / "cur") if n[0] != "." and "\n" not in n}
        idx_new, idx_cur = self._listing_of(fid)
        if disk_new == idx_new and disk_cur == idx_cur:
            r = self.conn.execute("SELECT new_mtime, cur_mtime, trusted FROM folders WHERE id=?", (fid,)).fetchone()
            if r is None or tuple(r) != (st_new.st_mtime_ns, st_cur.st_mtime_ns, trusted):
                with self.tx(durable=False) as c:  # a hint: lost in a power cut, the next sync rescans
                    c.execute("UPDATE folders SET new_mtime=?, cur_mtime=?, trusted=? WHERE id=?",
                              (st_new.st_mtime_ns, st_cur.st_mtime_ns, trusted, fid))
            return SyncResult(row, False)
        appeared: dict[str, tuple[int, str]] = {}  # base -> (sub, suffix); cur/ wins over new/
        for sub, names in ((1, disk_cur - idx_cur), (0, disk_new - idx_new)):
            for nm in names:
                base, sep, info = nm.partition(":")
                if base not in appeared:
                    appeared[base] = (sub, sep + info)
        vanished = {parse_file_name(nm)[0] for nm in (idx_new - disk_new) | (idx_cur - disk_cur)}
        known = self._lookup(fid, vanished | appeared.keys())
        gone = [known[b][0] for b in vanished if b not in appeared and b in known]
        moved = [(b, known[b][0], s, x) for b, (s, x) in appeared.items()
                 if b in known and b in vanished and (known[b][1], known[b][2]) != (s, x)]
        added = sorted(b for b in appeared if b not in known)
        letters = list(row.keywords)
        cur = self.folder(row.name) or row
        modseq = _new_modseq(cur.highestmodseq)
        uidnext = cur.uidnext
        new_rows: list[tuple[object, ...]] = []
        new_sizes: list[int] = []
        new_bases: list[str] = []
        journal_new: list[tuple[int, str]] = []
        taken: set[int] = set()
        if pending:
            taken = {u for (u,) in self.conn.execute("SELECT uid FROM msgs WHERE folder=?", (fid,))}
        decoded: dict[str, tuple[int, str]] = {}
        for b in added:
            sub, suffix = appeared[b]
            uid = pending.get(b) if pending else None
            i = b.rfind(",W=")  # Dovecot's virtual size, else ",S=" (ours are CRLF: the same)
            if i < 0:
                i = b.rfind(",S=")
            tail = b[i + 3:] if i >= 0 else ""
            size = int(tail) if tail.isdigit() and len(tail) < 16 else size_of(b)
            lf: int | None = None
            if size is None:
                fpath = path / _SUBDIR[sub] / (b + suffix)
                try:
                    size = os.stat(fpath).st_size
                except OSError:
                    continue  # gone again meanwhile
                lf = _has_bare_lf(fpath)
                if lf:
                    size = _crlf_size(fpath)
            if uid is None or uid in taken or uid >= 1 << 32:
                uid = uidnext
                uidnext += 1
                journal_new.append((uid, b))
            if pending:
                taken.add(uid)
                uidnext = max(uidnext, uid + 1)
            flags = decoded.get(suffix)
            if flags is None:
                bits, kws = _decode_suffix(suffix, letters)
                flags = decoded[suffix] = (bits, " ".join(kws))
            new_rows.append((fid, uid, b, sub, suffix, flags[0], flags[1], modseq, size, lf))
            new_sizes.append(size)
            new_bases.append(b)
        if uidnext >= 1 << 32:
            raise StoreLimit("mailbox UIDs exhausted; run postier reindex")
        if journal_new:
            append_journal(path, journal_new)
        with self.tx() as c:
            if gone:
                c.executemany("DELETE FROM msgs WHERE folder=? AND uid=?", [(fid, u) for u in gone])
                c.executemany("DELETE FROM cache WHERE folder=? AND uid=?", [(fid, u) for u in gone])
                c.executemany("INSERT OR REPLACE INTO tombs(folder, uid, modseq) VALUES (?, ?, ?)",
                              [(fid, u, modseq) for u in gone])
            if new_rows:
                # Plain INSERT: the rows are new by base and UID, and SQLite's REPLACE path (with the
                # quota triggers) costs twice as much. A row that is there after all (an index another
                # process changed behind our listing) is replaced, as before.
                ins = ("INTO msgs(folder, uid, base, sub, suffix, flags, keywords, modseq, size, lf)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
                c.execute("SAVEPOINT fresh")
                try:
                    quota.bulk_insert(c, "INSERT " + ins, new_rows, new_sizes, new_bases)
                except sqlite3.IntegrityError:
                    c.execute("ROLLBACK TO fresh")
                    quota.bulk_insert(c, "INSERT OR REPLACE " + ins, new_rows, new_sizes, new_bases)
                c.execute("RELEASE fresh")
            lower_letters = {x.lower() for x in letters[:_MAX_LETTER_KEYWORDS]}
            for _b, uid, sub, suffix in moved:
                bits, kws = _decode_suffix(suffix, letters)
                old = c.execute("SELECT keywords FROM msgs WHERE folder=? AND uid=?", (fid, uid)).fetchone()
                # Keywords beyond the 26 letters are not in the name: keep them from the index.
                extra = [k for k in (old[0].split(" ") if old and old[0] else []) if k.lower() not in lower_letters]
                c.execute("UPDATE msgs SET sub=?, suffix=?, flags=?, keywords=?, modseq=? WHERE folder=? AND uid=?",
                          (sub, suffix, bits, " ".join(kws + extra), modseq, fid, uid))
            c.execute("UPDATE folders SET uidnext=?, highestmodseq=?, new_mtime=?, cur_mtime=?, trusted=?,"
                      " journal_lines=journal_lines+? WHERE id=?",
                      (uidnext, modseq, st_new.st_mtime_ns, st_cur.st_mtime_ns, trusted, len(journal_new), fid))
        # The in-memory listing follows the index: vanished names out, indexed names in.
        idx_new -= idx_new - disk_new
        idx_cur -= idx_cur - disk_cur
        for r in new_rows:
            (idx_cur if r[3] else idx_new).add(str(r[2]) + str(r[4]))
        for b, _uid, sub, suffix in moved:
            (idx_cur if sub else idx_new).add(b + suffix)
        self._prune_tombs(fid)
        after = self.folder(row.name)
        assert after is not None
        self._maybe_compact(after, path)
        return SyncResult(after, bool(gone or new_rows), len(new_rows), len(gone), len(moved))

    def mark_untrusted(self, fid: int) -> None:
        """Our own change moved a directory mtime: make the next sync look at the listing."""
        self.conn.execute("UPDATE folders SET trusted=0 WHERE id=?", (fid,))

    def _prune_tombs(self, fid: int) -> None:
        n = self.conn.execute("SELECT COUNT(*) FROM tombs WHERE folder=?", (fid,)).fetchone()[0]
        if n <= _MAX_TOMBS:
            return
        cut = self.conn.execute("SELECT modseq FROM tombs WHERE folder=? ORDER BY modseq LIMIT 1 OFFSET ?",
                                (fid, n - _MAX_TOMBS // 2)).fetchone()[0]
        with self.tx() as c:
            c.execute("DELETE FROM tombs WHERE folder=? AND modseq<?", (fid, cut))
            c.execute("UPDATE folders SET tomb_floor=MAX(tomb_floor, ?) WHERE id=?", (cut, fid))

    # -- reads ------------------------------------------------------------------------------------

    def uid_array(self, fid: int) -> array[int]:
        return array("I", [u for (u,) in self.conn.execute(
            "SELECT uid FROM msgs WHERE folder=? ORDER BY uid", (fid,))])

    def rows(self, fid: int, uids: Iterable[int]) -> dict[int, MessageRow]:
        """Rows of the given UIDs (missing ones are left out)."""
        out: dict[int, MessageRow] = {}
        ul = list(uids)
        if not ul:
            return out
        q = f"SELECT {_MSG_COLS} FROM msgs WHERE folder=? AND uid BETWEEN ? AND ?"
        lo, hi = min(ul), max(ul)
        if len(ul) > 64 and hi - lo < 4 * len(ul):
            want = set(ul)
            for r in self.conn.execute(q, (fid, lo, hi)):
                if r[0] in want:
                    out[r[0]] = MessageRow(*r)
            return out
        q1 = f"SELECT {_MSG_COLS} FROM msgs WHERE folder=? AND uid=?"
        for u in ul:
            r = self.conn.execute(q1, (fid, u)).fetchone()
            if r:
                out[u] = MessageRow(*r)
        return out

    def row(self, fid: int, uid: int) -> MessageRow | None:
        r = self.conn.execute(f"SELECT {_MSG_COLS} FROM msgs WHERE folder=? AND uid=?", (fid, uid)).fetchone()
        return MessageRow(*r) if r else None

    def all_rows(self, fid: int) -> Iterator[MessageRow]:
        for r in self.conn.execute(f"SELECT {_MSG_COLS} FROM msgs WHERE folder=? ORDER BY uid", (fid,)):
            yield MessageRow(*r)

    def all_rows_between(self, fid: int, lo: int, hi: int) -> Iterator[MessageRow]:
        for r in self.conn.execute(f"SELECT {_MSG_COLS} FROM msgs WHERE folder=? AND uid BETWEEN ? AND ?"
                                   " ORDER BY uid", (fid, lo, hi)):
            yield MessageRow(*r)

    def flag_rows(self, fid: int, lo: int, hi: int) -> list[tuple[int, int, str, int]]:
        """(uid, flags, keywords, modseq) for lo <= uid <= hi, in UID order (FETCH FLAGS fast path)."""
        return self.conn.execute(
            "SELECT uid, flags, keywords, modseq FROM msgs WHERE folder=? AND uid BETWEEN ? AND ? ORDER BY uid",
            (fid, lo, hi)).fetchall()

    def changed_since(self, fid: int, modseq: int) -> list[tuple[int, int, str, int]]:
        return self.conn.execute(
            "SELECT uid, flags, keywords, modseq FROM msgs WHERE folder=? AND modseq>? ORDER BY uid",
            (fid, modseq)).fetchall()

    def vanished_since(self, fid: int, modseq: int) -> list[int] | None:
        """UIDs expunged after `modseq`, or None if tombstones that old were pruned."""
        r = self.conn.execute("SELECT tomb_floor FROM folders WHERE id=?", (fid,)).fetchone()
        if r is None or modseq < r[0]:
            return None
        return [u for (u,) in self.conn.execute(
            "SELECT uid FROM tombs WHERE folder=? AND modseq>? ORDER BY uid", (fid, modseq))]

    def counts(self, fid: int) -> tuple[int, int, int, int]:
        """(messages, unseen, deleted, total size)."""
        r = self.conn.execute(
            "SELECT COUNT(*), SUM(flags & 1 = 0), SUM(flags & 8 != 0), SUM(size) FROM msgs WHERE folder=?",
            (fid,)).fetchone()
        return r[0], r[1] or 0, r[2] or 0, r[3] or 0

    def first_unseen(self, fid: int) -> int | None:
        r = self.conn.execute("SELECT MIN(uid) FROM msgs WHERE folder=? AND flags & 1 = 0", (fid,)).fetchone()
        return r[0] if r else None

    # -- writes -----------------------------------------------------------------------------------

    def claim_recent(self, fid: int) -> int:
        """RFC 3501 §2.3.2 \\Recent: the first session to see new messages claims them. Returns the
        lowest UID that is recent for the caller (every UID >= it)."""
        r = self.conn.execute("SELECT recent_uid, uidnext FROM folders WHERE id=?", (fid,)).fetchone()
        if r is None:
            return 1 << 32
        if r[0] >= r[1]:
            return int(r[0])  # nothing new to claim: no write
        # Not fsynced: a claim lost in a power cut shows those messages as \\Recent once more.
        with self.tx(durable=False) as c:
            r = c.execute("SELECT recent_uid, uidnext FROM folders WHERE id=?", (fid,)).fetchone()
            c.execute("UPDATE folders SET recent_uid=? WHERE id=?", (r[1], fid))
        return int(r[0])

    def add_keywords(self, row: FolderRow, path: Path, keywords: Iterable[str]) -> FolderRow:
        """Register new keywords for the folder (letters a-z for the first 26)."""
        known = list(row.keywords)
        lower = {k.lower() for k in known}
        new = [k for k in keywords if k.lower() not in lower]
        if not new:
            return row
        if len(known) + len(new) > _MAX_KEYWORDS:
            raise StoreLimit("too many keywords in this mailbox")
        known += new
        with self.tx() as c:
            c.execute("UPDATE folders SET keywords=? WHERE id=?", (json.dumps(known), row.id))
        if len(known) - len(new) < _MAX_LETTER_KEYWORDS:
            write_keywords(path, known)
        after = self.folder(row.name)
        assert after is not None
        return after

    def canonical_keywords(self, row: FolderRow, kws: Iterable[str]) -> list[str]:
        by_lower = {k.lower(): k for k in row.keywords}
        return [by_lower.get(k.lower(), k) for k in kws]

    def set_flags(self, row: FolderRow, path: Path,
                  changes: Sequence[tuple[MessageRow, int, list[str]]]) -> tuple[int, list[int]]:
        """Apply new (flags, keywords) to messages: rename each file (:2, suffix), then update the
        index. Returns (modseq, uids changed). A file another program moved away is skipped (the next
        sync picks its new name up)."""
        if not changes:
            return row.highestmodseq, []
        letters = row.keywords
        done: list[tuple[MessageRow, str, int, str]] = []
        renamed: set[str] = set()  # subdirectories whose entries changed
        for m, bits, kws in changes:
            suffix = encode_suffix(m.suffix, bits, kws, letters)
            if suffix != m.suffix or m.sub == 0:
                src = path / m.relpath()
                dst = path / "cur" / (m.base + suffix)
                try:
                    os.rename(src, dst)
                except FileNotFoundError:
                    continue
                renamed.update(("cur", _SUBDIR[m.sub]))
            done.append((m, suffix, bits, " ".join(kws)))
        if not done:
            return row.highestmodseq, []
        # The file name is the truth a later sync reads: the renames are durable before the index
        # says so, or a power cut would bring the old flags back (and a stale copy in new/).
        fsync_folder(path, sorted(renamed))
        cur = self.folder(row.name) or row
        modseq = _new_modseq(cur.highestmodseq)
        # With the names durable, the index's commit needs no fsync of its own when the names say
        # everything (no keyword beyond the 26 letters, which only the index holds): a power cut
        # that takes it back leaves the renamed files, which the next sync reads again (the
        # directories' mtimes moved), under a new MODSEQ (time-based: never one already handed out).
        lettered = {k.lower() for k in letters[:_MAX_LETTER_KEYWORDS]}
        in_names = all(k.lower() in lettered for _m, _b, kws in changes for k in kws)
        with self.tx(durable=not in_names) as c:
            c.executemany("UPDATE msgs SET sub=1, suffix=?, flags=?, keywords=?, modseq=? WHERE folder=? AND uid=?",
                          [(sfx, bits, kws, modseq, row.id, m.uid) for m, sfx, bits, kws in done])
            c.execute("UPDATE folders SET highestmodseq=?, trusted=0 WHERE id=?", (modseq, row.id))
        lst = self._listing.get(row.id)
        if lst is not None:
            for m, sfx, _bits, _kws in done:
                lst[m.sub].discard(m.file_name)
                lst[1].add(m.base + sfx)
        return modseq, [m.uid for m, _s, _b, _k in done]

    def add_messages(self, row: FolderRow, path: Path,
                     entries: Sequence[tuple[str, int, str, int, str, int, int | None, int | None]],
                     alongside: Sequence[Callable[[], None]] = ()) -> tuple[int, list[int]]:
        """Index files already placed in the folder: (base, sub, suffix, flags, keywords, size, idate, lf).
        Assigns UIDs in order, journals them first (with the fsyncs `alongside`, at the same time).
        Returns (modseq, uids)."""
        cur = self.folder(row.name) or row
        uid0 = cur.uidnext
        uids = list(range(uid0, uid0 + len(entries)))
        if uids and uids[-1] >= 1 << 32:
            raise StoreLimit("mailbox UIDs exhausted")
        append_journal(path, [(u, e[0]) for u, e in zip(uids, entries, strict=True)], alongside)
        modseq = _new_modseq(cur.highestmodseq)
        with self.tx() as c:
            c.executemany(
                "INSERT OR REPLACE INTO msgs(folder, uid, base, sub, suffix, flags, keywords, modseq, size, idate, lf)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(row.id, u, *e[:5], modseq, *e[5:]) for u, e in zip(uids, entries, strict=True)])
            c.execute("UPDATE folders SET uidnext=?, highestmodseq=?, trusted=0, journal_lines=journal_lines+?"
                      " WHERE id=?", (uid0 + len(entries), modseq, len(entries), row.id))
        lst = self._listing.get(row.id)
        if lst is not None:
            for e in entries:
                lst[e[1]].add(e[0] + e[2])
        return modseq, uids

    def import_messages(self, row: FolderRow, path: Path, uidvalidity: int, uidnext: int,
                        entries: Sequence[tuple[int, str, int, str, int, str, int, int | None, int | None]]) -> int:
        """Index files already placed (and fsynced) in a folder that never held a message, under the
        UIDVALIDITY and UIDs they had in another store: (uid, base, sub, suffix, flags, keywords,
        size, idate, lf), UIDs ascending and below `uidnext`. The journal is rewritten first
        (atomically, its directory fsynced) with the new UIDVALIDITY, UIDNEXT and every UID, so that
        a rebuilt index keeps them (`attach_folder`: the journal's UIDVALIDITY wins over the row's);
        then one transaction changes the folder's row and inserts the messages. Returns the MODSEQ.
        The caller holds the user lock and has checked that the folder is unused (UIDNEXT 1)."""
        modseq = _new_modseq(row.highestmodseq)
        n = write_journal(path, uidvalidity, uidnext, modseq, row.special_use, [(e[0], e[1]) for e in entries])
        fsync_dir(path)  # the journal's rename is durable before the index says anything
        with self.tx() as c:
            last = c.execute("SELECT value FROM meta WHERE key='last_uidvalidity'").fetchone()
            if not last or last[0] < uidvalidity:  # RFC 9051 §2.3.1.1: later folders go above it
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_uidvalidity', ?)", (uidvalidity,))
            c.executemany(
                "INSERT INTO msgs(folder, uid, base, sub, suffix, flags, keywords, modseq, size, idate, lf)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(row.id, *e[:6], modseq, *e[6:]) for e in entries])
            # not \Recent (RFC 3501 §2.3.2): they were seen in the store they come from
            c.execute("UPDATE folders SET uidvalidity=?, uidnext=?, highestmodseq=?, recent_uid=?, trusted=0,"
                      " journal_lines=? WHERE id=?", (uidvalidity, uidnext, modseq, uidnext, n, row.id))
        lst = self._listing.get(row.id)
        if lst is not None:
            for e in entries:
                lst[e[2]].add(e[1] + e[3])
        return modseq

    def remove_messages(self, row: FolderRow, rows: Sequence[MessageRow]) -> int:
        """Drop index rows (files already gone) with tombstones for QRESYNC; returns the modseq.
        The unlinks are durable (the caller fsynced the directories): the commit needs no fsync of
        its own, a power cut that takes it back leaves files missing that the next sync drops again
        (under a new, time-based MODSEQ)."""
        uids = [m.uid for m in rows]
        lst = self._listing.get(row.id)
        if lst is not None:
            for m in rows:
                lst[m.sub].discard(m.file_name)
        cur = self.folder(row.name) or row
        modseq = _new_modseq(cur.highestmodseq)
        with self.tx(durable=False) as c:
            c.executemany("DELETE FROM msgs WHERE folder=? AND uid=?", [(row.id, u) for u in uids])
            c.executemany("DELETE FROM cache WHERE folder=? AND uid=?", [(row.id, u) for u in uids])
            c.executemany("INSERT OR REPLACE INTO tombs(folder, uid, modseq) VALUES (?, ?, ?)",
                          [(row.id, u, modseq) for u in uids])
            c.execute("UPDATE folders SET highestmodseq=?, trusted=0 WHERE id=?", (modseq, row.id))
        self._prune_tombs(row.id)
        return modseq

    # Facts learnt lazily while serving (internal date from a stat, bare-LF files) are queued and
    # written with the next transaction: one commit per batch, not one fsync per message.

    def set_idate(self, fid: int, uid: int, idate: int) -> None:
        self._meta.append(("UPDATE msgs SET idate=? WHERE folder=? AND uid=?", (idate, fid, uid)))

    def set_lf(self, fid: int, uid: int, lf: int, size: int) -> None:
        self._meta.append(("UPDATE msgs SET lf=?, size=? WHERE folder=? AND uid=?", (lf, size, fid, uid)))

    def _write_meta(self, c: sqlite3.Connection) -> None:
        meta, self._meta = self._meta, []
        for q, args in meta:
            c.execute(q, args)

    def flush_meta(self) -> None:
        if self._meta:
            with self.tx():
                pass

    # -- cache ------------------------------------------------------------------------------------

    def cache_get(self, fid: int, uids: Sequence[int], kind: str) -> dict[int, bytes]:
        out: dict[int, bytes] = {}
        q = "SELECT data FROM cache WHERE folder=? AND uid=? AND kind=?"
        for u in uids:
            r = self.conn.execute(q, (fid, u, kind)).fetchone()
            if r:
                out[u] = bytes(r[0])
        return out

    def cache_put(self, fid: int, items: Sequence[tuple[int, str, bytes]]) -> None:
        keep = [(fid, u, k, d) for u, k, d in items if len(d) <= CACHE_ITEM_LIMIT]
        if keep:
            with self.tx() as c:
                c.executemany("INSERT OR REPLACE INTO cache(folder, uid, kind, data) VALUES (?, ?, ?, ?)", keep)

    def copy_cache(self, src_fid: int, dst_fid: int, pairs: Sequence[tuple[int, int]]) -> None:
        with self.tx() as c:
            for su, du in pairs:
                c.execute("INSERT OR REPLACE INTO cache(folder, uid, kind, data)"
                          " SELECT ?, ?, kind, data FROM cache WHERE folder=? AND uid=?", (dst_fid, du, src_fid, su))


def _has_bare_lf(p: Path, limit: int = 1 << 16) -> int:
    """1 if the file's first bytes contain a LF not preceded by CR (a Unix-style Maildir file)."""
    try:
        with open(p, "rb") as f:
            head = f.read(limit)
    except OSError:
        return 0
    return int(bare_lf(head) > 0)


def _crlf_size(p: Path) -> int:
    n = 0
    try:
        with open(p, "rb") as f:
            prev_cr = False
            while chunk := f.read(1 << 20):
                n += len(chunk) + bare_lf(chunk, prev_cr)
                prev_cr = chunk[-1:] == b"\r"
    except OSError:
        return 0
    return n


def fsync_folder(path: Path, subs: Iterable[str] = ("cur", "new")) -> None:
    """fsync the folder's subdirectories, at the same time (`durable.together`: one disk flush)."""
    def one(d: Path) -> None:
        with contextlib.suppress(OSError):
            fsync_dir(d)
    together([functools.partial(one, path / s) for s in subs])
