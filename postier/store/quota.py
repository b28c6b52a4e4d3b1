"""Storage quotas: each user's usage counted exactly in their mailbox index, and the check made before
anything is stored (RFC 9208's STORAGE resource; messages are counted too, not limited).

Usage is the sum of the sizes of the indexed messages (the RFC822.SIZE IMAP reports; for the files
postier writes, CRLF with `,S=` in the name, that is the number of bytes of the file) and their number.
SQLite triggers on the index's `msgs` table keep it in `quota_usage`, so every change of the index
changes the usage in the same transaction: APPEND, COPY, MOVE, EXPUNGE, POP3 deletions, the rescan
that finds files another program added or removed, and `postier reindex`, which rebuilds the rows.

Deliveries are written by the delivery agent without the index (store/agent.py). A delivery to a
user who has a quota therefore reserves its size first: one write transaction that reads the usage
(indexed plus reserved), refuses when the message would exceed the limit and otherwise records the
file's name and size in `quota_pending`. The next rescan indexes the file, and the insert trigger
drops its reservation in the same transaction; a failed delivery drops it at once. APPEND and COPY
reserve the same way, so that concurrent writers (several IMAP sessions, the delivery agent) serialise
on SQLite's write lock and never together exceed the limit. Files waiting in new/ that neither the
index nor a reservation knows (delivered before the user had a quota, or by another program) are
counted at every check from their names' `,S=`. Reservations whose file never arrived (a crash between
reservation and rename) are pruned after PENDING_TTL.

Why hand-written: the quota lives in the index that already knows every message; no library keeps
a Maildir++ `maildirsize` file exactly under concurrent writers either (its format is only a cache).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..message.types import User
from ..proto.mutf7 import Mutf7Error, mutf7_decode
from .errors import OverQuota

__all__ = [
    "BULK_ROWS", "INDEX_NAME", "OVER_QUOTA", "PENDING_TTL", "SCHEMA", "WARN_LEVELS", "Usage", "bulk_insert", "check", "format_size",
    "init_schema", "parse_size", "prune_pending", "release", "reserve", "unindexed", "unindexed_bytes", "usage",
    "usage_of_index", "user_usage_line", "user_usages", "warning_due",
]

INDEX_NAME = "postier-index.sqlite"  # store/index.py's (imported from there would be a cycle)
#: The detail of a delivery result refused for quota (the pipelines map it to 452 4.2.2 / 552 5.2.2).
OVER_QUOTA = "over quota"
#: Seconds after which a reservation whose file is neither indexed nor in new/ is dropped.
PENDING_TTL = 3600
#: Percentages at which the user gets a warning (pipeline/quota.py), once per crossing.
WARN_LEVELS = (80, 95)

SCHEMA = """
CREATE TABLE IF NOT EXISTS quota_usage (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    bytes INTEGER NOT NULL,
    messages INTEGER NOT NULL,
    warned INTEGER NOT NULL DEFAULT 0,  -- the highest WARN_LEVELS percentage already warned of
    low INTEGER  -- the lowest usage since that warning (NULL: none given): below the level re-arms it
);
CREATE TABLE IF NOT EXISTS quota_pending (
    base TEXT PRIMARY KEY,  -- the Maildir file's base name (a key of its own for COPY)
    folder TEXT NOT NULL,  -- its folder's directory under the Maildir ("" for INBOX)
    size INTEGER NOT NULL,
    created INTEGER NOT NULL
) WITHOUT ROWID;
"""
_INSERT_TRIGGER = """
CREATE TRIGGER IF NOT EXISTS quota_msgs_insert AFTER INSERT ON msgs BEGIN
    UPDATE quota_usage SET bytes = bytes + NEW.size, messages = messages + 1 WHERE id = 1;
    DELETE FROM quota_pending WHERE base = NEW.base;
END;
"""
_TRIGGERS = _INSERT_TRIGGER + """
CREATE TRIGGER IF NOT EXISTS quota_msgs_delete AFTER DELETE ON msgs BEGIN
    UPDATE quota_usage SET bytes = bytes - OLD.size, messages = messages - 1, low = MIN(low, bytes - OLD.size)
        WHERE id = 1;
