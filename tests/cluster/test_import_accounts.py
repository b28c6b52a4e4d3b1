"""`postier cluster import-accounts`: a single-machine node's users, aliases, DKIM keys and Sieve scripts,
made with its own command line, copied into PostgreSQL; then a cluster node logs the users in with
their old passwords, signs with the old key and files with the old script. A second run copies
nothing; a row that PostgreSQL holds with other content stops the whole import unless --overwrite;
two imports at once copy each row once."""

from __future__ import annotations

import email
import smtplib
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import dkim  # noqa: E402
import psycopg  # noqa: E402

from postier.accounts import Accounts  # noqa: E402
from postier.mailauth.keys import KeyStore  # noqa: E402
from postier.message.types import User  # noqa: E402
from postier.store.cluster.importer import Outcome, copy_into, read_source  # noqa: E402
from postier.store.sieve import FileSieveStorage  # noqa: E402

from tests.concurrency import together
from tests.harness import Instance  # noqa: E402

from .conftest import PgServer  # noqa: E402
from .test_nodes import ALICE, DOMAIN, PASSWORD  # noqa: E402
from .test_nodes_accounts import inbox, login, login_fails  # noqa: E402

CAROL, DAVE, ERIN, TEAM = (f"{n}@{DOMAIN}" for n in ("carol", "dave", "erin", "team"))
SCRIPT = b'require ["fileinto"];\nif header :contains "subject" "boss" { fileinto "Work"; }\n'


@pytest.fixture
def single(tmp_path: Path) -> Instance:
    """A single-machine node whose accounts were made with its command line."""
    (tmp_path / "single").mkdir()
    s = Instance(tmp_path / "single", DOMAIN)
    s.cli("user", "add", CAROL, "--password-stdin", "--admin", "--quota", "1G", stdin="carol-password\n")
    s.add_user(DAVE, "dave-password")
    s.cli("alias", "add", TEAM, CAROL, DAVE, "far@remote.test")
    s.cli("dkim", "generate", DOMAIN, "--selector", "imp1", "--bits", "1024")
    (tmp_path / "boss.sieve").write_bytes(SCRIPT)
    s.cli("sieve", "put", CAROL, "boss", str(tmp_path / "boss.sieve"))
    s.cli("sieve", "activate", CAROL, "boss")
    return s


def counts(dsn: str) -> tuple[int, ...]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT (SELECT count(*) FROM domains), (SELECT count(*) FROM users), "
                           "(SELECT count(*) FROM aliases), (SELECT count(*) FROM dkim_keys), "
                           "(SELECT count(*) FROM sieve_scripts)").fetchone()
    assert row is not None
    return tuple(row)


