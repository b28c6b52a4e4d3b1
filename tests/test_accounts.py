"""Accounts: domains, users, aliases, plus-addressing, catch-all, case rules, password hashes."""

from pathlib import Path

import pytest

from postier.accounts import Accounts, Lookup
from postier.message.types import AccountError, User


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