END;
CREATE TRIGGER IF NOT EXISTS quota_msgs_size AFTER UPDATE OF size ON msgs BEGIN
    UPDATE quota_usage SET bytes = bytes - OLD.size + NEW.size, low = MIN(low, bytes - OLD.size + NEW.size)
        WHERE id = 1;
END;
"""


def init_schema(conn: sqlite3.Connection) -> None:
    """Create the quota tables and triggers in an index (autocommit connection, after `msgs` exists).
    The first time, the usage row is set from the rows already indexed, in the same transaction that
    creates the triggers."""
    # INSERT OR REPLACE into msgs deletes the row it replaces: count that deletion too.
    conn.execute("PRAGMA recursive_triggers=ON")
    conn.executescript(SCHEMA)
    if conn.execute("SELECT 1 FROM quota_usage WHERE id = 1").fetchone():
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        if not conn.execute("SELECT 1 FROM quota_usage WHERE id = 1").fetchone():
            for stmt in _TRIGGERS.split("END;")[:-1]:
                conn.execute(stmt + "END;")
            conn.execute("INSERT INTO quota_usage(id, bytes, messages)"
                         " SELECT 1, COALESCE(SUM(size), 0), COUNT(*) FROM msgs")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


#: Rows from which `bulk_insert` pays for dropping and re-creating the insert trigger.
BULK_ROWS = 512


def bulk_insert(c: sqlite3.Connection, sql: str, rows: Sequence[Sequence[object]],
                sizes: Iterable[int], bases: Iterable[str]) -> None:
    """`c.executemany(sql, rows)` into msgs inside the caller's write transaction, with the usage
    the insert trigger would keep. From BULK_ROWS rows the trigger is dropped for the statement and
    its work done once (a first SELECT of 100,000 messages spent 0.6 s in 100,000 trigger runs);
    the drop, the insert, the totals and the re-created trigger commit or roll back together, and
    a writer in another process waits on the same write lock, so nobody sees the table without it.
    The delete trigger still counts rows an INSERT OR REPLACE displaces. `sizes` and `bases` are
    the rows' size and base columns."""
    if len(rows) < BULK_ROWS:
        c.executemany(sql, rows)
        return
    c.execute("DROP TRIGGER IF EXISTS quota_msgs_insert")
    c.executemany(sql, rows)
    c.execute("UPDATE quota_usage SET bytes = bytes + ?, messages = messages + ? WHERE id = 1",
              (sum(sizes), len(rows)))
    pending = {b for (b,) in c.execute("SELECT base FROM quota_pending")}
    if pending:
        done = pending & set(bases)
        c.executemany("DELETE FROM quota_pending WHERE base = ?", [(b,) for b in done])
    c.execute(_INSERT_TRIGGER)


@dataclass(frozen=True, slots=True)
class Usage:
    bytes: int
    messages: int
    limit: int | None = None  # bytes; None: no quota

    @property
    def percent(self) -> int:
        return 100 * self.bytes // self.limit if self.limit else 0

    @property
    def kib(self) -> int:
        """RFC 9208 §5.1: STORAGE is counted in units of 1024 octets."""
        return self.bytes // 1024


def usage(conn: sqlite3.Connection, maildir: Path | None = None) -> tuple[int, int]:
    """(bytes, messages) of the index plus the reservations of deliveries not yet indexed, plus (with
    `maildir`) the files waiting in new/ that neither knows (`unindexed`)."""
    r = conn.execute("SELECT bytes, messages FROM quota_usage WHERE id = 1").fetchone()
    p = conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM quota_pending").fetchone()
    u = unindexed(conn, maildir) if maildir is not None else (0, 0)
    return (r[0] if r else 0) + p[0] + u[0], (r[1] if r else 0) + p[1] + u[1]