def test_import_then_login_sign_and_filter_on_the_cluster(single: Instance, node: tuple[Instance, str]) -> None:
    n, dsn = node

    def run() -> str:
        return n.cli("cluster", "import-accounts", "--from", str(single.root)).stdout
    outs = together(run, run)  # two admins at once: one copies, one finds it done
    out, other = sorted(outs, key=lambda o: "users: 2 copied" not in o)
    assert "users: 0 copied, 0 replaced, 2 unchanged" in other and "dkim keys: 0 copied" in other, other
    assert "domains: 0 copied, 0 replaced, 1 unchanged" in out, out  # example.org is there already
    assert "users: 2 copied" in out and "aliases: 1 copied" in out and "dkim keys: 1 copied" in out, out
    assert "sieve scripts: 1 copied" in out, out
    assert counts(dsn) == (1, 3, 3, 1, 1)
    with psycopg.connect(dsn) as conn:  # the hash as stored on the single machine, not made again
        pg_hash = conn.execute("SELECT password, quota, admin FROM users WHERE address = %s", (CAROL,)).fetchone()
    acc = Accounts(single.root / "accounts.sqlite")
    try:
        row = acc._conn().execute("SELECT password, quota, admin FROM users WHERE address = ?", (CAROL,)).fetchone()
    finally:
        acc.close()
    assert pg_hash == tuple(row)
    assert "boss  (active)" in n.cli("sieve", "list", CAROL).stdout
    assert n.cli("alias", "list").stdout.strip() == f"{TEAM}\t{CAROL}, {DAVE}, far@remote.test"

    n.start()
    login(n, DAVE, "dave-password").logout()
    assert login_fails(n, DAVE, "carol-password")
    with smtplib.SMTP(*n.addr("submission"), timeout=20) as s:
        s.starttls(context=n.client_ssl_context())
        s.login(CAROL, "carol-password")
        s.sendmail(CAROL, [TEAM], f"From: {CAROL}\r\nTo: {TEAM}\r\nSubject: from the boss\r\n\r\nsigned\r\n")
    deadline = time.monotonic() + 30
    while not (got := inbox(n, DAVE, "dave-password")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(got) == 1
    sig = email.message_from_bytes(got[0])["DKIM-Signature"]
    assert sig is not None and "s=imp1" in sig.replace(" ", "")
    txt = (single.root / "dkim" / DOMAIN / "imp1.txt").read_text().strip().encode()

    def dns(name: bytes, timeout: int = 5) -> bytes:
        assert name == f"imp1._domainkey.{DOMAIN}.".encode()
        return txt
    assert dkim.verify(got[0], dnsfunc=dns)  # the single machine's key, published in its DNS already
    with smtplib.SMTP(*n.addr("smtp"), timeout=20) as s:  # carol's script files what port 25 takes in
        s.sendmail("bob@example.net", [CAROL], f"From: bob@example.net\r\nTo: {CAROL}\r\nSubject: boss\r\n\r\nx\r\n")
    c = login(n, CAROL, "carol-password")
    try:
        assert c.select("Work")[1] == [b"1"]
    finally:
        c.logout()

    again = n.cli("cluster", "import-accounts", "--from", str(single.root / "accounts.sqlite")).stdout
    assert " 1 copied" not in again and " 2 copied" not in again and "users: 0 copied, 0 replaced, 2 unchanged" in again
    assert counts(dsn) == (1, 3, 3, 1, 1)


def test_conflict_copies_nothing_without_overwrite(single: Instance, node: tuple[Instance, str]) -> None:
    n, dsn = node
    single.add_user(ALICE, "another-alice-password")  # PostgreSQL has her with PASSWORD
    single.add_user(ERIN, "erin-password")
    before = counts(dsn)
    r = n.cli("cluster", "import-accounts", "--from", str(single.root), check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"conflict: user {ALICE} differs (password, scram)" in r.stderr, r.stderr
    assert "nothing copied" in r.stderr and "--overwrite" in r.stderr
    assert counts(dsn) == before  # not erin, not the keys, not the scripts
    n.start()
    login(n, ALICE, PASSWORD).logout()
    assert login_fails(n, ERIN, "erin-password")
    out = n.cli("cluster", "import-accounts", "--from", str(single.root), "--overwrite")
    assert f"replaced: user {ALICE} differs" in out.stderr and "users: 3 copied, 1 replaced, 0 unchanged" in out.stdout
    login(n, ALICE, "another-alice-password").logout()  # no restart: the login reads the hash every time
    login(n, ERIN, "erin-password").logout()
    assert login_fails(n, ALICE, PASSWORD)


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A data directory made through the single-machine classes: (accounts file, dkim/, mail/)."""
    db, keys, mail = tmp_path / "d" / "accounts.sqlite", tmp_path / "d" / "dkim", tmp_path / "d" / "mail"
    acc = Accounts(db)
    acc.add_domain(DOMAIN)
    acc.add_domain("example.net")
    for i in range(5):
        acc.add_user(f"u{i}@{DOMAIN}", PASSWORD)
    acc.add_alias(TEAM, [f"u{i}@{DOMAIN}" for i in range(5)])
    acc.set_admin(f"u1@{DOMAIN}")
    acc.close()
    store = KeyStore(keys)
    store.generate(DOMAIN, "rsa-sha256", "k1", bits=1024)
    store.generate(DOMAIN, "ed25519-sha256", "k2")
    scripts = FileSieveStorage(mail).scripts(User(f"u0@{DOMAIN}", "u0", DOMAIN, "maildir"))
    scripts.put("a", b"keep;\n")
    scripts.put("b", b"discard;\n")
    scripts.set_active("b")
    tracking = FileSieveStorage(mail).tracking(User(f"u0@{DOMAIN}", "u0", DOMAIN, "maildir"))
    tracking.record("vacation\0bob@example.net", time.time() + 3600)  # a reply sent: none again for an hour
    tracking.record("expired", time.time() - 1)  # pruned at once; never copied
    tracking.close()
    return db, keys, mail


def test_two_imports_at_once_copy_each_row_once(pg: PgServer, source: tuple[Path, Path, Path]) -> None:
    dsn = pg.create_db()
    src = read_source(*source)
    start = threading.Barrier(2)

    def run() -> Outcome:
        with psycopg.connect(dsn) as conn:
            start.wait(10)
            return copy_into(conn, src)

    from postier.store.cluster.schema import ensure_schema
    with psycopg.connect(dsn) as conn:
        ensure_schema(conn)
    outcomes = together(run, run, timeout=60)
    first, second = sorted(outcomes, key=lambda o: -sum(o.copied.values()))
    assert dict(first.copied) == {"domains": 2, "users": 5, "aliases": 1, "settings": 1, "dkim_keys": 2,
                                  "sieve_scripts": 2, "sieve_tracking": 1}
    assert not +second.copied and not second.conflicts and sum(second.unchanged.values()) == 14
    assert counts(dsn) == (2, 5, 5, 2, 2)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT name FROM sieve_scripts WHERE active").fetchall() == [("b",)]
        assert conn.execute("SELECT owner, key FROM sieve_tracking").fetchall() == [
            (f"u0@{DOMAIN}", b"vacation\0bob@example.net")]


def test_active_key_or_script_of_postgresql_is_a_conflict(pg: PgServer, source: tuple[Path, Path, Path]) -> None:
    """PostgreSQL already signs example.org with another RSA key, and u0 has another active script:
    conflicts (two keys would sign); with overwrite the file's become active and the others stand down."""
    from postier.store.cluster.accounts import ClusterKeyStore
    dsn = pg.create_db()
    keys = ClusterKeyStore(dsn, 3.0)
    try:
        keys.generate(DOMAIN, "rsa-sha256", "other", bits=1024)
    finally:
        keys.close()
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO sieve_scripts (owner, name, body, active) VALUES (%s, 'mine', 'keep;', true)",
                     (f"u0@{DOMAIN}",))
    src = read_source(*source)
    with psycopg.connect(dsn) as conn:
        out = copy_into(conn, src)
        assert sorted(str(c) for c in out.conflicts) == [f"DKIM key {DOMAIN}/other differs (state)",
                                                         f"Sieve script u0@{DOMAIN}/mine differs (active)"]
        assert conn.execute("SELECT count(*) FROM users").fetchone() == (0,)
        out = copy_into(conn, src, overwrite=True)
        assert out.copied["users"] == 5
        assert conn.execute("SELECT selector, state FROM dkim_keys ORDER BY selector").fetchall() == [
            ("k1", "active"), ("k2", "active"), ("other", "published")]
        assert conn.execute("SELECT name FROM sieve_scripts WHERE active").fetchall() == [("b",)]
