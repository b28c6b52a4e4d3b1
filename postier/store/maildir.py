"""Durable delivery into Maildir (maildir(5), Maildir++ folders as Dovecot lays them out) and mbox.

Delivery follows the Maildir protocol exactly: create a uniquely named file in `tmp/`, write it,
fsync it, rename it into `new/`, fsync `new/`. Only then may the caller answer 250 (DESIGN.md
invariant). Every function here blocks on the disk: servers call them from a worker thread.

Messages are stored as received on the wire (CRLF line endings). Dovecot and mutt read such files;
IMAP and POP3 can serve them without conversion, and sizes in the file name (`,S=`) are the sizes
clients are told.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import random
import re
import socket
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from ..durable import ensure_dirs, forget, fsync_dir
from ..faults import fault_point
from ..message.types import MessageBody, User
from ..proto.crlf import to_crlf
from . import quota
from ..proto.mutf7 import mutf7_encode
from .errors import InvalidName, OverQuota, StoreError, StoreLimit
from .index import INDEX_NAME, UserIndex
from .quota import OVER_QUOTA

log = logging.getLogger("postier.mda")

SUBDIRS = ("cur", "new", "tmp")
_counter = itertools.count(1)
_rng = random.Random()  # seeded from os.urandom: no getrandom() system call per message
_pid = os.getpid()


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()
    _rng.seed()


os.register_at_fork(after_in_child=_after_fork)
_HOST = socket.gethostname().replace("/", "\\057").replace(":", "\\072")  # maildir(5) escaping


class DeliveryError(Exception):
    """Delivery failed; nothing was made visible in new/ (the caller answers 4xx)."""


def ensure_maildir(root: Path, again: bool = False) -> None:
    """Create root/{cur,new,tmp} (mode 0700) and every missing directory above, durably (each new
    directory's parent fsynced: durable.ensure_dirs). Free once done in this process, unless `again`
    (the Maildir was removed under us)."""
    if again:
        forget(root)
    ensure_dirs(*(root / sub for sub in SUBDIRS))


def unique_name(size: int) -> str:
    """A maildir(5) unique name: time, microseconds, pid, counter, randomness, host, size."""
    now = time.time()
    secs = int(now)
    usecs = int((now - secs) * 1_000_000)
    # Dovecot's ",S=" gives the physical size so readers need not stat the file.
    return f"{secs}.M{usecs:06d}P{_pid}Q{next(_counter)}R{_rng.getrandbits(32):08x}.{_HOST},S={size}"


_SIZE_RE = re.compile(r",S=(\d+)")


def size_from_name(name: str) -> int | None:
    m = _SIZE_RE.search(name.split(":2,", 1)[0])
    return int(m.group(1)) if m else None


class _DirSync:
    """Group commit for directory fsyncs: renames into one directory that happen before an fsync of
    it starts are all covered by that one fsync (concurrent deliveries to one Maildir share it).

    Also keeps directory file descriptors open (bounded LRU) and remembers which Maildirs exist,
    so a delivery costs no stat()/open() of its directories.
    """

    MAX_FDS = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._ids: dict[str, tuple[int, int]] = {}  # path -> (inode, device) of the kept descriptor
        self._requested: dict[str, int] = {}
        self._done: dict[str, int] = {}
        self._running: set[str] = set()
        self.ready: set[str] = set()

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is not None:
            # The directory may have been removed and made again (IMAP DELETE and CREATE in another
            # process): a kept descriptor would fsync the old one, and the new name would not be
            # durable. One stat per directory fsync (shared by a group commit); the old inode's
            # number cannot have been reused meanwhile, since the kept descriptor holds it.
            try:
                st = os.stat(path)
                same = (st.st_ino, st.st_dev) == self._ids.get(path)
            except OSError:
                same = False
            if not same:
                del self._fds[path]
                os.close(fd)
                fd = None
        if fd is None:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            st = os.fstat(fd)
            self._fds[path] = fd
            self._ids[path] = (st.st_ino, st.st_dev)
            while len(self._fds) > self.MAX_FDS:
                gone, old = self._fds.popitem(last=False)
                self._ids.pop(gone, None)
                os.close(old)
        else:
            self._fds.move_to_end(path)
        return fd

    def sync(self, path: str) -> None:
        with self._cond:
            ticket = self._requested.get(path, 0) + 1
            self._requested[path] = ticket
            while self._done.get(path, 0) < ticket:
                if path in self._running:
                    self._cond.wait()
                    continue
                self._running.add(path)
                target = self._requested[path]
                fd = os.dup(self._fd(path))
                self._cond.release()
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                    self._cond.acquire()
                    self._running.discard(path)
                    self._cond.notify_all()
                self._done[path] = max(self._done.get(path, 0), target)


_dirsync = _DirSync()


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write every part, in order (one writev in the usual case)."""
    total = sum(len(p) for p in parts)
    done = os.writev(fd, parts) if parts else 0
    if done == total:
        return
    view = memoryview(b"".join(parts))[done:]
    while view:
        view = view[os.write(fd, view):]


_INFO_RE = re.compile(r"^(?::2,[A-Za-z]{0,52})?$")


class MaildirDraft:
    """One message on its way into a Maildir (maildir(5)): created and written in tmp/ by the
    constructor, then `sync()` (fsync), `publish()` (rename into new/), and new/ is fsynced
    (`sync_new`) before anyone is told. Every step raises DeliveryError and then leaves nothing
    behind in tmp/; the steps are separate so that the delivery agent can run one step for many
    messages at a time (several fsyncs in parallel, one fsync of new/ for all the renames into it).
    """

    __slots__ = ("dest_dir", "fd", "info", "key", "name", "root", "size", "synced", "tmp")

    def __init__(self, root: Path, prefix: bytes, body: MessageBody | bytes, info: str = ""):
        self.root = root
        self.info = info  # the flags `publish()` gives the message unless told otherwise
        self.synced = False
        key = self.key = str(root)
        if key not in _dirsync.ready:
            ensure_maildir(root)
            _dirsync.ready.add(key)
        size = self.size = len(prefix) + (body.size if isinstance(body, MessageBody) else len(body))
        self.name = unique_name(size)
        self.tmp = f"{key}/tmp/{self.name}"
        self.dest_dir = f"{key}/new"
        try:
            try:
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:  # the Maildir was removed under us: recreate it once
                _dirsync.ready.discard(key)
                ensure_maildir(root, again=True)
                _dirsync.ready.add(key)
                self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise DeliveryError(f"cannot create {self.tmp}: {exc.strerror}") from exc
        try:
            if isinstance(body, MessageBody) and not body.in_memory:
                with os.fdopen(os.dup(self.fd), "wb") as out:
                    out.write(prefix)
                    body.copy_to(out)
                    out.flush()
            elif isinstance(body, MessageBody):
                _write_all(self.fd, [prefix, *body.iter_chunks()])
            else:
                _write_all(self.fd, [prefix, body])
        except OSError as exc:
            self._fail(exc)

    @classmethod
    def adopt(cls, root: Path, spool: SpoolFile) -> MaildirDraft:
        """A draft over a file already written in a Maildir tmp/ on this file system (a streamed
        IMAP APPEND, `SpoolFile`): `sync()` and `publish()` then move it into `root` by rename."""
        if spool.failed is not None:
            raise DeliveryError(f"message not received: {spool.failed}")
        self = cls.__new__(cls)
        self.root = root
        self.info = ""
        self.synced = spool.synced  # `SpoolFile.sync` fsynced it already
        self.size = spool.size
        key = self.key = str(root)
        if key not in _dirsync.ready:
            ensure_maildir(root)
            _dirsync.ready.add(key)
        self.name = unique_name(spool.size)
        self.tmp = spool.path
        self.dest_dir = f"{key}/new"
        self.fd = spool.take_fd()
        return self

    def sync(self) -> None:
        """maildir(5): the file is on disk before it is in new/."""
        try:
            if not self.synced:  # (a second fsync of a clean file still flushes the disk's cache)
                os.fsync(self.fd)
                self.synced = True
            fd, self.fd = self.fd, -1
            os.close(fd)  # released even when it reports an error
        except OSError as exc:
            self._fail(exc)

    def publish(self, info: str | None = None) -> str:
        """Rename into new/, or with an info suffix (flags, ":2,S") into cur/ (maildir(5)): visible
        to readers, durable once `dest_dir` is fsynced (`sync_new`). Returns the file's name."""
        info = self.info if info is None else info
        if not _INFO_RE.match(info):  # it becomes part of a file name: flag letters only
            self._fail(OSError(f"invalid maildir info {info[:20]!r}"))
        if info:
            self.dest_dir = f"{self.key}/cur"
        fault_point("maildir.before_rename")
        try:
            os.rename(self.tmp, f"{self.dest_dir}/{self.name}{info}")
        except OSError as exc:
            self._fail(exc)
        fault_point("maildir.after_rename")
        return self.name + info

    def discard(self) -> None:
        """Give up on this message (nothing is left in tmp/)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.tmp)
        except OSError:
            pass

    def _fail(self, exc: OSError) -> None:
        self.discard()
        raise DeliveryError(f"delivery to {self.root} failed: {exc.strerror or exc}") from exc


class SpoolFile:
    """A message arriving in pieces (a large IMAP APPEND literal), written straight into a file in
    a Maildir's tmp/ so that memory stays bounded whatever its size; delivered by rename
    (`MaildirDraft.adopt`). Line ends are made CRLF on the way (bare LF, as `append` does for
    messages in memory). Writes happen as data arrives (small, into the page cache); a failing
    write is remembered in `failed` and the rest ignored, so that the reader never raises for the
    disk: the APPEND is refused when the file is delivered. `discard()` removes the file unless it
    was delivered."""

    __slots__ = ("_fd", "_prev_cr", "failed", "mtime", "path", "received", "size", "synced")

    def __init__(self, tmp_dir: Path):
        self.path = f"{tmp_dir}/{unique_name(0)}.append"
        self.size = 0  # bytes in the file (after CRLF)
        self.received = 0  # bytes given to write()
        self.failed: str | None = None
        self.mtime: int | None = None  # the internal date `sync` gave the file
        self.synced = False  # `sync` fsynced it, nothing written since
        self._prev_cr = False
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            self._fd = -1
            self.failed = exc.strerror or str(exc)

    def write(self, data: bytes) -> None:
        self.received += len(data)
        self.synced = False
        if self.failed is not None or not data:
            return
        head = b""
        if self._prev_cr and data[:1] == b"\n":  # a CRLF split between two pieces
            head, data = b"\n", data[1:]
        data = to_crlf(data)
        self._prev_cr = data[-1:] == b"\r"
        try:
            _write_all(self._fd, [head, data])
            self.size += len(head) + len(data)
        except OSError as exc:
            self.failed = exc.strerror or str(exc)

    def read_all(self) -> bytes:
        """The content so far (a message below MEMORY_DATA_LIMIT, cluster mode's upload)."""
        with open(self.path, "rb") as f:
            return f.read()

    def pieces(self, size: int = 256 << 10) -> Iterator[bytes]:
        """The content so far, `size` octets at a time (CATENATE's TEXT parts, copied on)."""
        with open(self.path, "rb") as f:
            while piece := f.read(size):
                yield piece

    def sync(self, mtime: float | None = None) -> None:
        """The whole message is here: give it its internal date (`mtime`) and fsync it, before it is
        delivered (`MaildirDraft.adopt`; its own `sync` then finds nothing left to write). A failure
        is remembered in `failed`, as for `write`."""
        if self.failed is not None or self._fd < 0:
            return
        try:
            if mtime is not None:
                os.utime(self._fd, (mtime, mtime))
                self.mtime = int(mtime)
            os.fsync(self._fd)
            self.synced = True
        except OSError as exc:
            self.failed = exc.strerror or str(exc)

    def take_fd(self) -> int:
        fd, self._fd = self._fd, -1
        return fd

    def discard(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                os.close(fd)
            except OSError:
                pass
            try:
                os.unlink(self.path)
            except OSError:
                pass


def sync_new(new_dir: str) -> None:
    """fsync a Maildir's new/ (or cur/) (group commit with concurrent callers); DeliveryError on failure."""
    try:
        _dirsync.sync(new_dir)
    except OSError as exc:
        raise DeliveryError(f"fsync of {new_dir} failed: {exc.strerror or exc}") from exc


def deliver_maildir(root: Path, prefix: bytes, body: MessageBody | bytes, info: str = "") -> str:
    """Deliver prefix+body into the Maildir at `root`; return the new file's name (in new/, or in
    cur/ with the `info` flags suffix, e.g. ":2,FS").

    Blocking. On any error nothing is left in tmp/, and nothing is visible in new/ unless only the
    final fsync of new/ failed (the caller answers 4xx either way).
    """
    draft = MaildirDraft(root, prefix, body, info)
    draft.sync()
    name = draft.publish()
    sync_new(draft.dest_dir)  # ...and the rename is on disk before we answer 250
    return name


# -- mbox ---------------------------------------------------------------------------------------

_FROM_RE = re.compile(rb"^(>*From )", re.MULTILINE)


def mboxrd_quote(data: bytes) -> bytes:
    """mboxrd: every line matching ^>*From gets one more '>' (reversible, unlike mboxo)."""
    return _FROM_RE.sub(rb">\1", data)


def deliver_mbox(path: Path, envelope_from: str, prefix: bytes, body: MessageBody | bytes,
                 lock_timeout: float = 30.0) -> None:
    """Append one message to an mbox file (mboxrd, LF line endings), with dot-lock and fcntl lock.

    The append is fsynced before returning; on failure the file is truncated back to its old size
    so that no half message stays behind.
    """
    ensure_dirs(path.parent)
    raw = prefix + (body.getvalue() if isinstance(body, MessageBody) else body)
    text = mboxrd_quote(raw.replace(b"\r\n", b"\n"))
    if not text.endswith(b"\n"):
        text += b"\n"
    sender = envelope_from or "MAILER-DAEMON"
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
    record = f"From {sender} {stamp}\n".encode() + text + b"\n"
    lock = path.with_name(path.name + ".lock")
    deadline = time.monotonic() + lock_timeout
    while True:  # dot-lock, as mutt and procmail expect
        try:
            lfd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(lfd)
            break
        except FileExistsError:
            try:
                if time.time() - lock.stat().st_mtime > 300:  # stale lock (procmail's rule)
                    lock.unlink()
                    continue
            except FileNotFoundError:
                continue
            if time.monotonic() > deadline:
                raise DeliveryError(f"{path} is locked") from None
            time.sleep(0.05)
    try:
        created = False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        except FileNotFoundError:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            created = True
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
            start = os.fstat(fd).st_size
            try:
                view = memoryview(record)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
                if created:  # a new mbox file: its name is durable once the directory is fsynced
                    fsync_dir(path.parent)
            except OSError as exc:
                os.ftruncate(fd, start)
                raise DeliveryError(f"mbox delivery to {path} failed: {exc.strerror}") from exc
        finally:
            os.close(fd)
    finally:
        try:
            lock.unlink()
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


# -- folder names (IMAP's, and Sieve's fileinto: one mapping) --------------------------------------

SEPARATOR = "."
INBOX = "INBOX"
MAX_NAME_CHARS = 200
MAX_DEPTH = 16
_RESERVED = frozenset({"cur", "new", "tmp"})
_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f/%*]")


def normalize_name(name: str) -> str:
    """Check an IMAP mailbox name and return its canonical form (INBOX upper-cased, RFC 9051 §5.1).

    Raises StoreError for names that could not be a folder here, whatever the client sent.
    """
    if name.upper() == INBOX:
        return INBOX
    if not name or len(name) > MAX_NAME_CHARS:
        raise InvalidName("invalid mailbox name (length)")
    if _BAD_CHARS.search(name):
        raise InvalidName("invalid mailbox name (forbidden character)")
    parts = name.split(SEPARATOR)
    if len(parts) > MAX_DEPTH:
        raise StoreLimit("mailbox hierarchy too deep")
    for p in parts:
        if not p or p.strip() != p:
            raise InvalidName("invalid mailbox name (empty or padded component)")
        if p.lower() in _RESERVED:
            raise InvalidName(f"invalid mailbox name ({p!r} is reserved by Maildir)")
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    return SEPARATOR.join(parts)


def folder_dir_name(name: str) -> str:
    """The Maildir++ directory name of a (normalized, non-INBOX) folder: "." + modified UTF-7."""
    enc = mutf7_encode(name)
    if len(enc) + 1 > 255:  # NAME_MAX
        raise StoreLimit("mailbox name too long")
    return "." + enc


def folder_root(maildir: Path, folder: str | None) -> Path:
    """INBOX is the Maildir root; another folder is the Maildir++ subfolder that IMAP shows under the
    same name ("." + modified UTF-7: `folder_dir_name`), so that a Sieve fileinto "Café" (RFC 5228
    §4.1: names are UTF-8) lands where IMAP lists "Café". DeliveryError for a name that cannot be a
    folder (the caller keeps the message in INBOX)."""
    if not folder:
        return maildir
    try:
        name = normalize_name(folder)
        return maildir if name == INBOX else maildir / folder_dir_name(name)
    except StoreError as exc:
        raise DeliveryError(f"invalid folder name {folder!r}: {exc}") from None


def deliver_to_user(mail_root: Path, user: User, prefix: bytes, body: MessageBody | bytes, envelope_from: str,
                    folder: str | None = None, info: str = "") -> tuple[bool, str]:
    """Blocking delivery to one user's Maildir folder or mbox: (True, file name) or (False, the error;
    `quota.OVER_QUOTA` when the user's quota has no room for the message). `info` is the Maildir flags
    suffix (":2,FS"); an mbox has no place for flags."""
    try:
        if user.mailbox_format == "mbox":
            deliver_mbox(user.mbox(mail_root), envelope_from, prefix, body)
            return True, "mbox"
        root = folder_root(user.maildir(mail_root), folder)
        if user.quota is None:
            return True, deliver_maildir(root, prefix, body, info)
        draft = MaildirDraft(root, prefix, body, info)
        hold = QuotaHold(mail_root, user)
        try:
            hold.reserve(draft)
            draft.sync()
            name = draft.publish()
            sync_new(draft.dest_dir)
        except BaseException:
            draft.discard()
            hold.release(draft)
            raise
        return True, name
    except OverQuota:
        log.info("delivery to %s refused: over quota", user.address)
        return False, OVER_QUOTA
    except (DeliveryError, OSError, sqlite3.Error) as exc:
        log.error("delivery to %s failed: %s", user.address, exc)
        return False, str(exc)


class QuotaHold:
    """A delivery's reservation of its size in the user's index (store/quota.py): taken once the
    file is written in tmp/ (its name is the key), dropped by the rescan that indexes it.

    The connections stay open (an LRU of `_KEEP` users): closing the last connection to a WAL
    database checkpoints and fsyncs it, which would cost each delivery several milliseconds."""

    _KEEP = 64
    _open: OrderedDict[str, tuple[sqlite3.Connection, int, threading.Lock]] = OrderedDict()
    _lock = threading.Lock()

    def __init__(self, mail_root: Path, user: User):
        self.user = user
        self.maildir = user.maildir(mail_root)
        self.index_path = user.home(mail_root) / INDEX_NAME

    def _conn(self) -> tuple[sqlite3.Connection, threading.Lock]:
        key = str(self.index_path)
        with QuotaHold._lock:
            got = QuotaHold._open.get(key)
            if got is not None:
                try:
                    same = os.stat(key).st_ino == got[1]
                except OSError:
                    same = False
                if same:
                    QuotaHold._open.move_to_end(key)
                    return got[0], got[2]
                del QuotaHold._open[key]  # the index was replaced (reindex of a damaged one)
                got[0].close()
            idx = UserIndex(self.index_path)  # the schema (and the usage row) if the user has no index yet
            # A lost reservation only under-counts until the rescan indexes the file: no fsync per delivery.
            idx.conn.execute("PRAGMA synchronous=NORMAL")
            entry = (idx.conn, os.stat(key).st_ino, threading.Lock())
            QuotaHold._open[key] = entry
            while len(QuotaHold._open) > QuotaHold._KEEP:
                _k, old = QuotaHold._open.popitem(last=False)
                with old[2]:
                    old[0].close()
            return entry[0], entry[2]

    def reserve(self, draft: MaildirDraft) -> None:
        """Raises OverQuota when the message does not fit (the caller discards the draft)."""
        conn, lock = self._conn()
        rel = "" if draft.root == self.maildir else draft.root.name
        with lock:
            quota.reserve(conn, self.user.quota, draft.name, rel, draft.size, self.maildir)

    def release(self, draft: MaildirDraft) -> None:
        with contextlib.suppress(sqlite3.Error, OSError):
            conn, lock = self._conn()
            with lock:
                quota.release(conn, draft.name)

    def usage(self) -> int:
        """Bytes in use now: indexed, reserved and waiting unindexed in new/ (the RCPT check)."""
        if not self.index_path.exists():
            return quota.unindexed_bytes(self.maildir)
        conn, lock = self._conn()
        with lock:
            return quota.usage(conn, self.maildir)[0]

    def warning_due(self) -> int | None:
        """The warning level newly reached, if any (`quota.warning_due`; pipeline/quota.py sends it)."""
        if self.user.quota is None:
            return None
        conn, lock = self._conn()
        with lock:
            return quota.warning_due(conn, self.user.quota, self.maildir)