def unindexed(conn: sqlite3.Connection, maildir: Path) -> tuple[int, int]:
    """(bytes, files) in the new/ of every folder that the index has not seen yet and no reservation
    covers: delivered before the user had a quota, or by another program. Their size is the `,S=`
    of the name (else a stat); a folder whose new/ the index has seen since it last changed is skipped."""
    total = count = 0
    pending: set[str] | None = None
    try:
        dirs = [("INBOX", maildir)] + [(n, maildir / n) for n in os.listdir(maildir) if n.startswith(".")
                                       and n not in (".", "..") and os.path.isdir(maildir / n / "new")]
    except OSError:
        return 0, 0
    for name, d in dirs:
        try:
            mtime = os.stat(d / "new").st_mtime_ns
            names = [n for n in os.listdir(d / "new") if n[0] != "."]
        except OSError:
            continue
        if not names:
            continue
        folder = name if name == "INBOX" else _folder_name(name)
        row = conn.execute("SELECT id, new_mtime, trusted FROM folders WHERE name = ?", (folder,)).fetchone() \
            if folder is not None else None
        if row is not None and row[2] and row[1] == mtime:
            continue  # the index has seen this new/ as it is
        if pending is None:
            pending = {b for (b,) in conn.execute("SELECT base FROM quota_pending")}
        known = {b for (b,) in conn.execute("SELECT base FROM msgs WHERE folder = ? AND sub = 0", (row[0],))} \
            if row is not None else set()
        for n in names:
            base = n.partition(":")[0]
            if base in pending or base in known:
                continue
            m = _S_RE.search(base)
            if m is not None:
                size = int(m.group(1))
            else:
                try:
                    size = os.stat(d / "new" / n).st_size
                except OSError:
                    continue
            total += size
            count += 1
    return total, count


_S_RE = re.compile(r",S=(\d{1,15})")


def _folder_name(dirname: str) -> str | None:
    """The folder name of a Maildir++ directory (".Name", modified UTF-7), as the index keys it."""
    try:
        return mutf7_decode(dirname[1:])
    except Mutf7Error:
        return None


def check(conn: sqlite3.Connection, limit: int | None, size: int, maildir: Path | None = None) -> None:
    """Raise OverQuota when `size` more bytes would take the usage over `limit`."""
    if limit is not None and usage(conn, maildir)[0] + size > limit:
        raise OverQuota("quota exceeded")


@contextlib.contextmanager
def _tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def reserve(conn: sqlite3.Connection, limit: int | None, key: str, folder: str, size: int,
            maildir: Path | None = None) -> None:
    """Check and record `size` bytes on their way in under `key` (a file's base name), in one write
    transaction: two writers at once see each other's reservation. Raises OverQuota. With `maildir`,
    unindexed files in new/ count too."""
    if limit is None:
        return
    with _tx(conn):
        check(conn, limit, size, maildir)
        conn.execute("INSERT OR REPLACE INTO quota_pending(base, folder, size, created) VALUES (?, ?, ?, ?)",
                     (key, folder, size, int(time.time())))


def warning_due(conn: sqlite3.Connection, limit: int, maildir: Path) -> int | None:
    """The WARN_LEVELS percentage the usage has newly reached (recorded as warned), or None. Once per
    crossing: a level warned of is re-armed when the usage went below it since (triggers keep `low`)."""
    with _tx(conn):
        used = usage(conn, maildir)[0]
        row = conn.execute("SELECT warned, low FROM quota_usage WHERE id = 1").fetchone()
        if row is None:
            return None
        warned, low = row
        if warned and low is not None and low * 100 < warned * limit:  # went below since the warning
            warned = max((lv for lv in WARN_LEVELS if low * 100 >= lv * limit), default=0)
        level = max((lv for lv in WARN_LEVELS if used * 100 >= lv * limit), default=0)
        if level > warned:
            conn.execute("UPDATE quota_usage SET warned = ?, low = ? WHERE id = 1", (level, used))
            return level
        if (warned, low) != tuple(row) or (warned and low is not None and used < low):
            conn.execute("UPDATE quota_usage SET warned = ?, low = ? WHERE id = 1",
                         (warned, min(used, low) if warned and low is not None else (used if warned else None)))
        return None


