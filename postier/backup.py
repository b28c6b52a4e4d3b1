"""Backups of a running server's data directory: `postier backup`, `backup verify`, `restore`.

What a backup holds: every file under the data directory that a server needs (configuration,
certificates and keys, accounts, DKIM keys, the queue, every Maildir and mbox, the mailbox indexes
and UID journals, report stores), each listed in `MANIFEST.json` with its size, mode and SHA-256.
It is made while the server runs, and is consistent in the sense a restore needs:

- SQLite databases are copied through SQLite's online backup API (a transactionally consistent
  snapshot), never byte-copied while a writer may be mid-commit. Their `-wal`/`-shm` side files are
  not copied: the snapshot is complete without them.
- Maildir message files in `new/` and `cur/` are immutable once there (flags live in the name), so
  a plain copy (or, with `--hardlink`, a link) is consistent. A file renamed for a flag change while
  the walk runs is found again under its new name; one expunged meanwhile is left out. `tmp/` holds
  deliveries that were never acknowledged and is skipped.
- Order: message files first, then the databases, then the UID journals and keyword files. Every
  message file in the backup was delivered before its index snapshot was taken, so the index knows
  its UID; an index entry whose file is absent (delivered or expunged in between) is handled by the
  store's ordinary directory comparison on first use (the message simply is not there). The
  append-only `postier-uidlist` journals are copied after the index, so they never lag behind it.
- The queue's spool files and rows may disagree by the messages that arrived or left in between;
  the queue's start-up recovery drops either half, and both cases are messages acknowledged after
  the backup started or already delivered.
- mbox files are copied under their fcntl lock, the one the MDA takes to append.

A backup is written into `DEST.partial` and renamed to `DEST` only once every file and the manifest
are fsynced: a crash or any error leaves no directory that looks like a finished backup. Any error
fails the command with a message naming the file: there is no silent partial backup.

Incremental: `--link-dest PREV` hard-links files from an earlier backup instead of copying them
when they are unchanged (message files: same folder, same unique name and size, content being
immutable; other files: same path, size and SHA-256).

Written here rather than with an archiver library because consistency needs the store's rules
(online SQLite backup, Maildir renames, lock order); sending the result off-site is left to the
tools made for it (restic, borg), which deduplicate a directory like this one well.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import stat
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "MANIFEST.json"
FORMAT = "postier-backup 1"
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: Side files of SQLite databases: the online backup makes them unnecessary.
_SQLITE_SIDE = ("-wal", "-shm", "-journal")
#: Small files appended or rewritten in place that must be copied after the databases.
_LATE_FILES = ("postier-uidlist", "dovecot-keywords")
#: Run-time state that a restored server must not inherit.
_SKIP_NAMES = frozenset({"postier-pop3.lock", "server.log"})
_SKIP_DIRS = frozenset({"run"})
_CHUNK = 1 << 20


class BackupError(Exception):
    """A backup, verification or restore failed; str() names the file and the problem."""


@dataclass
class Entry:
    path: str  # relative POSIX path inside the backup
    size: int
    sha256: str
    mode: int
    kind: str = "file"  # "file" | "sqlite"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256, "mode": self.mode,
                "kind": self.kind}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        try:
            return cls(str(d["path"]), int(d["size"]), str(d["sha256"]), int(d["mode"]),
                       str(d.get("kind", "file")))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackupError(f"{MANIFEST}: malformed entry {d!r}") from exc


@dataclass
class Stats:
    files: int = 0
    databases: int = 0
    linked: int = 0
    bytes: int = 0
    vanished: int = 0
    entries: list[Entry] = field(default_factory=list)


# -- helpers ----------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _copy_file(src: Path, dst: Path, lock: bool = False) -> tuple[str, int]:
    """Copy src to a new file dst (fsynced), hashing on the way; `lock` takes a shared fcntl lock."""
    h = hashlib.sha256()
    n = 0
    with open(src, "rb") as fin:
        if lock:
            fcntl.lockf(fin.fileno(), fcntl.LOCK_SH)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                h.update(chunk)
                fout.write(chunk)
                n += len(chunk)
            fout.flush()
            os.fsync(fout.fileno())
    return h.hexdigest(), n


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(16) == _SQLITE_MAGIC
    except OSError:
        return False


def _maildir_key(rel: PurePosixPath) -> tuple[str, str] | None:
    """(folder, unique name) of a Maildir message file path, else None."""
    if len(rel.parts) >= 2 and rel.parts[-2] in ("new", "cur"):
        return str(rel.parent.parent), rel.name.split(":2,", 1)[0]
    return None


def _safe_rel(path: str) -> PurePosixPath:
    """A manifest path as a relative path that cannot leave the backup or data directory."""
    p = PurePosixPath(path)
    if p.is_absolute() or not p.parts or any(part in ("", ".", "..") for part in p.parts) or "\x00" in path:
        raise BackupError(f"{MANIFEST}: unsafe path {path!r}")
    return p


def _walk(root: Path) -> Iterator[tuple[PurePosixPath, os.DirEntry[str]]]:
    """Every regular file under root (relative path, entry), without following symlinks."""
    stack = [(root, PurePosixPath())]
    while stack:
        d, rel = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except FileNotFoundError:
            continue  # a folder deleted while we walk
        except OSError as exc:
            raise BackupError(f"{d}: cannot read directory: {exc.strerror}") from None
        for e in entries:
            r = rel / e.name
            if e.is_dir(follow_symlinks=False):
                if not rel.parts and e.name in _SKIP_DIRS:
                    continue
                if e.name == "tmp" and (Path(e.path).parent / "cur").is_dir():
                    continue  # a Maildir's tmp/: never acknowledged
                stack.append((Path(e.path), r))
            elif e.is_file(follow_symlinks=False):
                yield r, e


# -- backup -----------------------------------------------------------------------------------------

def _load_manifest(dest: Path) -> dict[str, Any]:
    try:
        data = json.loads((dest / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise BackupError(f"{dest / MANIFEST}: missing (not a finished postier backup)") from None
    except (OSError, ValueError) as exc:
        raise BackupError(f"{dest / MANIFEST}: unreadable: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), list):
        raise BackupError(f"{dest / MANIFEST}: not a {FORMAT} manifest")
    return data


def backup(data_dir: Path, dest: Path, link_dest: Path | None = None, hardlink: bool = False,
           extra_files: dict[str, Path] | None = None) -> Stats:
    """Back up data_dir into dest (which must not exist); see the module docstring.

    `extra_files` maps a backup path to a file outside data_dir (a configuration file kept elsewhere).
    """
    data_dir = data_dir.resolve()
    dest = dest.absolute()
    if dest.exists():
        raise BackupError(f"{dest}: already exists (a backup goes into a new directory)")
    if dest == data_dir or data_dir in dest.parents:
        raise BackupError(f"{dest}: inside the data directory {data_dir}")
    if not data_dir.is_dir():
        raise BackupError(f"{data_dir}: no such data directory")
    prev: dict[str, Entry] = {}
    prev_msgs: dict[tuple[str, str], Entry] = {}
    if link_dest is not None:
        for d in _load_manifest(link_dest)["files"]:
            e = Entry.from_json(d)
            _safe_rel(e.path)
            prev[e.path] = e
            key = _maildir_key(PurePosixPath(e.path))
            if key is not None:
                prev_msgs[key] = e
    work = dest.with_name(dest.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(mode=0o700)
    stats = Stats()
    made_dirs: set[Path] = {work}

    def target(rel: PurePosixPath) -> Path:
        t = work.joinpath(*rel.parts)
        parent = t.parent
        if parent not in made_dirs:
            parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            p = parent
            while p != work and p not in made_dirs:
                made_dirs.add(p)
                p = p.parent
        return t

    def add_file(rel: PurePosixPath, src: Path, mode: int, lock: bool = False) -> None:
        key = _maildir_key(rel)
        t = target(rel)
        old = prev_msgs.get(key) if key is not None else None
        size = os.stat(src).st_size
        if old is not None and link_dest is not None and old.size == size:
            os.link(link_dest.joinpath(*PurePosixPath(old.path).parts), t)
            stats.entries.append(Entry(str(rel), size, old.sha256, mode))
            stats.linked += 1
            return
        if hardlink and key is not None:
            os.link(src, t)
            digest, n = _sha256_file(t)
        else:
            digest, n = _copy_file(src, t, lock=lock)
        old = prev.get(str(rel))
        if old is not None and link_dest is not None and old.sha256 == digest and old.size == n:
            os.unlink(t)
            os.link(link_dest.joinpath(*rel.parts), t)
            stats.linked += 1
        stats.entries.append(Entry(str(rel), n, digest, mode))
        stats.bytes += n

    try:
        databases: list[tuple[PurePosixPath, Path, int]] = []
        late: list[tuple[PurePosixPath, Path, int]] = []
        for rel, de in _walk(data_dir):
            name = rel.name
            if name in _SKIP_NAMES or name.endswith(_SQLITE_SIDE) or name.endswith(".lock"):
                continue
            src = Path(de.path)
            try:
                mode = stat.S_IMODE(de.stat(follow_symlinks=False).st_mode)
                if _maildir_key(rel) is None and _is_sqlite(src):  # message files are never databases
                    databases.append((rel, src, mode))
                    continue
                if name in _LATE_FILES:
                    late.append((rel, src, mode))
                    continue
                try:
                    add_file(rel, src, mode, lock=name == "mbox")
                except FileNotFoundError:
                    found = _renamed(src, rel)
                    if found is None:
                        stats.vanished += 1  # expunged while we walked
                        continue
                    add_file(found[0], found[1], mode)
                stats.files += 1
            except BackupError:
                raise
            except OSError as exc:
                raise BackupError(f"{src}: {exc.strerror or exc}") from None
        for rel, src, mode in databases:
            t = target(rel)
            try:
                _sqlite_backup(src, t)
                digest, n = _sha256_file(t)
            except (OSError, sqlite3.Error) as exc:
                raise BackupError(f"{src}: database backup failed: {exc}") from None
            stats.entries.append(Entry(str(rel), n, digest, mode, "sqlite"))
            stats.databases += 1
            stats.bytes += n
        for rel, src, mode in late:
            try:
                add_file(rel, src, mode)
            except FileNotFoundError:
                continue  # its folder was deleted meanwhile
            except OSError as exc:
                raise BackupError(f"{src}: {exc.strerror or exc}") from None
            stats.files += 1
        for name, src in (extra_files or {}).items():
            try:
                add_file(PurePosixPath(name), src, 0o600)
            except OSError as exc:
                raise BackupError(f"{src}: {exc.strerror or exc}") from None
            stats.files += 1
        manifest = {
            "format": FORMAT,
            "created": time.time(),
            "source": str(data_dir),
            "base": str(link_dest) if link_dest else None,
            "files": [en.to_json() for en in stats.entries],
        }
        mpath = work / MANIFEST
        fd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            json.dump(manifest, f, indent=0)
            f.flush()
            os.fsync(f.fileno())
        for d in sorted(made_dirs, key=lambda p: len(p.parts), reverse=True):
            _fsync_dir(d)
        os.rename(work, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise BackupError(f"{exc.filename or dest}: {exc.strerror or exc}") from None
    return stats


def _renamed(src: Path, rel: PurePosixPath) -> tuple[PurePosixPath, Path] | None:
    """A Maildir message file that vanished: its new name (flags changed, or new/ -> cur/), if any."""
    key = _maildir_key(rel)
    if key is None:
        return None
    folder = src.parent.parent
    for sub in ("cur", "new"):
        with contextlib.suppress(OSError):
            for e in os.scandir(folder / sub):
                if e.name.split(":2,", 1)[0] == key[1]:
                    return rel.parent.parent / sub / e.name, Path(e.path)
    return None


def _sqlite_backup(src: Path, dst: Path) -> None:
    s = sqlite3.connect(src, timeout=30)
    try:
        d = sqlite3.connect(dst)
        try:
            s.backup(d)
            d.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        finally:
            d.close()
    finally:
        s.close()
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(dst, 0o600)


# -- verify -----------------------------------------------------------------------------------------

def verify(dest: Path) -> list[str]:
    """Re-read every file against the manifest; the list of problems (empty when the backup is good)."""
    data = _load_manifest(dest)
    problems: list[str] = []
    listed: set[str] = set()
    for d in data["files"]:
        e = Entry.from_json(d)
        rel = _safe_rel(e.path)
        listed.add(str(rel))
        p = dest.joinpath(*rel.parts)
        try:
            digest, n = _sha256_file(p)
        except FileNotFoundError:
            problems.append(f"{e.path}: missing")
            continue
        except OSError as exc:
            problems.append(f"{e.path}: unreadable: {exc.strerror}")
            continue
        if n != e.size:
            problems.append(f"{e.path}: size {n}, manifest says {e.size}")
        elif digest != e.sha256:
            problems.append(f"{e.path}: SHA-256 differs from the manifest")
        elif e.kind == "sqlite":
            try:
                con = sqlite3.connect(f"file:{p}?mode=ro&immutable=1", uri=True)
                try:
                    row = con.execute("PRAGMA integrity_check").fetchone()
                finally:
                    con.close()
                if row is None or row[0] != "ok":
                    problems.append(f"{e.path}: database integrity check failed: {row}")
            except sqlite3.Error as exc:
                problems.append(f"{e.path}: database unreadable: {exc}")
    for rel, _e in _walk(dest):
        if str(rel) != MANIFEST and str(rel) not in listed:
            problems.append(f"{rel}: not in the manifest")
    return problems


# -- restore ----------------------------------------------------------------------------------------

def restore(dest: Path, data_dir: Path, config_name: str = "postier.toml") -> int:
    """Rebuild a data directory from a verified backup; the number of files restored."""
    problems = verify(dest)
    if problems:
        raise BackupError(f"{dest}: the backup does not verify: {problems[0]}"
                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    if data_dir.exists():
        if not data_dir.is_dir():
            raise BackupError(f"{data_dir}: not a directory")
        if any(data_dir.iterdir()):
            raise BackupError(f"{data_dir}: not empty (restore refuses to overwrite a data directory)")
    else:
        data_dir.mkdir(parents=True, mode=0o700)
        _fsync_dir(data_dir.parent)
    data = _load_manifest(dest)
    made: set[Path] = {data_dir}
    n = 0
    for d in data["files"]:
        e = Entry.from_json(d)
        rel = _safe_rel(e.path)
        t = data_dir.joinpath(*rel.parts)
        if t.parent not in made:
            t.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            p = t.parent
            while p != data_dir and p not in made:
                made.add(p)
                p = p.parent
        try:
            _copy_file(dest.joinpath(*rel.parts), t)
            os.chmod(t, e.mode & 0o777)
        except OSError as exc:
            raise BackupError(f"{t}: {exc.strerror or exc}") from None
        n += 1
    cfg = data_dir / config_name
    if cfg.is_file():
        _relocate_config(cfg)
    for d2 in sorted(made, key=lambda p: len(p.parts), reverse=True):
        _fsync_dir(d2)
    return n


def _relocate_config(cfg: Path) -> None:
    """Point a restored configuration's data_dir at its new home (the directory it sits in)."""
    text = cfg.read_text()
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.lstrip().startswith("["):
            break  # data_dir is a top-level key
        if line.split("=", 1)[0].strip() == "data_dir":
            if line.split("=", 1)[1].strip() not in ('"."', "'.'"):
                lines[i] = 'data_dir = "."\n'
                tmp = cfg.with_name(cfg.name + ".tmp")
                tmp.write_text("".join(lines))
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, cfg)
            return



