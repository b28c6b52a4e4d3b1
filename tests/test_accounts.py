"""Accounts: domains, users, aliases, plus-addressing, catch-all, case rules, password hashes."""

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import pytest
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.profiles import CHEAPEST, RFC_9106_LOW_MEMORY

from postier.accounts import AccountError, Accounts, LoginCache, Lookup, User


@pytest.fixture
def acc(tmp_path: Path) -> Accounts:
    a = Accounts(tmp_path / "accounts.sqlite")
    a.add_domain("a.test")
    a.add_user("Alice@A.test", "password123")
    a.add_user("bob@a.test", "password456", "mbox")
    return a


def test_case_insensitive_and_plus(acc: Accounts) -> None:
    for addr in ("alice@a.test", "ALICE@A.TEST", "alice+news@a.test", "Alice+x+y@a.test"):
        r = acc.resolve(addr)
        assert r.status is Lookup.FOUND
        assert [u.address for u in r.users] == ["alice@a.test"]


def test_unknown_and_foreign(acc: Accounts) -> None:
    assert acc.resolve("carol@a.test").status is Lookup.UNKNOWN_USER
    assert acc.resolve("alice@b.test").status is Lookup.NOT_LOCAL
    assert acc.resolve("not-an-address").status is Lookup.NOT_LOCAL
    assert acc.resolve("+@a.test").status is Lookup.UNKNOWN_USER


def test_aliases_one_to_many_and_remote(acc: Accounts) -> None:
    acc.add_alias("team@a.test", ["alice@a.test", "bob@a.test", "ext@remote.test"])
    acc.add_alias("all@a.test", ["team@a.test"])
    r = acc.resolve("ALL@a.test")
    assert sorted(u.address for u in r.users) == ["alice@a.test", "bob@a.test"]
    assert r.remote == ("ext@remote.test",)
    assert acc.addresses_of(acc.get_user("alice@a.test")) == {"alice@a.test", "team@a.test", "all@a.test"}  # type: ignore[arg-type]


def test_alias_loop_is_bounded(acc: Accounts) -> None:
    acc.add_alias("x@a.test", ["y@a.test"])
    acc.add_alias("y@a.test", ["x@a.test"])
    assert acc.resolve("x@a.test").status is Lookup.UNKNOWN_USER


def test_catchall(acc: Accounts) -> None:
    acc.set_catchall("a.test", "alice@a.test")
    r = acc.resolve("whatever@a.test")
    assert [u.address for u in r.users] == ["alice@a.test"]
    assert [u.address for u in acc.resolve("bob@a.test").users] == ["bob@a.test"]


def test_passwords(acc: Accounts) -> None:
    assert acc.verify_password("ALICE@a.test", "password123") is not None
    assert acc.verify_password("alice@a.test", "wrong-password") is None
    assert acc.verify_password("nobody@a.test", "password123") is None
    acc.set_password("alice@a.test", "newpassword1")
    assert acc.verify_password("alice@a.test", "newpassword1") is not None
    assert acc.scram_credentials("alice@a.test") is not None


@pytest.mark.parametrize("bad", ["../x@a.test", "a/b@a.test", ".x@a.test", "x..y@a.test", "a\x00@a.test", "q+t@a.test"])
def test_unsafe_local_parts_refused(acc: Accounts, bad: str) -> None:
    with pytest.raises(AccountError):
        acc.add_user(bad, "password123")


def test_errors(acc: Accounts) -> None:
    with pytest.raises(AccountError, match="not a local domain"):
        acc.add_user("x@c.test", "password123")
    with pytest.raises(AccountError, match="already exists"):
        acc.add_user("alice@a.test", "password123")
    with pytest.raises(AccountError, match="too short"):
        acc.add_user("carol@a.test", "short")
    with pytest.raises(AccountError, match="still has users"):
        acc.remove_domain("a.test")
    with pytest.raises(AccountError, match="invalid domain"):
        acc.add_domain("bad_domain..test")


def test_home_containment(tmp_path: Path) -> None:
    u = User("x@a.test", "..", "a.test", "maildir")
    with pytest.raises(AccountError):
        u.home(tmp_path)


# -- login cache and argon2 parameters --------------------------------------------------------------

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


def test_default_hash_parameters_are_rfc9106_second_option(acc: Accounts) -> None:
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