def release(conn: sqlite3.Connection, key: str) -> None:
    """Drop a reservation (the write failed, or a COPY's rows are indexed)."""
    with contextlib.suppress(sqlite3.Error):
        conn.execute("DELETE FROM quota_pending WHERE base = ?", (key,))


def prune_pending(conn: sqlite3.Connection, maildir: Path, now: float | None = None) -> int:
    """Drop reservations older than PENDING_TTL whose file is not waiting in new/ (a delivery that
    crashed before its rename, or a file another program removed before it was indexed)."""
    cut = int((now if now is not None else time.time()) - PENDING_TTL)
    old = conn.execute("SELECT base, folder FROM quota_pending WHERE created < ?", (cut,)).fetchall()
    gone = []
    for base, folder in old:
        d = maildir / folder if folder else maildir
        if not os.path.exists(d / "new" / base):
            gone.append(base)
    if gone:
        with _tx(conn):
            conn.executemany("DELETE FROM quota_pending WHERE base = ?", [(b,) for b in gone])
    return len(gone)


def usage_of_index(index_path: Path, limit: int | None = None, maildir: Path | None = None) -> Usage:
    """A user's usage read from their index file (no index yet: nothing indexed), with `maildir` the
    files waiting in new/ too."""
    if not index_path.exists():
        b, m = _no_index(maildir) if maildir is not None else (0, 0)
        return Usage(b, m, limit)
    conn = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True, timeout=30)
    try:
        try:
            b, m = usage(conn, maildir)
        except sqlite3.OperationalError:  # an index older than quotas: not opened since
            r = conn.execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM msgs").fetchone()
            b, m = r[0], r[1]
        return Usage(b, m, limit)
    finally:
        conn.close()


def unindexed_bytes(maildir: Path) -> int:
    """Bytes waiting in new/ of a user who has no index yet."""
    return _no_index(maildir)[0] if maildir.is_dir() else 0


def _no_index(maildir: Path) -> tuple[int, int]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.executescript("CREATE TABLE folders (id, name, new_mtime, trusted); CREATE TABLE msgs (folder, base);"
                           " CREATE TABLE quota_pending (base);")
        return unindexed(conn, maildir)
    finally:
        conn.close()


# -- sizes as the admin writes them ------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int | None:
    """"500M", "1G", "2048K", "12345" (bytes; binary units) -> bytes; "none" / "0" -> None (no quota)."""
    if text.strip().lower() in ("none", "0", "unlimited"):
        return None
    m = _SIZE_RE.match(text)
    if m is None:
        raise ValueError(f"not a size: {text!r} (e.g. 500M, 1G, none)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0 or n >= 1 << 62:
        raise ValueError(f"size out of range: {text!r}")
    return n


def user_usages(mail_root: Path, users: Iterable[User]) -> Iterator[tuple[User, Usage]]:
    """Each Maildir user's usage as of their index's last rescan (plus files waiting in new/)."""
    for u in users:
        if u.mailbox_format != "maildir":
            continue
        try:
            yield u, usage_of_index(u.home(mail_root) / INDEX_NAME, u.quota, u.maildir(mail_root))
        except (sqlite3.Error, OSError):
            continue


def user_usage_line(mail_root: Path, user: User) -> str:
    """"12.5M/500M (2%), 31 messages" for `postier user list` (as of the index's last rescan)."""
    if user.mailbox_format != "maildir":
        return "mbox (no usage count)"
    try:
        u = usage_of_index(user.home(mail_root) / INDEX_NAME, user.quota, user.maildir(mail_root))
    except (sqlite3.Error, OSError) as exc:
        return f"usage unknown ({exc})"
    used = format_size(u.bytes)
    if u.limit is None:
        return f"{used}/unlimited, {u.messages} messages"
    return f"{used}/{format_size(u.limit)} ({u.percent}%), {u.messages} messages"


def format_size(n: int) -> str:
    for unit, factor in (("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= factor:
            v = n / factor
            return f"{v:.0f}{unit}" if v == int(v) or v >= 100 else f"{v:.1f}{unit}"
    return f"{n}B"