# -- command line -----------------------------------------------------------------------------------

def cmd_backup(args: argparse.Namespace) -> int:
    from .cli import CLIError, _config_path
    from .config import load_config

    words: list[str] = args.words
    try:
        if words[0] == "verify":
            if len(words) != 2:
                raise CLIError("usage: postier backup verify DEST")
            dest = Path(words[1])
            problems = verify(dest)
            for p in problems:
                print(f"{dest}: {p}", file=sys.stderr)
            if problems:
                print(f"postier: backup {dest} does NOT verify: {len(problems)} problem(s)", file=sys.stderr)
                return 1
            n = len(_load_manifest(dest)["files"])
            print(f"backup {dest} verified: {n} files match the manifest")
            return 0
        if len(words) != 1:
            raise CLIError("usage: postier backup DEST [--link-dest PREV] | postier backup verify DEST")
        cfg_path = _config_path(args)
        cfg = load_config(cfg_path)
        extra: dict[str, Path] = {}
        if cfg.data_dir.resolve() not in cfg_path.resolve().parents:
            extra["postier.toml"] = cfg_path
        started = time.monotonic()
        st = backup(cfg.data_dir, Path(words[0]), Path(args.link_dest) if args.link_dest else None,
                    hardlink=args.hardlink, extra_files=extra)
    except BackupError as exc:
        raise CLIError(str(exc)) from None
    print(f"backup {words[0]}: {st.files} files and {st.databases} databases, {st.bytes} bytes copied, "
          f"{st.linked} linked, {st.vanished} expunged during the backup, "
          f"{time.monotonic() - started:.1f} s")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from .cli import CLIError

    try:
        n = restore(Path(args.dest), Path(args.data_dir))
    except BackupError as exc:
        raise CLIError(str(exc)) from None
    print(f"restored {n} files into {args.data_dir}; start it with: "
          f"postier --config {Path(args.data_dir) / 'postier.toml'} serve")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("backup", help="back up the data directory while the server runs; "
                                      "`backup verify DEST` checks a backup")
    p.add_argument("words", nargs="+", metavar="DEST", help="DEST, or: verify DEST")
    p.add_argument("--link-dest", metavar="PREV", help="an earlier backup: unchanged files are hard-linked from it")
    p.add_argument("--hardlink", action="store_true",
                   help="hard-link message files from the data directory instead of copying them "
                        "(same file system only)")
    p.set_defaults(func=cmd_backup)
    p = sub.add_parser("restore", help="rebuild a data directory from a backup (refuses a non-empty one)")
    p.add_argument("dest", metavar="DEST", help="the backup directory")
    p.add_argument("--data-dir", required=True, help="the new data directory (empty or missing)")
    p.set_defaults(func=cmd_restore)
