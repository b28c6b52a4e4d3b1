"""The asyncio driver of the POP3 listeners (RFC 1939): pop3 (port 110, STLS per RFC 2595) and pop3s
(port 995, implicit TLS per RFC 8314).

A short loop between the socket and the sans-IO core (`proto.pop3`): read, feed, answer each event,
write. The maildrop is the user's INBOX in the mailbox store shared with IMAP (`store.mailbox`), so
UIDL values are the IMAP identity of each message (UID and UIDVALIDITY) and a RETR sets \\Seen there.

Maildrop lock (RFC 1939 §8): the store's `lock_maildrop` (an exclusive `flock()` on
`postier-pop3.lock` in the user's home directory, `store.maildrop`; in cluster mode a PostgreSQL
advisory lock, so a session on another node is kept out too), taken when the user logs in and
released after the UPDATE state or when the connection drops. A session's listing is fixed at
login (RFC 1939 §5: message numbers stay valid for the session): mail delivered meanwhile shows
up in the next session. Deletions happen only in the UPDATE state after
QUIT; a dropped connection deletes nothing (RFC 1939 §6).

RETR and TOP stream the message file in chunks through the core's encoder (CRLF line ends and
byte-stuffing), so a large message is never held in memory whole. Disk and SQLite work runs in the
store's worker threads.

Abuse bounds (docs/security.md): before login the session lasts at most `limits.session_timeout`; a
command line, once started, must be complete within `limits.command_timeout` (slowloris), whatever
the idle timeout; `limits.max_errors` -ERR replies end the session (the core counts them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

from ..message.types import AccountError, User
from ..config import IMPLICIT_TLS_ROLES
from ..proto import pop3 as core
from ..proto.pop3.replies import Reply
from ..store.api import Mailboxes, MailStoreAPI, PopMessage
from ..store.errors import MailboxNotFound, StoreError, StoreUnavailable
from ..store.maildrop import LOCK_NAME
from .base import CommandTimeout, Session
from .throttle import AuthThrottle

__all__ = ["LOCK_NAME", "POP3Session"]

log = logging.getLogger("postier.pop3")

INBOX = "INBOX"  # RFC 1939 §1: the maildrop is the INBOX
CHUNK = 64 * 1024
MIN_IDLE_TIMEOUT = 600.0  # RFC 1939 §3: an autologout timer is at least 10 minutes
FLUSH_TIMEOUT = 5.0

# Lines the driver writes outside any command exchange (the core answers everything else).
ERR_BUSY = Reply(False, "Too many connections, try again later.", "SYS/TEMP")
ERR_SHUTDOWN = Reply(False, "Server shutting down.", "SYS/TEMP")
ERR_IDLE = Reply(False, "Disconnected for inactivity.")
ERR_COMMAND_TIMEOUT = Reply(False, "Command not received in time.")


class _Maildrop:
    """What a logged-in session holds: the user's mailboxes, the lock and the listing of login."""

    def __init__(self, user: User, mb: Mailboxes, unlock: Callable[[], None], listing: list[PopMessage],
                 uidvalidity: int):
        self.user = user
        self.mb = mb
        self.unlock: Callable[[], None] | None = unlock  # None once released
        self.uids = {m.uidl: m.uid for m in listing}
        self.uidvalidity = uidvalidity
        #: RFC 1939 §5: (size in CRLF octets, UIDL) in message-number order, fixed for the session
        self.entries = [(m.size, m.uidl) for m in listing]


def _open_maildrop(store: MailStoreAPI, user: User) -> _Maildrop | None:
    """Lock and list the maildrop (blocking). None when it is locked by another session."""
    unlock = store.lock_maildrop(user)
    if unlock is None:
        return None
    try:
        mb = store.acquire(user)
        try:
            try:
                listing, uidvalidity = mb.pop_listing()
            except MailboxNotFound:  # cluster mode: a user with no folders yet (no mail, no IMAP login)
                mb.ensure_defaults()  # as a delivery or an IMAP login would: an empty maildrop
                listing, uidvalidity = mb.pop_listing()
        except BaseException:
            store.release(mb)
            raise
    except BaseException:
        unlock()
        raise
    return _Maildrop(user, mb, unlock, listing, uidvalidity)


