"""Cluster mode's accounts and DKIM keys against a real PostgreSQL: two `Accounts` (two nodes) on one
database see each other's users, passwords, aliases and domains at once; concurrent writers from two
connections; DKIM keys made through one key store sign through another; PostgreSQL down is
`StoreUnavailable`, never a wrong answer."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import dkim  # noqa: E402

from postier import accounts as accounts_mod  # noqa: E402
from postier.accounts import Accounts, Lookup  # noqa: E402
from postier.mailauth.keys import DKIMSigner, KeyError_  # noqa: E402
from postier.message.types import AccountError  # noqa: E402
from postier.store.cluster.accounts import ClusterKeyStore, PGAccountStorage  # noqa: E402
from postier.store.errors import StoreUnavailable  # noqa: E402

from tests.concurrency import together
from tests.harness import Instance  # noqa: E402

from .conftest import PgServer  # noqa: E402

PW = "password123"


@pytest.fixture(autouse=True)
def _no_cache_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accounts_mod, "CACHE_CHECK", 0.0)  # each resolve asks for the change counter


@pytest.fixture
def two(pg: PgServer) -> Iterator[tuple[Accounts, Accounts]]:
    dsn = pg.create_db()
    a, b = Accounts(PGAccountStorage(dsn, 3.0)), Accounts(PGAccountStorage(dsn, 3.0))
    yield a, b
    a.close()
    b.close()


def test_users_domains_and_passwords_are_shared(two: tuple[Accounts, Accounts]) -> None:
    a, b = two
    assert a.add_domain("Example.ORG") == "example.org"
    assert b.list_domains() == ["example.org"] and b.is_local_domain("EXAMPLE.org")
    with pytest.raises(AccountError, match="already exists"):
        b.add_domain("example.org")
    u = a.add_user("Alice@example.org", PW, admin=True)
    assert u.address == "alice@example.org"
    assert b.verify_password("alice@EXAMPLE.org", PW) == u
    assert b.scram_credentials("alice@example.org") is not None
    assert b.is_admin("alice@example.org") and b.admin() == "alice@example.org"
    assert b.verify_password("alice@example.org", "wrong-password") is None
    assert len(b.login_cache) == 1
    a.set_password("alice@example.org", "new-password-1")  # on node A: B's cached login ends at once
    assert b.verify_password("alice@example.org", PW) is None
    assert b.verify_password("alice@example.org", "new-password-1") == u
    a.set_domain_quota("example.org", 1000)
    assert b.get_user("alice@example.org").quota == 1000  # type: ignore[union-attr]
    b.set_quota("alice@example.org", 500)
    assert a.get_user("alice@example.org").quota == 500 and a.own_quota("alice@example.org") == "user"  # type: ignore[union-attr]
    assert [x.address for x in b.list_users("example.org")] == ["alice@example.org"]
    with pytest.raises(AccountError, match="still has users"):
        b.remove_domain("example.org")
    b.remove_user("alice@example.org")
    assert a.verify_password("alice@example.org", "new-password-1") is None
    assert a.resolve("alice@example.org").status is Lookup.UNKNOWN_USER
    a.remove_domain("example.org")
    assert b.resolve("alice@example.org").status is Lookup.NOT_LOCAL


def test_aliases_catchall_and_roles_route_on_every_node(two: tuple[Accounts, Accounts]) -> None:
    a, b = two
    a.add_domain("example.org")
    alice = a.add_user("alice@example.org", PW)
    bob = a.add_user("bob@example.org", PW)
    assert b.resolve("team@example.org").status is Lookup.UNKNOWN_USER  # cached on B ...
    a.add_alias("team@example.org", ["alice@example.org", "bob@example.org", "far@remote.test"])
    res = b.resolve("team@example.org")  # ... and dropped when A writes
    assert res.status is Lookup.FOUND and set(res.users) == {alice, bob} and res.remote == ("far@remote.test",)
    assert b.resolve("alice+tag@example.org").users == (alice,)
    assert b.addresses_of(alice) == {"alice@example.org", "team@example.org"}
    assert b.resolve("postmaster@example.org").users == (alice,)  # the first user created
    b.set_admin("bob@example.org")
    assert a.resolve("abuse@example.org").users == (bob,)
    a.set_catchall("example.org", "bob@example.org")
    assert b.resolve("nobody@example.org").users == (bob,)
    a.add_alias("team@example.org", ["alice@example.org"])  # already there: no error, no duplicate
    assert b.list_aliases() == [("team@example.org", ["alice@example.org", "bob@example.org", "far@remote.test"])]
    b.remove_alias("team@example.org", ["far@remote.test"])
    assert a.resolve("team@example.org").remote == ()
    a.remove_user("bob@example.org")  # its alias targets go with it
    assert b.list_aliases() == [("team@example.org", ["alice@example.org"])]
    with pytest.raises(AccountError, match="no such alias"):
        b.remove_alias("none@example.org")


def test_concurrent_adds_from_two_connections(two: tuple[Accounts, Accounts]) -> None:
    """Writers on two nodes at once: every distinct user is added once, and of two adds of the same
    user exactly one succeeds (the other is told it exists), as with SQLite's single writer."""
    a, b = two
    a.add_domain("example.org")
    a.rehash = b.rehash = False
    errors: list[str] = []
    added: list[str] = []
    lock = threading.Lock()

    def worker(acc: Accounts, names: list[str]) -> None:
        for name in names:
            try:
                acc.add_user(f"{name}@example.org", PW)
                with lock:
                    added.append(name)
            except AccountError as exc:
                with lock:
                    errors.append(str(exc))
        acc.close()

    names = [f"u{i}" for i in range(6)]
    together(lambda: worker(a, names), lambda: worker(b, names),
             lambda: worker(a, [f"a{i}" for i in range(4)]), lambda: worker(b, [f"b{i}" for i in range(4)]))
    assert sorted(added) == sorted(names + [f"a{i}" for i in range(4)] + [f"b{i}" for i in range(4)])
    assert len(errors) == len(names) and all("already exists" in e for e in errors)
    assert len(a.list_users()) == len(b.list_users()) == 14


