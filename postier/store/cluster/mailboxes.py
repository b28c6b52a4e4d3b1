"""One user's folders in cluster mode: the `store.api.Mailboxes` interface (RFC 9051 mailboxes, RFC
7162 MODSEQ) over PostgreSQL, with message bodies in the object store (`store.cluster.bodies`).

Each method is one transaction. A write takes the folder's row first (`SELECT ... FOR UPDATE`, then
`UPDATE folders SET uidnext = uidnext + n, highestmodseq = highestmodseq + 1 ... RETURNING`), so the
writers of one folder, on any node, queue on that row and commit in the order they drew their UIDs
and MODSEQs. A body is put in the object store, and confirmed, before the transaction that makes it
visible; every write also sends a NOTIFY (delivered at commit) that wakes IDLE sessions on every node.

Names are checked by the Maildir store's `normalize_name` (one set of rules for both modes). When
PostgreSQL or the object store cannot be reached, a method raises `StoreUnavailable` and nothing
is acknowledged. Per process, the UID array of each open folder is kept (`_State`) and reloaded only
when the folder's HIGHESTMODSEQ moved, which every change to its messages does.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import tempfile
import threading
import time
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Concatenate, cast

import psycopg
import psycopg_pool

from ...message.types import MEMORY_DATA_LIMIT, User
from ...message.mime import header_end, header_section
from ...message.textscan import LAYOUT_KIND, ReadAt, layout_at
from ...proto.crlf import to_crlf
from ..api import (
    RENAMES_KEPT,
    CopyResult,
    FlagTable,
    FolderInfo,
    FolderSnapshot,
    MessageRow,
    NamesView,
    PopMessage,
    StatusInfo,
    StoreResult,
    renames_after,
)
from ..errors import (
    MailboxExists,
    MailboxNotFound,
    MessageGone,
    NotPermitted,
    OverQuota,
    StoreError,
    StoreLimit,
    StoreUnavailable,
    UnknownSpecialUse,
)
from ..index import CACHE_ITEM_LIMIT, FLAG_DELETED, FLAG_SEEN, names_to_flags, plan_store
from ..maildir import SpoolFile
from ..fts import CATCH_UP, searchable
from ..quota import WARN_LEVELS, Usage
from ..mailbox import DEFAULT_SPECIAL_USE, INBOX, SEPARATOR, SPECIAL_USES, normalize_name
from . import fulltext
from . import cache as views
from .bodies import BodyStore, RangedBody, SpooledSource
from .gc import mark
from .schema import CHANNEL

__all__ = ["FLAGS_INFO", "ClusterMailboxes"]

#: `delivery_suffix`'s answer: this, then the flag names separated by spaces (not a Maildir suffix)
FLAGS_INFO = "flags:"
MAX_KEYWORDS = 1000  # per folder, as the Maildir store (RFC 9051 §2.3.2 lets a server limit them)
_MSG_COLS = "uid, body, flags, keywords, modseq, size, idate"
type Conn = psycopg.Connection[tuple[Any, ...]]
log = logging.getLogger("postier.store")

_HEADS_PENDING = 500  # header blocks read from the object store, kept together at most this many

@dataclass
class _State:
    fid: int
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: array[int]
    version: int
    special_use: str
    keywords: tuple[str, ...]
    flagtab: FlagTable | None = None  # every message's flags, aligned with flagtab.uids (`flag_table`)
    flag_hms: int = 0  # the folder's HIGHESTMODSEQ when flagtab was last brought up to date
    flag_gone: array[int] | None = None  # a UID list with a message expunged since: no table for it


class _ViewGone(Exception):
    """A message of the UID list a flag table was asked for is expunged (`flag_table`)."""


def _quota_key(owner: str) -> int:
    """The transaction advisory-lock key that queues one user's quota-checked writes."""
    return int.from_bytes(hashlib.sha256(b"quota\x1f" + owner.encode()).digest()[:8], "big", signed=True)


def _row(r: tuple[Any, ...]) -> MessageRow:
    # base is the body's SHA-256: the key in the object store (no Maildir file, no line-end question)
    return MessageRow(r[0], r[1], 0, "", r[2], r[3], r[4], r[5], r[6], 0)