class POP3Session(Session):
    busy_line = ERR_BUSY.to_bytes()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.services.config
        listener = cfg.listeners.get(self.role)
        ctx = self.services.ssl_context
        self.settings = core.POP3Settings(
            tls_active=self.tls_implicit,
            offer_stls=ctx is not None and self.role not in IMPLICIT_TLS_ROLES
            and (listener.starttls if listener else True),
            allow_plaintext_auth=cfg.auth.allow_plaintext,
            expire=cfg.pop3.expire,
            login_delay=cfg.pop3.login_delay or None,
            greeting=f"{cfg.hostname} POP3 server ready",
            max_errors=max(1, cfg.limits.max_errors),
        )
        self.conn = core.POP3Connection(self.settings)
        self.store: MailStoreAPI = self.services.mailstore
        self.drop: _Maildrop | None = None
        self._sasl_failures = 0
        self._drop_after_flush = False
        self._auth_deadline: asyncio.Timeout | None = None

    @property
    def throttle(self) -> AuthThrottle:
        return self.services.throttle

    # -- lifecycle --------------------------------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        lim = self.services.config.limits
        try:
            # Until login, the whole session is bounded too; afterwards only idle time is.
            async with asyncio.timeout(lim.session_timeout) as self._auth_deadline:
                await self._session(max(MIN_IDLE_TIMEOUT, lim.idle_timeout))
        except TimeoutError:
            await self._say_and_flush(ERR_IDLE)
        except CommandTimeout:
            log.info("%s: %s did not finish a command in time", self.role, self.peer_ip)
            await self._say_and_flush(ERR_COMMAND_TIMEOUT)
        except asyncio.CancelledError:
            if not self.closing:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            await self._say_and_flush(ERR_SHUTDOWN)
        finally:
            self._release()

    def _release(self) -> None:
        """Drop the maildrop without any UPDATE (RFC 1939 §6). This runs in the event loop (it must
        also run when cancelled), so a lock still held is released in a worker thread without
        waiting (in cluster mode that is a database round trip); after QUIT `_update` has released
        it already, before its answer."""
        drop, self.drop = self.drop, None
        if drop is not None:
            unlock, drop.unlock = drop.unlock, None
            if unlock is not None:
                try:
                    self.store.call(unlock)  # scheduled now; nothing to wait for
                except RuntimeError:  # the workers are shut down already
                    unlock()
            self.store.release(drop.mb)

    async def _say_and_flush(self, reply: Reply) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError, OSError, ssl.SSLError):
            async with asyncio.timeout(FLUSH_TIMEOUT):
                self.writer.write(self.conn.data_to_send() + reply.to_bytes())
                await self.writer.drain()

    async def _flush(self, timeout: float) -> None:
        out = self.conn.data_to_send()
        if out:
            self.writer.write(out)
            async with asyncio.timeout(timeout):
                await self.writer.drain()

    # -- main loop ----------------------------------------------------------------------------------

    async def _session(self, idle: float) -> None:
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is not core.NEED_DATA:
                self.clock.stop()  # a line was complete: the next one starts its own clock
            if ev is core.NEED_DATA:
                if conn.sasl_failures > self._sasl_failures:  # SCRAM proof wrong, malformed SASL
                    self._sasl_failures = conn.sasl_failures
                    await self._penalize("SASL")
                await self._flush(idle)
                if self._drop_after_flush:
                    return
                conn.receive_data(await self.read_command(idle, conn.partial_input))
            elif isinstance(ev, core.StartTLS):
                await self._start_tls(idle)
            elif isinstance(ev, core.Login):
                await self._login(ev)
            elif isinstance(ev, core.ScramLookup):
                creds = None
                if not self.throttle.blocked(self.peer_ip):
                    creds = await asyncio.to_thread(self.services.accounts.scram_credentials, ev.username)
                conn.scram_credentials(creds)
            elif isinstance(ev, core.Authenticated):
                user = await asyncio.to_thread(self.services.accounts.get_user, ev.user)
                if user is None:  # removed meanwhile
                    conn.login_failed()
                else:
                    await self._grant(user, ev.mechanism)
            elif isinstance(ev, core.Retrieve):
                await self._retrieve(ev, idle)
            elif isinstance(ev, core.Update):
                await self._update(ev)
            elif isinstance(ev, core.ConnectionLost):
                return
            elif isinstance(ev, core.Close):
                await self._flush(FLUSH_TIMEOUT)
                return
            else:  # PAUSED: every event above is answered before the next one is asked for
                raise RuntimeError(f"POP3 core paused on an unanswered event ({ev!r})")

    async def _start_tls(self, idle: float) -> None:
        ctx = self.services.ssl_context
        assert ctx is not None  # STLS is offered only with a certificate
        await self._flush(idle)
        await self.start_tls(ctx)  # RFC 2595 §4: the core dropped its buffered bytes, this the stream's
        self.conn.tls_started()

    # -- AUTHORIZATION (RFC 1939 §4, RFC 5034) ---------------------------------------------------

    async def _penalize(self, mechanism: str) -> None:
        self.services.metrics.auth_failed(self.role, mechanism)
        log.info("%s: authentication failed from %s", self.role, self.peer_ip)
        await self.throttle.penalize(self.peer_ip)
        if self.throttle.blocked(self.peer_ip):
            self._drop_after_flush = True

    async def _login(self, ev: core.Login) -> None:
        if self.throttle.blocked(self.peer_ip):
            self.conn.login_failed(temporary=True)
            self._drop_after_flush = True
            return
        user = None
        if not ev.authzid or ev.authzid.lower() == ev.user.lower():  # no proxy logins
            try:
                user = await self.services.accounts.verify_password_async(ev.user, ev.password)
            except StoreUnavailable as exc:  # cluster mode: the account database is out of reach
                log.error("%s: login of %s impossible: %s", self.role, ev.user, exc)
                self.conn.login_failed(temporary=True)
                return
        if user is None:
            await self._penalize(ev.mechanism)
            self.conn.login_failed()
            return
        await self._grant(user, ev.mechanism)

    async def _grant(self, user: User, mechanism: str) -> None:
        """The user is who they say: lock and list the maildrop, or say why not."""
        self.throttle.success(self.peer_ip)
        if user.mailbox_format != "maildir":
            log.warning("%s: %s has an mbox mailbox, which POP3 does not serve", self.role, user.address)
            self.conn.login_failed(unavailable=True)
            return
        delay = self.settings.login_delay
        last = self.services.pop3_last_login  # RFC 2449 §6.5 LOGIN-DELAY
        if delay and last.last(user.address, delay) is not None:  # RFC 2449 §6.5
            self.conn.login_failed(login_delay=True)
            return
        try:
            drop = await self.store.call(_open_maildrop, self.store, user)
        except (StoreError, AccountError, OSError) as exc:
            log.error("%s: cannot open the maildrop of %s: %s", self.role, user.address, exc)
            self.conn.login_failed(temporary=True)
            return
        if drop is None:
            self.conn.login_failed(in_use=True)  # RFC 2449 §8.1 IN-USE
            return
        self.drop = drop
        if delay:
            last.record(user.address, delay)
        if self._auth_deadline is not None:
            self._auth_deadline.reschedule(None)
        self.conn.login_ok(drop.entries)
        log.info("%s: %s logged in from %s (%s, %s)", self.role, user.address, self.peer_ip, mechanism,
                 self.tls_info or "no TLS")

    # -- TRANSACTION (RFC 1939 §5, §7) ------------------------------------------------------------

    async def _retrieve(self, ev: core.Retrieve, idle: float) -> None:
        conn = self.conn
        drop = self.drop
        assert drop is not None
        uid = drop.uids[ev.uid]
        try:
            f = await self.store.call(drop.mb.open_message, INBOX, uid)
        except (StoreError, OSError) as exc:
            log.error("%s: cannot open message %d of %s: %s", self.role, uid, drop.user.address, exc)
            f = None
        if f is None:
            conn.retrieve_failed()  # expunged over IMAP meanwhile: -ERR [SYS/TEMP]
            return
        try:
            # Bounded: each pass reads up to CHUNK bytes of a finite file.
            while conn.message_needs_more:
                chunk = await asyncio.to_thread(f.read, CHUNK)
                if not chunk:
                    break
                conn.send_message_chunk(chunk)
                await self._flush(idle)
            conn.end_message()
        finally:
            f.close()
        if ev.top_lines is None:  # RETR, not TOP: the message has been read (IMAP \Seen)
            try:
                await self.store.call(drop.mb.mark_seen, [uid])
            except (StoreError, OSError) as exc:
                log.warning("%s: cannot mark message %d of %s seen: %s", self.role, uid,
                            drop.user.address, exc)
            else:
                self.store.notifier.notify(drop.user.address, INBOX)

    # -- UPDATE (RFC 1939 §6) ----------------------------------------------------------------------

    async def _update(self, ev: core.Update) -> None:
        drop = self.drop
        assert drop is not None
        ok = True
        if ev.deleted_uids:
            uids = [drop.uids[u] for u in ev.deleted_uids]
            try:
                ok = await self.store.call(drop.mb.pop_delete, uids, drop.uidvalidity)
            except (StoreError, OSError) as exc:
                log.error("%s: deleting messages of %s failed: %s", self.role, drop.user.address, exc)
                ok = False
            self.store.notifier.notify(drop.user.address, INBOX)
            log.info("%s: %s deleted %d messages", self.role, drop.user.address, len(uids) if ok else 0)
        unlock, drop.unlock = drop.unlock, None
        if unlock is not None:  # released before the answer: a new session may come in at once
            await self.store.call(unlock)
        self._release()
        self.conn.update_done(ok)
