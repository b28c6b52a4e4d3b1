"""Domains, users, aliases, catch-all and plus-addressing in SQLite (WAL); argon2id password hashes.

Matching rules are those Postfix and Dovecot users expect: domains are case-insensitive (and stored
as IDNA A-labels), local parts are case-insensitive too (RFC 5321 §2.4 leaves it to the receiver;
virtually every MX folds them), `alice+tag@` reaches `alice@` (Postfix recipient_delimiter), an alias
expands to one or more targets (local or remote, recursively, bounded), and a per-domain catch-all
receives what matches nothing else.

Password checks are synchronous here; servers call `verify_password_async`, which runs argon2 in a
worker thread so the event loop never blocks. Unknown users cost the same argon2 work as known ones.
Stored hashes are argon2id with RFC 9106 §4's second recommended option (t=3, 64 MiB, p=4); a hash
made with other parameters still verifies and is replaced at the next successful login.

Successful verifications are remembered (`LoginCache`, as Dovecot's auth cache does), so a client
that reconnects all day pays argon2 once per hour rather than per connection. An entry is keyed on
the address, the stored hash (read from the database at every login, so `passwd`, a removed user or
a change made by another process takes effect at once) and an HMAC-SHA256 of the password under a
random key that lives only in this process's memory: neither the password nor a fast unsalted hash
of it is ever kept. Failures are never cached; they go to the login throttle as before.

Recipient resolution (`resolve`, several queries per RCPT) is cached in memory, per thread. The
cache is dropped whenever the database may have changed: SQLite's `PRAGMA data_version` reports
commits made through any other connection (the CLI adding or removing a user while the server
runs) and is asked at most every `CACHE_CHECK` seconds (it starts a read transaction: two fcntl
locks and an fstat), so a change made elsewhere is seen within that time; a generation counter
covers the writes made through this object at once. Each resolution a thread answers is also
published, with the deadline its thread's last check allows (that check's time + `CACHE_CHECK`) and
the generation it was made under, for `resolve_cached`: the event loop answers RCPT from it without
a thread hop while that deadline is ahead and the generation unchanged, so no answer is older than a
thread's would be. The deadline travels with each entry because `data_version` numbers of two
connections cannot be compared.

Where the tables live is pluggable (`AccountStorage`): a SQLite file on one machine
(`SQLiteStorage`), PostgreSQL in cluster mode (store/cluster/accounts.py), so that every node
sees every account at once. The rules above are the same for both; the statements are written in
the SQL both understand, and the storage supplies the rest (schema, write transactions, the change
counter that invalidates the resolution caches).
"""

from __future__ import annotations

import asyncio
import base64
import re
import sqlite3
import threading
import time
import hashlib
import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .config import normalize_domain
from .durable import ensure_dirs, fsync_dir, immediate, use_wal
from .message.types import AccountError, User
from .proto.sasl import ScramCredentials, scram_credentials_from_password

