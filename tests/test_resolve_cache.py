"""The recipient resolution cache of Accounts: writes through the same object are seen at once,
writes by another connection or process (the CLI) within accounts.CACHE_CHECK seconds."""

import asyncio
import threading
import time
from pathlib import Path

import argon2
import pytest

from postier import accounts
from postier.accounts import Accounts, Lookup
from tests.concurrency import together


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

    together(other)
    assert seen == [Lookup.UNKNOWN_USER]
    assert a.resolve("z@a.test").status is Lookup.UNKNOWN_USER  # the generation counter tells this thread


def test_cached_answers_only_what_a_thread_answered_fresh(tmp_path: Path) -> None:
    """`resolve_cached` (the event loop's RCPT fast path) knows only what `resolve` answered, and
    forgets it at once on a write through the same object."""
    a = Accounts(tmp_path / "acc.sqlite")
    a.add_domain("a.test")
    a.add_user("w@a.test", "password123")
    assert a.resolve_cached("w@a.test") is None  # nobody asked yet
    found = a.resolve("w@a.test")
    assert found.status is Lookup.FOUND
    assert a.resolve_cached("w@a.test") == found
    a.remove_user("w@a.test")
    assert a.resolve_cached("w@a.test") is None  # the generation moved
    assert a.resolve("w@a.test").status is Lookup.UNKNOWN_USER
    assert a.resolve_cached("w@a.test") == accounts.Resolution(Lookup.UNKNOWN_USER)


def test_cached_answer_expires_with_the_check_that_made_it(tmp_path: Path) -> None:
    a = Accounts(tmp_path / "acc.sqlite")
    a.add_domain("a.test")
    a.resolve("v@a.test")
    t0 = time.monotonic()
    assert a.resolve_cached("v@a.test") is not None
    while time.monotonic() < t0 + accounts.CACHE_CHECK:
        time.sleep(0.02)
    assert a.resolve_cached("v@a.test") is None  # a thread has to look again


def test_cached_answers_follow_another_process_from_two_threads_and_the_loop(tmp_path: Path) -> None:
    """Two threads resolve while the event loop answers from the published entries and another
    connection (the CLI) adds and removes the user: no answer the loop gives is older than
    CACHE_CHECK seconds after the change was committed."""
    server = Accounts(tmp_path / "acc.sqlite")
    cli = Accounts(tmp_path / "acc.sqlite")
    cli.add_domain("a.test")
    changes: list[tuple[float, bool]] = [(time.monotonic(), False)]  # (committed by, exists)
    writing = threading.Event()  # set from before a change begins until it is in `changes`
    stop = threading.Event()

    def resolver() -> None:
        while not stop.is_set():
            server.resolve("t@a.test")
            time.sleep(0.001)

    def writer() -> None:
        for i in range(6):
            time.sleep(0.25)
            writing.set()
            if i % 2 == 0:
                cli.add_user("t@a.test", "password123")
            else:
                cli.remove_user("t@a.test")
            changes.append((time.monotonic(), i % 2 == 0))
            writing.clear()
        stop.set()

    async def loop_reader() -> int:
        answered = 0
        while not stop.is_set():
            before, n = writing.is_set(), len(changes)
            asked = time.monotonic()
            got = server.resolve_cached("t@a.test")
            if got is not None:
                answered += 1
                done, exists = changes[n - 1]
                quiet = not before and not writing.is_set() and len(changes) == n  # no change overlapped
                if quiet and done + accounts.CACHE_CHECK <= asked:  # the last change is past the bound
                    assert (got.status is Lookup.FOUND) == exists, (asked, changes)
            await asyncio.sleep(0.001)
        return answered

    threads = [threading.Thread(target=resolver) for _ in range(2)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    try:
        answered = asyncio.run(asyncio.wait_for(loop_reader(), 30))
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert answered > 0


# -- the expiry both this cache and the Sieve script cache use (accounts.FreshCache) -------------------

def test_fresh_cache_deadline_generation_and_bound() -> None:
    c: accounts.FreshCache[str, int] = accounts.FreshCache(size=3)
    now = time.monotonic()
    c.put("a", 1, now + 60, c.generation)
    c.put("old", 2, now - 1, c.generation)  # its deadline passed
    assert (c.get("a"), c.get("old"), c.get("none")) == (1, None, None)
    assert c.last("old") == 2  # kept for reuse, whatever its age
    made_under = c.generation
    c.changed()  # a write through this process: every entry is stale at once
    assert c.get("a") is None and c.last("a") == 1
    c.put("b", 3, now + 60, made_under)  # read before the change: stale as soon as it is kept
    assert c.get("b") is None
    c.put("b", 3, now + 60, c.generation)
    assert c.get("b") == 3
    c.put("c", 4, now + 60, c.generation)  # a fourth key: emptied first, then kept
    assert (c.last("a"), c.get("c")) == (None, 4)


def test_fresh_cache_changes_from_two_threads_all_count() -> None:
    c: accounts.FreshCache[str, int] = accounts.FreshCache(size=10)

    def bump() -> None:
        for _ in range(10_000):
            c.changed()

    together(bump, bump)
    assert c.generation == 20_000