def _op[**P, R](fn: Callable[Concatenate[ClusterMailboxes, P], R]) -> Callable[Concatenate[ClusterMailboxes, P], R]:
    """Hold the per-process lock (the cached states) and turn lost connections into StoreUnavailable."""
    def wrapper(self: ClusterMailboxes, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.lock:
            try:
                return fn(self, *args, **kwargs)
            except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
                self.states.clear()
                raise StoreUnavailable("mail storage unavailable, try again later") from exc
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class ClusterMailboxes:
    """Every folder of one user, in PostgreSQL and the object store. All public methods block."""

    def __init__(self, user: User, pool: psycopg_pool.ConnectionPool[Any], bodies: BodyStore,
                 special_use_folders: Sequence[str] = tuple(DEFAULT_SPECIAL_USE)):
        self.user = user
        self.owner = user.address
        self.pool = pool
        self.bodies = bodies
        self.special_use_folders = tuple(special_use_folders)
        self.lock = threading.RLock()
        self.states: dict[str, _State] = {}
        self.refs = 0
        self._defaults_done = False
        # header blocks read from the object store, kept at the next flush_meta (one transaction),
        # and the bodies the last peek_headers found without one (read_header then asks no more)
        self._heads_lock = threading.Lock()
        self._new_heads: dict[str, bytes] = {}
        self._headless: set[str] = set()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[Conn]:
        """One transaction on a pooled connection: committed on success, rolled back on error."""
        with self.pool.connection() as conn:
            yield conn

    def _notify(self, conn: Conn, name: str) -> None:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.owner}\x1f{name}"))

    def _fid(self, conn: Conn, name: str, lock: bool = False) -> tuple[int, int, tuple[str, ...]]:
        """(id, uidvalidity, keywords) of a folder; with `lock`, its row is held until commit."""
        r = conn.execute("SELECT id, uidvalidity, keywords FROM folders WHERE owner=%s AND name=%s"
                         + (" FOR UPDATE" if lock else ""), (self.owner, name)).fetchone()
        if r is None:
            raise MailboxNotFound("no such mailbox")
        return r[0], r[1], tuple(r[2])

    def _default_use(self, name: str) -> str:
        return DEFAULT_SPECIAL_USE.get(name, "") if name in self.special_use_folders else ""

    # -- folders --------------------------------------------------------------------------------

    @_op
    def ensure_defaults(self) -> None:
        if self._defaults_done:
            return
        with self._tx() as conn:
            conn.execute("INSERT INTO folders (owner, name) VALUES (%s, %s) ON CONFLICT DO NOTHING",
                         (self.owner, INBOX))
            for name in self.special_use_folders:
                try:
                    name = normalize_name(name)
                except StoreError:  # a configured name that cannot be a folder: skipped, as in Maildir mode
                    continue
                cur = conn.execute("INSERT INTO folders (owner, name, special_use) VALUES (%s, %s, %s) "
                                   "ON CONFLICT DO NOTHING RETURNING id", (self.owner, name, self._default_use(name)))
                if cur.fetchone() is not None:
                    conn.execute("INSERT INTO subscriptions VALUES (%s, %s) ON CONFLICT DO NOTHING", (self.owner, name))
        self._defaults_done = True

    @_op
    def list_folders(self) -> list[FolderInfo]:
        with self._tx() as conn:
            rows = conn.execute("SELECT name, special_use FROM folders WHERE owner=%s", (self.owner,)).fetchall()
        names = {n: u for n, u in rows}
        out = [FolderInfo(INBOX, "")]
        out += [FolderInfo(n, names[n] or self._default_use(n)) for n in sorted(names) if n != INBOX]
        return out

    @_op
    def create(self, name: str, special_use: str | None = None) -> None:
        n = normalize_name(name)
        if special_use is not None and special_use not in SPECIAL_USES:
            raise UnknownSpecialUse(f"unknown special-use attribute {special_use}")
        if n == INBOX:
            raise MailboxExists("mailbox already exists")
        with self._tx() as conn:
            got = conn.execute("INSERT INTO folders (owner, name, special_use) VALUES (%s, %s, %s) "
                               "ON CONFLICT DO NOTHING RETURNING id",
                               (self.owner, n, special_use or self._default_use(n))).fetchone()
            if got is None:
                raise MailboxExists("mailbox already exists")
            self._notify(conn, n)

    @_op
    def delete(self, name: str) -> None:
        n = normalize_name(name)
        if n == INBOX:
            raise NotPermitted("INBOX cannot be deleted")
        with self._tx() as conn:
            if conn.execute("DELETE FROM folders WHERE owner=%s AND name=%s RETURNING id",
                            (self.owner, n)).fetchone() is None:
                raise MailboxNotFound("no such mailbox")
            self._notify(conn, n)
        self.states.pop(n, None)

    @_op
    def rename(self, old: str, new: str) -> None:
        o, n = normalize_name(old), normalize_name(new)
        if n == INBOX:
            raise MailboxExists("mailbox already exists")
        if n.startswith(o + SEPARATOR):
            raise NotPermitted("cannot rename a mailbox into itself")
        with self._tx() as conn:
            # The rename log's number first: the head row queues the user's renames until commit, so
            # their numbers are in commit order and a snapshot holding one holds every earlier one.
            head = conn.execute("INSERT INTO rename_heads VALUES (%s, 1) ON CONFLICT (owner) DO UPDATE "
                                "SET seq = rename_heads.seq + 1 RETURNING seq", (self.owner,)).fetchone()
            assert head is not None
            seq = head[0]
            self._fid(conn, o, lock=True)
            if conn.execute("SELECT 1 FROM folders WHERE owner=%s AND name=%s", (self.owner, n)).fetchone():
                raise MailboxExists("mailbox already exists")
            if o == INBOX:  # RFC 9051 §6.3.6: the messages move to the new name, INBOX stays, empty
                conn.execute("UPDATE folders SET name=%s WHERE owner=%s AND name=%s", (n, self.owner, INBOX))
                conn.execute("INSERT INTO folders (owner, name) VALUES (%s, %s)", (self.owner, INBOX))
            else:  # the folder and its sub-folders, and their subscriptions (RFC 9051 §6.3.6)
                under = "owner=%s AND (name=%s OR left(name, %s) = %s)"
                args = (self.owner, o, len(o) + 1, o + SEPARATOR)
                moves = [(a, n + a[len(o):]) for (a,) in conn.execute(f"SELECT name FROM folders WHERE {under}", args)]
                targets = [normalize_name(b) for _a, b in moves]  # depth and length limits of the new names
                if conn.execute("SELECT 1 FROM folders WHERE owner=%s AND name = ANY(%s)",
                                (self.owner, targets)).fetchone():
                    raise MailboxExists("a target mailbox already exists")
                conn.execute(f"UPDATE folders SET name = %s || substr(name, %s) WHERE {under}", (n, len(o) + 1, *args))
                conn.execute("DELETE FROM subscriptions WHERE owner=%s AND name = ANY(%s)", (self.owner, targets))
                conn.execute(f"UPDATE subscriptions SET name = %s || substr(name, %s) WHERE {under}",
                             (n, len(o) + 1, *args))
            # RFC 5465 §5.4 OLDNAME: logged in the transaction that renames, the last RENAMES_KEPT kept
            conn.execute("INSERT INTO renames VALUES (%s, %s, %s, %s)", (self.owner, seq, o, n))
            conn.execute("DELETE FROM renames WHERE owner=%s AND seq <= %s", (self.owner, seq - RENAMES_KEPT))
            self._notify(conn, o)
        self.states.clear()

    @_op
    def subscriptions(self) -> list[str]:
        with self._tx() as conn:
            return [n for (n,) in conn.execute("SELECT name FROM subscriptions WHERE owner=%s ORDER BY name",
                                               (self.owner,))]

    @_op
    def names_since(self, cursor: int | None) -> NamesView:
        """The folders, subscriptions and renames after `cursor` in one REPEATABLE READ snapshot: a
        rename's new names are listed if and only if its log row is read (RFC 5465 §5.4)."""
        with self._tx() as conn:
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            folders = [n for (n,) in conn.execute("SELECT name FROM folders WHERE owner=%s", (self.owner,))]
            subs = [n for (n,) in conn.execute("SELECT name FROM subscriptions WHERE owner=%s ORDER BY name",
                                               (self.owner,))]
            r = conn.execute("SELECT seq FROM rename_heads WHERE owner=%s", (self.owner,)).fetchone()
            head = r[0] if r else 0
            rows: list[tuple[int, str, str]] = []
            if cursor is not None and cursor < head:
                rows = [(a, b, c) for a, b, c in conn.execute(
                    "SELECT seq, old, new FROM renames WHERE owner=%s AND seq > %s ORDER BY seq", (self.owner, cursor))]
        names = sorted(n for n in folders if n != INBOX)
        return NamesView(head, [INBOX, *names], subs, renames_after(cursor, head, rows))  # as list_folders

    @_op
    def subscribe(self, name: str, on: bool = True) -> None:
        n = normalize_name(name)
        with self._tx() as conn:
            if on:
                self._fid(conn, n)
                conn.execute("INSERT INTO subscriptions VALUES (%s, %s) ON CONFLICT DO NOTHING", (self.owner, n))
            else:
                conn.execute("DELETE FROM subscriptions WHERE owner=%s AND name=%s", (self.owner, n))

    @_op
    def status(self, name: str) -> StatusInfo:
        n = normalize_name(name)
        with self._tx() as conn:
            st = self._load(conn, n)
            r = conn.execute("SELECT count(*), count(*) FILTER (WHERE flags & %s = 0), "
                             "count(*) FILTER (WHERE flags & %s != 0), coalesce(sum(size), 0), "
                             "count(*) FILTER (WHERE uid >= (SELECT recent_uid FROM folders WHERE id=%s)), "
                             "coalesce(sum(size) FILTER (WHERE flags & %s != 0), 0) "
                             "FROM messages WHERE folder=%s",
                             (FLAG_SEEN, FLAG_DELETED, st.fid, FLAG_DELETED, st.fid)).fetchone()
        assert r is not None
        return StatusInfo(r[0], r[1], r[2], int(r[3]), st.uidnext, st.uidvalidity, st.highestmodseq, r[4], int(r[5]))

    @_op
    def exists(self, name: str) -> bool:
        n = normalize_name(name)
        with self._tx() as conn:
            return conn.execute("SELECT 1 FROM folders WHERE owner=%s AND name=%s", (self.owner, n)).fetchone() is not None

    @_op
    def quota_usage(self) -> Usage:
        """RFC 9208 STORAGE and MESSAGE usage: every message of the user, in every folder."""
        with self._tx() as conn:
            r = conn.execute("SELECT coalesce(sum(m.size), 0), count(*) FROM messages m JOIN folders f ON f.id = m.folder "
                             "WHERE f.owner=%s", (self.owner,)).fetchone()
        assert r is not None
        return Usage(int(r[0]), int(r[1]), self.user.quota)

    @_op
    def quota_warning_due(self) -> int | None:
        """The WARN_LEVELS percentage the usage newly reached (recorded as warned), or None: once per
        crossing, as `store.quota.warning_due` in Maildir mode. A level is re-armed when a check
        finds the usage below it (checks follow deliveries: PostgreSQL has no trigger keeping the
        lowest usage since the warning, as the Maildir index has)."""
        limit = self.user.quota
        if not limit:
            return None
        with self._tx() as conn:
            conn.execute("INSERT INTO quota_warned (owner) VALUES (%s) ON CONFLICT DO NOTHING", (self.owner,))
            r = conn.execute("SELECT warned, low FROM quota_warned WHERE owner=%s FOR UPDATE", (self.owner,)).fetchone()
            assert r is not None
            used = self._used(conn)
            warned, low = int(r[0]), r[1]
            low = used if low is None else min(int(low), used)
            if warned and low * 100 < warned * limit:  # went below since the warning
                warned = max((lv for lv in WARN_LEVELS if low * 100 >= lv * limit), default=0)
            level = max((lv for lv in WARN_LEVELS if used * 100 >= lv * limit), default=0)
            due = level if level > warned else None
            # the lowest usage seen since the warning (reset to now when one is given)
            conn.execute("UPDATE quota_warned SET warned=%s, low=%s WHERE owner=%s",
                         (level if due else warned, used if due else low, self.owner))
        return due

    @_op
    def text_search(self, name: str, queries: Sequence[tuple[str, str]]) -> tuple[list[set[int]], set[int]] | None:
        """The full-text index's answer to each (field, needle) query (as `UserMailbox.text_search`):
        the UIDs whose text contains the needle among the messages it covers, and the UIDs it does
        not cover (for the matcher). Up to CATCH_UP bodies of the folder without a row get one first
        (store.cluster.fulltext)."""
        if not queries or not all(searchable(f, n) for f, n in queries):
            return None
        n = normalize_name(name)
        with self._tx() as conn:
            fid = self._state(conn, n).fid
        try:
            got = self._text_answer(fid, queries)
            # bodies without a row (stored before the index): the next CATCH_UP get one, then ask again
            if got[1] and fulltext.catch_up(self._tx, self.bodies, fid, CATCH_UP):
                got = self._text_answer(fid, queries)
            return got
        except (psycopg.errors.ProgrammingError, psycopg.errors.DataError) as exc:
            log.warning("full-text search of %s not used: %s", self.owner, exc)
            return None

    def _text_answer(self, fid: int, queries: Sequence[tuple[str, str]]) -> tuple[list[set[int]], set[int]]:
        with self._tx() as conn:  # hits and the uncovered UIDs from one snapshot
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            return fulltext.answer(conn, fid, queries)

    @_op
    def rebuild_text_index(self) -> int:
        """Rewrite the full-text rows of every body of the user (`postier reindex`); returns the count."""
        return fulltext.rebuild(self._tx, self.bodies, self.owner)

    def watch_path(self, name: str) -> Path | None:
        return None  # changes arrive by LISTEN/NOTIFY (store.cluster.store.ClusterNotifier)

    # -- the state of one folder ----------------------------------------------------------------

    def _load(self, conn: Conn, name: str) -> _State:
        r = conn.execute("SELECT id, uidvalidity, uidnext, highestmodseq, special_use, keywords FROM folders "
                         "WHERE owner=%s AND name=%s", (self.owner, name)).fetchone()
        if r is None:
            self.states.pop(name, None)
            raise MailboxNotFound("no such mailbox")
        fid, uidvalidity, uidnext, hms, use, kws = r
        st = self.states.get(name)
        if st is not None and st.fid == fid and st.uidvalidity == uidvalidity:
            if st.highestmodseq == hms:
                return st
            uids = self._catch_up(conn, st)
        else:
            uids = array("I", [u for (u,) in conn.execute("SELECT uid FROM messages WHERE folder=%s ORDER BY uid",
                                                          (fid,))])
        if st is None or st.fid != fid or st.uidvalidity != uidvalidity:
            st = _State(fid, uidvalidity, uidnext, hms, uids, 1, use or self._default_use(name), tuple(kws))
            self.states[name] = st
            return st
        if uids != st.uids:
            st.uids = uids  # replaced, never changed in place: sessions keep the array they announced
            st.version += 1
        st.uidnext, st.highestmodseq, st.keywords = uidnext, hms, tuple(kws)
        st.special_use = use or self._default_use(name)
        return st

    @staticmethod
    def _catch_up(conn: Conn, st: _State) -> array[int]:
        """The folder's UID list now, from the one this node holds and the changes since its MODSEQ,
        instead of the whole list again (what a NOOP in a busy large folder would otherwise cost):
        the UIDs expunged since (their tombstones carry the MODSEQ of the expunge) go, and the UIDs
        above the highest one held come. Nothing in between can be missing: a folder's UIDs are
        allocated by updating its row, so they commit in UID order (RFC 9051 §2.3.1.1: UIDs only
        grow), and tombstones are never pruned while the folder lives."""
        gone = {u for (u,) in conn.execute("SELECT uid FROM expunged WHERE folder=%s AND modseq > %s",
                                           (st.fid, st.highestmodseq))}
        last = st.uids[-1] if st.uids else 0
        new = [u for (u,) in conn.execute("SELECT uid FROM messages WHERE folder=%s AND uid > %s ORDER BY uid",
                                          (st.fid, last))]
        if not gone and not new:
            return st.uids  # only flags changed: the same list
        kept = array("I", (u for u in st.uids if u not in gone)) if gone else array("I", st.uids)
        kept.extend(u for u in new if u not in gone)
        return kept

    def _state(self, conn: Conn, name: str) -> _State:
        st = self.states.get(name)
        return st if st is not None else self._load(conn, normalize_name(name))

    @staticmethod
    def _snap(name: str, st: _State) -> FolderSnapshot:
        return FolderSnapshot(name, st.uidvalidity, st.uidnext, st.highestmodseq, st.uids, st.version,
                              st.special_use, st.keywords)

    @_op
    def snapshot(self, name: str, sync: bool = True) -> FolderSnapshot:
        n = normalize_name(name)
        st = self.states.get(n)
        if sync or st is None:
            with self._tx() as conn:
                st = self._load(conn, n)
        return self._snap(n, st)

    def _claim(self, conn: Conn, fid: int) -> int:
        r = conn.execute("UPDATE folders f SET recent_uid = f.uidnext FROM "
                         "(SELECT recent_uid FROM folders WHERE id=%s FOR UPDATE) old "
                         "WHERE f.id=%s RETURNING old.recent_uid", (fid, fid)).fetchone()
        assert r is not None
        return int(r[0])

    @_op
    def select(self, name: str, claim_recent: bool, want_unseen: bool) -> tuple[FolderSnapshot, int, int | None]:
        n = normalize_name(name)
        with self._tx() as conn:
            st = self._load(conn, n)
            if claim_recent:  # RFC 3501 §2.3.2: one session sees a message as \Recent
                recent = self._claim(conn, st.fid)
            else:
                r = conn.execute("SELECT recent_uid FROM folders WHERE id=%s", (st.fid,)).fetchone()
                recent = int(r[0]) if r else st.uidnext
            first = None
            if want_unseen:
                first = conn.execute("SELECT min(uid) FROM messages WHERE folder=%s AND flags & %s = 0",
                                     (st.fid, FLAG_SEEN)).fetchone()[0]  # type: ignore[index]
        return self._snap(n, st), recent, first

    @_op
    def claim_recent(self, name: str) -> int:
        with self._tx() as conn:
            return self._claim(conn, self._load(conn, normalize_name(name)).fid)

    @_op
    def at_once[T](self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)`: each call is its own transaction here (PostgreSQL orders them)."""
        return fn(*args)

    @_op
    def changed_since(self, name: str, modseq: int, max_uid: int | None = None) -> list[tuple[int, int, str, int]]:
        with self._tx() as conn:
            st = self._state(conn, name)
            return [tuple(r) for r in conn.execute(
                "SELECT uid, flags, keywords, modseq FROM messages WHERE folder=%s AND modseq > %s "
                "AND uid <= %s ORDER BY uid", (st.fid, modseq, max_uid if max_uid is not None else 2**32))]

    @_op
    def vanished_since(self, name: str, modseq: int) -> list[int] | None:
        with self._tx() as conn:  # every tombstone is kept (RFC 7162 §3.2.5.1 allows fewer)
            st = self._state(conn, name)
            return [u for (u,) in conn.execute("SELECT uid FROM expunged WHERE folder=%s AND modseq > %s ORDER BY uid",
                                               (st.fid, modseq))]

    # -- reading messages -----------------------------------------------------------------------

    @_op
    def rows(self, name: str, uids: Iterable[int]) -> dict[int, MessageRow]:
        with self._tx() as conn:
            st = self._state(conn, name)
            return {r[0]: _row(r) for r in conn.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE folder=%s AND uid = ANY(%s)", (st.fid, list(uids)))}

    @_op
    def rows_between(self, name: str, lo: int, hi: int) -> dict[int, MessageRow]:
        with self._tx() as conn:
            st = self._state(conn, name)
            return {r[0]: _row(r) for r in conn.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE folder=%s AND uid BETWEEN %s AND %s ORDER BY uid",
                (st.fid, lo, hi))}

    @_op
    def flag_rows(self, name: str, lo: int, hi: int) -> list[tuple[int, int, str, int]]:
        with self._tx() as conn:
            st = self._state(conn, name)
            return [tuple(r) for r in conn.execute(
                "SELECT uid, flags, keywords, modseq FROM messages WHERE folder=%s AND uid BETWEEN %s AND %s "
                "ORDER BY uid", (st.fid, lo, hi))]

    @_op
    def flag_table(self, name: str, view: array[int], need_modseq: bool = False) -> FlagTable | None:
        """A copy of the folder's flag table when `view` (the UID array a session announced) is this
        node's UID list of the folder and none of its messages was expunged since, else None (the
        caller then asks `flag_rows`). Kept per node with the HIGHESTMODSEQ it is exact for: a FETCH
        reads the folder's row (one statement) and, only when that moved, the changes since (one
        more: rows whose MODSEQ passed it, and tombstones), instead of every message's flags. As
        exact as reading the rows: every change to a message gives it the folder's new MODSEQ, and
        the writers of a folder commit in MODSEQ order (the folder row is theirs until commit), so
        the rows above the MODSEQ read hold every change up to it (later ones, read early, are read
        again next time). Modseqs are always kept (`need_modseq` is for stores that build them late)."""
        n = normalize_name(name)
        st = self.states.get(n)
        if st is None or st.uids is not view or st.flag_gone is view:
            return None  # the last: a message of it is gone for good, the rows answer without asking again
        with self._tx() as conn:
            r = conn.execute("SELECT highestmodseq, uidvalidity FROM folders WHERE id=%s", (st.fid,)).fetchone()
            if r is None or r[1] != st.uidvalidity:
                return None
            hms = int(r[0])
            tab = st.flagtab
            try:
                if tab is not None and (hms != st.flag_hms or tab.uids is not view):
                    tab = self._update_flags(conn, st.fid, tab, st.flag_hms, view)
                if tab is None:
                    tab = self._build_flags(conn, st.fid, view)
            except _ViewGone:
                st.flagtab, st.flag_gone = None, view
                return None
        st.flagtab, st.flag_hms = tab, hms
        assert tab.modseq is not None
        return FlagTable(tab.uids, array("B", tab.flags), dict(tab.keywords), array("Q", tab.modseq))

    @staticmethod
    def _build_flags(conn: Conn, fid: int, view: array[int]) -> FlagTable:
        """Every message's flags, read whole (UIDs above `view` are new messages, not in the table);
        _ViewGone when a message of `view` is gone."""
        n = len(view)
        rows = conn.execute("SELECT uid, flags, keywords, modseq FROM messages WHERE folder=%s AND uid <= %s "
                            "ORDER BY uid", (fid, view[-1] if n else 0)).fetchall()
        if len(rows) != n or any(r[0] != u for r, u in zip(rows, view, strict=True)):
            raise _ViewGone
        return FlagTable(view, array("B", [r[1] for r in rows]), {r[0]: r[2] for r in rows if r[2]},
                         array("Q", [r[3] for r in rows]))

    @staticmethod
    def _update_flags(conn: Conn, fid: int, tab: FlagTable, since: int, view: array[int]) -> FlagTable | None:
        """`tab` brought up to date with the changes after MODSEQ `since` and extended to `view` when
        that is its UIDs and new ones above them (one statement: the rows changed or new, and the
        tombstones, from one snapshot); None when `view` is not such an extension (the caller then
        reads the table whole); _ViewGone when a message of `view` is gone."""
        old, k = tab.uids, len(tab.uids)
        if view is not old and (len(view) < k or view[:k] != old):
            return None
        assert tab.modseq is not None
        top, old_top = (view[-1] if view else 0), (old[-1] if k else 0)
        added: list[tuple[int, int, str, int]] = []
        for uid, flags, kws, modseq, gone in conn.execute(
                "SELECT uid, flags, keywords, modseq, false FROM messages WHERE folder=%s AND uid <= %s "
                "AND (modseq > %s OR uid > %s) UNION ALL "
                "SELECT uid, 0, '', modseq, true FROM expunged WHERE folder=%s AND modseq > %s AND uid <= %s "
                "ORDER BY 1", (fid, top, since, old_top, fid, since, top)):
            if uid > old_top:
                if not gone:
                    added.append((uid, flags, kws, modseq))
                continue  # a tombstone of a new message: the count below tells whether it was in `view`
            i = bisect_left(old, uid)
            if i == k or old[i] != uid:
                continue  # expunged before the table was made
            if gone:
                raise _ViewGone
            tab.flags[i], tab.modseq[i] = flags, modseq
            if kws:
                tab.keywords[uid] = kws
            else:
                tab.keywords.pop(uid, None)
        if len(added) != len(view) - k or any(r[0] != u for r, u in zip(added, view[k:], strict=True)):
            raise _ViewGone  # a new message of `view` expunged meanwhile
        if not added:
            return tab
        tab.flags.extend(r[1] for r in added)
        tab.modseq.extend(r[3] for r in added)
        tab.keywords.update((r[0], r[2]) for r in added if r[2])
        return FlagTable(view, tab.flags, tab.keywords, tab.modseq)

    def read(self, name: str, row: MessageRow) -> bytes:
        """The body as stored: CRLF line ends (converted when written)."""
        return self.bodies.get(row.base)

    def read_header(self, name: str, row: MessageRow, limit: int = 256 * 1024) -> bytes:
        """The header block (up to and including the empty line, at most `limit` bytes): the body's
        kept block (store.cluster.cache `body_heads`), else the first bytes of the object, from
        which the block is then kept (bodies stored before the table)."""
        with self._heads_lock:
            known_missing = row.base in self._headless
        kept = None if known_missing else self.peek_headers(name, [row]).get(row.uid)
        if kept is not None:
            return kept[:limit]  # what the reads below give: the block, cut at `limit`
        want = min(16384, limit)
        head = self.bodies.get(row.base, want)
        if header_end(head) < 0 and len(head) >= want and limit > want:
            want = limit
            head = self.bodies.get(row.base, limit)
        block = views.head_of(head, complete=len(head) < want)  # shorter than asked: the whole body
        if block is not None:
            with self._heads_lock:
                self._new_heads[row.base] = block
                full = len(self._new_heads) >= _HEADS_PENDING
            if full:
                self._flush_heads()
        return header_section(head)

    def peek_header(self, name: str, row: MessageRow, limit: int = 16384) -> bytes | None:
        """The kept header block when it has one of at most `limit` bytes, else None (the caller
        then uses `read_header`)."""
        head = self.peek_headers(name, [row]).get(row.uid)
        return head if head is not None and len(head) <= limit else None

    def peek_headers(self, name: str, rows: Iterable[MessageRow]) -> dict[int, bytes]:
        """uid -> kept header block (store.cluster.cache `body_heads`), in one query, for those of
        `rows` whose body has one: the same bytes `read_header` gives. PostgreSQL out of reach is
        StoreUnavailable; a missing table gives nothing (the object store answers)."""
        by_body: dict[str, list[int]] = {}
        for r in rows:
            by_body.setdefault(r.base, []).append(r.uid)
        if not by_body:
            return {}
        try:
            with self._tx() as conn:  # no user lock: the batches of one SEARCH read at once
                heads = views.get_heads(conn, list(by_body))
        except psycopg.errors.UndefinedTable as exc:
            log.warning("cluster: header blocks not readable: %s", exc)
            return {}
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            raise StoreUnavailable("mail storage unavailable, try again later") from exc
        with self._heads_lock:
            if len(self._headless) > _HEADS_PENDING * 10:
                self._headless.clear()
            self._headless.difference_update(heads)
            self._headless.update(b for b in by_body if b not in heads)
        return {u: head for body, head in heads.items() for u in by_body[body]}

    def _keep_heads(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Best effort, as `cache_put`: a block not kept is read from the object store next time."""
        try:
            with self._tx() as conn:
                views.put_heads(conn, items)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            log.warning("cluster: header blocks of %s not kept: %s", self.owner, exc)

    @_op
    def open_message(self, name: str, uid: int, partial: bool = False) -> IO[bytes] | None:
        """The message for reading in pieces (POP3 RETR/TOP, `import imap --verify`, a FETCH of a
        large message), or None when it is gone: up to MEMORY_DATA_LIMIT its bytes; a larger body
        read for parts of it (`partial`: a section, a partial range) is read by ranged GETs as they
        come (`RangedBody`), else downloaded in pieces into an unnamed temporary file
        (`BodyStore.download`: memory bounded by one piece, the SHA-256 checked), which the caller's
        close removes."""
        row = self.rows(name, [uid]).get(uid)
        if row is None:
            return None
        try:
            if row.size <= MEMORY_DATA_LIMIT:
                return io.BytesIO(self.bodies.get(row.base))
            if partial:
                return cast(IO[bytes], RangedBody(self.bodies, row.base, row.size))
            with tempfile.TemporaryDirectory(prefix="postier-open-") as work:
                path = Path(work) / "body"
                self.bodies.download(row.base, path)
                return open(path, "rb")  # noqa: SIM115 - closed by the caller; unnamed once `work` goes
        except MessageGone:
            return None

    def internal_date(self, name: str, row: MessageRow) -> int:
        return row.idate or 0

    @_op
    def cache_get(self, name: str, uids: Sequence[int], kind: str) -> dict[int, bytes]:
        """Parsed views shared by every node, keyed by body hash (store.cluster.cache). PostgreSQL
        out of reach is StoreUnavailable, as for the rows; a missing table is an empty cache."""
        try:
            with self._tx() as conn:
                return views.get(conn, self._state(conn, name).fid, uids, kind)
        except psycopg.errors.UndefinedTable as exc:
            log.warning("cluster: parsed-view cache not readable: %s", exc)
            return {}

    def cache_put(self, name: str, items: Sequence[tuple[int, str, bytes]]) -> None:
        """Best effort: a view not stored is computed again, so no failure here fails the FETCH."""
        if not items:
            return
        with self.lock:
            try:
                with self._tx() as conn:
                    views.put(conn, self._state(conn, name).fid, items)
            except (psycopg.Error, psycopg_pool.PoolTimeout, StoreError) as exc:
                log.warning("cluster: parsed views of %s not cached: %s", self.owner, exc)

    def flush_meta(self) -> None:
        """Keep the header blocks read from the object store since the last call (one transaction)."""
        with self._heads_lock:
            self._headless.clear()
        self._flush_heads()

    def _flush_heads(self) -> None:
        with self._heads_lock:
            items, self._new_heads = list(self._new_heads.items()), {}
        if items:
            self._keep_heads(items)

    # -- writing --------------------------------------------------------------------------------

    def _keywords(self, conn: Conn, fid: int, known: tuple[str, ...], kws: Sequence[str]) -> tuple[list[str], tuple[str, ...]]:
        """Keywords in the folder's spelling, registering new ones (the folder row is locked)."""
        by_lower = {k.lower(): k for k in known}
        new = [k for k in kws if k.lower() not in by_lower]
        if new:
            if len(known) + len(new) > MAX_KEYWORDS:
                raise StoreLimit("too many keywords in this mailbox")
            known = known + tuple(new)
            conn.execute("UPDATE folders SET keywords=%s WHERE id=%s", (list(known), fid))
            by_lower.update({k.lower(): k for k in new})
        return [by_lower[k.lower()] for k in kws], known

    @staticmethod
    def _allocate(conn: Conn, fid: int, n: int) -> tuple[int, int]:
        """(first UID, MODSEQ) for `n` new messages: drawn from the locked folder row, in this transaction."""
        r = conn.execute("UPDATE folders SET uidnext = uidnext + %s, highestmodseq = highestmodseq + 1 "
                         "WHERE id=%s RETURNING uidnext - %s, highestmodseq", (n, fid, n)).fetchone()
        assert r is not None
        if r[0] + n > 2**32 - 1:
            raise StoreLimit("no UIDs left in this mailbox")
        return int(r[0]), int(r[1])

    @staticmethod
    def _bump(conn: Conn, fid: int) -> int:
        r = conn.execute("UPDATE folders SET highestmodseq = highestmodseq + 1 WHERE id=%s RETURNING highestmodseq",
                         (fid,)).fetchone()
        assert r is not None
        return int(r[0])

    def _used(self, conn: Conn) -> int:
        r = conn.execute("SELECT coalesce(sum(m.size), 0) FROM messages m JOIN folders f ON f.id = m.folder "
                         "WHERE f.owner=%s", (self.owner,)).fetchone()
        assert r is not None
        return int(r[0])

    def _check_quota(self, conn: Conn, size: int) -> None:
        """RFC 9208 §4.1 (STORAGE): raise OverQuota when `size` more bytes would pass the user's limit.
        In a writing transaction, after its folder rows are locked: the user's transaction advisory
        lock (taken last, so never in a cycle with the folder rows) queues the user's writers on
        every node until commit, so two of them cannot both fit in the same room."""
        limit = self.user.quota
        if limit is None:
            return
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_quota_key(self.owner),))
        if self._used(conn) + size > limit:
            raise OverQuota("quota exceeded")

    def _put_body(self, data: bytes | SpooledSource) -> str:
        """Store a body (CRLF), its full-text row and its header block; returns its hash. The mark
        comes first (store.cluster.gc), then the upload, then both rows in one transaction of their
        own (store.cluster.fulltext, store.cluster.cache `put_heads`): committed before the caller's
        transaction makes a message refer to the body, so a search never finds a message without its
        rows, and a MULTIAPPEND or an import does not hold every message's text until its commit.
        Rows left by a transaction that then fails belong to an orphan body and go with it
        (`postier cluster gc`). A body in a file (an open `SpooledSource`) is hashed (unless its
        `digest` is known already) and uploaded from it (`BodyStore.put_stream`), and its text extracted from it holding a bounded part of it
        (`fulltext.text_row_at`), only when the body has no row yet (not for a second copy of it);
        so is its MIME layout (`textscan.layout_at`, kept in `body_views` as LAYOUT_KIND), with
        which a FETCH of a section reads only that span (`open_message(partial=True)`)."""
        if isinstance(data, SpooledSource):
            digest = data.digest or self.bodies.digest_stream(data.read_at, data.size)
        else:
            digest = self.bodies.digest(data)
        with self._tx() as conn:
            mark(conn, digest)
            known = fulltext.has_row(conn, digest)
            head_known = views.has_head(conn, digest)
        if isinstance(data, SpooledSource):
            self.bodies.put_stream(data.read_at, data.size, digest)
        else:
            self.bodies.put(data, digest)
        row = head = None
        layout: list[tuple[str, str, bytes]] = []
        read_at: ReadAt
        if not known:
            if isinstance(data, SpooledSource):  # a bounded part of it (fulltext.text_row_at)
                row = fulltext.text_row_at(digest, data.read_at, data.size)
                read_at, size = data.read_at, data.size
            else:
                row = fulltext.text_row(digest, data)
                whole = data
                read_at, size = (lambda off, n: whole[off:off + n]), len(whole)
            # its layout too (a large body given in memory as well: an import, a CATENATE), so that
            # a FETCH of a section reads only its span (RangedBody)
            lay = layout_at(read_at, size) if size > MEMORY_DATA_LIMIT else None
            if lay is not None:
                layout.append((digest, LAYOUT_KIND, lay.dump()))
        if not head_known:
            if isinstance(data, SpooledSource):  # the block is at most CACHE_ITEM_LIMIT: no more is read
                first = data.read_at(0, CACHE_ITEM_LIMIT + 4)
                head = views.head_of(first, complete=len(first) == data.size)
            else:
                head = views.head_of(data)
        if row is not None or head is not None or layout:
            with self._tx() as conn:
                if row is not None:
                    fulltext.write_rows(conn, [row])
                if head is not None:
                    views.put_heads(conn, [(digest, head)])
                views.put_by_body(conn, layout)
        return digest

    def _put_spooled(self, item: SpoolFile) -> tuple[str, int]:
        """`_put_body` of a message spooled to a file (`spool`; CRLF made on the way): uploaded from
        the file above MEMORY_DATA_LIMIT, read into memory below; (hash, size). The file is
        discarded in any case."""
        try:
            if item.failed is not None:
                raise StoreError(f"message not stored: {item.failed}")
            if item.size > MEMORY_DATA_LIMIT:
                with SpooledSource(b"", item.path, item.size) as src:
                    return self._put_body(src), src.size
            data = item.read_all()
            return self._put_body(data), len(data)
        finally:
            item.discard()

    def append(self, name: str, data: bytes | SpooledSource, flag_names: Sequence[str] = (),
               internal_date: float | None = None) -> tuple[int, int]:
        """RFC 9051 §6.3.12 APPEND: the body confirmed by the object store, then the row committed,
        before the caller answers OK. Returns (uidvalidity, uid) for APPENDUID (RFC 4315 §3).
        `data` in a file (an open `SpooledSource`, CRLF already) is uploaded from it (`_put_body`)."""
        v, uids = self.append_many(name, [(data, flag_names, internal_date)])
        return v, uids[0]

    def spool(self) -> SpoolFile:
        """A local temporary file for a message that arrives in pieces (a large APPEND literal)."""
        return SpoolFile(Path(tempfile.gettempdir()))

    @_op
    def append_many(self, name: str,
                    messages: Sequence[tuple[bytes | SpoolFile | SpooledSource, Sequence[str], float | None]]
                    ) -> tuple[int, list[int]]:
        """APPEND of several messages, all or none (RFC 3502 MULTIAPPEND): every body is put and
        confirmed first, then one transaction draws their UIDs and inserts the rows. A literal
        spooled to a file (`SpoolFile`, CRLF on the way) above MEMORY_DATA_LIMIT goes up from it."""
        n = normalize_name(name)
        if not messages:
            raise StoreError("no message to append")
        with self._tx() as conn:  # fail early (no upload) when the folder is missing or the quota full
            self._fid(conn, n)
            limit = self.user.quota
            if limit is not None and self._used(conn) >= limit:
                raise OverQuota("quota exceeded")
        prepared: list[tuple[str, int, int, list[str], int]] = []
        for item, flag_names, internal_date in messages:
            bits, kws = names_to_flags(flag_names)
            if isinstance(item, SpoolFile):
                digest, size = self._put_spooled(item)
            elif isinstance(item, SpooledSource):
                digest, size = self._put_body(item), item.size
            else:
                data = to_crlf(item)
                digest, size = self._put_body(data), len(data)
            idate = int(internal_date) if internal_date is not None else int(time.time())
            prepared.append((digest, size, bits, kws, idate))
        with self._tx() as conn:
            fid, uidvalidity, known = self._fid(conn, n, lock=True)
            self._check_quota(conn, sum(p[1] for p in prepared))
            rows = []
            for digest, size, bits, kws, idate in prepared:
                canon, known = self._keywords(conn, fid, known, kws)
                rows.append((digest, size, bits, " ".join(canon), idate))
            first, modseq = self._allocate(conn, fid, len(rows))
            uids = list(range(first, first + len(rows)))
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO messages (folder, uid, body, size, flags, keywords, modseq, idate) "
                                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                                [(fid, u, d, size, bits, kw, modseq, idate)
                                 for u, (d, size, bits, kw, idate) in zip(uids, rows, strict=True)])
            self._notify(conn, n)
        return uidvalidity, uids

    def _unused(self, conn: Conn, name: str, lock: bool = False) -> tuple[int, tuple[str, ...]] | None:
        """(id, keywords) of a folder that never held a message (UIDNEXT 1), else None."""
        r = conn.execute("SELECT id, uidnext, keywords FROM folders WHERE owner=%s AND name=%s"
                         + (" FOR UPDATE" if lock else ""), (self.owner, name)).fetchone()
        if r is None:
            raise MailboxNotFound("no such mailbox")
        return (int(r[0]), tuple(r[2])) if r[1] == 1 else None

    @_op
    def import_with_uids(self, name: str, uidvalidity: int, uidnext: int,
                         messages: Iterable[tuple[int, bytes | SpoolFile, Sequence[str], float | None]]) -> bool:
        """Messages moved from another store keep their UIDVALIDITY and UIDs (an export's
        dovecot-uidlist), so clients need not resynchronise (RFC 9051 §2.3.1.1: the triple of name,
        UIDVALIDITY and UID still names the same message). Only into a folder that never held a
        message (UIDNEXT 1): False, with nothing consumed or changed, otherwise, and the caller
        appends instead. Bodies are put first, as APPEND's are; then one transaction sets
        UIDVALIDITY, UIDNEXT (at least the highest UID + 1) and inserts the rows, all or none."""
        n = normalize_name(name)
        if not 0 < uidvalidity < 2**32:
            return False
        with self._tx() as conn:
            if self._unused(conn, n) is None:
                return False
        prepared: list[tuple[int, str, int, int, list[str], int]] = []
        seen: set[int] = set()
        for uid, data, flag_names, internal_date in messages:
            try:
                if not 0 < uid < 2**32 - 1 or uid in seen:
                    raise StoreError(f"bad or repeated UID {uid} in the import")
                seen.add(uid)
                bits, kws = names_to_flags(flag_names)
            except BaseException:
                if isinstance(data, SpoolFile):
                    data.discard()
                raise
            if isinstance(data, SpoolFile):  # a large message, uploaded from its file
                digest, size = self._put_spooled(data)
            else:
                data = to_crlf(data)
                digest, size = self._put_body(data), len(data)
            idate = int(internal_date) if internal_date is not None else int(time.time())
            prepared.append((uid, digest, size, bits, kws, idate))
        prepared.sort()
        nxt = max(uidnext, prepared[-1][0] + 1 if prepared else 1)
        if nxt > 2**32 - 1:
            raise StoreLimit("no UIDs left in this mailbox")
        with self._tx() as conn:
            got = self._unused(conn, n, lock=True)
            if got is None:  # someone appended meanwhile: the bodies are orphans, collected later
                return False
            fid, known = got
            self._check_quota(conn, sum(p[2] for p in prepared))
            rows = []
            for uid, digest, size, bits, kws, idate in prepared:
                canon, known = self._keywords(conn, fid, known, kws)
                rows.append((fid, uid, digest, size, bits, " ".join(canon), idate))
            r = conn.execute("UPDATE folders SET uidvalidity=%s, uidnext=%s, recent_uid=%s, "
                             "highestmodseq = highestmodseq + 1 WHERE id=%s RETURNING highestmodseq",
                             (uidvalidity, nxt, nxt, fid)).fetchone()
            assert r is not None
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO messages (folder, uid, body, size, flags, keywords, modseq, idate) "
                                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                                [(*row[:6], r[0], row[6]) for row in rows])
            self._notify(conn, n)
        self.states.pop(n, None)
        return True

    @_op
    def store(self, name: str, uids: Iterable[int], mode: str, flag_names: Sequence[str],
              unchangedsince: int | None = None) -> StoreResult:
        """RFC 9051 §6.4.6 STORE: mode "FLAGS", "+FLAGS" or "-FLAGS"; RFC 7162 §3.1.3 UNCHANGEDSINCE."""
        n = normalize_name(name)
        bits, kws = names_to_flags(flag_names)
        with self._tx() as conn:
            fid, _v, known = self._fid(conn, n, lock=True)
            if mode != "-FLAGS":
                kws, known = self._keywords(conn, fid, known, kws)
            rows = {r[0]: _row(r) for r in conn.execute(
                f"SELECT {_MSG_COLS} FROM messages WHERE folder=%s AND uid = ANY(%s)", (fid, list(uids)))}
            planned, unchanged, conflicts = plan_store(rows, mode, bits, kws, unchangedsince)
            changes = [(m.uid, nb, " ".join(nk)) for m, nb, nk in planned]
            after: dict[int, MessageRow] = {}
            if changes:
                modseq = self._bump(conn, fid)
                with conn.cursor() as cur:
                    cur.executemany("UPDATE messages SET flags=%s, keywords=%s, modseq=%s WHERE folder=%s AND uid=%s",
                                    [(nb, nk, modseq, fid, uid) for uid, nb, nk in changes])
                after = {r[0]: _row(r) for r in conn.execute(
                    f"SELECT {_MSG_COLS} FROM messages WHERE folder=%s AND uid = ANY(%s)",
                    (fid, [c[0] for c in changes]))}
                self._notify(conn, n)
            else:
                r = conn.execute("SELECT highestmodseq FROM folders WHERE id=%s", (fid,)).fetchone()
                assert r is not None
                modseq = int(r[0])
        return StoreResult(modseq, after, unchanged, conflicts, known)

    def _remove(self, conn: Conn, fid: int, name: str, uids: list[int]) -> list[int]:
        if not uids:
            return []
        modseq = self._bump(conn, fid)
        conn.execute("DELETE FROM messages WHERE folder=%s AND uid = ANY(%s)", (fid, uids))
        with conn.cursor() as cur:  # tombstones for QRESYNC VANISHED (RFC 7162 §3.2.10)
            cur.executemany("INSERT INTO expunged (folder, uid, modseq) VALUES (%s, %s, %s) "
                            "ON CONFLICT DO NOTHING", [(fid, u, modseq) for u in uids])
        self._notify(conn, name)
        return uids

    @_op
    def expunge(self, name: str, uids: Iterable[int] | None = None) -> list[int]:
        """RFC 9051 §6.4.3 EXPUNGE (RFC 4315 §2.1 UID EXPUNGE when `uids` is given)."""
        n = normalize_name(name)
        with self._tx() as conn:
            fid = self._fid(conn, n, lock=True)[0]
            q = "SELECT uid FROM messages WHERE folder=%s AND flags & %s != 0"
            args: tuple[Any, ...] = (fid, FLAG_DELETED)
            if uids is not None:
                q += " AND uid = ANY(%s)"
                args += (list(uids),)
            return self._remove(conn, fid, n, [u for (u,) in conn.execute(q + " ORDER BY uid", args)])

    @_op
    def delete_uids(self, name: str, uids: Iterable[int]) -> list[int]:
        """Remove messages whatever their flags (POP3 DELE at QUIT)."""
        n = normalize_name(name)
        with self._tx() as conn:
            fid = self._fid(conn, n, lock=True)[0]
            return self._remove(conn, fid, n, [u for (u,) in conn.execute(
                "SELECT uid FROM messages WHERE folder=%s AND uid = ANY(%s) ORDER BY uid", (fid, list(uids)))])

    @_op
    def copy(self, src: str, uids: Iterable[int], dst: str) -> CopyResult:
        """RFC 9051 §6.4.7 COPY: new rows referring to the same bodies, all or nothing."""
        return self._copy(normalize_name(src), list(uids), normalize_name(dst), move=False)

    @_op
    def move(self, src: str, uids: Iterable[int], dst: str) -> CopyResult:
        """RFC 6851 MOVE: copied and expunged in one transaction."""
        return self._copy(normalize_name(src), list(uids), normalize_name(dst), move=True)

    def _copy(self, s: str, uids: list[int], d: str, move: bool) -> CopyResult:
        with self._tx() as conn:
            # Lock both rows in id order, so that two opposite moves cannot deadlock.
            found = conn.execute("SELECT id, name FROM folders WHERE owner=%s AND name = ANY(%s) ORDER BY id FOR UPDATE",
                                 (self.owner, [s, d])).fetchall()
            ids = {name: fid for fid, name in found}
            if s not in ids or d not in ids:
                raise MailboxNotFound("no such mailbox")
            sfid, dfid, dvalid, dknown = ids[s], *self._fid(conn, d)
            rows = conn.execute(f"SELECT {_MSG_COLS} FROM messages WHERE folder=%s AND uid = ANY(%s) ORDER BY uid",
                                (sfid, uids)).fetchall()
            if not rows:
                return CopyResult(dvalid, [], [])
            if not move:  # RFC 9208 §4.1: a COPY over the quota stores nothing (a MOVE adds nothing)
                self._check_quota(conn, sum(int(r[5]) for r in rows))
            kws = sorted({k for r in rows for k in (r[3].split(" ") if r[3] else [])})
            self._keywords(conn, dfid, dknown, kws)
            first, modseq = self._allocate(conn, dfid, len(rows))
            new = list(range(first, first + len(rows)))
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO messages (folder, uid, body, size, flags, keywords, modseq, idate) "
                                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                                [(dfid, u, r[1], r[5], r[2], r[3], modseq, r[6]) for u, r in zip(new, rows, strict=True)])
            self._notify(conn, d)
            src_uids = [r[0] for r in rows]
            if move:
                self._remove(conn, sfid, s, src_uids)
        return CopyResult(dvalid, src_uids, new)

    def delivery_suffix(self, name: str, flag_names: Sequence[str]) -> str:
        """What `ClusterDelivery` needs to give a message delivered into the folder these flags (RFC
        5232 §5: Sieve's imap4flags), the folder created when missing (RFC 5228 §4.1): FLAGS_INFO and
        the flag names. Keywords are registered when the message is appended (no letters here, unlike
        a Maildir file name, so none is dropped); names that are not flags are left out (RFC 5232 §3)."""
        n = normalize_name(name)
        if n != INBOX and not self.exists(n):
            with contextlib.suppress(MailboxExists):
                self.create(n)
        valid: list[str] = []
        for f in flag_names:
            with contextlib.suppress(StoreError):
                names_to_flags([f])
                if f.lower() != "\\recent":
                    valid.append(f)
        return FLAGS_INFO + " ".join(valid) if valid else ""

    # -- POP3 (RFC 1939) ------------------------------------------------------------------------

    @_op
    def pop_listing(self) -> tuple[list[PopMessage], int]:
        with self._tx() as conn:
            st = self._load(conn, INBOX)
            rows = conn.execute("SELECT uid, size, body FROM messages WHERE folder=%s ORDER BY uid", (st.fid,)).fetchall()
        # RFC 1939 §7 UIDL as the Maildir store makes it (UID and UIDVALIDITY); no file: the path is the body key
        return [PopMessage(u, size, Path(body), f"{u:08X}{st.uidvalidity:08X}") for u, size, body in rows], \
            st.uidvalidity

    @_op
    def pop_delete(self, uids: Sequence[int], uidvalidity: int) -> bool:
        with self._tx() as conn:
            if self._load(conn, INBOX).uidvalidity != uidvalidity:
                return False
        self.delete_uids(INBOX, uids)
        return True

    @_op
    def mark_seen(self, uids: Iterable[int]) -> None:
        self.store(INBOX, uids, "+FLAGS", ["\\Seen"])
