"""The recipient resolution cache of Accounts: writes through the same object are seen at once,
writes by another connection or process (the CLI) within accounts.CACHE_CHECK seconds."""

import threading
import time
from pathlib import Path

import argon2
import pytest

from postier import accounts
from postier.accounts import Accounts, Lookup


@pytest.fixture(autouse=True)
def fast_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts, "PasswordHasher",
                        lambda: argon2.PasswordHasher(time_cost=1, memory_cost=64, parallelism=1))


def wait_for(pred, timeout: float = 2.0) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not pred():
        assert time.monotonic() - t0 < timeout, "the cache never saw the change"
        time.sleep(0.01)
    return time.monotonic() - t0


def test_own_writes_are_seen_at_once(tmp_path: Path) -> None:
    a = Accounts(tmp_path / "acc.sqlite")
    a.add_domain("a.test")
    assert a.resolve("x@a.test").status is Lookup.UNKNOWN_USER
    a.add_user("x@a.test", "password123")
    assert a.resolve("x@a.test").status is Lookup.FOUND
    a.add_alias("list@a.test", ["x@a.test", "far@elsewhere.test"])
    assert a.resolve("list@a.test").remote == ("far@elsewhere.test",)
    a.remove_user("x@a.test")
    assert a.resolve("x@a.test").status is Lookup.UNKNOWN_USER
    assert a.resolve("list@a.test").users == ()


def test_other_connections_writes_are_seen_soon(tmp_path: Path) -> None:
    server = Accounts(tmp_path / "acc.sqlite")
    cli = Accounts(tmp_path / "acc.sqlite")  # another connection, as the CLI process has
    cli.add_domain("a.test")
    assert server.resolve("y@a.test").status is Lookup.UNKNOWN_USER
    cli.add_user("y@a.test", "password123")
    assert wait_for(lambda: server.resolve("y@a.test").status is Lookup.FOUND) < accounts.CACHE_CHECK + 0.5
    cli.set_catchall("a.test", "y@a.test")
    wait_for(lambda: server.resolve("anything@a.test").status is Lookup.FOUND)
    cli.remove_user("y@a.test")
    wait_for(lambda: server.resolve("y@a.test").status is Lookup.UNKNOWN_USER)


def test_each_thread_has_its_own_cache(tmp_path: Path) -> None:
    a = Accounts(tmp_path / "acc.sqlite")
    a.add_domain("a.test")
    a.add_user("z@a.test", "password123")
    assert a.resolve("z@a.test").status is Lookup.FOUND
    seen: list[Lookup] = []

    def other() -> None:
        a.remove_user("z@a.test")  # a write through this object, from another thread
        seen.append(a.resolve("z@a.test").status)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [Lookup.UNKNOWN_USER]
    assert a.resolve("z@a.test").status is Lookup.UNKNOWN_USER  # the generation counter tells this thread
