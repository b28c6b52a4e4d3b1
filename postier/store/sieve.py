"""Per-user Sieve script storage (RFC 5804 §1.6, §2.6-§2.11 semantics): scripts under the user's home,
durable writes, one active script, quotas; shared by ManageSieve, the admin CLI and delivery.

Layout: ``<home>/sieve/<name>.sieve`` and ``<home>/sieve/.active`` holding the active script's name
(absent: no active script). Every change is write-to-temporary, fsync, rename, fsync directory, under
an exclusive ``fcntl`` lock on ``<home>/sieve/.lock`` so that two sessions (or processes) never
interleave a rename with a SETACTIVE or a DELETESCRIPT. Script names are checked (RFC 5804 §1.6: no
control characters; here also no "/", no leading ".", at most 128 characters) so that no path is built
from user input without containment.
"""

from __future__ import annotations

import fcntl
import os
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..durable import fsync_dir, use_wal
from ..message.types import User

__all__ = ["FileSieveStorage", "ScriptError", "ScriptStore", "Scripts", "SieveStorage", "Tracking", "TrackingStore",
           "valid_script_name"]

MAX_NAME = 128


class ScriptError(Exception):
    """A refused operation; ``code`` is the ManageSieve response code (RFC 5804 §1.3) or ""."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def valid_script_name(name: str) -> bool:
    """RFC 5804 §1.6: no control characters (Cc, Zl, Zp, U+FFFE/FFFF); no path separators here."""
    if not name or len(name) > MAX_NAME or name.startswith(".") or "/" in name or "\\" in name:
        return False
    return not any(unicodedata.category(c) in ("Cc", "Zl", "Zp", "Cs") or c in "\ufffe\uffff" for c in name)


class Scripts(Protocol):
    """One user's scripts, wherever they are kept: `ScriptStore` (files under the user's home) or, in
    cluster mode, PostgreSQL (`store.cluster.sieve.ClusterScripts`). Every method blocks."""

    max_script_size: int
    def active(self) -> str | None: ...
    def list(self) -> list[tuple[str, bool]]: ...
    def get(self, name: str) -> bytes: ...
    def have_space(self, name: str, size: int) -> None: ...
    def put(self, name: str, data: bytes, check: Callable[[bytes], None] | None = None) -> None: ...
    def delete(self, name: str) -> None: ...
    def rename(self, old: str, new: str) -> None: ...
    def set_active(self, name: str) -> None: ...
    def active_script(self) -> tuple[str, bytes] | None: ...


class Tracking(Protocol):
    """Vacation and duplicate tracking of one user (`TrackingStore`, or PostgreSQL in cluster mode)."""

    def exclusive(self) -> AbstractContextManager[None]:
        """Hold the user's tracking for this process alone, against every other process and node,
        until the block ends: a delivery's checks (`seen`) and marks (`record`) are then one step,
        so two deliveries at once cannot both find "not replied yet" (RFC 5230 §4.1, RFC 7352 §3)."""
        ...
    def seen(self, key: str, now: float) -> bool: ...
    def record(self, key: str, until: float) -> None: ...
    def close(self) -> None: ...


class SieveStorage(Protocol):
    """Where each user's scripts and tracking are: `FileSieveStorage` on one machine, PostgreSQL in
    cluster mode (`store.cluster.sieve.ClusterSieve`). Delivery, ManageSieve, the web settings and
    `postier sieve` all reach the scripts through it."""

    def scripts(self, user: User) -> Scripts: ...
    def tracking(self, user: User) -> Tracking: ...


@dataclass(frozen=True)
class FileSieveStorage:
    """Single-machine mode: ``<home>/sieve`` of each user (`ScriptStore`, `TrackingStore`)."""

    mail_root: Path
    max_scripts: int = 20
    max_script_size: int = 256 * 1024

    def scripts(self, user: User) -> ScriptStore:
        return ScriptStore(user.home(self.mail_root) / "sieve", self.max_scripts, self.max_script_size)

    def tracking(self, user: User) -> TrackingStore:
        return TrackingStore(user.home(self.mail_root) / "sieve")


@dataclass
class ScriptStore:
    """One user's scripts. Blocking (disk and fsync): async callers run it in a thread."""

    root: Path  # <home>/sieve
    max_scripts: int = 20
    max_script_size: int = 256 * 1024

    def _path(self, name: str) -> Path:
        if not valid_script_name(name):
            raise ScriptError(f"invalid script name {name!r}", "")
        return self.root / f"{name}.sieve"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, path: Path, data: bytes) -> None:
        """Durable replace: temporary file, fsync, rename, fsync directory."""
        tmp = path.with_name(f".tmp.{os.getpid()}.{path.name}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)

    # -- queries --------------------------------------------------------------------------------

    def active(self) -> str | None:
        try:
            name = (self.root / ".active").read_text("utf-8").strip()
        except FileNotFoundError:
            return None
        return name if name and valid_script_name(name) and self._path(name).is_file() else None

    def list(self) -> list[tuple[str, bool]]:
        """(name, active) for every script, by name."""
        if not self.root.is_dir():
            return []
        active = self.active()
        names = sorted(p.name[:-6] for p in self.root.iterdir()
                       if p.name.endswith(".sieve") and not p.name.startswith("."))
        return [(n, n == active) for n in names if valid_script_name(n)]

    def get(self, name: str) -> bytes:
        try:
            return self._path(name).read_bytes()
        except FileNotFoundError:
            raise ScriptError(f"no script {name!r}", "NONEXISTENT") from None

    def have_space(self, name: str, size: int) -> None:
        """RFC 5804 §2.5 HAVESPACE; raises ScriptError with QUOTA/MAXSIZE or QUOTA/MAXSCRIPTS."""
        if size > self.max_script_size:
            raise ScriptError("script too large", "QUOTA/MAXSIZE")
        existing = {n for n, _ in self.list()}
        if name not in existing and len(existing) >= self.max_scripts:
            raise ScriptError("too many scripts", "QUOTA/MAXSCRIPTS")

    # -- changes --------------------------------------------------------------------------------

    def put(self, name: str, data: bytes, check: Callable[[bytes], None] | None = None) -> None:
        """RFC 5804 §2.6 PUTSCRIPT: ``check`` raises to refuse the script (parse errors) before any
        write; an existing script of that name is replaced atomically."""
        path = self._path(name)
        self.have_space(name, len(data))
        if check is not None:
            check(data)
        with self._locked():
            self.have_space(name, len(data))
            self._write(path, data)

    def delete(self, name: str) -> None:
        """RFC 5804 §2.10: the active script cannot be deleted (ACTIVE)."""
        path = self._path(name)
        with self._locked():
            if self.active() == name:
                raise ScriptError("script is active", "ACTIVE")
            try:
                path.unlink()
            except FileNotFoundError:
                raise ScriptError(f"no script {name!r}", "NONEXISTENT") from None
            fsync_dir(self.root)

    def rename(self, old: str, new: str) -> None:
        """RFC 5804 §2.11.1 RENAMESCRIPT: the active script stays active under its new name."""
        src, dst = self._path(old), self._path(new)
        with self._locked():
            if not src.is_file():
                raise ScriptError(f"no script {old!r}", "NONEXISTENT")
            if dst.exists():
                raise ScriptError(f"script {new!r} exists", "ALREADYEXISTS")
            was_active = self.active() == old
            os.rename(src, dst)
            fsync_dir(self.root)
            if was_active:
                self._write(self.root / ".active", new.encode("utf-8"))

    def set_active(self, name: str) -> None:
        """RFC 5804 §2.8 SETACTIVE; "" deactivates."""
        with self._locked():
            if name == "":
                try:
                    (self.root / ".active").unlink()
                    fsync_dir(self.root)
                except FileNotFoundError:
                    pass
                return
            if not self._path(name).is_file():
                raise ScriptError(f"no script {name!r}", "NONEXISTENT")
            self._write(self.root / ".active", name.encode("utf-8"))

    def active_script(self) -> tuple[str, bytes] | None:
        """The active script's name and text, for delivery."""
        name = self.active()
        if name is None:
            return None
        try:
            return name, self.get(name)
        except ScriptError:
            return None


class TrackingStore:
    """Who got a vacation reply and which message ids were seen (RFC 5230 §4.1, RFC 7352 §3), per user:
    SQLite (WAL) in ``<home>/sieve/.tracking.sqlite``, shared safely by concurrent deliveries.

    Implements ``postier.sieve.vacation.VacationStore`` (``seen``/``record``); duplicate tracking uses
    the same two calls with its own keys. Expired rows are pruned as new ones are written.
    """

    def __init__(self, root: Path, max_rows: int = 100_000) -> None:
        import sqlite3

        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(root / ".tracking.sqlite", timeout=30, isolation_level=None,
                                   check_same_thread=False)
        use_wal(self._db)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (key TEXT PRIMARY KEY, until REAL NOT NULL)")
        self._max_rows = max_rows
        self._lock_path = root / ".tracking.lock"

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """`Tracking.exclusive`: an flock on ``.tracking.lock`` (the worker processes of one machine;
        released by the kernel if the holder dies)."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def seen(self, key: str, now: float) -> bool:
        row = self._db.execute("SELECT until FROM seen WHERE key = ?", (key,)).fetchone()
        return row is not None and float(row[0]) > now

    def record(self, key: str, until: float) -> None:
        import time

        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("INSERT INTO seen (key, until) VALUES (?, ?) ON CONFLICT(key) DO UPDATE "
                             "SET until = max(until, excluded.until)", (key, until))
            self._db.execute("DELETE FROM seen WHERE until < ?", (time.time(),))
            count = self._db.execute("SELECT count(*) FROM seen").fetchone()[0]
            if count > self._max_rows:  # bounded: the oldest entries go first
                self._db.execute("DELETE FROM seen WHERE key IN (SELECT key FROM seen WHERE key != ? "
                                 "ORDER BY until LIMIT ?)", (key, count - self._max_rows))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