_SCHEMA = """
CREATE TABLE IF NOT EXISTS domains (
    name TEXT PRIMARY KEY,
    catchall TEXT,
    created REAL NOT NULL,
    quota INTEGER  -- bytes for each user of the domain; NULL: [limits] default_quota, 0: none
);
CREATE TABLE IF NOT EXISTS users (
    address TEXT PRIMARY KEY,
    local TEXT NOT NULL,
    domain TEXT NOT NULL REFERENCES domains(name) ON DELETE CASCADE,
    password TEXT NOT NULL,
    scram TEXT NOT NULL DEFAULT '',
    mailbox_format TEXT NOT NULL DEFAULT 'maildir',
    created REAL NOT NULL,
    admin INTEGER NOT NULL DEFAULT 0,
    quota INTEGER  -- bytes; NULL: the domain's (else the default), 0: none
);
CREATE TABLE IF NOT EXISTS aliases (
    alias TEXT NOT NULL,
    target TEXT NOT NULL,
    PRIMARY KEY (alias, target)
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

_USER_SELECT = ("SELECT u.address, u.local, u.domain, u.mailbox_format, u.quota, d.quota"
                " FROM users u JOIN domains d ON d.name = u.domain")

#: Local parts every domain must receive (RFC 5321 §4.5.1 postmaster, RFC 2142 §2 abuse): when no alias
#: or user of that name exists they reach the admin (`set_admin`, else the first user created).
ROLE_LOCAL_PARTS = frozenset({"postmaster", "abuse"})

#: Local parts we create mailboxes for: a conservative dot-atom subset, so that a user's directory
#: name is always safe (no "/", no leading dot, no "..").
_LOCAL_RE = re.compile(r"^[a-z0-9!#$%&'*+=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+=?^_`{|}~-]+)*$")
_MAX_ALIAS_DEPTH = 10
_MAX_EXPANSION = 1000
_MAX_CACHED = 10000  # resolutions kept per thread (the cache is emptied when full)
CACHE_CHECK = 0.1  # seconds between two PRAGMA data_version checks of one thread's cache


class FreshCache[K, V]:
    """Answers a process remembers for the event loop, each until its own monotonic deadline and only
    while nothing changed through this process since it was made: key -> (deadline, generation,
    value), at most `size` keys (emptied when full). `changed()` makes every entry stale at once.
    Used by the recipient resolution (`Accounts.resolve_cached`) and the Sieve script of each user
    (pipeline/sieve.py). Thread-safe: entries are replaced whole, one dictionary operation each."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.generation = 0  # bumped by `changed`; an entry made under another one is stale
        self._entries: dict[K, tuple[float, int, V]] = {}
        self._lock = threading.Lock()

    def changed(self) -> None:
        with self._lock:
            self.generation += 1

    def get(self, key: K) -> V | None:
        """The value kept for `key` while its deadline is ahead and no change was made since, else None."""
        entry = self._entries.get(key)
        if entry is None or entry[1] != self.generation or time.monotonic() >= entry[0]:
            return None
        return entry[2]

    def last(self, key: K) -> V | None:
        """The value last kept for `key`, however old (to reuse what did not change)."""
        entry = self._entries.get(key)
        return None if entry is None else entry[2]

    def put(self, key: K, value: V, until: float, generation: int) -> None:
        """Keep `value` until the monotonic time `until`, made under `generation` (read before the
        value was, so that a change made meanwhile makes it stale)."""
        entries = self._entries
        if len(entries) >= self.size:
            entries = self._entries = {}
        entries[key] = (until, generation, value)


class Cursor(Protocol):
    """What the account queries use of a DB-API cursor."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """One thread's connection: statements with `?` placeholders (sqlite3.Connection is one)."""

    def execute(self, sql: str, parameters: Any = (), /) -> Cursor: ...

    def close(self) -> None: ...


class AccountStorage(Protocol):
    """Where the account tables live: `SQLiteStorage`, or PostgreSQL in cluster mode."""

    #: the first user created (the admin when none is set)
    first_user_sql: str

    def connect(self) -> Connection:
        """A new connection, used by one thread only; the tables exist once it returns."""

    def write(self, conn: Connection) -> AbstractContextManager[None]:
        """A write transaction: writers are serialized (committed on success, else rolled back)."""

    def data_version(self, conn: Connection) -> int:
        """A number that changes whenever another connection has committed a change."""