def test_dkim_key_made_on_one_node_signs_on_another(pg: PgServer) -> None:
    dsn = pg.create_db()
    a, b = ClusterKeyStore(dsn, 3.0), ClusterKeyStore(dsn, 3.0)
    try:
        key = a.generate("example.org", "rsa-sha256", "s1", bits=1024)
        assert key.state == "active" and b.domains() == ["example.org"]
        assert [k.selector for k in b.active("Example.ORG")] == ["s1"]  # names fold as the files' do
        assert b.signing_domain("mail.example.org") == "example.org"  # relaxed alignment (RFC 7489 §3.1.1)
        with pytest.raises(KeyError_, match="exists already"):
            b.generate("example.org", "rsa-sha256", "s1", bits=1024)
        msg = b"From: alice@example.org\r\nTo: bob@remote.test\r\nSubject: hi\r\n\r\nhello\r\n"
        sig = asyncio.run(DKIMSigner(b).sign_bytes(msg))
        assert b"d=example.org" in sig and b"s=s1" in sig

        def dns(name: bytes, timeout: int = 5) -> bytes:
            assert name == b"s1._domainkey.example.org."
            return key.txt.encode()
        assert dkim.verify(sig + msg, dnsfunc=dns)
        # rotation: a second key starts published; activating it on B makes A sign with it
        second = b.generate("example.org", "rsa-sha256", "s2", bits=1024)
        assert second.state == "published"
        b.set_state("example.org", "s2", "active")
        assert [(k.selector, k.state) for k in a.keys("example.org")] == [("s1", "published"), ("s2", "active")]
        assert b"s=s2" in asyncio.run(DKIMSigner(a).sign_bytes(msg))
        a.set_state("example.org", "s2", "retired")
        assert asyncio.run(DKIMSigner(b).sign_bytes(msg)) == b""
    finally:
        a.close()
        b.close()


