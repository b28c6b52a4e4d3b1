"""postier.durable: which directories get fsynced, in which order, and that a known path costs nothing.

That the fsyncs are the right ones is proven under the POSIX model by tests/powercut/; here the calls
themselves are recorded (os.fsync is wrapped to note the directory each descriptor points at).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier import durable


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths fsynced through os.fsync, in order."""
    calls: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    monkeypatch.setattr(durable, "SKIP_DIR_FSYNC", False)
    yield calls


def test_ensure_dirs_fsyncs_each_new_components_parent_bottom_up(tmp_path: Path, synced: list[str]) -> None:
    durable.ensure_dirs(tmp_path)  # the existing base: known from now on
    synced.clear()
    leaf = tmp_path / "a" / "b" / "c"
    durable.ensure_dirs(leaf)
    assert leaf.is_dir()
    assert oct(leaf.stat().st_mode & 0o777) == oct(0o700)
    assert synced == [str(tmp_path / "a" / "b"), str(tmp_path / "a"), str(tmp_path)]
    assert durable.is_known(leaf) and durable.is_known(tmp_path / "a")


def test_known_path_costs_no_syscall(tmp_path: Path, synced: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = tmp_path / "x" / "y"
    durable.ensure_dirs(leaf)
    synced.clear()

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("a syscall on the hot path")

    monkeypatch.setattr(os, "mkdir", boom)
    monkeypatch.setattr(os, "open", boom)
    durable.ensure_dirs(leaf)
    durable.ensure_dirs(tmp_path / "x")
    assert synced == []


def test_existing_but_unknown_directories_get_their_parents_fsynced(tmp_path: Path, synced: list[str]) -> None:
    # Made by a process that may have died before its fsync: fsynced once more, then remembered.
    durable.ensure_dirs(tmp_path)
    (tmp_path / "old" / "er").mkdir(parents=True)
    synced.clear()
    durable.ensure_dirs(tmp_path / "old" / "er")
    assert synced == [str(tmp_path / "old"), str(tmp_path)]


def test_several_paths_share_fsyncs(tmp_path: Path, synced: list[str]) -> None:
    durable.ensure_dirs(tmp_path)
    synced.clear()
    md = tmp_path / "Maildir"
    durable.ensure_dirs(md / "cur", md / "new", md / "tmp")
    assert synced == [str(md), str(tmp_path)]


def test_a_file_in_the_way_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        durable.ensure_dirs(tmp_path / "f")
    assert not durable.is_known(tmp_path / "f")


def test_make_dir_is_exclusive_and_fsyncs_the_parent(tmp_path: Path, synced: list[str]) -> None:
    durable.ensure_dirs(tmp_path)
    synced.clear()
    durable.make_dir(tmp_path / ".Folder")
    assert synced == [str(tmp_path)]
    with pytest.raises(FileExistsError):
        durable.make_dir(tmp_path / ".Folder")


def test_rename_fsyncs_both_parents_and_forgets_the_old_path(tmp_path: Path, synced: list[str]) -> None:
    durable.ensure_dirs(tmp_path / "a" / "sub" / "cur", tmp_path / "b")
    synced.clear()
    durable.rename(tmp_path / "a" / "sub", tmp_path / "b" / "sub")
    assert synced == [str(tmp_path / "b"), str(tmp_path / "a")]
    assert not durable.is_known(tmp_path / "a" / "sub")
    assert not durable.is_known(tmp_path / "a" / "sub" / "cur")
    # Made again when needed (a folder deleted and created anew).
    durable.ensure_dirs(tmp_path / "a" / "sub" / "cur")
    assert (tmp_path / "a" / "sub" / "cur").is_dir()


def test_write_file_is_atomic_and_durable(tmp_path: Path, synced: list[str]) -> None:
    target = tmp_path / "new" / "cfg.toml"
    durable.write_file(target, b"one", mode=0o644)
    durable.write_file(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in target.parent.iterdir()] == ["cfg.toml"]
    assert synced[-2:] == [str(target.parent / f".cfg.toml.{os.getpid()}.tmp"), str(target.parent)]


def test_test_only_switch_skips_directory_fsyncs(tmp_path: Path, synced: list[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "SKIP_DIR_FSYNC", True)
    durable.ensure_dirs(tmp_path)
    synced.clear()
    durable.ensure_dirs(tmp_path / "p" / "q")
    assert (tmp_path / "p" / "q").is_dir()
    assert synced == []


def test_a_remembered_directory_removed_meanwhile_is_made_again(tmp_path: Path, synced: list[str]) -> None:
    md = tmp_path / "mail" / "d" / "u" / "Maildir"
    durable.ensure_dirs(md / "new")
    (tmp_path / "mail").rename(tmp_path / "mail.old")  # moved aside behind our back
    (tmp_path / "mail").mkdir()
    durable.forget(md)  # what ensure_maildir(again=True) does
    durable.ensure_dirs(md / "new")
    assert (md / "new").is_dir()


def test_together_runs_every_step_at_once_and_raises_the_first_error(tmp_path: Path, synced: list[str]) -> None:
    """`together`: independent fsyncs in parallel threads (the file system commits them at once);
    every step runs even when one fails, and the error comes out after all have finished."""
    import threading

    dirs = [tmp_path / n for n in ("a", "b", "c")]
    for d in dirs:
        d.mkdir()
    threads: set[str] = set()

    def step(d: Path) -> None:
        threads.add(threading.current_thread().name)
        durable.fsync_dir(d)

    durable.together([functools.partial(step, d) for d in dirs])
    assert sorted(synced) == [str(d) for d in dirs]
    assert len(threads) >= 2 and threading.current_thread().name in threads  # the last one here
    synced.clear()

    def boom() -> None:
        raise OSError(5, "EIO")

    with pytest.raises(OSError, match="EIO"):
        durable.together([boom, lambda: durable.fsync_dir(dirs[0])])
    assert synced == [str(dirs[0])]
    durable.together([])  # nothing to do


def test_immediate_commits_or_rolls_back(tmp_path: Path) -> None:
    import sqlite3

    from postier.durable import immediate

    conn = sqlite3.connect(tmp_path / "t.sqlite", isolation_level=None)
    conn.execute("CREATE TABLE t (x INTEGER)")
    with immediate(conn):
        conn.execute("INSERT INTO t VALUES (1)")
    with pytest.raises(RuntimeError), immediate(conn):
        conn.execute("INSERT INTO t VALUES (2)")
        raise RuntimeError("taken back")
    assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]
    assert not conn.in_transaction
