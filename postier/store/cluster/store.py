"""Cluster mode's mail store for one node: `store.api.MailStoreAPI` over PostgreSQL and S3, the
cross-node change notifier (PostgreSQL LISTEN/NOTIFY feeding IDLE, RFC 2177) and local delivery.

`open_cluster(config)` makes the three from `[cluster]`; server/app.py `build_app` uses them in
place of the Maildir `MailStore` and `LocalDelivery`. Deliveries are written by this process (no
delivery agent: the work is network round trips, not fsyncs). The mailbox calls use psycopg's
blocking API in the store's worker threads, as the Maildir store's calls do, from a
`psycopg_pool.ConnectionPool`; the notifier is the one asynchronous part (`psycopg.AsyncConnection`
in the event loop, reconnecting after a loss, then waking every watcher since it may have missed
changes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool

from ...config import Config
from ...message.types import MEMORY_DATA_LIMIT, MessageBody, User
from ...metrics import Metrics
from ..api import Mailboxes
from ..delivery import DeliveryResult, LocalDelivery
from ..errors import MailboxExists, MailboxNotFound, OverQuota, StoreError, StoreUnavailable
from ..quota import OVER_QUOTA
from ..mailbox import DEFAULT_SPECIAL_USE, INBOX, ChangeNotifier, normalize_name
from .bodies import BodyStore, SpooledSource
from .mailboxes import FLAGS_INFO, ClusterMailboxes
from .schema import CHANNEL, ensure_schema
from .sieve import ClusterSieve

__all__ = ["ClusterDelivery", "ClusterNotifier", "ClusterStore", "maildrop_key", "open_bodies", "open_cluster",
           "open_store"]

log = logging.getLogger("postier.cluster")

_NAMES_SEP = "\x1e"  # a NUL of a names key, in a NOTIFY payload (PostgreSQL text holds no NUL)
_OUTBOX = 1000  # names changes waiting to be sent to the other nodes

#: maildir(5) info letters -> IMAP system flags
_LETTER_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


class ClusterNotifier(ChangeNotifier):
    """`ChangeNotifier` whose changes also come from every node, by LISTEN on `schema.CHANNEL`."""

    def __init__(self, dsn: str, retry: float = 1.0):
        super().__init__()
        self.dsn = dsn
        self.retry = retry
        self.listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: this notifier's mark on the names changes it sends (its own come back to it: skipped)
        self.origin = secrets.token_hex(8)
        self._outbox: asyncio.Queue[str] | None = None
        self._sender: asyncio.Task[None] | None = None
        self.forward = self._publish

    def start(self) -> None:
        """Begin listening (needs a running event loop; again after `close` is a no-op)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    def watch(self, address: str, folder: str, path: Path | None, callback: Callable[[], None]) -> Callable[[], None]:
        with contextlib.suppress(RuntimeError):
            self.start()
        return super().watch(address, folder, None, callback)

    async def _listen(self) -> None:
        lost = False
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=5)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    if lost:  # changes made while we were not listening: let every watcher look
                        for key in list(self._watchers):
                            self.local(*key)
                    async for n in conn.notifies():
                        owner, _, folder = n.payload.partition("\x1f")
                        folder, names, origin = folder.partition("\x1f")
                        if not names:  # a folder's messages changed (mailboxes.py, at commit)
                            self.local(owner, folder)
                        elif origin != self.origin:  # a names change made on another node
                            self.local(owner, folder.replace(_NAMES_SEP, "\x00"))
            except (psycopg.Error, OSError) as exc:
                if not lost:
                    log.warning("cluster: change notifications lost (%s); reconnecting", exc)
            self.listening.clear()
            lost = True
            await asyncio.sleep(self.retry)

    def _publish(self, address: str, key: str) -> None:
        """`forward`: a names change made by a session of this node (created, deleted, renamed,
        (un)subscribed: the NAMES key) goes to every other node, to wake their NOTIFY sessions, which
        then read what changed, renames included, from PostgreSQL in one snapshot
        (`ClusterMailboxes.names_since`; RFC 5465 §5.4). Message changes are not sent here:
        mailboxes.py announces them in the transaction that makes them. Sent after the change is
        committed (the session calls this once the store call returned), in order, on a connection
        of its own; a payload holds no NUL (a key's NULs are sent as `_NAMES_SEP`)."""
        if not key.startswith("\x00"):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._outbox is None:
            self._outbox = asyncio.Queue(maxsize=_OUTBOX)
        if self._sender is None or self._sender.done():
            self._sender = loop.create_task(self._send(self._outbox))
        with contextlib.suppress(asyncio.QueueFull):  # PostgreSQL unreachable for long: dropped
            self._outbox.put_nowait(f"{address}\x1f{key.replace(chr(0), _NAMES_SEP)}\x1f{self.origin}")

    async def _send(self, outbox: asyncio.Queue[str]) -> None:
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            while True:
                payload = await outbox.get()
                try:
                    if conn is None or conn.closed:
                        conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=5)
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                except (psycopg.Error, OSError) as exc:
                    log.warning("cluster: a mailbox names change was not sent to the other nodes (%s)", exc)
                    if conn is not None:
                        await conn.close()
                    conn = None
        finally:
            if conn is not None:
                await conn.close()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._sender is not None:
            self._sender.cancel()
        super().close()