def test_postgresql_down_is_unavailable_not_unknown(pg_own: PgServer) -> None:
    dsn = pg_own.create_db()
    acc = Accounts(PGAccountStorage(dsn, 2.0))
    acc.add_domain("example.org")
    acc.add_user("alice@example.org", PW)
    assert acc.resolve("alice@example.org").status is Lookup.FOUND
    pg_own.stop()
    with pytest.raises(StoreUnavailable):
        acc.resolve("alice@example.org")
    with pytest.raises(StoreUnavailable):
        acc.verify_password("alice@example.org", PW)
    with pytest.raises(StoreUnavailable):
        acc.add_user("bob@example.org", PW)
    pg_own.start()
    assert acc.verify_password("alice@example.org", PW) is not None  # connected again
    pg_own.stop()  # a restart between two lookups: the lost connection is replaced, no error
    pg_own.start()
    assert acc.verify_password("alice@example.org", PW) is not None
    acc.add_user("bob@example.org", PW)
    acc.close()


def test_every_account_command_works_on_postgresql(tmp_path: Path, pg: PgServer) -> None:
    """`postier domain|user|alias|dkim|dns` with `[cluster]` configured: what one node's commands
    change, another node's commands show (no server running: the commands alone)."""
    dsn = pg.create_db()
    nodes = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        nodes.append(Instance(tmp_path / name, "example.org", extra_config=(
            f'[cluster]\ndsn = "{dsn}"\ns3_bucket = "unused"\ntimeout = 2.0\n')))
    a, b = nodes
    a.cli("domain", "add", "example.org")
    a.cli("domain", "add", "example.net")
    assert b.cli("domain", "list").stdout.split() == ["example.net", "example.org"]
    a.cli("user", "add", "alice@example.org", "--password-stdin", "--admin", "--quota", "1G", stdin=PW + "\n")
    assert "already exists" in b.cli("user", "add", "alice@example.org", "--password-stdin", stdin=PW + "\n",
                                     check=False).stderr
    b.cli("user", "passwd", "alice@example.org", "--password-stdin", stdin="another-password\n")
    b.cli("user", "quota", "alice@example.org", "500M")
    a.cli("domain", "quota", "example.org", "2G")
    b.cli("alias", "add", "team@example.org", "alice@example.org", "far@remote.test")
    assert a.cli("alias", "list").stdout.strip() == "team@example.org\talice@example.org, far@remote.test"
    a.cli("alias", "remove", "team@example.org", "far@remote.test")
    assert b.cli("alias", "list").stdout.strip() == "team@example.org\talice@example.org"
    out = b.cli("dkim", "generate", "example.org", "--selector", "s1", "--bits", "1024").stdout
    assert "(active)" in out and "note:" not in out  # example.org is a local domain, in PostgreSQL
    b.cli("dkim", "generate", "example.org", "--selector", "s2", "--algorithm", "ed25519")
    a.cli("dkim", "retire", "example.org", "s1")
    p = b.cli("dkim", "list")
    assert "couldn't stop thread" not in p.stderr  # the key store's pool is closed at exit, not by its finalizer
    listed = p.stdout
    assert "\ts1\trsa-sha256\tretired\t" in listed and "\ts2\ted25519-sha256\tactive\t" in listed
    assert "s2._domainkey.example.org" in a.cli("dns", "records", "example.org").stdout
    assert not list((tmp_path / "a").glob("**/dkim/example.org"))  # no key files on the node
    acc = Accounts(PGAccountStorage(dsn, 2.0))
    try:
        alice = acc.verify_password("alice@example.org", "another-password")
        assert alice is not None and alice.quota == 500 * 1024 ** 2 and acc.is_admin(alice.address)
        assert acc.own_quota(alice.address) == "user"
    finally:
        acc.close()
    a.cli("user", "remove", "alice@example.org")
    assert b.cli("user", "list").stdout.strip() == ""
    assert b.cli("alias", "list").stdout.strip() == ""  # the alias's only target went with the user
    b.cli("domain", "remove", "example.net")
    assert a.cli("domain", "list").stdout.split() == ["example.org"]
