"""The mailbox API shared by the IMAP and POP3 servers: Maildir++ folders (RFC 9051 §5.1 names) over
the per-user index, with durable writes, flag changes, expunge, copy/move and change notification.

Layout (as Dovecot lays Maildir++ out): INBOX is the Maildir itself; folder "A.B" is the directory
`.A.B` next to `cur/new/tmp`, with non-ASCII names stored in modified UTF-7 (RFC 3501 §5.1.3) so
that directory names stay ASCII. The hierarchy separator is "." (Dovecot's default for Maildir++),
so a folder name cannot contain "."; names are checked before any path is built (no "/", no empty
components, hence no ".." and no absolute names, no `cur`/`new`/`tmp` components, no control
characters, bounded length and depth) and the result is always a direct child of the Maildir.

Every method of `UserMailbox` blocks on the disk: servers call them through `MailStore.call()`,
which runs them in the store's worker threads, one user at a time (a per-user lock). Per process,
the mailboxes of one user are one `UserMailbox`, shared by that user's sessions; the current state of
each open folder (`FolderState`, with its UID array) is shared too, and sessions keep the array they
last announced (arrays are replaced, never changed in place), so idle sessions cost little memory.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
import contextlib
import errno
import fcntl
import functools
import logging
import os
import secrets
import shutil
import sqlite3
import stat
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Concatenate

from .. import durable
from . import maildrop, quota
from ..message.types import MEMORY_DATA_LIMIT, User
from ..message.mime import header_end, header_section
from ..faults import fault_point
from ..proto.mutf7 import Mutf7Error, mutf7_decode
from ..proto.crlf import bare_lf, to_crlf
from .index import (
    FLAG_DELETED,
    INDEX_NAME,
    FolderRow,
    MessageRow,
    UserIndex,
    encode_suffix,
    fsync_folder,
    names_to_flags,
    plan_store,
)
from .api import (
    RENAMES_KEPT,
    CopyResult,
    FlagTable,
    FolderInfo,
    FolderSnapshot,
    Mailboxes,
    NamesView,
    PopMessage,
    StatusInfo,
    StoreResult,
    renames_after,
)
from .errors import (
    InvalidKeyword,
    InvalidName,
    MailboxExists,
    MailboxNotFound,
    MessageGone,
    NotPermitted,
    OverQuota,
    StoreError,
    StoreLimit,
    UnknownSpecialUse,
)
from .fts import CATCH_UP, CATCH_UP_HELD, FTS_NAME, Source, TextIndex, build_from_maildir, searchable
from .maildir import (
    INBOX, SEPARATOR, DeliveryError, MaildirDraft, SpoolFile, ensure_maildir,
    folder_dir_name, normalize_name, sync_new, unique_name,
)

__all__ = [
    "DEFAULT_SPECIAL_USE", "INBOX", "SEPARATOR", "ChangeNotifier", "CopyResult", "FolderInfo", "FolderSnapshot",
    "FolderState",
    "MailStore", "PopMessage", "StatusInfo", "StoreResult", "UserMailbox",
    "folder_dir_name", "normalize_name", "on_delivery",
]

log = logging.getLogger("postier.store")

SUBSCRIPTIONS_FILE = "postier-subscriptions"
#: RFC 6154 §2 attributes for the default folders, by name.
DEFAULT_SPECIAL_USE: dict[str, str] = {
    "Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk", "Archive": "\\Archive",
}
SPECIAL_USES = frozenset({"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"})


# -- names ----------------------------------------------------------------------------------------

def _name_from_dir(dirname: str) -> str | None:
    if not dirname.startswith(".") or dirname in (".", ".."):
        return None
    try:
        name = mutf7_decode(dirname[1:])
        return normalize_name(name) if name != INBOX else None
    except (Mutf7Error, StoreError):
        return None


# -- values ---------------------------------------------------------------------------------------

@dataclass
class FolderState:
    """An open folder as this process knows it. `uids` is replaced (never mutated) when it changes."""

    name: str
    fid: int
    path: Path
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: array[int]
    version: int = 0
    special_use: str = ""
    keywords: tuple[str, ...] = ()
    flagtab: FlagTable | None = None  # valid while flagtab.uids is uids

    @property
    def exists(self) -> int:
        return len(self.uids)


# -- one user's mailboxes -------------------------------------------------------------------------

def _locked[**P, R](fn: Callable[Concatenate[UserMailbox, P], R]) -> Callable[Concatenate[UserMailbox, P], R]:
    def wrapper(self: UserMailbox, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self.lock:
            if self.shared is None:
                return fn(self, *args, **kwargs)
            with self.shared:
                return fn(self, *args, **kwargs)
    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class ProcessLock:
    """The user lock between processes (`[server] workers` > 1): an exclusive flock on a file beside
    the index, held while one store call runs (re-entrant within the holder; the per-user thread lock
    is taken first). Two processes must not interleave an index sync or a UID assignment."""

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self.depth = 0

    def __enter__(self) -> None:
        if self.depth == 0:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1
        if self.depth == 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self.fd)


class UserMailbox:
    """Every folder of one user. All public methods block (disk, SQLite) and take the user lock."""

    def __init__(self, user: User, maildir: Path, index_path: Path,
                 special_use_folders: Sequence[str] = tuple(DEFAULT_SPECIAL_USE), shared: bool = False):
        self.user = user
        self.root = maildir
        self.lock = threading.RLock()
        #: Other processes use this index too: their lock, and what they changed since we looked.
        self.shared = ProcessLock(index_path.with_name(index_path.name + ".lock")) if shared else None
        self._data_version = -1
        self._stale: set[str] = set()
        ensure_maildir(maildir)
        self.index_path = index_path
        self.index = UserIndex(index_path)
        self._index_ino = os.stat(index_path).st_ino
        self.states: dict[str, FolderState] = {}
        self.special_use_folders = tuple(special_use_folders)
        self._defaults_done = False
        self.refs = 0
        #: Folders written to by someone who did not update the index (a delivery): sync before use.
        self.dirty: set[str] = set()
        self._text: TextIndex | None = None  # the full-text index (store.fts), attached on first use

    def close(self) -> None:
        with self.lock:
            self._text = None
            self.index.close()
            self.states.clear()
            if self.shared is not None:
                self.shared.close()

    def _catch_up(self) -> None:
        """Another process committed to the index since our last call (SQLite's data_version moved):
        forget the file listings and folder states built from what we saw (re-read on next use)."""
        dv = self.index.conn.execute("PRAGMA data_version").fetchone()[0]
        if dv != self._data_version:
            if self._data_version != -1:
                self.index.forget_listings()
                self._stale.update(self.states)
            self._data_version = dv

    def index_file_unchanged(self) -> bool:
        try:
            return os.stat(self.index_path).st_ino == self._index_ino
        except OSError:
            return False

    # -- paths --------------------------------------------------------------------------------

    def path_of(self, name: str) -> Path:
        """The directory of a normalized folder name (INBOX is the Maildir root)."""
        if name == INBOX:
            return self.root
        p = self.root / folder_dir_name(name)
        if p.parent != self.root:  # belt and braces: names never contain "/"
            raise InvalidName("invalid mailbox name")
        return p

    def _exists(self, name: str) -> bool:
        if name == INBOX:
            return True
        p = self.path_of(name)
        try:
            st = os.lstat(p)
        except OSError:
            return False
        return stat.S_ISDIR(st.st_mode)

    def _default_use(self, name: str) -> str:
        if name in self.special_use_folders:
            return DEFAULT_SPECIAL_USE.get(name, "")
        return ""

    # -- folders ------------------------------------------------------------------------------

    def ensure_defaults(self) -> None:
        """Create the special-use folders (Sent, Drafts, Trash, Junk, Archive) when missing."""
        if self._defaults_done:  # set once, never unset: read without waiting for the lock (each login)
            return
        self._ensure_defaults()

    @_locked
    def _ensure_defaults(self) -> None:
        if self._defaults_done:
            return
        for name in self.special_use_folders:
            with contextlib.suppress(StoreError):
                n = normalize_name(name)
                if not self._exists(n):
                    self._create(n, self._default_use(n) or None)
                    self._subscribe(n, True)
        self._defaults_done = True

    @_locked
    def list_folders(self) -> list[FolderInfo]:
        """Every existing folder, INBOX first (implied parents are not included)."""
        out = [FolderInfo(INBOX, "")]
        names: list[str] = []
        with os.scandir(self.root) as it:
            for e in it:
                if e.name[0] != "." or not e.is_dir(follow_symlinks=False):
                    continue
                n = _name_from_dir(e.name)
                if n is not None:
                    names.append(n)
        uses = {n: u for n, u in self.index.conn.execute("SELECT name, special_use FROM folders")}
        for n in sorted(names):
            out.append(FolderInfo(n, uses.get(n) or self._default_use(n)))
        return out

    @_locked
    def exists(self, name: str) -> bool:
        return self._exists(normalize_name(name))

    @_locked
    def create(self, name: str, special_use: str | None = None) -> None:
        """RFC 9051 §6.3.4 CREATE (with RFC 6154 §3 USE); parents are implied, not created."""
        n = normalize_name(name.rstrip(SEPARATOR) if name.endswith(SEPARATOR) else name)
        if n == INBOX or self._exists(n):
            raise MailboxExists("mailbox already exists")
        if special_use is not None and special_use not in SPECIAL_USES:
            raise UnknownSpecialUse("unsupported special-use attribute")
        self._create(n, special_use)

    def _create(self, name: str, special_use: str | None) -> None:
        p = self.path_of(name)
        try:
            durable.make_dir(p)  # the new name is durable before CREATE answers OK
        except FileExistsError:
            raise MailboxExists("mailbox already exists") from None
        (p / "maildirfolder").touch()  # Maildir++ marker, as Dovecot and Courier write it
        ensure_maildir(p)  # cur/new/tmp, and p fsynced (the marker with them)
        self.index.forget_folder(name)  # a stale row from a folder deleted behind our back
        self.index.attach_folder(name, p, special_use or "")

    @_locked
    def delete(self, name: str) -> None:
        """RFC 9051 §6.3.5 DELETE: the folder and its messages go; its children stay."""
        n = normalize_name(name)
        if n == INBOX:
            raise NotPermitted("INBOX cannot be deleted")
        if not self._exists(n):
            raise MailboxNotFound("no such mailbox")
        p = self.path_of(n)
        trash = self.root / "tmp" / f".deleted.{secrets.token_hex(8)}"
        durable.rename(p, trash)  # atomic: no half-deleted folder is ever listed
        self.index.forget_folder(n)
        self.states.pop(n, None)
        shutil.rmtree(trash, ignore_errors=True)

    @_locked
    def rename(self, old: str, new: str) -> None:
        """RFC 9051 §6.3.6 RENAME, children included; renaming INBOX moves its messages."""
        o = normalize_name(old)
        n = normalize_name(new)
        if n == INBOX:
            raise MailboxExists("cannot rename to INBOX")
        if o == n or self._exists(n):
            raise MailboxExists("target mailbox already exists")
        if (n + SEPARATOR).startswith(o + SEPARATOR):
            raise NotPermitted("cannot rename a mailbox into itself")
        if o == INBOX:
            self._rename_inbox(n)
            self.index.log_rename(o, n, RENAMES_KEPT)
            return
        prefix = o + SEPARATOR
        moves = [(x.name, n + x.name[len(o):]) for x in self.list_folders()
                 if x.name == o or x.name.startswith(prefix)]
        if not moves:
            raise MailboxNotFound("no such mailbox")
        for _a, b in moves:
            normalize_name(b)
            if self._exists(b):
                raise MailboxExists(f"target mailbox {b} already exists")
        for a, b in moves:
            durable.rename(self.path_of(a), self.path_of(b))  # both parents fsynced
            self.index.rename_folder(a, b)
            self.states.pop(a, None)
        subs = self._subscriptions()
        if any(s == o or s.startswith(prefix) for s in subs):
            self._write_subscriptions([n + s[len(o):] if (s == o or s.startswith(prefix)) else s for s in subs])
        self.index.log_rename(o, n, RENAMES_KEPT)  # under the user lock, as `names_since` reads

    def _rename_inbox(self, new: str) -> None:
        # RFC 9051 §6.3.6: all INBOX messages move to the new name; INBOX stays, empty.
        self._create(new, None)
        st = self._open(INBOX)
        if len(st.uids):
            self._move(INBOX, list(st.uids), new)

    # -- subscriptions (RFC 9051 §6.3.7) -----------------------------------------------------

    def _subscriptions(self) -> list[str]:
        try:
            text = (self.root / SUBSCRIPTIONS_FILE).read_text("utf-8", errors="replace")
        except OSError:
            return []
        return [line for line in text.split("\n")[:10000] if line]

    def _write_subscriptions(self, names: Iterable[str]) -> None:
        seen: dict[str, None] = dict.fromkeys(names)
        durable.write_file(self.root / SUBSCRIPTIONS_FILE, "".join(f"{n}\n" for n in seen).encode("utf-8"))

    def _subscribe(self, name: str, on: bool) -> None:
        subs = self._subscriptions()
        if on and name not in subs:
            self._write_subscriptions([*subs, name])
        elif not on and name in subs:
            self._write_subscriptions([s for s in subs if s != name])

    @_locked
    def subscriptions(self) -> list[str]:
        return self._subscriptions()

    @_locked
    def names_since(self, cursor: int | None) -> NamesView:
        """The folders, subscriptions and renames after `cursor` under the user lock, which every
        rename holds until it is logged (between processes too): one consistent read for the
        renames made by postier. A folder renamed by another program is seen as deleted and created."""
        head, rows = self.index.renames(cursor)
        return NamesView(head, [f.name for f in self.list_folders()], self._subscriptions(),
                         renames_after(cursor, head, rows))

    @_locked
    def subscribe(self, name: str, on: bool = True) -> None:
        n = normalize_name(name)
        if on and not self._exists(n):
            raise MailboxNotFound("no such mailbox")
        self._subscribe(n, on)

    # -- opening and syncing ------------------------------------------------------------------

    def _row(self, name: str) -> FolderRow:
        if not self._exists(name):
            self.states.pop(name, None)
            raise MailboxNotFound("no such mailbox")
        p = self.path_of(name)
        if name not in self.states:
            ensure_maildir(p)  # once per open folder: another tool may have made it without cur/new/tmp
        return self.index.attach_folder(name, p, self._default_use(name))

    def _open(self, name: str, force: bool = False) -> FolderState:
        if self.shared is not None:
            self._catch_up()  # at every sync point: what other processes committed is seen here
        row = self._row(name)
        p = self.path_of(name)
        res = self.index.sync(row, p, force=force)
        row = res.folder
        st = self.states.get(name)
        if st is None or st.fid != row.id or st.uidvalidity != row.uidvalidity:
            st = FolderState(name, row.id, p, row.uidvalidity, row.uidnext, row.highestmodseq,
                             self.index.uid_array(row.id), 1, row.special_use or self._default_use(name),
                             row.keywords)
            self.states[name] = st
            return st
        stale = name in self._stale  # another process changed the index since we built `st`
        self._stale.discard(name)
        if res.uids_changed:
            st.uids = self.index.uid_array(row.id)
            st.version += 1
        elif stale and (uids := self.index.uid_array(row.id)) != st.uids:
            st.uids = uids
            st.version += 1
        if res.uids_changed or res.flags_changed or stale:
            st.flagtab = None
        return self._take_row(st, row)

    def _take_row(self, st: FolderState, row: FolderRow) -> FolderState:
        """The folder row's counters and attributes into the kept state (after a sync or a reload)."""
        st.uidnext = row.uidnext
        st.highestmodseq = row.highestmodseq
        st.keywords = row.keywords
        st.special_use = row.special_use or self._default_use(st.name)
        return st

    @_locked
    def open(self, name: str, force: bool = False) -> FolderState:
        """Sync the folder with the disk and return its state (SELECT, NOOP, IDLE wake-ups)."""
        return self._open(normalize_name(name), force)

    @_locked
    def snapshot(self, name: str, sync: bool = True) -> FolderSnapshot:
        """The folder's state (synced with the disk first unless `sync` is False)."""
        n = normalize_name(name)
        if self.shared is not None and not sync:
            self._catch_up()  # another process's commits (its changes go through the index)
        if sync or n not in self.states or n in self.dirty:
            self.dirty.discard(n)
            st = self._open(n)
        elif n in self._stale:
            st = self._reload(n)
        else:
            st = self.states[n]
        return FolderSnapshot(st.name, st.uidvalidity, st.uidnext, st.highestmodseq, st.uids, st.version,
                              st.special_use, st.keywords)

    def _reload(self, name: str) -> FolderState:
        """The folder's state read again from the index alone, after another process committed to
        it (no directory scan: what it changed, it changed through the index)."""
        st = self.states[name]
        row = self.index.folder(name)
        if row is None or row.id != st.fid or row.uidvalidity != st.uidvalidity:
            return self._open(name)
        self._stale.discard(name)
        uids = self.index.uid_array(row.id)
        if uids != st.uids:
            st.uids = uids
            st.version += 1
        st.flagtab = None
        return self._take_row(st, row)

    @_locked
    def select(self, name: str, claim_recent: bool, want_unseen: bool) -> tuple[FolderSnapshot, int, int | None]:
        """Everything SELECT needs in one call: the synced snapshot, the lowest \\Recent UID (claimed
        when `claim_recent`, RFC 3501 §2.3.2) and the first unseen UID (when `want_unseen`)."""
        snap = self.snapshot(name, True)
        st = self.states[snap.name]
        if claim_recent:
            recent = self.index.claim_recent(st.fid)
        else:
            r = self.index.folder(snap.name)
            recent = r.recent_uid if r is not None else snap.uidnext
        first = self.index.first_unseen(st.fid) if want_unseen else None
        return snap, recent, first

    @_locked
    def state(self, name: str) -> FolderState:
        """The folder's state without touching the disk when it is already open."""
        st = self.states.get(name)  # keys are normalized names: a hit needs no check (per-message calls)
        if st is not None and name not in self._stale:
            return st
        n = normalize_name(name)
        st = self.states.get(n)
        return st if st is not None and n not in self._stale else self._open(n)

    @_locked
    def needs_sync(self, name: str) -> bool:
        st = self.states.get(name)
        return st is None or self.index.needs_sync(st.fid, st.path)

    @_locked
    def flag_table(self, name: str, view: array[int], need_modseq: bool = False) -> FlagTable | None:
        """A copy of the folder's FlagTable (built from the index on first use) when it is aligned
        with `view` (the UID array a session announced), else None (then use `flag_rows`)."""
        tab = self._flag_table(name, need_modseq)
        if tab is None or tab.uids is not view:
            return None
        return FlagTable(tab.uids, array("B", tab.flags), dict(tab.keywords),
                         array("Q", tab.modseq) if tab.modseq is not None else None)

    def _flag_table(self, name: str, need_modseq: bool) -> FlagTable | None:
        st = self.state(name)
        tab = st.flagtab
        if tab is None or tab.uids is not st.uids:
            conn = self.index.conn
            flags = array("B", [f for (f,) in conn.execute(
                "SELECT flags FROM msgs WHERE folder=? ORDER BY uid", (st.fid,))])
            if len(flags) != len(st.uids):
                return None
            kws = {u: k for u, k in conn.execute(
                "SELECT uid, keywords FROM msgs WHERE folder=? AND keywords != ''", (st.fid,))}
            tab = st.flagtab = FlagTable(st.uids, flags, kws, None)
        if need_modseq and tab.modseq is None:
            ms = array("Q", [m for (m,) in self.index.conn.execute(
                "SELECT modseq FROM msgs WHERE folder=? ORDER BY uid", (st.fid,))])
            if len(ms) != len(st.uids):
                return None
            tab.modseq = ms
        return tab

    @_locked
    def at_once[T](self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` under the user lock, taken once (the methods it calls take it again, cheaply)."""
        return fn(*args)

    @_locked
    def claim_recent(self, name: str) -> int:
        st = self.state(normalize_name(name))  # the claim is the index's: no directory scan first
        return self.index.claim_recent(st.fid)

    @_locked
    def status(self, name: str) -> StatusInfo:
        n = normalize_name(name)
        st = self._open(n)
        msgs, unseen, deleted, size = self.index.counts(st.fid)
        r = self.index.folder(n)
        recent_from = r.recent_uid if r else st.uidnext
        recent = len(st.uids) - _bisect(st.uids, recent_from)
        deleted_size = self.index.conn.execute(  # RFC 9208 §4.2 DELETED-STORAGE
            "SELECT COALESCE(SUM(size), 0) FROM msgs WHERE folder=? AND flags & ? != 0",
            (st.fid, FLAG_DELETED)).fetchone()[0] if deleted else 0
        return StatusInfo(msgs, unseen, deleted, size, st.uidnext, st.uidvalidity, st.highestmodseq, recent,
                          deleted_size)

    @_locked
    def quota_usage(self) -> quota.Usage:
        """The user's storage usage and quota (RFC 9208 STORAGE, MESSAGE), every folder rescanned
        first so that files other programs added or removed are counted."""
        for f in self.list_folders():
            with contextlib.suppress(StoreError):
                self._open(f.name)
        quota.prune_pending(self.index.conn, self.root)
        b, m = quota.usage(self.index.conn)
        return quota.Usage(b, m, self.user.quota)

    @_locked
    def first_unseen(self, name: str) -> int | None:
        st = self._open(normalize_name(name))
        return self.index.first_unseen(st.fid)

    # -- reads --------------------------------------------------------------------------------

    @_locked
    def rows(self, name: str, uids: Iterable[int]) -> dict[int, MessageRow]:
        st = self.state(name)
        return self.index.rows(st.fid, uids)

    @_locked
    def all_rows(self, name: str) -> list[MessageRow]:
        st = self.state(name)
        return list(self.index.all_rows(st.fid))

    @_locked
    def rows_between(self, name: str, lo: int, hi: int) -> dict[int, MessageRow]:
        """Rows of the UIDs lo..hi that exist, by UID."""
        st = self.state(name)
        return {r.uid: r for r in self.index.all_rows_between(st.fid, lo, hi)}

    @_locked
    def flush_meta(self) -> None:
        """Write the facts learnt while reading (line-end style, INTERNALDATE) to the index."""
        self.index.flush_meta()

    def watch_path(self, name: str) -> Path | None:
        """The directory whose changes by other programs concern folder `name` (for IDLE)."""
        return self.path_of(normalize_name(name))

    @_locked
    def flag_rows(self, name: str, lo: int, hi: int) -> list[tuple[int, int, str, int]]:
        st = self.state(name)
        return self.index.flag_rows(st.fid, lo, hi)

    @_locked
    def changed_since(self, name: str, modseq: int, max_uid: int | None = None) -> list[tuple[int, int, str, int]]:
        st = self.state(name)
        rows = self.index.changed_since(st.fid, modseq)
        return rows if max_uid is None else [r for r in rows if r[0] <= max_uid]

    @_locked
    def vanished_since(self, name: str, modseq: int) -> list[int] | None:
        st = self.state(name)
        return self.index.vanished_since(st.fid, modseq)

    def _file(self, st: FolderState, row: MessageRow) -> Path:
        return st.path / row.relpath()

    def _resolve(self, st: FolderState, row: MessageRow) -> tuple[MessageRow, Path]:
        """The message's current path; resyncs once when another program renamed the file."""
        p = self._file(st, row)
        if os.path.exists(p):
            return row, p
        return self._relocate(st, row)

    def _relocate(self, st: FolderState, row: MessageRow) -> tuple[MessageRow, Path]:
        self._open(st.name, force=True)
        fresh = self.index.row(st.fid, row.uid)
        if fresh is None:
            raise MessageGone("message was expunged")
        return fresh, self._file(st, fresh)

    def _read_file(self, st: FolderState, row: MessageRow, limit: int | None = None) -> tuple[MessageRow, bytes]:
        """The file's bytes (the first `limit` only, if given), following a rename by another program."""
        for attempt in (0, 1):
            path = f"{st.path}/{'cur' if row.sub else 'new'}/{row.base}{row.suffix}"
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if attempt:
                    break
                row = self._relocate(st, row)[0]
                continue
            try:
                want = limit if limit is not None else max(row.size, 4096) + 1
                first = os.read(fd, want)
                if limit is not None or len(first) < want:  # a short read of a regular file is its end
                    return row, first
                chunks = [first]
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
                return row, b"".join(chunks)
            finally:
                os.close(fd)
        raise MessageGone("message was expunged")

    @_locked
    def read(self, name: str, row: MessageRow) -> bytes:
        """The message as served: CRLF line ends (a bare-LF file written by another tool converted)."""
        return self._read_crlf(self.state(name), row)[1]

    def _read_crlf(self, st: FolderState, row: MessageRow) -> tuple[MessageRow, bytes]:
        row, data = self._read_file(st, row)
        if row.lf is None:
            lf = int(bare_lf(data) > 0)
            if lf:
                data = to_crlf(data)
            self.index.set_lf(st.fid, row.uid, lf, len(data))
        elif row.lf:
            data = to_crlf(data)
        return row, data

    @_locked
    def read_header(self, name: str, row: MessageRow, limit: int = 256 * 1024) -> bytes:
        """The header block (up to the blank line), without reading a large body."""
        st = self.state(name)
        row, head = self._read_file(st, row, 16384)
        if b"\n\r\n" not in head and b"\n\n" not in head and len(head) == 16384:
            row, head = self._read_file(st, row, limit)
        return header_section(to_crlf(head))

    def peek_header(self, name: str, row: MessageRow, limit: int = 16384) -> bytes | None:
        """The header block of a message read without the user lock (so that the batches of one
        SEARCH read files in parallel), or None when that is not possible here: renamed meanwhile,
        or a header longer than `limit`. The bytes are as on disk (bare LF if `row.lf` says so).
        The caller then uses `read_header`."""
        st = self.states.get(name)
        if st is None:
            return None
        try:
            fd = os.open(f"{st.path}/{'cur' if row.sub else 'new'}/{row.base}{row.suffix}", os.O_RDONLY)
        except OSError:
            return None
        try:
            head = os.read(fd, limit)
        except OSError:
            return None
        finally:
            os.close(fd)
        end = header_end(head)
        if end >= 0:
            return head[:end]
        if b"\n\n" in head or len(head) >= limit:
            return None
        return head

    def peek_headers(self, name: str, rows: Iterable[MessageRow]) -> dict[int, bytes]:
        """`peek_header` of each row (uid -> block, for those it gives one), without the user lock."""
        return {r.uid: h for r in rows if (h := self.peek_header(name, r)) is not None}

    @_locked
    def open_message(self, name: str, uid: int, partial: bool = False) -> IO[bytes] | None:
        """The message file opened for reading (streamed by POP3 RETR/TOP), or None when it is gone
        (`partial` changes nothing: a file is read by offset anyway).
        Another client may have renamed it (flags changed): the folder is resynced once."""
        n = normalize_name(name)
        for attempt in range(2):
            st = self.state(n)
            row = self.index.rows(st.fid, [uid]).get(uid)
            if row is None:
                return None
            try:
                return open(st.path / row.relpath(), "rb")  # noqa: SIM115 - closed by the caller
            except FileNotFoundError:
                if attempt == 0:
                    self._open(n, force=True)
        return None

    @_locked
    def internal_date(self, name: str, row: MessageRow) -> int:
        """INTERNALDATE (RFC 9051 §2.3.3) as a Unix time: the file's mtime, as Dovecot keeps it."""
        if row.idate is not None:
            return row.idate
        st = self.state(name)
        row, p = self._resolve(st, row)
        try:
            t = int(os.stat(p).st_mtime)
        except FileNotFoundError:
            raise MessageGone("message was expunged") from None
        self.index.set_idate(st.fid, row.uid, t)
        return t

    @_locked
    def internal_dates(self, name: str, rows: Sequence[MessageRow]) -> dict[int, int]:
        out: dict[int, int] = {}
        for r in rows:
            try:
                out[r.uid] = self.internal_date(name, r)
            except StoreError:
                pass
        return out

    @_locked
    def cache_get(self, name: str, uids: Sequence[int], kind: str) -> dict[int, bytes]:
        st = self.state(name)
        return self.index.cache_get(st.fid, uids, kind)

    @_locked
    def cache_put(self, name: str, items: Sequence[tuple[int, str, bytes]]) -> None:
        st = self.state(name)
        self.index.cache_put(st.fid, items)

    # -- the full-text index (store.fts) -------------------------------------------------------

    def _text_index(self, create: bool = True) -> TextIndex | None:
        """The attached FTS file (made when `create`); None when it cannot be used (then every
        search runs through the matcher, as without an index)."""
        if self._text is None:
            path = self.index_path.parent / FTS_NAME
            if not create and not path.exists():
                return None
            try:
                self._text = TextIndex(self.index.conn, path)
            except sqlite3.Error as exc:
                log.warning("full-text index of %s unusable: %s", self.user.address, exc)
                return None
        return self._text

    def _text_add(self, items: Sequence[tuple[str, bytes]]) -> None:
        ti = self._text_index()
        if ti is not None:
            try:
                ti.add(items)
            except sqlite3.Error as exc:  # a cache: the message is searched by the matcher instead
                log.warning("full-text index of %s not updated: %s", self.user.address, exc)

    def _text_forget(self, fid: int, rows: Sequence[MessageRow]) -> None:
        ti = self._text_index(create=False)
        if ti is not None:
            try:
                ti.forget(fid, [(r.uid, r.base) for r in rows])
            except sqlite3.Error as exc:  # an entry left behind matches no message of any folder
                log.warning("full-text index of %s not updated: %s", self.user.address, exc)

    @_locked
    def text_search(self, name: str, queries: Sequence[tuple[str, str]]) -> tuple[list[set[int]], set[int]] | None:
        """The full-text index's answer to each (field, needle) query (field: SUBJECT, FROM, TO, CC,
        BCC, BODY or TEXT, as `message.matching` searches them): the UIDs whose text contains the
        needle, among the messages it covers; and the UIDs it does not cover (to be checked by the
        matcher). None when the index cannot answer (then search without it). Up to CATCH_UP
        messages not indexed yet are indexed first (see store.fts)."""
        if not queries or not all(searchable(f, n) for f, n in queries):
            return None
        st = self.state(name)
        ti = self._text_index()
        if ti is None:
            return None
        try:
            todo = ti.unindexed(st.fid, CATCH_UP)
            if todo:
                items: list[tuple[int, str, Source]] = []
                held = 0  # octets read into `items`: indexed each time they reach CATCH_UP_HELD
                for r in self.index.rows(st.fid, todo).values():
                    with contextlib.suppress(StoreError):
                        source = self._text_source(st, r)
                        items.append((r.uid, r.base, source))
                        held += len(source) if isinstance(source, bytes) else 0
                    if held >= CATCH_UP_HELD:
                        ti.index_messages(st.fid, items)
                        items, held = [], 0
                if items:
                    ti.index_messages(st.fid, items)
            answers = [ti.hits(st.fid, f, n) for f, n in queries]
            if ti.known(st.fid) != len(st.uids):  # messages removed behind the index's back: only current ones
                answers = [_present(st.uids, a) for a in answers]
            return answers, ti.unchecked(st.fid)
        except sqlite3.Error as exc:
            log.warning("full-text index of %s not used: %s", self.user.address, exc)
            return None

    def _text_source(self, st: FolderState, row: MessageRow) -> Source:
        """What the text index reads of a message: up to MEMORY_DATA_LIMIT its octets as served; above
        it its file's path (following a rename by another program), read in pieces (store.fts)."""
        if row.size <= MEMORY_DATA_LIMIT:
            return self._read_crlf(st, row)[1]
        return self._resolve(st, row)[1]

    @_locked
    def rebuild_text_index(self) -> int:
        """Index every message of every folder afresh (`postier reindex`); returns the count."""
        ti = self._text_index()
        try:
            if ti is None:
                raise sqlite3.DatabaseError("cannot open")
            ti.clear()
        except sqlite3.DatabaseError:  # damaged: start a new file (it holds nothing else)
            if ti is not None:
                ti.detach()
            self._text = None
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.index_path.parent / FTS_NAME}{suffix}")
            ti = self._text_index()
            if ti is None:
                return 0
        return build_from_maildir(ti, [self.path_of(f.name) for f in self.list_folders()])

    # -- writes -------------------------------------------------------------------------------

    def _after_uids_added(self, st: FolderState, new_uids: Sequence[int], modseq: int) -> None:
        a = array("I", st.uids)
        a.extend(new_uids)
        st.uids = a
        st.version += 1
        st.flagtab = None
        st.highestmodseq = max(st.highestmodseq, modseq)
        st.uidnext = max(st.uidnext, (new_uids[-1] + 1) if new_uids else st.uidnext)

    def _after_uids_removed(self, st: FolderState, gone: Iterable[int], modseq: int) -> None:
        g = set(gone)
        if g:
            st.uids = array("I", [u for u in st.uids if u not in g])
            st.version += 1
            st.flagtab = None
        st.highestmodseq = max(st.highestmodseq, modseq)

    def append(self, name: str, data: bytes, flag_names: Sequence[str] = (),
               internal_date: float | None = None) -> tuple[int, int]:
        """RFC 9051 §6.3.12 APPEND of one message (see `append_many`). Returns (uidvalidity, uid)
        for APPENDUID (RFC 4315 §3)."""
        uidvalidity, uids = self.append_many(name, [(data, flag_names, internal_date)])
        return uidvalidity, uids[0]

    def spool(self) -> SpoolFile:
        """A file in the Maildir's tmp/ for a message that arrives in pieces (a large APPEND
        literal): `append_many` delivers it by rename. No lock: nothing shared is touched."""
        return SpoolFile(self.root / "tmp")

    def append_many(self, name: str, messages: Sequence[tuple[bytes | SpoolFile, Sequence[str], float | None]]
                    ) -> tuple[int, list[int]]:
        """APPEND of (data, flag names, internal date) messages, all or none (RFC 3502 §6.3.11:
        MULTIAPPEND is atomic). Each is durable (tmp, fsync) before any is renamed into the folder,
        the folder is fsynced before the index learns of them, and if one rename fails the others
        are taken back out. Returns (uidvalidity, uids in order) for APPENDUID (RFC 4315 §3).

        The files are written and fsynced in the Maildir's tmp/ before the user lock is taken
        (nothing shared is touched there, as with `spool`), so that the user's other sessions do
        not wait for those fsyncs; under the lock they are moved into the folder by rename."""
        if not messages:
            raise StoreError("no message to append")
        spooled: list[tuple[SpoolFile, bytes | None, Sequence[str]]] = []
        try:
            for data, flag_names, internal_date in messages:
                if isinstance(data, bytes):
                    data = to_crlf(data)  # (a SpoolFile did this as it was written)
                    spool = self.spool()
                    spooled.append((spool, data, flag_names))
                    spool.write(data)
                else:
                    spool = data
                    spooled.append((spool, None, flag_names))
                spool.sync(internal_date)
                if spool.failed is not None:
                    raise StoreError(f"message not stored: {spool.failed}")
            return self._append_spooled(name, spooled)
        finally:
            for spool, _data, _flags in spooled:
                spool.discard()  # (nothing to do for a delivered one)

    @_locked
    def _append_spooled(self, name: str, messages: Sequence[tuple[SpoolFile, bytes | None, Sequence[str]]]
                        ) -> tuple[int, list[int]]:
        """`append_many`'s part under the lock: (spooled and fsynced file, its content when it was
        in memory, flag names) into the folder, then the index."""
        n = normalize_name(name)
        if not self._exists(n):
            raise MailboxNotFound("no such mailbox")
        st = self._open(n)
        row = self.index.folder(n)
        assert row is not None
        prepared: list[tuple[SpoolFile, bytes | None, str, int, list[str]]] = []
        for spool, data, flag_names in messages:
            bits, kws = names_to_flags(flag_names)
            row = self.index.add_keywords(row, st.path, kws)
            st.keywords = row.keywords
            kws = self.index.canonical_keywords(row, kws)
            suffix = encode_suffix("", bits, kws, row.keywords) if (bits or kws) else ""
            prepared.append((spool, data, suffix, bits, kws))
        drafts: list[MaildirDraft] = []
        published: list[str] = []
        try:  # the same durable write as a delivery: tmp, fsync, rename, fsync of the directory
            try:
                folder = "" if n == INBOX else st.path.name
                for spool, _data, _suffix, _bits, _kws in prepared:
                    draft = MaildirDraft.adopt(st.path, spool)  # fsynced in tmp/: delivered by rename
                    drafts.append(draft)
                    # RFC 9208 §4.1: over the quota, nothing is stored (reserved until indexed below).
                    quota.reserve(self.index.conn, self.user.quota, draft.name, folder, spool.size, self.root)
                    draft.sync()  # (its data was fsynced before the lock: nothing left to write)
            except BaseException:
                for d in drafts:
                    d.discard()
                    quota.release(self.index.conn, d.name)
                raise
            try:
                for draft, (_spool, _data, suffix, *_rest) in zip(drafts, prepared, strict=True):
                    draft.publish(suffix)
                    published.append(f"{draft.dest_dir}/{draft.name}{suffix}")
            except BaseException:  # all or nothing: take back the ones already in the folder
                self._take_back(drafts, published)
                raise
        except (DeliveryError, OSError) as exc:
            raise StoreError(f"message not stored: {exc}") from exc
        fault_point("imap.append")  # the files are in the Maildir, not yet in the index
        now = int(time.time())
        entries = [(draft.name, 1 if suffix else 0, suffix, bits, " ".join(kws), spool.size,
                    spool.mtime if spool.mtime is not None else now, 0)
                   for draft, (spool, _data, suffix, bits, kws) in zip(drafts, prepared, strict=True)]
        # The renames are durable (the directory fsynced, with the UID journal at the same time)
        # before the index learns of the messages.
        renamed_into = [functools.partial(sync_new, d) for d in dict.fromkeys(d.dest_dir for d in drafts)]
        try:
            modseq, uids = self.index.add_messages(row, st.path, entries, renamed_into)
        except (DeliveryError, OSError) as exc:
            raise StoreError(f"message not stored: {exc}") from exc
        self._after_uids_added(st, uids, modseq)
        # the full-text index (store/fts.py); a streamed message is indexed by the next search's catch-up
        self._text_add([(d.name, data) for d, (_spool, data, *_rest) in zip(drafts, prepared, strict=True)
                        if data is not None])
        return st.uidvalidity, uids

    @_locked
    def delivery_suffix(self, name: str, flag_names: Sequence[str]) -> str:
        """The maildir(5) info suffix (":2,FSa") that gives a message delivered into the folder these
        flags (RFC 5232 §5: Sieve's imap4flags), the folder created when missing. Keywords are
        registered with the folder first, so their letters mean them once the file appears; names
        that are not flags are left out (RFC 5232 §3), as are \\Recent and keywords beyond the 26
        letters a file name can carry."""
        n = normalize_name(name)
        if not self._exists(n):
            with contextlib.suppress(MailboxExists):
                self._create(n, self._default_use(n) or None)
        valid: list[str] = []
        for f in flag_names:
            with contextlib.suppress(InvalidKeyword):
                names_to_flags([f])
                valid.append(f)
        bits, kws = names_to_flags(valid)
        if not (bits or kws):
            return ""
        row = self._row(n)
        if kws:
            try:
                row = self.index.add_keywords(row, self.path_of(n), kws)
                kws = self.index.canonical_keywords(row, kws)
            except StoreLimit:
                kws = []
            st = self.states.get(n)
            if st is not None:
                st.keywords = row.keywords
        return encode_suffix("", bits, kws, row.keywords)

    @_locked
    def store(self, name: str, uids: Iterable[int], mode: str, flag_names: Sequence[str],
              unchangedsince: int | None = None) -> StoreResult:
        """RFC 9051 §6.4.6 STORE: mode "FLAGS", "+FLAGS" or "-FLAGS"; RFC 7162 §3.1.3 UNCHANGEDSINCE."""
        n = normalize_name(name)
        st = self.state(n)
        bits, kws = names_to_flags(flag_names)
        row = self.index.folder(n)
        assert row is not None
        if mode != "-FLAGS":
            row = self.index.add_keywords(row, st.path, kws)
            kws = self.index.canonical_keywords(row, kws)
        rows = self.index.rows(st.fid, uids)
        changes, unchanged, conflicts = plan_store(rows, mode, bits, kws, unchangedsince)
        modseq, done = self.index.set_flags(row, st.path, changes)
        st.highestmodseq = max(st.highestmodseq, modseq)
        st.keywords = row.keywords
        after = self.index.rows(st.fid, done)
        tab = st.flagtab
        if tab is not None and tab.uids is st.uids:
            for u, r in after.items():
                i = _bisect(st.uids, u)
                if i < len(st.uids) and st.uids[i] == u:
                    tab.flags[i] = r.flags
                    if r.keywords:
                        tab.keywords[u] = r.keywords
                    else:
                        tab.keywords.pop(u, None)
                    if tab.modseq is not None:
                        tab.modseq[i] = r.modseq
        return StoreResult(modseq, after, unchanged, conflicts, row.keywords)

    @_locked
    def expunge(self, name: str, uids: Iterable[int] | None = None) -> list[int]:
        """RFC 9051 §6.4.3 EXPUNGE (RFC 4315 §2.1 UID EXPUNGE when `uids` is given): remove the
        \\Deleted messages. Returns the expunged UIDs."""
        n = normalize_name(name)
        st = self.state(n)
        want = set(uids) if uids is not None else None
        rows = [r for r in self.index.all_rows(st.fid)
                if r.flags & FLAG_DELETED and (want is None or r.uid in want)] if want is None or len(want) > 64 \
            else [r for r in self.index.rows(st.fid, want).values() if r.flags & FLAG_DELETED]
        return self._remove(st, rows)

    def _remove(self, st: FolderState, rows: Sequence[MessageRow], fault: str = "imap.expunge") -> list[int]:
        if not rows:
            return []
        row = self.index.folder(st.name)
        assert row is not None
        for r in rows:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(st.path / r.relpath())
            fault_point(fault)  # some files are gone, the index not yet updated
        fsync_folder(st.path, sorted({r.relpath().split("/", 1)[0] for r in rows}))  # where files went
        gone = [r.uid for r in rows]
        modseq = self.index.remove_messages(row, rows)
        self._after_uids_removed(st, gone, modseq)
        self._text_forget(st.fid, rows)
        return gone

    @_locked
    def delete_uids(self, name: str, uids: Iterable[int]) -> list[int]:
        """Remove messages whatever their flags (POP3 DELE at QUIT)."""
        st = self.state(normalize_name(name))
        return self._remove(st, list(self.index.rows(st.fid, uids).values()), "pop3.update")

    @_locked
    def copy(self, src: str, uids: Iterable[int], dst: str) -> CopyResult:
        """RFC 9051 §6.4.7 COPY with COPYUID (RFC 4315 §3): hard links where possible, all or nothing."""
        s, d = normalize_name(src), normalize_name(dst)
        if not self._exists(d):
            raise MailboxNotFound("no such mailbox")
        ul = list(uids)
        if self.user.quota is None:
            return self._copy(s, ul, d, move=False)
        # RFC 9208 §4.1: a COPY over the quota stores nothing (a MOVE within one user changes nothing).
        hold = f"copy:{secrets.token_hex(8)}"
        size = sum(r.size for r in self.index.rows(self.state(s).fid, ul).values())
        quota.reserve(self.index.conn, self.user.quota, hold, "", size, self.root)
        try:
            return self._copy(s, ul, d, move=False)
        finally:
            quota.release(self.index.conn, hold)

    @_locked
    def move(self, src: str, uids: Iterable[int], dst: str) -> CopyResult:
        """RFC 6851 MOVE: rename the files into the destination, new UIDs there, expunged here."""
        s, d = normalize_name(src), normalize_name(dst)
        if not self._exists(d):
            raise MailboxNotFound("no such mailbox")
        return self._move(s, list(uids), d)

    def _move(self, s: str, uids: list[int], d: str) -> CopyResult:
        return self._copy(s, uids, d, move=True)

    def _copy(self, s: str, uids: list[int], d: str, move: bool) -> CopyResult:
        sst = self.state(s)
        dst = self._open(d)
        # s == d: RFC 6851 §3.3 allows MOVE into the same mailbox (new UIDs, the old ones expunged)
        rows = self.index.rows(sst.fid, uids)
        ordered = [rows[u] for u in sorted(rows)]
        drow = self.index.folder(d)
        srow = self.index.folder(s)
        assert drow is not None and srow is not None
        # Keywords move with the messages: register them in the destination first.
        all_k = {k for r in ordered for k in (r.keywords.split(" ") if r.keywords else [])}
        drow = self.index.add_keywords(drow, dst.path, sorted(all_k))
        dst.keywords = drow.keywords
        known_bases = {b for (b,) in self.index.conn.execute("SELECT base FROM msgs WHERE folder=?", (dst.fid,))} \
            if len(ordered) > 32 else None
        placed: list[Path] = []
        entries: list[tuple[str, int, str, int, str, int, int | None, int | None]] = []
        done_src: list[MessageRow] = []
        try:
            for r in ordered:
                r, sp = self._resolve(sst, r)
                base = r.base
                clash = (base in known_bases) if known_bases is not None else \
                    self.index.conn.execute("SELECT 1 FROM msgs WHERE folder=? AND base=?",
                                            (dst.fid, base)).fetchone() is not None
                if clash or s == d:
                    base = unique_name(r.size)
                kws = r.keywords.split(" ") if r.keywords else []
                suffix = encode_suffix(r.suffix, r.flags, kws, drow.keywords) if (r.flags or kws or r.suffix) else ""
                sub = 1 if suffix else 0
                target = dst.path / ("cur" if sub else "new") / (base + suffix)
                if move:
                    os.rename(sp, target)
                else:
                    _link_or_copy(sp, target, dst.path / "tmp" / base)
                placed.append(target)
                done_src.append(r)
                entries.append((base, sub, suffix, r.flags, r.keywords, r.size, r.idate, r.lf))
        except FileNotFoundError:
            self._undo(placed, done_src, sst, move)
            raise MessageGone("a message was expunged meanwhile") from None
        except OSError as exc:
            self._undo(placed, done_src, sst, move)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OverQuota("no space left") from None
            raise
        fsync_folder(dst.path)
        if move:
            fsync_folder(sst.path)
        modseq, new_uids = self.index.add_messages(drow, dst.path, entries) if entries else (dst.highestmodseq, [])
        self._after_uids_added(dst, new_uids, modseq)
        src_uids = [r.uid for r in done_src]
        self.index.copy_cache(sst.fid, dst.fid, list(zip(src_uids, new_uids, strict=True)))
        if move and src_uids:
            m2 = self.index.remove_messages(srow, done_src)
            self._after_uids_removed(sst, src_uids, m2)
            self._text_forget(sst.fid, done_src)
        return CopyResult(dst.uidvalidity, src_uids, new_uids)

    def _undo(self, placed: list[Path], done: list[MessageRow], sst: FolderState, move: bool) -> None:
        for target, r in zip(placed, done, strict=True):
            with contextlib.suppress(OSError):
                if move:
                    os.rename(target, sst.path / r.relpath())
                else:
                    os.unlink(target)

    def _take_back(self, drafts: Sequence[MaildirDraft], published: Sequence[str]) -> None:
        """All or nothing: discard the drafts not yet in the folder, remove the files that are
        (`published`, in the drafts' order), and release every draft's quota reservation."""
        for d in drafts[len(published):]:
            d.discard()
        for path in published:
            with contextlib.suppress(OSError):
                os.unlink(path)
        for d in drafts:
            quota.release(self.index.conn, d.name)

    def import_with_uids(self, name: str, uidvalidity: int, uidnext: int,
                         messages: Iterable[tuple[int, bytes | SpoolFile, Sequence[str], float | None]]) -> bool:
        """Messages moved from another store keep their UIDVALIDITY and UIDs (an export's
        dovecot-uidlist), so clients need not resynchronise (RFC 9051 §2.3.1.1: the triple of name,
        UIDVALIDITY and UID still names the same message). Only into a folder that never held a
        message (UIDNEXT 1, no file in new/ or cur/): otherwise False, with nothing changed, and the
        caller appends instead (nothing is consumed when that is known before the first message).

        As APPEND does, each message is written and fsynced in tmp/ (with its internal date) before
        the user lock is taken; under the lock, after checking again that the folder is unused, the
        files are renamed into cur/ with their flags, cur/ is fsynced, the journal is rewritten with
        the new UIDVALIDITY, UIDNEXT (at least the highest UID + 1) and every UID, and the index
        commits (`UserIndex.import_messages`). A delivery or APPEND meanwhile waits for the lock (a
        delivered file that lands in new/ is indexed by the next sync), so its UID comes after the
        imported ones. All or none: a failed rename takes the others back out. A message given as a
        `SpoolFile` (of `spool`: a large one, never held whole) is that file, discarded in any case."""
        n = normalize_name(name)
        if not 0 < uidvalidity < 2**32 or not self._unused(n):
            return False
        spooled: list[tuple[int, SpoolFile, Sequence[str]]] = []
        seen: set[int] = set()
        try:
            for uid, data, flag_names, internal_date in messages:
                spool = data if isinstance(data, SpoolFile) else self.spool()
                spooled.append((uid, spool, flag_names))
                if not 0 < uid < 2**32 - 1 or uid in seen:
                    raise StoreError(f"bad or repeated UID {uid} in the import")
                seen.add(uid)
                if not isinstance(data, SpoolFile):
                    spool.write(data)  # (bare LF becomes CRLF as it is written)
                names_to_flags(flag_names)  # InvalidKeyword before anything is placed
                spool.sync(internal_date if internal_date is not None else time.time())
                if spool.failed is not None:
                    raise StoreError(f"message not stored: {spool.failed}")
            spooled.sort(key=lambda m: m[0])
            nxt = max(uidnext, spooled[-1][0] + 1 if spooled else 1)
            if nxt > 2**32 - 1:
                raise StoreLimit("no UIDs left in this mailbox")
            return self._import_spooled(n, uidvalidity, nxt, spooled)
        finally:
            for _uid, spool, _flags in spooled:
                spool.discard()  # (nothing to do for a delivered one)

    @_locked
    def _unused(self, n: str) -> bool:
        """The folder exists and never held a message (UIDNEXT 1, no file in new/ or cur/)."""
        if not self._exists(n):
            raise MailboxNotFound("no such mailbox")
        st = self._open(n, force=True)  # indexes any file delivered meanwhile
        if st.uidnext != 1 or st.uids:
            return False
        for sub in ("new", "cur"):  # a file that landed after that sync
            with os.scandir(st.path / sub) as it:
                if any(not e.name.startswith(".") for e in it):
                    return False
        return True

    @_locked
    def _import_spooled(self, n: str, uidvalidity: int, uidnext: int,
                        messages: Sequence[tuple[int, SpoolFile, Sequence[str]]]) -> bool:
        """`import_with_uids`'s part under the lock: (UID, spooled and fsynced file, flag names)."""
        if not self._unused(n):
            return False
        st = self.states[n]
        row = self.index.folder(n)
        assert row is not None
        wanted: list[str] = []
        flags: list[tuple[int, list[str]]] = []
        for _uid, _spool, flag_names in messages:
            bits, kws = names_to_flags(flag_names)
            flags.append((bits, kws))
            wanted += kws
        row = self.index.add_keywords(row, st.path, dict.fromkeys(wanted))
        folder = "" if n == INBOX else st.path.name
        drafts: list[MaildirDraft] = []
        published: list[str] = []
        entries: list[tuple[int, str, int, str, int, str, int, int | None, int | None]] = []
        try:
            try:
                for _uid, spool, _flags in messages:
                    draft = MaildirDraft.adopt(st.path, spool)
                    drafts.append(draft)
                    # RFC 9208 §4.1: over the quota, nothing is stored (reserved until indexed below)
                    quota.reserve(self.index.conn, self.user.quota, draft.name, folder, spool.size, self.root)
                    draft.sync()
                for draft, (uid, spool, _flags), (bits, kws) in zip(drafts, messages, flags, strict=True):
                    kws = self.index.canonical_keywords(row, kws)
                    # into cur/ (":2," and the flags): seen by clients in the store they come from
                    suffix = encode_suffix("", bits, kws, row.keywords)
                    draft.publish(suffix)
                    published.append(f"{draft.dest_dir}/{draft.name}{suffix}")
                    entries.append((uid, draft.name, 1, suffix, bits, " ".join(kws), spool.size, spool.mtime, 0))
                fsync_folder(st.path, ("cur",))
            except BaseException:  # all or nothing: take back the ones already in the folder
                self._take_back(drafts, published)
                raise
        except (DeliveryError, OSError) as exc:
            raise StoreError(f"message not stored: {exc}") from exc
        self.index.import_messages(row, st.path, uidvalidity, uidnext, entries)
        self.states.pop(n, None)  # a new UIDVALIDITY: a new state
        self._open(n)
        return True

    # -- POP3 (RFC 1939) -------------------------------------------------------------------

    @_locked
    def pop_listing(self) -> tuple[list[PopMessage], int]:
        """The INBOX as POP3 numbers it (UID order) and its UIDVALIDITY, in one consistent step."""
        st = self._open(INBOX)
        out = []
        for r in self.index.all_rows(st.fid):
            # RFC 1939 §7 UIDL: 1-70 printable characters, never reused: UIDVALIDITY and UID,
            # Dovecot's default pop3_uidl_format (%08Xu%08Xv).
            out.append(PopMessage(r.uid, r.size, st.path / r.relpath(), f"{r.uid:08X}{st.uidvalidity:08X}"))
        return out, st.uidvalidity

    @_locked
    def pop_delete(self, uids: Sequence[int], uidvalidity: int) -> bool:
        """RFC 1939 §6: remove the messages marked deleted; False if the INBOX was renumbered since
        the listing (UIDVALIDITY changed), in which case nothing is removed."""
        if self._open(INBOX).uidvalidity != uidvalidity:
            return False
        self.delete_uids(INBOX, uids)
        return True

    @_locked
    def mark_seen(self, uids: Iterable[int]) -> None:
        self.store(INBOX, uids, "+FLAGS", ["\\Seen"])


def _bisect(a: array[int], x: int) -> int:
    lo, hi = 0, len(a)
    while lo < hi:
        mid = (lo + hi) // 2
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _present(uids: array[int], found: set[int]) -> set[int]:
    """The members of `found` that are in `uids` (ascending): the folder's current messages."""
    n = len(uids)
    if len(found) > n // 16:
        return found.intersection(uids)
    out: set[int] = set()
    for u in found:
        i = bisect_left(uids, u)
        if i < n and uids[i] == u:
            out.add(u)
    return out


def _link_or_copy(src: Path, dst: Path, tmp: Path) -> None:
    try:
        os.link(src, dst)
        return
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
    shutil.copyfile(src, tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    shutil.copystat(src, tmp)
    os.rename(tmp, dst)


# -- every user, one process ----------------------------------------------------------------------

#: The notifier's key for a user's mailbox names and subscriptions (created, deleted, renamed,
#: (un)subscribed), which IMAP NOTIFY watches (RFC 5465 §5.4, §5.5).
NAMES = "\x00names"
_DELIVERED = "\x00delivered\x00"  # to other processes: files no index knows yet ("\x00delivered\x00FOLDER")


class ChangeNotifier:
    """Wakes IDLE sessions: deliveries and other sessions call `notify()`; for changes made by other
    programs, each watched folder's `new/` and `cur/` mtimes are polled every `interval` seconds
    (two stat calls per folder, in the event loop) while someone watches it.

    A change of the user's mailbox names is told as the `NAMES` key: it only wakes. What changed,
    renames included, NOTIFY reads from the store in one step (`Mailboxes.names_since`)."""

    def __init__(self, interval: float = 0.5):
        self.interval = max(0.05, interval)
        #: Also tell other processes serving the same mailboxes (`[server] workers` > 1), or None.
        self.forward: Callable[[str, str], None] | None = None
        self._watchers: dict[tuple[str, str], set[Callable[[], None]]] = {}
        self._pollers: dict[tuple[str, str], asyncio.Task[None]] = {}

    def watch(self, address: str, folder: str, path: Path | None, callback: Callable[[], None]) -> Callable[[], None]:
        key = (address, folder)
        self._watchers.setdefault(key, set()).add(callback)
        if path is not None and key not in self._pollers:
            with contextlib.suppress(RuntimeError):
                self._pollers[key] = asyncio.get_running_loop().create_task(self._poll(key, path))

        def unwatch() -> None:
            ws = self._watchers.get(key)
            if ws is not None:
                ws.discard(callback)
                if not ws:
                    del self._watchers[key]
                    t = self._pollers.pop(key, None)
                    if t is not None:
                        t.cancel()
        return unwatch

    def notify(self, address: str, folder: str) -> None:
        """A change made in this process: wake its watchers, and other processes' (`forward`)."""
        if self.forward is not None:
            self.forward(address, folder)
        self.local(address, folder)

    def delivered(self, address: str, folder: str) -> None:
        """`notify` for files that no index knows yet (a delivery): other processes must read the
        directory, not only the index (`MailStore.changed_elsewhere`)."""
        if self.forward is not None:
            self.forward(address, _DELIVERED + folder)
        self.local(address, folder)

    def local(self, address: str, folder: str) -> None:
        """Wake this process's watchers of the folder (a change seen here or told by another process)."""
        for cb in list(self._watchers.get((address, folder), ())):
            try:
                cb()
            except Exception:
                log.exception("change watcher failed")

    async def _poll(self, key: tuple[str, str], path: Path) -> None:
        def mtimes() -> tuple[int, int]:
            try:
                return os.stat(path / "new").st_mtime_ns, os.stat(path / "cur").st_mtime_ns
            except OSError:
                return -1, -1
        last = mtimes()
        while key in self._watchers:
            await asyncio.sleep(self.interval)
            now = mtimes()
            if now != last:
                last = now
                self.local(*key)

    def close(self) -> None:
        for t in self._pollers.values():
            t.cancel()
        self._pollers.clear()
        self._watchers.clear()


class MailStore:
    """Every user's mailboxes for one process: a shared `UserMailbox` per user (reference counted),
    a worker pool for the blocking calls, and the change notifier."""

    def __init__(self, mail_root: Path, special_use_folders: Sequence[str] = tuple(DEFAULT_SPECIAL_USE),
                 workers: int = 8, poll_interval: float = 0.5, keep_idle: int = 16, shared: bool = False):
        self.mail_root = mail_root
        self.shared = shared  # other processes serve the same mailboxes (a lock between them)
        self.special_use_folders = tuple(special_use_folders)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="store")
        self.notifier = ChangeNotifier(poll_interval)
        self._users: dict[str, UserMailbox] = {}
        self._idle: OrderedDict[str, UserMailbox] = OrderedDict()
        self.keep_idle = keep_idle
        self._lock = threading.Lock()

    def index_path(self, user: User) -> Path:
        return user.home(self.mail_root) / INDEX_NAME

    def acquire(self, user: User) -> UserMailbox:
        """The user's mailboxes (blocking: opens the index); pair with `release()`."""
        with self._lock:
            mb = self._users.get(user.address)
            if mb is None:
                mb = self._idle.pop(user.address, None)
                if mb is not None and not mb.index_file_unchanged():
                    mb.close()  # the index file was replaced or deleted meanwhile: reopen it
                    mb = None
                if mb is None:
                    md = user.maildir(self.mail_root)
                    durable.ensure_dirs(md.parent)
                    mb = UserMailbox(user, md, self.index_path(user), self.special_use_folders, self.shared)
                self._users[user.address] = mb
            mb.user = user  # a new login brings the current quota
            mb.refs += 1
            return mb

    def release_later(self, mb: Mailboxes) -> None:
        """`release()` in a worker thread, without waiting (the last release may commit an index)."""
        self.executor.submit(self.release, mb)

    def release(self, mb: Mailboxes) -> None:
        """Done with the user's mailboxes. The last release keeps them open a while (an LRU of
        `keep_idle` users), so a client that reconnects finds its folder states warm."""
        assert isinstance(mb, UserMailbox)  # handed out by acquire()
        with self._lock:
            mb.refs -= 1
            if mb.refs <= 0 and self._users.get(mb.user.address) is mb:
                del self._users[mb.user.address]
                self._idle[mb.user.address] = mb
                while len(self._idle) > self.keep_idle:
                    _addr, old = self._idle.popitem(last=False)
                    old.close()

    def lock_maildrop(self, user: User) -> Callable[[], None] | None:
        """POP3's exclusive maildrop lock (RFC 1939 §8; blocking): its release function, or None
        when another session, in this process or another, holds it (`store.maildrop`)."""
        return maildrop.lock_maildrop(user.home(self.mail_root))

    def changed_elsewhere(self, address: str, folder: str) -> None:
        """Another process changed the folder, or delivered into it: wake its IDLE sessions. A
        delivery makes the next look at the folder read its directory; a change through the index
        only needs the index re-read (`UserMailbox.snapshot` sees that SQLite's data_version moved)."""
        if folder.startswith(_DELIVERED):
            folder = folder[len(_DELIVERED):]
            self.mark_dirty(address, folder)
        self.notifier.local(address, folder)

    def mark_dirty(self, address: str, folder: str) -> None:
        """A delivery wrote into the folder: the next look at it reads the directory."""
        mb = self._users.get(address) or self._idle.get(address)
        if mb is not None:
            mb.dirty.add(folder)

    def call[T](self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        """Run a blocking store call in the worker pool."""
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.notifier.close()
        self.executor.shutdown(wait=True)
        with self._lock:
            for mb in [*self._users.values(), *self._idle.values()]:
                mb.close()
            self._users.clear()
            self._idle.clear()

    # -- POP3 entry points (blocking; run them through `call`) ---------------------------------

    def open_inbox(self, user: User) -> list[PopMessage]:
        """INBOX messages in UID order (POP3 message numbers are positions in this list)."""
        mb = self.acquire(user)
        try:
            return mb.pop_listing()[0]
        finally:
            self.release(mb)

    def mark_seen(self, user: User, uids: Iterable[int]) -> None:
        mb = self.acquire(user)
        try:
            mb.mark_seen(list(uids))
        finally:
            self.release(mb)

    def delete(self, user: User, uids: Iterable[int]) -> list[int]:
        """Remove INBOX messages (POP3 DELE, applied in the UPDATE state); returns the UIDs removed."""
        mb = self.acquire(user)
        try:
            return mb.delete_uids(INBOX, list(uids))
        finally:
            self.release(mb)

    def message_bytes(self, user: User, uid: int) -> bytes:
        """An INBOX message with CRLF line ends (files other tools wrote with bare LF converted)."""
        mb = self.acquire(user)
        try:
            rows = mb.rows(INBOX, [uid])
            if uid not in rows:
                raise MessageGone("message was expunged")
            return mb.read(INBOX, rows[uid])
        finally:
            self.release(mb)

    def reindex(self, user: User) -> dict[str, int]:
        """Rebuild the user's index from the Maildir, in place (journals keep the UIDs); a damaged
        index file is replaced. Safe while a server runs: SQLite serialises the writers."""
        p = self.index_path(user)
        try:
            return self._reindex(user)
        except sqlite3.DatabaseError:
            log.warning("index of %s is damaged: recreating it", user.address)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(p) + suffix)
            return self._reindex(user)

    def _reindex(self, user: User) -> dict[str, int]:
        mb = self.acquire(user)
        try:
            with mb.lock:
                warned = mb.index.conn.execute("SELECT warned, low FROM quota_usage").fetchone()
                folders = mb.list_folders()
                names = {f.name for f in folders}
                for stale in set(mb.index.folder_names()) - names:
                    mb.index.forget_folder(stale)
                out: dict[str, int] = {}
                for f in folders:
                    mb.index.forget_folder(f.name)
                    mb.states.pop(f.name, None)
                    out[f.name] = len(mb.open(f.name, force=True).uids)
                quota.prune_pending(mb.index.conn, mb.root)  # the usage is the rebuilt rows' (triggers)
                if warned is not None:  # a rebuild is no drop in usage: warnings stay as they were
                    mb.index.conn.execute("UPDATE quota_usage SET warned=?, low=?", warned)
                mb.rebuild_text_index()
                return out
        finally:
            self.release(mb)


def on_delivery(store: MailStore) -> Callable[[User, str], None]:
    """The MDA listener that tells `store` about a delivery: the folder is re-read when next looked
    at, and IDLE sessions watching it wake up (wired in server/app.py `build_app`)."""

    def delivered(user: User, folder: str) -> None:
        name = INBOX if folder.upper() == INBOX else folder
        store.mark_dirty(user.address, name)
        store.notifier.delivered(user.address, name)

    return delivered