def maildrop_key(address: str) -> int:
    """The advisory-lock key of a user's POP3 maildrop: 64 bits of SHA-256 (a signed bigint)."""
    return int.from_bytes(hashlib.sha256(b"pop3\x1f" + address.encode()).digest()[:8], "big", signed=True)


class ClusterStore:
    """Every user's mailboxes for one node of a cluster (`MailStoreAPI`)."""

    def __init__(self, dsn: str, bodies: BodyStore, special_use_folders: Sequence[str] = tuple(DEFAULT_SPECIAL_USE),
                 workers: int = 8, timeout: float = 5.0):
        self.bodies = bodies
        self.dsn = dsn
        self.timeout = timeout
        self.special_use_folders = tuple(special_use_folders)
        self.pool: psycopg_pool.ConnectionPool[Any] = psycopg_pool.ConnectionPool(
            dsn, min_size=1, max_size=workers + 8, open=False, timeout=timeout,
            kwargs={"connect_timeout": max(1, int(timeout))}, check=psycopg_pool.ConnectionPool.check_connection)
        self.pool.open(wait=False)
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cluster")
        self.notifier = ClusterNotifier(dsn)
        with contextlib.suppress(RuntimeError):  # in the event loop (serve): listen from the start
            self.notifier.start()
        self._users: dict[str, ClusterMailboxes] = {}
        self._lock = threading.Lock()
        self._schema_done = False

    def ensure_schema(self) -> None:
        """Create the tables when missing (blocking; done before the first mailbox is handed out)."""
        if self._schema_done:
            return
        try:
            with self.pool.connection() as conn:
                ensure_schema(conn)
        except (psycopg.OperationalError, psycopg.InterfaceError, psycopg_pool.PoolTimeout) as exc:
            raise StoreUnavailable("mail storage unavailable, try again later") from exc
        self._schema_done = True

    def acquire(self, user: User) -> ClusterMailboxes:
        self.ensure_schema()
        with self._lock:
            mb = self._users.get(user.address)
            if mb is None:
                mb = self._users[user.address] = ClusterMailboxes(user, self.pool, self.bodies,
                                                                  self.special_use_folders)
            mb.user = user  # a new login or delivery brings the current quota
            mb.refs += 1
            return mb

    def release(self, mb: Mailboxes) -> None:
        assert isinstance(mb, ClusterMailboxes)
        with self._lock:
            mb.refs -= 1
            if mb.refs <= 0 and self._users.get(mb.owner) is mb:
                del self._users[mb.owner]

    def release_later(self, mb: Mailboxes) -> None:
        self.release(mb)  # nothing to write back: no need for a worker thread

    def call[T](self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def sieve_storage(self, max_scripts: int, max_script_size: int) -> ClusterSieve:
        """Sieve's scripts and tracking in PostgreSQL, through this node's pool (`store.sieve.SieveStorage`)."""
        return ClusterSieve(self.pool, self.ensure_schema, max_scripts, max_script_size)

    def lock_maildrop(self, user: User) -> Callable[[], None] | None:
        """POP3's exclusive maildrop lock across every node (RFC 1939 §8; blocking): its release
        function, or None when a session on any node holds it (RFC 2449 §8.1 IN-USE).

        A session-level advisory lock on a connection of its own (not the pool's): PostgreSQL drops
        it when that connection ends, so a node that dies frees its users' maildrops once its
        connections are seen closed (TCP keepalives bound that for a node that vanished). Advisory
        locks are re-entrant within one connection, which is why each POP3 session has its own.
        The release function blocks (a round trip): run it in a worker thread."""
        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout)),
                                   keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3)
        except psycopg.Error as exc:
            raise StoreUnavailable("mail storage unavailable, try again later") from exc
        key = maildrop_key(user.address)
        try:
            r = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
        except psycopg.Error as exc:
            conn.close()
            raise StoreUnavailable("mail storage unavailable, try again later") from exc
        if r is None or not r[0]:
            conn.close()
            return None

        def release() -> None:
            # Unlocked explicitly (answered when done): closing alone would leave the release to the
            # server process's exit, which a new session on another node could overtake.
            try:
                conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
            except psycopg.Error:
                pass  # the connection is gone: so is the lock
            finally:
                conn.close()
        return release

    def close(self) -> None:
        self.notifier.close()
        self.executor.shutdown(wait=True)
        self.pool.close()


