"""Durable directories, renames and small files under the POSIX power-loss model (fsync(2), rename(2)).

POSIX makes a new directory entry (a create, mkdir or rename) survive a power loss only once the
directory that holds it has been fsynced; a file's data only once the file has been fsynced. A
`mkdir -p` therefore needs one fsync per new component, of that component's parent, or the whole new
subtree (and every message acknowledged inside it) can vanish. ext4's journal usually hides the
missing fsyncs; other filesystems, and the model postier promises, do not. This module is the one
place postier creates directories for data it acknowledges (the data directory, Maildirs and
folders, the queue spool, DKIM keys, certificates, databases), and the one place for a directory
rename that must survive (both parents fsynced).

Cost: every path made durable is remembered (per process), so steady-state deliveries do no
syscall here. A path not yet remembered gets its ancestors' parents fsynced once, even those that
existed already: another process may have made them and died before its fsync.

`POSTIER_TEST_SKIP_DIR_FSYNC=1` is a test-only switch: it skips the parent fsyncs of new
directories, bringing back the bug this module fixes, so that the power-cut test
(tests/powercut/) can show that it detects it. Never set it anywhere else.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

StrPath = str | os.PathLike[str]

#: Test-only: skip the parent fsyncs of new directories (see the module docstring).
SKIP_DIR_FSYNC = os.environ.get("POSTIER_TEST_SKIP_DIR_FSYNC") == "1"

_known: set[str] = set()  # absolute paths known to be durable directories (in this process)
_lock = threading.Lock()


def fsync_dir(path: StrPath) -> None:
    """fsync a directory so that a create, rename or unlink inside it is durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_together: ThreadPoolExecutor | None = None


def _forget_pool() -> None:
    global _together
    _together = None  # a forked worker has none of the parent's threads: it makes its own pool


os.register_at_fork(after_in_child=_forget_pool)


def together(calls: Sequence[Callable[[], None]]) -> None:
    """Run fsync steps that do not depend on each other at the same time (the last in this thread,
    the others in helper threads), and return when all are done: the file system commits them in
    one journal commit (one flush of the disk's cache) rather than one each. The first error is
    raised, after every step has finished."""
    global _together
    if len(calls) <= 1:
        for call in calls:
            call()
        return
    with _lock:
        if _together is None:
            _together = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        pool = _together
    futures = [pool.submit(call) for call in calls[:-1]]
    error: BaseException | None = None
    try:
        calls[-1]()
    except BaseException as exc:
        error = exc
    for f in futures:
        failed = f.exception()
        if failed is not None and error is None:
            error = failed
    if error is not None:
        raise error


def fsync_file(path: StrPath) -> None:
    """fsync a file's data and size (by name: for files written by another library)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _abs(path: StrPath) -> str:
    return os.path.abspath(os.fspath(path))


def ensure_dirs(*paths: StrPath, mode: int = 0o700) -> None:
    """Create every path in `paths` and their missing ancestors (new ones with `mode`), durably.

    Each new component is made top-down, then the parents are fsynced bottom-up (deepest first), so
    that on return the whole chain survives a power loss. Raises OSError (NotADirectoryError if a
    component is a file); on error nothing is remembered and the next call tries again.
    """
    todo = [p for p in map(_abs, paths) if p not in _known]
    if not todo:
        return
    chains: list[str] = []
    parents: dict[str, bool] = {}  # directory to fsync -> it was made by us (errors are then fatal)
    for p in todo:
        for _attempt in range(p.count(os.sep) + 1):
            try:
                chains += _make_chain(p, mode, parents)
                break
            except FileNotFoundError as exc:
                # A directory remembered as made was removed meanwhile (by an admin, or a test that
                # moves Maildirs aside): forget it and everything below it, then walk up further.
                forget(os.path.dirname(exc.filename or p))
        else:
            raise FileNotFoundError(errno.ENOENT, "cannot create the directory", p)
    if not SKIP_DIR_FSYNC:
        for d in sorted(parents, key=lambda s: s.count(os.sep), reverse=True):  # bottom-up
            try:
                fsync_dir(d)
            except PermissionError:
                if parents[d]:
                    raise
                # An ancestor we did not make and may not open (say /home): nothing we made is in it.
    with _lock:
        _known.update(chains)


def _make_chain(p: str, mode: int, parents: dict[str, bool]) -> list[str]:
    """mkdir p and its ancestors not yet known, top-down; note each one's parent in `parents`."""
    chain: list[str] = []
    a = p
    while a not in _known:
        chain.append(a)
        up = os.path.dirname(a)
        if up == a:  # the filesystem root: nothing above to fsync
            break
        a = up
    for d in reversed(chain):  # top-down
        try:
            os.mkdir(d, mode)
            created = True
        except FileExistsError:
            if not os.path.isdir(d):
                raise NotADirectoryError(f"{d} exists and is not a directory") from None
            created = False
        up = os.path.dirname(d)
        if up != d:
            parents[up] = parents.get(up, False) or created
    return chain


def make_dir(path: StrPath, mode: int = 0o700) -> None:
    """mkdir exactly `path` (FileExistsError if it exists), its ancestors made durable, its parent
    fsynced: for a new IMAP folder, which must not exist yet."""
    p = _abs(path)
    parent = os.path.dirname(p)
    ensure_dirs(parent)
    os.mkdir(p, mode)
    if not SKIP_DIR_FSYNC:
        fsync_dir(parent)
    with _lock:
        _known.add(p)


def rename(src: StrPath, dst: StrPath) -> None:
    """rename(2), then fsync the destination's parent and, if different, the source's: both the new
    name and the removal of the old one survive a power loss (a moved folder neither vanishes nor
    comes back twice)."""
    s, d = _abs(src), _abs(dst)
    os.rename(s, d)
    forget(s)
    fsync_dir(os.path.dirname(d))
    if os.path.dirname(s) != os.path.dirname(d):
        fsync_dir(os.path.dirname(s))


def write_file(path: StrPath, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically and durably: a temporary file written and fsynced,
    renamed over `path`, the directory fsynced. The directory is made durable first."""
    p = Path(_abs(path))
    ensure_dirs(p.parent)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, p)
    fsync_dir(p.parent)


def forget(path: StrPath) -> None:
    """The directory `path` (and everything below it) was removed or moved: make it again next time."""
    p = _abs(path)
    prefix = p + os.sep
    with _lock:
        _known.difference_update([k for k in _known if k == p or k.startswith(prefix)])


def is_known(path: StrPath) -> bool:
    """True once `path` was made durable by this process (for tests)."""
    return _abs(path) in _known


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """One write transaction on an autocommit SQLite connection: BEGIN IMMEDIATE takes the write
    lock at once (no upgrade deadlock between two readers turned writers), COMMIT on success,
    ROLLBACK on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def use_wal(conn: sqlite3.Connection, pragma: str = "journal_mode", tries: int = 50) -> None:
    """Put an SQLite database in WAL mode. Switching needs a moment's exclusive lock, and SQLite answers
    "database is locked" at once, without its busy handler, while another process (a sibling worker
    opening the same file at start-up) holds one: retry for up to about 5 s before giving up."""
    for attempt in range(tries):
        try:
            conn.execute(f"PRAGMA {pragma}=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.1)
