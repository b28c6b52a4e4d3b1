"""Domains, users, aliases, catch-all and plus-addressing in SQLite (WAL); argon2id password hashes.

Matching rules are those Postfix and Dovecot users expect: domains are case-insensitive (and stored
as IDNA A-labels), local parts are case-insensitive too (RFC 5321 §2.4 leaves it to the receiver;
virtually every MX folds them), `alice+tag@` reaches `alice@` (Postfix recipient_delimiter), an alias
expands to one or more targets (local or remote, recursively, bounded), and a per-domain catch-all
receives what matches nothing else.

Password checks are synchronous here; servers call `verify_password_async`, which runs argon2 in a
worker thread so the event loop never blocks. Unknown users cost the same argon2 work as known ones.

Recipient resolution (`resolve`, several queries per RCPT) is cached in memory, per thread. The
cache is dropped whenever the database may have changed: SQLite's `PRAGMA data_version` reports
commits made through any other connection (the CLI adding or removing a user while the server
runs) and is asked at most every `CACHE_CHECK` seconds (it starts a read transaction: two fcntl
locks and an fstat), so a change made elsewhere is seen within that time; a generation counter
covers the writes made through this object at once.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .config import normalize_domain
from .proto.sasl import ScramCredentials, scram_credentials_from_password

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    catchall TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS users (
    address TEXT PRIMARY KEY,
    local TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    password TEXT NOT NULL,
    scram TEXT NOT NULL DEFAULT '',
    mailbox_format TEXT NOT NULL DEFAULT 'maildir',
    created REAL NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (alias, target)
);
"""

#: Local parts we create mailboxes for: a conservative dot-atom subset, so that a user's directory
#: name is always safe (no "/", no leading dot, no "..").
_LOCAL_RE = re.compile(r"^[a-z0-9!#$%&'*+=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+=?^_`{|}~-]+)*$")
_MAX_ALIAS_DEPTH = 10
_MAX_EXPANSION = 1000
_MAX_CACHED = 10000  # resolutions kept per thread (the cache is emptied when full)
CACHE_CHECK = 0.1  # seconds between two PRAGMA data_version checks of one thread's cache


class AccountError(Exception):
    """A user-facing problem with an account operation (message names the problem)."""


@dataclass(frozen=True)
class User:
    address: str
    local: str
    domain: str
    mailbox_format: str

    def home(self, mail_root: Path) -> Path:
        """The user's directory under mail_root, with a containment check."""
        # Lexical containment check: local parts and domains are validated when created, and this
        # runs for every delivery, so no resolve() (one lstat per path component) here.
        root = os.path.normpath(mail_root)
        p = os.path.normpath(os.path.join(root, self.domain, self.local))
        if not p.startswith(root + os.sep) or p.count(os.sep) != root.count(os.sep) + 2:
            raise AccountError(f"mailbox path of {self.address} escapes the mail root")
        return Path(p)

    def maildir(self, mail_root: Path) -> Path:
        return self.home(mail_root) / "Maildir"

    def mbox(self, mail_root: Path) -> Path:
        return self.home(mail_root) / "mbox"


class Lookup(Enum):
    FOUND = "found"
    UNKNOWN_USER = "unknown-user"
    NOT_LOCAL = "not-local"


@dataclass(frozen=True)
class Resolution:
    status: Lookup
    users: tuple[User, ...] = ()
    remote: tuple[str, ...] = ()