class ClusterDelivery(LocalDelivery):
    """The MDA of cluster mode: each recipient's copy is an APPEND to its folder (created when a Sieve
    script named one that does not exist; INBOX when the name cannot be a folder), so a 250 means the body is in the object store
    and the row committed. The fan-out, alias handling and listeners are `LocalDelivery`'s."""

    def __init__(self, store: ClusterStore, mail_root: Path, workers: int = 16, metrics: Metrics | None = None):
        super().__init__(mail_root, workers=workers, agent=False, metrics=metrics)
        self.store = store
        self._shared: dict[tuple[int, bytes, int], tuple[weakref.ref[MessageBody], _Shared]] = {}
        self._shared_lock = threading.Lock()

    def quota_used(self, user: User) -> int:
        """The user's bytes in PostgreSQL's rows, for the quota check at RCPT (blocking)."""
        mb = self.store.acquire(user)
        try:
            return mb.quota_usage().bytes
        finally:
            self.store.release(mb)

    def quota_warning_due(self, user: User) -> int | None:
        """The quota warning level newly reached, kept in PostgreSQL (`ClusterMailboxes.quota_warning_due`)."""
        mb = self.store.acquire(user)
        try:
            return mb.quota_warning_due()
        finally:
            self.store.release(mb)

    def deliver_one(self, user: User, prefix: bytes, body: MessageBody | bytes, envelope_from: str,
                    folder: str | None = None, info: str = "") -> DeliveryResult:
        """One user's copy: an APPEND of prefix and body. A body spooled to a file above
        MEMORY_DATA_LIMIT (with CRLF line ends, as SMTP gives them) is uploaded from its file. The
        copies of one such body (the users of one delivery, in parallel threads, or later ones of
        the same body, as a Sieve user's) share one reading of its line ends and one SHA-256 pass,
        and one upload: the first copy holds `_Shared.lock` until its APPEND is done, the others
        then find the object (HEAD) and the text row, and only mark the body and add their rows."""
        if isinstance(body, MessageBody) and body.spool_path is not None and (
                len(prefix) + body.size > MEMORY_DATA_LIMIT):
            shared = self._shared_for(body, prefix)
            with SpooledSource(prefix, body.spool_path, len(prefix) + body.size) as src:
                with shared.lock:
                    if shared.clean is None:
                        shared.clean = src.crlf_clean()
                        if shared.clean:
                            src.digest = shared.digest = BodyStore.digest_stream(src.read_at, src.size)
                            return self._deliver(user, src, folder, info)
                if shared.clean:
                    src.digest = shared.digest
                    return self._deliver(user, src, folder, info)
        data = prefix + (body if isinstance(body, bytes) else body.getvalue())
        return self._deliver(user, data, folder, info)

    def _shared_for(self, body: MessageBody, prefix: bytes) -> _Shared:
        """The `_Shared` of this body object with this prefix and size (a MessageBody only grows, so
        the same object and size is the same content). Entries of body objects gone are dropped
        here (not by a weakref callback, which the collector could run while this lock is held)."""
        key = (id(body), prefix, body.size)
        with self._shared_lock:
            got = self._shared.get(key)
            if got is not None and got[0]() is body:
                return got[1]
            for k in [k for k, (ref, _s) in self._shared.items() if ref() is None]:
                del self._shared[k]
            shared = _Shared()
            self._shared[key] = (weakref.ref(body), shared)
            return shared

    def _deliver(self, user: User, data: bytes | SpooledSource, folder: str | None, info: str) -> DeliveryResult:
        flags = _info_flags(info)
        try:
            mb = self.store.acquire(user)
        except StoreError as exc:
            log.error("delivery to %s failed: %s", user.address, exc)
            return DeliveryResult(user, False, str(exc))
        try:
            name = INBOX
            if folder:
                with contextlib.suppress(StoreError):
                    name = normalize_name(folder)
            try:
                v, uid = mb.append(name, data, flags)
            except MailboxNotFound:  # a new user (no INBOX yet), or a folder a script named
                mb.ensure_defaults()
                if name != INBOX:  # RFC 5228 §4.1: a missing folder is created, as in Maildir mode
                    with contextlib.suppress(MailboxExists):
                        mb.create(name)
                v, uid = mb.append(name, data, flags)
            return DeliveryResult(user, True, f"{v}:{uid}")
        except OverQuota:  # nothing stored for this user; the pipelines answer 452/552 (pipeline/quota.py)
            log.info("delivery to %s refused: over quota", user.address)
            return DeliveryResult(user, False, OVER_QUOTA)
        except StoreError as exc:
            log.error("delivery to %s failed: %s", user.address, exc)
            return DeliveryResult(user, False, str(exc))
        finally:
            self.store.release(mb)


