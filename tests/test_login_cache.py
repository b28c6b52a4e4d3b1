"""The login cache (accounts.LoginCache) and the argon2id parameters of stored hashes."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pytest
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.profiles import CHEAPEST, RFC_9106_LOW_MEMORY

from postier.accounts import Accounts, LoginCache


class CountingHasher(PasswordHasher):
    """argon2's cheapest parameters, counting the (expensive in production) verifications."""

    def __init__(self) -> None:
        p = CHEAPEST
        super().__init__(p.time_cost, p.memory_cost, p.parallelism, p.hash_len, p.salt_len, type=p.type)
        self.verifications = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:  # noqa: A002
        self.verifications += 1
        return super().verify(hash, password)


@pytest.fixture
def cheap(tmp_path: Path) -> tuple[Accounts, CountingHasher]:
    a = Accounts(tmp_path / "accounts.sqlite")
    hasher = CountingHasher()
    a._hasher = hasher
    a.add_domain("a.test")
    a.add_user("alice@a.test", "password123")
    return a, hasher


def test_default_hash_parameters_are_rfc9106_second_option(tmp_path: Path) -> None:
    acc = Accounts(tmp_path / "accounts.sqlite")
    acc.add_domain("a.test")
    acc.add_user("alice@a.test", "password123")
    row = acc._conn().execute("SELECT password FROM users WHERE address='alice@a.test'").fetchone()
    params = extract_parameters(row[0])
    assert (params.type, params.time_cost, params.memory_cost, params.parallelism) == (Type.ID, 3, 65536, 4)
    assert params == RFC_9106_LOW_MEMORY


def test_successful_login_is_cached(cheap: tuple[Accounts, CountingHasher]) -> None:
    acc, hasher = cheap
    assert acc.verify_password("alice@a.test", "password123") is not None
    assert hasher.verifications == 1
    for _ in range(5):
        assert acc.verify_password("Alice@A.test", "password123") is not None
    assert hasher.verifications == 1  # served from the cache
    # a wrong password is never answered from the cache, and never cached
    for _ in range(3):
        assert acc.verify_password("alice@a.test", "password124") is None
    assert hasher.verifications == 4
    assert acc.verify_password("nobody@a.test", "password123") is None
    assert len(acc.login_cache) == 1


def test_cache_holds_no_password(cheap: tuple[Accounts, CountingHasher]) -> None:
    acc, _ = cheap
    acc.verify_password("alice@a.test", "password123")
    (entry,) = acc.login_cache._entries
    assert "password123" not in repr(entry)
    assert entry[2] != hashlib.sha256(b"password123").digest()  # keyed HMAC, not a plain hash


def test_password_change_invalidates_at_once(cheap: tuple[Accounts, CountingHasher], tmp_path: Path) -> None:
    acc, _ = cheap
    assert acc.verify_password("alice@a.test", "password123") is not None
    acc.set_password("alice@a.test", "newpassword1")
    assert acc.verify_password("alice@a.test", "password123") is None
    assert acc.verify_password("alice@a.test", "newpassword1") is not None
    # a change made by another process (the CLI's own connection) is seen at the next login too
    other = Accounts(tmp_path / "accounts.sqlite")
    other._hasher = CountingHasher()
    other.set_password("alice@a.test", "thirdpassword")
    assert acc.verify_password("alice@a.test", "newpassword1") is None
    assert acc.verify_password("alice@a.test", "thirdpassword") is not None
    other.remove_user("alice@a.test")
    assert acc.verify_password("alice@a.test", "thirdpassword") is None


def test_cache_is_bounded_and_expires() -> None:
    now = [0.0]
    cache = LoginCache(size=2, ttl=10.0, clock=lambda: now[0])
    for user in ("a", "b", "c"):
        cache.add(user, "h", "pw")
    assert len(cache) == 2 and not cache.hit("a", "h", "pw") and cache.hit("c", "h", "pw")
    assert not cache.hit("c", "other-hash", "pw") and not cache.hit("c", "h", "pw2")
    now[0] = 10.5
    assert not cache.hit("c", "h", "pw")
    assert not LoginCache(size=0).hit("a", "h", "pw")


def test_old_parameters_are_rehashed_at_next_login(cheap: tuple[Accounts, CountingHasher]) -> None:
    acc, _ = cheap  # alice's hash was made with the cheapest parameters
    acc._hasher = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)
    assert acc.verify_password("alice@a.test", "password123") is not None  # old hash still verifies
    row = acc._conn().execute("SELECT password FROM users WHERE address='alice@a.test'").fetchone()
    assert extract_parameters(row[0]) == RFC_9106_LOW_MEMORY
    assert acc.verify_password("alice@a.test", "password123") is not None  # cached under the new hash
    assert acc.verify_password("alice@a.test", "wrong-password") is None


def test_concurrent_logins_share_the_cache(cheap: tuple[Accounts, CountingHasher]) -> None:
    acc, hasher = cheap
    acc.add_user("bob@a.test", "password456")
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: acc.verify_password(*(("alice@a.test", "password123"), (
            "bob@a.test", "password456"), ("bob@a.test", "bad-password1"))[i % 3]), range(60)))
    assert [r is not None for r in results] == [i % 3 != 2 for i in range(60)]
    assert hasher.verifications <= 20 + 2 * 4  # every failure, and at most one miss per thread and user
