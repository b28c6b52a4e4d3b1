"""The power-cut filesystem's own model (POSIX fsync durability), through a real FUSE mount.

Each test changes files through the mount, cuts power (unmount) and reads what is left in the
backing directory: the durable state, and only that.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from .mount import CutMount


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(path: Path, data: bytes, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def test_unsynced_data_is_lost_synced_data_kept(cutfs: CutMount) -> None:
    m = cutfs.mnt
    write(m / "synced", b"durable", sync=True)
    write(m / "unsynced", b"volatile", sync=False)
    fsync_dir(m)  # both names are durable; only one file's data
    with open(m / "synced", "ab") as f:  # an append never fsynced
        f.write(b" and more")
    cutfs.cut()
    b = cutfs.backing
    assert (b / "synced").read_bytes() == b"durable"
    assert (b / "unsynced").read_bytes() == b""


def test_a_new_name_needs_its_directory_fsynced(cutfs: CutMount) -> None:
    write(cutfs.mnt / "lost", b"x", sync=True)  # data fsynced, directory not
    cutfs.cut()
    assert not (cutfs.backing / "lost").exists()


def test_rename_without_directory_fsync_is_undone(cutfs: CutMount) -> None:
    m = cutfs.mnt
    write(m / "tmpfile", b"message", sync=True)
    fsync_dir(m)
    cutfs.power_cycle()
    os.rename(m / "tmpfile", m / "final")
    cutfs.cut()
    assert sorted(os.listdir(cutfs.backing)) == ["tmpfile"]
    assert (cutfs.backing / "tmpfile").read_bytes() == b"message"


def test_rename_with_directory_fsync_is_kept(cutfs: CutMount) -> None:
    m = cutfs.mnt
    (m / "tmp").mkdir()
    (m / "new").mkdir()
    fsync_dir(m)
    write(m / "tmp" / "msg", b"message", sync=True)
    fsync_dir(m / "tmp")
    os.rename(m / "tmp" / "msg", m / "new" / "msg")
    fsync_dir(m / "new")  # the Maildir protocol: the new name is durable, the old one may linger
    cutfs.cut()
    b = cutfs.backing
    assert (b / "new" / "msg").read_bytes() == b"message"
    assert (b / "tmp" / "msg").read_bytes() == b"message"  # tmp/ was not fsynced after the rename


def test_replacing_a_file_without_fsync_keeps_the_old_content(cutfs: CutMount) -> None:
    m = cutfs.mnt
    write(m / "f", b"old", sync=True)
    fsync_dir(m)
    cutfs.power_cycle()
    write(m / "f.tmp", b"new", sync=True)
    os.replace(m / "f.tmp", m / "f")
    cutfs.cut()
    assert sorted(os.listdir(cutfs.backing)) == ["f"]
    assert (cutfs.backing / "f").read_bytes() == b"old"


def test_mkdir_chain_without_parent_fsyncs_is_lost(cutfs: CutMount) -> None:
    m = cutfs.mnt
    leaf = m / "mail" / "example.org" / "user" / "Maildir" / "new"
    leaf.mkdir(parents=True)
    write(leaf / "msg", b"acknowledged?", sync=True)
    fsync_dir(leaf)  # the file is durable inside new/, but nothing above new/ is
    fsync_dir(leaf.parent)
    cutfs.cut()
    assert os.listdir(cutfs.backing) == []


def test_mkdir_chain_with_each_parent_fsynced_is_kept(cutfs: CutMount) -> None:
    m = cutfs.mnt
    leaf = m / "a" / "b" / "c"
    leaf.mkdir(parents=True)
    write(leaf / "msg", b"kept", sync=True)
    for d in (leaf, leaf.parent, leaf.parent.parent, m):
        fsync_dir(d)
    cutfs.cut()
    assert (cutfs.backing / "a" / "b" / "c" / "msg").read_bytes() == b"kept"


def test_unlink_without_directory_fsync_comes_back(cutfs: CutMount) -> None:
    m = cutfs.mnt
    write(m / "f", b"still here", sync=True)
    fsync_dir(m)
    cutfs.power_cycle()
    os.unlink(m / "f")
    cutfs.cut()
    assert (cutfs.backing / "f").read_bytes() == b"still here"


def test_hard_links_survive(cutfs: CutMount) -> None:
    m = cutfs.mnt
    write(m / "a", b"shared", sync=True)
    os.link(m / "a", m / "b")
    fsync_dir(m)
    cutfs.cut()
    b = cutfs.backing
    assert (b / "a").read_bytes() == (b / "b").read_bytes() == b"shared"
    assert (b / "a").stat().st_ino == (b / "b").stat().st_ino


SQLITE_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, v TEXT)")
for i in range(200):  # one commit each
    db.execute("INSERT INTO t VALUES (?, ?)", (i, "x" * 100))
other = sqlite3.connect(sys.argv[1])  # a second connection reads through the shared -shm
assert other.execute("SELECT count(*) FROM t").fetchone() == (200,)
other.close()
db.execute("PRAGMA synchronous=OFF")  # from here on commits are not fsynced
for i in range(200, 300):
    db.execute("INSERT INTO t VALUES (?, ?)", (i, "y"))
print("ready", flush=True)
time.sleep(600)
"""


def test_sqlite_wal_commits_with_synchronous_full_are_kept(cutfs: CutMount) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(cutfs.mnt / "t.sqlite")],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
    finally:
        proc.kill()  # the power goes with the connection open: no checkpoint, no WAL cleanup
        proc.wait()
    cutfs.cut()
    back = sqlite3.connect(cutfs.backing / "t.sqlite")
    assert back.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert back.execute("SELECT count(*) FROM t").fetchone() == (200,)
    back.close()