@dataclass
class _Shared:
    """What the copies of one spooled body share (`ClusterDelivery.deliver_one`)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    clean: bool | None = None  # every LF after a CR (None: not read yet; False: copies made CRLF in memory)
    digest: str | None = None  # its SHA-256 when clean


def _info_flags(info: str) -> list[str]:
    """The flags a delivery's `info` names: `ClusterMailboxes.delivery_suffix`'s FLAGS_INFO list
    (Sieve's imap4flags, keywords included), or a Maildir suffix (":2,FS": system flags only)."""
    if info.startswith(FLAGS_INFO):
        return info[len(FLAGS_INFO):].split()
    return [_LETTER_FLAGS[ch] for ch in info.partition(":2,")[2] if ch in _LETTER_FLAGS]


def _secret(config: Config, path: str) -> str:
    if not path:
        return ""
    try:
        return (config.data_dir / path).read_text().splitlines()[0].strip()
    except (OSError, IndexError) as exc:
        raise SystemExit(f"postier: cluster.s3_secret_key_file: cannot read {config.data_dir / path}: {exc}") from None


def open_bodies(config: Config) -> BodyStore:
    c = config.cluster
    return BodyStore(c.s3_endpoint, c.s3_bucket, c.s3_access_key, _secret(config, c.s3_secret_key_file),
                     c.s3_region, c.timeout)


def open_store(config: Config, workers: int = 8) -> ClusterStore:
    """Cluster mode's mail store from `[cluster]` (the server, `postier export`/`import`)."""
    c = config.cluster
    return ClusterStore(c.dsn, open_bodies(config), config.mailbox.special_use_folders, workers=workers,
                        timeout=c.timeout)


def open_cluster(config: Config, metrics: Metrics | None = None) -> tuple[ClusterStore, ClusterDelivery]:
    """The mail store and MDA of cluster mode from `[cluster]` (server/app.py `build_app`)."""
    store = open_store(config)
    return store, ClusterDelivery(store, config.mail_root, metrics=metrics)