class SQLiteStorage:
    """The accounts in one SQLite file (WAL, synchronous=FULL), as on a single machine."""

    first_user_sql = "SELECT address FROM users ORDER BY created, rowid LIMIT 1"

    def __init__(self, path: Path):
        self.path = path
        self._ready = False

    def connect(self) -> Connection:
        if not self._ready:
            ensure_dirs(self.path.parent)
        new = not self.path.exists()
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        use_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        if not self._ready:
            conn.executescript(_SCHEMA)
            self._migrate(conn)
            if new:  # SQLite fsyncs the directory for its journals, not for a new database file
                fsync_dir(self.path.parent)
            self._ready = True
        return conn

    @contextmanager
    def write(self, conn: Connection) -> Iterator[None]:
        assert isinstance(conn, sqlite3.Connection)
        with immediate(conn):
            yield

    def data_version(self, conn: Connection) -> int:
        return int(conn.execute("PRAGMA data_version").fetchone()[0])

    def _migrate(self, conn: Connection) -> None:
        """Bring a database made by an older version up to the current schema (columns added with
        defaults that keep the old behaviour; idempotent, run at every open)."""
        def columns(table: str = "users") -> set[str]:
            return {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if "quota" in columns() and "quota" in columns("domains"):
            return  # the usual case: no write lock taken
        with self.write(conn):
            if "admin" not in columns():  # may use the admin console (/admin/); nobody does by default
                conn.execute("ALTER TABLE users ADD COLUMN admin INTEGER NOT NULL DEFAULT 0")
            if "quota" not in columns():  # storage quotas (store/quota.py): none until set
                conn.execute("ALTER TABLE users ADD COLUMN quota INTEGER")
            if "quota" not in columns("domains"):
                conn.execute("ALTER TABLE domains ADD COLUMN quota INTEGER")


class Lookup(Enum):
    FOUND = "found"
    UNKNOWN_USER = "unknown-user"
    NOT_LOCAL = "not-local"


@dataclass(frozen=True)
class Resolution:
    status: Lookup
    users: tuple[User, ...] = ()
    remote: tuple[str, ...] = ()


class Directory(Protocol):
    """Who the addresses of our domains reach: what the pipelines, the queue and the report job ask
    of the accounts (`Accounts` implements it)."""

    def resolve(self, address: str) -> Resolution:
        """Where mail for `address` goes (aliases, plus-addressing and catch-all applied)."""

    def resolve_cached(self, address: str) -> Resolution | None:
        """`resolve`'s answer when it is known without blocking (None: call `resolve` in a thread)."""

    def is_local_domain(self, name: str) -> bool: ...

    def list_domains(self) -> list[str]: ...

    def addresses_of(self, user: User) -> set[str]:
        """The user's own address and every alias reaching it."""


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


class LoginCache:
    """A bounded memory of successful password verifications (least recently used dropped first,
    entries expire after ``ttl`` seconds). Thread-safe. See the module docstring for the key."""

    def __init__(self, size: int = 10_000, ttl: float = 3600.0, clock: Callable[[], float] = time.monotonic):
        self.size = size
        self.ttl = ttl
        self._clock = clock
        self._key = secrets.token_bytes(32)  # per process, never stored
        self._entries: OrderedDict[tuple[str, str, bytes], float] = OrderedDict()
        self._lock = threading.Lock()

    def _entry(self, address: str, stored_hash: str, password: str) -> tuple[str, str, bytes]:
        mac = hmac.new(self._key, address.encode() + b"\0" + password.encode("utf-8", "surrogatepass"),
                       hashlib.sha256).digest()
        return address, stored_hash, mac

    def hit(self, address: str, stored_hash: str, password: str) -> bool:
        entry = self._entry(address, stored_hash, password)
        now = self._clock()
        with self._lock:
            expires = self._entries.get(entry)
            if expires is None:
                return False
            if expires <= now:
                del self._entries[entry]
                return False
            self._entries.move_to_end(entry)
            return True

    def add(self, address: str, stored_hash: str, password: str) -> None:
        if self.size <= 0:
            return
        entry = self._entry(address, stored_hash, password)
        with self._lock:
            self._entries[entry] = self._clock() + self.ttl
            self._entries.move_to_end(entry)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class Accounts:
    """The account database. Thread-safe: one connection per thread. `db` is the SQLite file, or
    another `AccountStorage` (cluster mode's PostgreSQL)."""

    def __init__(self, db: Path | AccountStorage, recipient_delimiter: str = "+", default_format: str = "maildir",
                 default_quota: int = 0):
        self.storage: AccountStorage = SQLiteStorage(db) if isinstance(db, Path) else db
        self.default_quota = default_quota  # bytes, 0: none (`[limits] default_quota`)
        self.delimiter = recipient_delimiter
        self.default_format = default_format
        self._local = threading.local()
        # address -> what any thread answered (`resolve_cached`); its generation is bumped by every
        # write made through this object
        self._published: FreshCache[str, Resolution] = FreshCache(_MAX_CACHED)
        # argon2id with RFC 9106 §4's second recommended option (t=3, m=64 MiB, p=4); the first
        # option's 2 GiB per verification is too much for a mail host serving many logins
        # (argon2-cffi's defaults, which are that profile: tests/test_login_cache.py checks it)
        self._hasher = PasswordHasher()
        self._dummy_hash = ""  # `dummy_hash`: made at first need (an argon2 hash: 0.1 s per CLI command)
        self._dummy_lock = threading.Lock()
        self.login_cache = LoginCache()
        self.rehash = True
        self.role_local_parts = ROLE_LOCAL_PARTS  # build_app adds the report mailboxes we publish
        self._conn()  # the tables exist from here on

    def set_hash_cost(self, time_cost: int, memory_kib: int, parallelism: int) -> None:
        """argon2id's parameters for new hashes (`[auth] argon2_*`; the dummy hash follows them, and
        `rehash` replaces a stored hash made with others)."""
        with self._dummy_lock:
            self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
            self._dummy_hash = ""

    def dummy_hash(self) -> str:
        """The hash an unknown user's password is checked against, so that the check costs what a
        known user's does; made once (blocking: the server makes it in a thread when it starts)."""
        if not self._dummy_hash:
            with self._dummy_lock:
                if not self._dummy_hash:
                    self._dummy_hash = self._hasher.hash("postier-dummy-password")
        return self._dummy_hash

    def configure_logins(self, cache_size: int, cache_ttl: float, rehash: bool) -> None:
        """Apply the ``[auth]`` login settings: login_cache_size, login_cache_ttl, rehash_passwords."""
        self.login_cache = LoginCache(cache_size, cache_ttl)
        self.rehash = rehash

    # -- plumbing -------------------------------------------------------------------------------

    def _conn(self) -> Connection:
        conn: Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self.storage.connect()
        return conn

    @contextmanager
    def _db(self) -> Iterator[Connection]:
        conn = self._conn()
        try:
            with self.storage.write(conn):
                yield conn
        finally:
            self._published.changed()

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
        return self.get_user(addr) or User(addr, local, domain, fmt)

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

    def set_console_admin(self, address: str, admin: bool) -> None:
        """Allow (or not) this user into the admin console (`user add --admin`)."""
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
        q = _USER_SELECT
        args: tuple[str, ...] = ()
        if domain:
            q += " WHERE u.domain=?"
            args = (self._domain_arg(domain),)
        return [self._user(r) for r in self._conn().execute(q + " ORDER BY u.domain, u.local", args)]

    # -- quotas (store/quota.py) ----------------------------------------------------------------

    def _user(self, row: tuple[str, str, str, str, int | None, int | None]) -> User:
        """A User from a `_USER_SELECT` row, with its effective quota: its own, else its domain's,
        else the default; 0 at any level means none."""
        q = row[4] if row[4] is not None else row[5] if row[5] is not None else self.default_quota
        return User(row[0], row[1], row[2], row[3], q or None)

    def set_quota(self, address: str, quota: int | None) -> None:
        """The user's own quota in bytes: None for none at all, -1 to inherit the domain's/default."""
        addr = normalize_address(address)
        value = None if quota == -1 else (quota or 0)
        with self._db() as db:
            if not db.execute("UPDATE users SET quota=? WHERE address=?", (value, addr)).rowcount:
                raise AccountError(f"no such user: {addr}")

    def set_domain_quota(self, name: str, quota: int | None) -> None:
        """Every user's quota in the domain unless set per user: None for none, -1 for the default."""
        domain = self._domain_arg(name)
        value = None if quota == -1 else (quota or 0)
        with self._db() as db:
            if not db.execute("UPDATE domains SET quota=? WHERE name=?", (value, domain)).rowcount:
                raise AccountError(f"no such domain: {domain}")

    def own_quota(self, address: str) -> str:
        """Where the user's quota comes from: "user", "domain" or "default"."""
        row = self._conn().execute(
            "SELECT u.quota, d.quota FROM users u JOIN domains d ON d.name = u.domain WHERE u.address=?",
            (normalize_address(address),)).fetchone()
        if row is None:
            raise AccountError(f"no such user: {address}")
        return "user" if row[0] is not None else "domain" if row[1] is not None else "default"

    def get_user(self, address: str) -> User | None:
        try:
            addr = normalize_address(address)
        except AccountError:
            return None
        row = self._conn().execute(_USER_SELECT + " WHERE u.address=?", (addr,)).fetchone()
        return self._user(row) if row else None

    def scram_credentials(self, address: str) -> ScramCredentials | None:
        try:
            addr = normalize_address(address)
        except AccountError:
            return None
        row = self._conn().execute("SELECT scram FROM users WHERE address=?", (addr,)).fetchone()
        return _decode_scram(row[0]) if row else None

    def verify_password(self, address: str, password: str) -> User | None:
        """Check a password (blocking: argon2, unless it succeeded recently: ``login_cache``).
        Unknown users cost a dummy verification too; failures always cost one."""
        user = self.get_user(address) if len(address) <= 320 else None
        row = None
        if user is not None:
            row = self._conn().execute("SELECT password FROM users WHERE address=?", (user.address,)).fetchone()
        if user is not None and row is not None and self.login_cache.hit(user.address, row[0], password):
            return user
        stored = row[0] if row else self.dummy_hash()
        try:
            self._hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if user is None or row is None:
            return None
        if self.rehash and self._hasher.check_needs_rehash(stored):
            stored = self._rehash(user.address, stored, password)
        self.login_cache.add(user.address, stored, password)
        return user

    def _rehash(self, address: str, old: str, password: str) -> str:
        """Store a hash with the current parameters in place of ``old`` (unless the password was
        changed meanwhile); returns the hash now stored."""
        new = self._hasher.hash(password)
        with self._db() as db:
            if db.execute("UPDATE users SET password=? WHERE address=? AND password=?", (new, address, old)).rowcount:
                return new
        return old

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
                db.execute("INSERT INTO aliases(alias, target) VALUES (?, ?) ON CONFLICT DO NOTHING", (a, t))

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

    # -- the admin (postmaster) -----------------------------------------------------------------

    def set_admin(self, address: str) -> str:
        """Route postmaster@ and abuse@ of every local domain to `address` (unless an alias says otherwise)."""
        addr = normalize_address(address)
        with self._db() as db:
            db.execute("INSERT INTO settings(key, value) VALUES ('admin', ?)"
                       " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (addr,))
        return addr

    def admin(self) -> str | None:
        """The admin address: the one set, else the first user created, else None."""
        return self._admin(self._conn())

    def _admin(self, conn: Connection) -> str | None:
        row = conn.execute("SELECT value FROM settings WHERE key='admin'").fetchone()
        if row is None:
            row = conn.execute(self.storage.first_user_sql).fetchone()
        return str(row[0]) if row else None

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
        now, generation = time.monotonic(), self._published.generation
        if cache is None or now >= local.cache_checked + CACHE_CHECK or local.cache_generation != generation:
            version = self.storage.data_version(self._conn())
            if cache is None or local.cache_version != version or local.cache_generation != generation:
                cache = local.cache = {}
                local.cache_version = version
                local.cache_generation = generation
            local.cache_checked = now
        elif len(cache) >= _MAX_CACHED:
            cache = local.cache = {}
        found = cache.get(address)
        if found is None:
            found = cache[address] = self._resolve(address)
        self._published.put(address, found, local.cache_checked + CACHE_CHECK, local.cache_generation)
        return found

    def resolve_cached(self, address: str) -> Resolution | None:
        """`resolve`'s answer without blocking (for the event loop), or None when no thread of this
        process has answered it under a check still fresh: no answer given is older than CACHE_CHECK
        seconds after a data_version check, and none survives a write made through this object.
        Thread-safe: entries are replaced whole, one dictionary operation each."""
        return self._published.get(address)

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

    def _expand(self, conn: Connection, addr: str, users: dict[str, User],
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
        if top and candidates[-1].partition("@")[0] in self.role_local_parts:
            admin = self._admin(conn)  # RFC 5321 §4.5.1, RFC 2142 §2: postmaster@, abuse@ of every domain
            if admin and admin not in candidates:
                return self._expand(conn, admin, users, remote, depth + 1)
        if top:
            catch = conn.execute("SELECT catchall FROM domains WHERE name=?", (domain,)).fetchone()
            if catch and catch[0] and catch[0] != addr:
                return self._expand(conn, catch[0], users, remote, depth + 1)
        return False

    def _user_row(self, conn: Connection, addr: str) -> User | None:
        row = conn.execute(_USER_SELECT + " WHERE u.address=?", (addr,)).fetchone()
        return self._user(row) if row else None


def _check_password(password: str) -> None:
    if len(password) < 8:
        raise AccountError("password too short (8 characters at least)")
    if len(password) > 1024:
        raise AccountError("password too long (1024 characters at most)")
    if any(c in password for c in "\r\n\0"):
        raise AccountError("password must not contain CR, LF or NUL")