def split_address(address: str) -> tuple[str, str]:
    """Split local@domain at the last '@'; raise AccountError when there is no domain."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        raise AccountError(f"not an address: {address!r}")
    return local, domain


def normalize_address(address: str) -> str:
    """Fold an address the way lookups compare it: lower-case local part, IDNA lower-case domain."""
    local, domain = split_address(address.strip())
    try:
        domain = normalize_domain(domain)
    except ValueError as exc:
        raise AccountError(str(exc)) from None
    return f"{local.lower()}@{domain}"


def _encode_scram(c: ScramCredentials) -> str:
    b = base64.b64encode
    return f"{c.iterations}${b(c.salt).decode()}${b(c.stored_key).decode()}${b(c.server_key).decode()}"


def _decode_scram(text: str) -> ScramCredentials | None:
    try:
        it, salt, sk, svk = text.split("$")
        d = base64.b64decode
        return ScramCredentials(d(salt), int(it), d(sk), d(svk))
    except (ValueError, TypeError):
        return None


def _scram_for(password: str) -> str:
    try:
        return _encode_scram(scram_credentials_from_password(password))
    except ValueError:  # SASLprep prohibits this password: SCRAM is not offered to this user
        return ""


class Accounts:
    """The account database. Thread-safe: one SQLite connection per thread."""

    def __init__(self, db_path: Path, recipient_delimiter: str = "+", default_format: str = "maildir"):
        self.db_path = db_path
        self.delimiter = recipient_delimiter
        self.default_format = default_format
        self._local = threading.local()
        self._generation = 0  # bumped by every write made through this object
        self._hasher = PasswordHasher()  # argon2id, RFC 9106 defaults of argon2-cffi
        self._dummy_hash = self._hasher.hash("postier-dummy-password")
        db_path.parent.mkdir(parents=True, exist_ok=True)
        self._conn().executescript(_SCHEMA)
        self._migrate()

    # -- plumbing -------------------------------------------------------------------------------

    def _migrate(self) -> None:
        """Bring a database made by an older version up to the current schema (columns added with
        defaults that keep the old behaviour; idempotent, run at every open)."""
        def columns(db: sqlite3.Connection) -> set[str]:
            return {r[1] for r in db.execute("PRAGMA table_info(users)")}
        if "admin" in columns(self._conn()):  # the usual case: no write lock taken
            return
        with self._db() as db:
            if "admin" not in columns(db):  # may use the admin console (/admin/); nobody does by default
                db.execute("ALTER TABLE users ADD COLUMN admin INTEGER NOT NULL DEFAULT 0")

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        else:
            conn.execute("COMMIT")
        finally:
            self._generation += 1

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        self._local.cache = None

    # -- domains --------------------------------------------------------------------------------

    def add_domain(self, name: str) -> str:
        try:
            domain = normalize_domain(name)
        except ValueError as exc:
            raise AccountError(str(exc)) from None
        with self._db() as db:
            if db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise AccountError(f"domain {domain} already exists")
            db.execute("INSERT INTO domains(name, created) VALUES (?, ?)", (domain, time.time()))
        return domain

    def remove_domain(self, name: str) -> None:
        domain = self._domain_arg(name)
        with self._db() as db:
            if db.execute("SELECT 1 FROM users WHERE domain=?", (domain,)).fetchone():
                raise AccountError(f"domain {domain} still has users; remove them first")
            if not db.execute("DELETE FROM domains WHERE name=?", (domain,)).rowcount:
                raise AccountError(f"no such domain: {domain}")
            db.execute("DELETE FROM aliases WHERE alias LIKE ?", (f"%@{domain}",))

    def list_domains(self) -> list[str]:
        return [r[0] for r in self._conn().execute("SELECT name FROM domains ORDER BY name")]

    def is_local_domain(self, name: str) -> bool:
        try:
            domain = normalize_domain(name)
        except ValueError:
            return False
        return self._conn().execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone() is not None

    def set_catchall(self, name: str, target: str | None) -> None:
        domain = self._domain_arg(name)
        tgt = normalize_address(target) if target else None
        with self._db() as db:
            if not db.execute("UPDATE domains SET catchall=? WHERE name=?", (tgt, domain)).rowcount:
                raise AccountError(f"no such domain: {domain}")

    def _domain_arg(self, name: str) -> str:
        try:
            return normalize_domain(name)
        except ValueError as exc:
            raise AccountError(str(exc)) from None

    # -- users ----------------------------------------------------------------------------------

    def add_user(self, address: str, password: str, mailbox_format: str | None = None,
                 admin: bool = False) -> User:
        addr = normalize_address(address)
        local, domain = split_address(addr)
        if not _LOCAL_RE.match(local) or len(local) > 64:  # RFC 5321 §4.5.3.1.1: 64 octets
            raise AccountError(f"unsupported local part {local!r} (use letters, digits and . _ - +)")
        if self.delimiter and self.delimiter in local:
            raise AccountError(f"local part {local!r} contains the recipient delimiter {self.delimiter!r}")
        fmt = mailbox_format or self.default_format
        if fmt not in ("maildir", "mbox"):
            raise AccountError(f"unknown mailbox format {fmt!r}")
        _check_password(password)
        pw_hash = self._hasher.hash(password)
        scram = _scram_for(password)
        with self._db() as db:
            if not db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise AccountError(f"domain {domain} is not a local domain; add it first")
            if db.execute("SELECT 1 FROM users WHERE address=?", (addr,)).fetchone():
                raise AccountError(f"user {addr} already exists")
            db.execute(
                "INSERT INTO users(address, local, domain, password, scram, mailbox_format, created, admin)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (addr, local, domain, pw_hash, scram, fmt, time.time(), int(admin)),
            )
        return User(addr, local, domain, fmt)

    def set_password(self, address: str, password: str) -> None:
        addr = normalize_address(address)
        _check_password(password)
        pw_hash = self._hasher.hash(password)
        scram = _scram_for(password)
        with self._db() as db:
            if not db.execute("UPDATE users SET password=?, scram=? WHERE address=?", (pw_hash, scram, addr)).rowcount:
                raise AccountError(f"no such user: {addr}")

    def is_admin(self, address: str) -> bool:
        """May this user use the admin console?"""
        try:
            addr = normalize_address(address)
        except AccountError:
            return False
        row = self._conn().execute("SELECT admin FROM users WHERE address=?", (addr,)).fetchone()
        return bool(row and row[0])

    def set_admin(self, address: str, admin: bool) -> None:
        addr = normalize_address(address)
        with self._db() as db:
            if not db.execute("UPDATE users SET admin=? WHERE address=?", (int(admin), addr)).rowcount:
                raise AccountError(f"no such user: {addr}")

    def remove_user(self, address: str) -> None:
        addr = normalize_address(address)
        with self._db() as db:
            if not db.execute("DELETE FROM users WHERE address=?", (addr,)).rowcount:
                raise AccountError(f"no such user: {addr}")
            db.execute("DELETE FROM aliases WHERE target=?", (addr,))

    def list_users(self, domain: str | None = None) -> list[User]:
        q = "SELECT address, local, domain, mailbox_format FROM users"
        args: tuple[str, ...] = ()
        if domain:
            q += " WHERE domain=?"
            args = (self._domain_arg(domain),)
        return [User(*r) for r in self._conn().execute(q + " ORDER BY domain, local", args)]

    def get_user(self, address: str) -> User | None:
        try:
            addr = normalize_address(address)
        except AccountError:
            return None
        row = self._conn().execute(
            "SELECT address, local, domain, mailbox_format FROM users WHERE address=?", (addr,)
        ).fetchone()
        return User(*row) if row else None

    def scram_credentials(self, address: str) -> ScramCredentials | None:
        try:
            addr = normalize_address(address)
        except AccountError:
            return None
        row = self._conn().execute("SELECT scram FROM users WHERE address=?", (addr,)).fetchone()
        return _decode_scram(row[0]) if row else None

    def verify_password(self, address: str, password: str) -> User | None:
        """Check a password (blocking: argon2). Unknown users cost a dummy verification too."""
        user = self.get_user(address) if len(address) <= 320 else None
        row = None
        if user is not None:
            row = self._conn().execute("SELECT password FROM users WHERE address=?", (user.address,)).fetchone()
        stored = row[0] if row else self._dummy_hash
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return user if row else None

    async def verify_password_async(self, address: str, password: str) -> User | None:
        return await asyncio.to_thread(self.verify_password, address, password)

    # -- aliases --------------------------------------------------------------------------------

    def add_alias(self, alias: str, targets: list[str]) -> None:
        a = normalize_address(alias)
        if not targets:
            raise AccountError("an alias needs at least one target")
        tgts = [normalize_address(t) for t in targets]
        with self._db() as db:
            _, domain = split_address(a)
            if not db.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
                raise AccountError(f"domain {domain} is not a local domain; add it first")
            for t in tgts:
                db.execute("INSERT OR IGNORE INTO aliases(alias, target) VALUES (?, ?)", (a, t))

    def remove_alias(self, alias: str, targets: list[str] | None = None) -> None:
        a = normalize_address(alias)
        with self._db() as db:
            if targets:
                n = sum(db.execute("DELETE FROM aliases WHERE alias=? AND target=?",
                                   (a, normalize_address(t))).rowcount for t in targets)
            else:
                n = db.execute("DELETE FROM aliases WHERE alias=?", (a,)).rowcount
            if not n:
                raise AccountError(f"no such alias: {a}")

    def list_aliases(self) -> list[tuple[str, list[str]]]:
        out: dict[str, list[str]] = {}
        for alias, target in self._conn().execute("SELECT alias, target FROM aliases ORDER BY alias, target"):
            out.setdefault(alias, []).append(target)
        return list(out.items())

    def addresses_of(self, user: User) -> set[str]:
        """The user's own address and every alias that expands to it (for submission sender checks)."""
        found = {user.address}
        frontier = [user.address]
        conn = self._conn()
        for _ in range(_MAX_ALIAS_DEPTH):
            nxt = []
            for t in frontier:
                for (alias,) in conn.execute("SELECT alias FROM aliases WHERE target=?", (t,)):
                    if alias not in found:
                        found.add(alias)
                        nxt.append(alias)
            if not nxt:
                break
            frontier = nxt
        return found

    # -- recipient resolution -------------------------------------------------------------------

    def resolve(self, address: str) -> Resolution:
        """Where does mail for `address` go? Aliases, plus-addressing and catch-all applied."""
        local = self._local
        cache: dict[str, Resolution] | None = getattr(local, "cache", None)
        now = time.monotonic()
        if cache is None or now >= local.cache_checked + CACHE_CHECK or local.cache_generation != self._generation:
            version = self._conn().execute("PRAGMA data_version").fetchone()[0]
            if cache is None or local.cache_version != version or local.cache_generation != self._generation:
                cache = local.cache = {}
                local.cache_version = version
                local.cache_generation = self._generation
            local.cache_checked = now
        elif len(cache) >= _MAX_CACHED:
            cache = local.cache = {}
        found = cache.get(address)
        if found is None:
            found = cache[address] = self._resolve(address)
        return found

    def _resolve(self, address: str) -> Resolution:
        try:
            addr = normalize_address(address)
        except AccountError:
            return Resolution(Lookup.NOT_LOCAL)
        _, domain = split_address(addr)
        conn = self._conn()
        if not conn.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
            return Resolution(Lookup.NOT_LOCAL)
        users: dict[str, User] = {}
        remote: dict[str, None] = {}
        if not self._expand(conn, addr, users, remote, 0, top=True):
            return Resolution(Lookup.UNKNOWN_USER)
        if not users and not remote:
            return Resolution(Lookup.UNKNOWN_USER)
        return Resolution(Lookup.FOUND, tuple(users.values()), tuple(remote))

    def _expand(self, conn: sqlite3.Connection, addr: str, users: dict[str, User],
                remote: dict[str, None], depth: int, top: bool = False) -> bool:
        if depth > _MAX_ALIAS_DEPTH or len(users) + len(remote) >= _MAX_EXPANSION:
            return bool(users or remote)
        local, domain = split_address(addr)
        if not conn.execute("SELECT 1 FROM domains WHERE name=?", (domain,)).fetchone():
            remote[addr] = None  # an alias target in a foreign domain: forwarded
            return True
        candidates = [addr]
        if self.delimiter and self.delimiter in local:
            base = local.split(self.delimiter, 1)[0]
            if base:
                candidates.append(f"{base}@{domain}")
        for cand in candidates:
            targets = [t for (t,) in conn.execute("SELECT target FROM aliases WHERE alias=?", (cand,))]
            if targets:
                ok = False
                for t in targets:
                    if t == cand:  # an alias that also lists itself: deliver to the user of that name
                        row = self._user_row(conn, t)
                        if row:
                            users[row.address] = row
                            ok = True
                        continue
                    ok = self._expand(conn, t, users, remote, depth + 1) or ok
                return ok
            row = self._user_row(conn, cand)
            if row:
                users[row.address] = row
                return True
        if top:
            catch = conn.execute("SELECT catchall FROM domains WHERE name=?", (domain,)).fetchone()
            if catch and catch[0] and catch[0] != addr:
                return self._expand(conn, catch[0], users, remote, depth + 1)
        return False

    @staticmethod
    def _user_row(conn: sqlite3.Connection, addr: str) -> User | None:
        row = conn.execute("SELECT address, local, domain, mailbox_format FROM users WHERE address=?",
                           (addr,)).fetchone()
        return User(*row) if row else None


def _check_password(password: str) -> None:
    if len(password) < 8:
        raise AccountError("password too short (8 characters at least)")
    if len(password) > 1024:
        raise AccountError("password too long (1024 characters at most)")
    if any(c in password for c in "\r\n\0"):
        raise AccountError("password must not contain CR, LF or NUL")
