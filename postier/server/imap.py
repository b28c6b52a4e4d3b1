"""IMAP4rev2 and IMAP4rev1 sessions (RFC 9051, RFC 3501): the asyncio driver over `proto.imap`.

The sans-IO `CommandReader` frames commands and `proto.imap.session.SessionCore` holds the session's
rules (legal commands per state, capabilities, the selected mailbox as announced, sequence sets, when
EXISTS/EXPUNGE/VANISHED/FETCH updates may be sent); this module does the I/O around them: it reads
and writes the socket, STARTTLS, deadlines, logins (one SASL exchange with SMTP and POP3:
`server/auth.py`), and asks the mail store (`store.api`, in its worker threads) for the facts each
command needs. Extensions: STARTTLS with discarding of bytes that arrived before the handshake
(RFC 9051 §6.2.1), LOGINDISABLED and PRIVACYREQUIRED before TLS, AUTH=SCRAM-SHA-256, AUTH=PLAIN and
AUTH=LOGIN with SASL-IR (RFC 4959), ID (RFC 2971), ENABLE (RFC 5161), IDLE (RFC 2177) woken by
deliveries, NAMESPACE, UNSELECT, UIDPLUS (RFC 4315), MOVE (RFC 6851), SPECIAL-USE and
CREATE-SPECIAL-USE (RFC 6154), LIST-EXTENDED (RFC 5258), LIST-STATUS (RFC 5819), ESEARCH (RFC 4731),
SEARCHRES (RFC 5182), LITERAL+ (RFC 7888), CHILDREN (RFC 3348), APPENDLIMIT (RFC 7889), CONDSTORE
and QRESYNC (RFC 7162), BINARY (RFC 3516), STATUS=SIZE (RFC 8438), MULTIAPPEND (RFC 3502),
CATENATE (RFC 4469, URLs: `proto.imap.url`), UTF8=ACCEPT (RFC 6855), WITHIN (RFC 5032),
NOTIFY (RFC 5465: events sent between commands and in IDLE, `_read_between_commands`).

Changes by other sessions, deliveries and other programs reach a session at its notification points
(after each command, in NOOP and while IDLE); the rules of what is sent then are the core's.

Abuse bounds (docs/security.md): before login the whole session lasts at most `limits.session_timeout`;
a command, once its first byte is in, must be complete within `limits.command_timeout` plus one second
per `limits.min_data_rate` bytes received (`server.base.CommandClock`); output must be read at that
rate too; and `limits.max_errors` BAD responses without a successful command in between end the session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import IO, Any

from ..antispam.learning import JUNK, enqueue, verdict
from ..message.types import MEMORY_DATA_LIMIT, User
from ..message.matching import SearchContext
from ..message.sorting import SortItem, sort_messages
from ..message.threading import thread_orderedsubject, thread_references
from ..proto import sasl
from ..proto.imap import commands as C
from ..proto.imap import response as R
from ..proto.imap.errors import ParseError
from ..proto.imap.reader import CommandReader, NeedContinuation, RawLine, ReaderLimits
from ..proto.imap.response import Code, ResponseCode
from ..proto.imap.listing import list_entries, lsub_entries
from ..proto.imap.search import AllKey, ModSeqKey, SearchKey
from ..proto.imap.seqset import SequenceSet
from ..proto.imap.session import FlagChange, FolderView, MailboxGone, Refusal, SessionCore, SessionSettings
from ..proto.imap.notify import MESSAGE_EVENTS as notify_message_events
from ..proto.imap.notify import NotifyPlan
from ..proto.imap.notify import plan as notify_plan
from ..proto.imap.states import State
from ..proto.imap.url import UrlError, parse_url
from ..store import errors as E
from ..store.api import FolderSnapshot, Mailboxes, MailStoreAPI, MessageRow, StatusInfo
from ..store.errors import StoreError
from ..store.index import flags_to_names
from ..store.maildir import SpoolFile
from ..store.mailbox import NAMES as NOTIFY_NAMES
from ..store.mailbox import INBOX, SEPARATOR, normalize_name
from .auth import settle
from .base import READ_SIZE, CommandTimeout, Session
from .imapsort import sort_items
from .imapfetch import (
    FetchError,
    FetchOptions,
    FetchPace,
    StreamedAnswer,
    changed_targets,
    is_flags_only,
    render_all_flags,
    render_fetch,
    render_flags,
    narrow,
    run_search,
    url_copy,
)

log = logging.getLogger("postier.imap")

IDLE_TIMEOUT_AUTH = 31 * 60.0  # RFC 9051 §5.4: the autologout timer is at least 30 minutes
IDLE_KEEPALIVE = 120.0  # "* OK Still here" during IDLE, for NAT boxes (Dovecot's default interval)
# Before login: a line as long as after (a 32 KB ID is legal), little else (literals are for LOGIN).
PREAUTH_LIMITS = ReaderLimits(max_line=64 * 1024, max_literal=8192, max_command=80 * 1024, max_literals=4)
FLUSH_AT = 256 * 1024
SEARCH_BATCH = 5000
FLAGS_BATCH = 1_000_000  # FETCH FLAGS lines are short: one batch even for a large mailbox
#: SASL mechanisms for AUTHENTICATE, offered (like LOGIN) only over TLS unless auth.allow_plaintext.
AUTH_MECHANISMS = ("SCRAM-SHA-256", "PLAIN", "LOGIN")


class _Disconnect(Exception):
    """The session must end now (BYE already queued)."""


def _no(text: str, code: ResponseCode | None = None) -> Refusal:
    return Refusal("NO", text, code)


def _bad(text: str, code: ResponseCode | None = None) -> Refusal:
    return Refusal("BAD", text, code)


#: RFC 9051 §7.1 response codes for the store's failures (TRYCREATE instead of NONEXISTENT where the
#: missing mailbox is the target of APPEND, COPY or MOVE: RFC 9051 §6.3.12, §6.4.7).
_STORE_CODES: dict[type[StoreError], ResponseCode] = {
    E.MailboxNotFound: Code.NONEXISTENT,
    E.MailboxExists: Code.ALREADYEXISTS,
    E.InvalidName: Code.CANNOT,
    E.NotPermitted: Code.CANNOT,
    E.StoreLimit: Code.LIMIT,
    E.MessageGone: Code.EXPUNGEISSUED,
    E.OverQuota: Code.OVERQUOTA,
    E.StoreUnavailable: Code.UNAVAILABLE,
    E.UnknownSpecialUse: Code.named("USEATTR"),  # RFC 6154 §3
}


def _store_reply(exc: StoreError, target: bool = False) -> Refusal:
    """The tagged NO for a store failure; `target` when the mailbox named is a destination."""
    if target and isinstance(exc, E.MailboxNotFound):
        return _no(str(exc), Code.TRYCREATE)
    return _no(str(exc), _STORE_CODES.get(type(exc)))


class IMAPSession(Session):
    busy_line = b"* BYE [UNAVAILABLE] Too many connections, try again later\r\n"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = self.services.config
        self.cfg = cfg
        listener = cfg.listeners.get(self.role)
        starttls_ok = (self.services.ssl_context is not None and not self.tls_implicit
                       and (listener.starttls if listener else True))
        self.core = SessionCore(SessionSettings(starttls_ok, cfg.auth.allow_plaintext, cfg.imap.appendlimit,
                                                AUTH_MECHANISMS), tls=self.tls_implicit)
        self.parser = CommandReader(PREAUTH_LIMITS)
        self.out: list[bytes] = []
        self.out_size = 0
        self.user: User | None = None
        self.store: MailStoreAPI = self.services.mailstore
        self.mb: Mailboxes | None = None
        self.logout = False
        self._wake = asyncio.Event()
        self._counted = False
        self._bad = 0  # BAD responses since the last command that completed OK
        self._preauth: asyncio.Timeout | None = None
        # NOTIFY (RFC 5465): the plan, the watches it needs, what changed, and what was last told
        self._nplan: NotifyPlan | None = None
        self._nwatches: list[Callable[[], None]] = []
        self._nchanged: set[str] = set()
        self._nstatus: dict[str, tuple[int, int, int, int]] = {}
        self._nfolders: set[str] = set()
        self._nsubs: set[str] = set()
        self._ncursor: int | None = None  # the store's rename log position when the names were last read
        self._nrenames: list[tuple[str, str]] | None = None  # the renames that read brought (None: not known)
        self._notifying = False  # sending NOTIFY's events between commands (written without waiting)

    # -- output ---------------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.out.append(data)
        self.out_size += len(data)

    def _write_out(self) -> int:
        """Hand what was sent to the transport (without waiting for the client); its size."""
        if not self.out:
            return 0
        data = b"".join(self.out)
        self.out.clear()
        self.out_size = 0
        self.writer.write(data)
        return len(data)

    async def flush(self) -> None:
        if self.out:
            size = self._write_out()
            lim = self.cfg.limits
            # A client that stops reading is dropped like one that stops sending.
            async with asyncio.timeout(lim.command_timeout + size / lim.min_data_rate):
                await self.writer.drain()

    async def maybe_flush(self) -> None:
        if self.out_size >= FLUSH_AT:
            if self._notifying:  # NOTIFY's events between commands: bounded by NOTIFY_MAX_PENDING instead
                self._write_out()
            else:
                await self.flush()

    def _unread(self) -> int:
        """Bytes sent to the client that it has not yet taken (beyond what the kernel holds)."""
        return self.out_size + self.writer.transport.get_write_buffer_size()

    def call[T](self, fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return self.store.call(fn, *args)

    # -- lifecycle ------------------------------------------------------------------------------

    async def run(self) -> None:
        self._task = asyncio.current_task()
        try:
            # Until login the whole session is bounded too; afterwards only idle time is.
            async with asyncio.timeout(self.cfg.limits.session_timeout) as self._preauth:
                await self._main()
        except asyncio.CancelledError:
            if not self.closing:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            self.send(R.bye("Server shutting down", Code.UNAVAILABLE))
            await self._flush_quietly()
        except TimeoutError:
            self.send(R.bye("Autologout; idle for too long"))
            await self._flush_quietly()
        except CommandTimeout:
            self.send(R.bye("Command not received in time"))
            await self._flush_quietly()
        except _Disconnect:
            await self._flush_quietly()
        finally:
            self._release()

    async def _flush_quietly(self) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError, OSError, ssl.SSLError):
            async with asyncio.timeout(5):
                await self.flush()

    def _release(self) -> None:
        self.parser.close()  # a large APPEND literal cut off: its file in tmp/ goes
        self._notify_off()
        if self.mb is not None:
            # Off the event loop: the last release may close an index (a final commit).
            self.store.release_later(self.mb)
            self.mb = None
        if self._counted and self.user is not None:
            self.services.imap_user_connections.release(self.user.address)
            self._counted = False

    def _timeout(self) -> float:
        return self.cfg.limits.idle_timeout if self.core.state is State.NOT_AUTHENTICATED else IDLE_TIMEOUT_AUTH

    async def _read_command_bytes(self) -> bytes:
        return await self.read_command(self._timeout(), self.parser.in_command, self.parser.buffered)

    def _count_bad(self) -> None:
        """One more BAD; at limits.max_errors the session ends (the BYE is queued)."""
        self._bad += 1
        if self._bad >= max(1, self.cfg.limits.max_errors):
            log.info("imap: %s sent too many invalid commands", self.peer_ip)
            self.send(R.bye("Too many invalid commands"))
            raise _Disconnect()

    async def _main(self) -> None:
        if self.services.throttle.blocked(self.peer_ip):
            self.send(R.bye("Too many failed logins; try again later", Code.UNAVAILABLE))
            await self.flush()
            return
        self.send(R.untagged_status("OK", "postier IMAP4rev2 ready", Code.capability(self.core.capabilities())))
        while not self.logout:
            try:
                ev = self.parser.next_event()
            except ParseError as exc:
                self._parse_error(exc)
                continue
            if ev is None:
                await self.flush()
                if self.closing:
                    raise asyncio.CancelledError
                data = await self._read_between_commands()
                if not data:
                    return
                self.parser.feed(data)
                continue
            self.clock.stop()  # the next partial command starts its own clock
            if isinstance(ev, NeedContinuation):
                self._continuation(ev)
            elif isinstance(ev, RawLine):
                self.send(R.untagged_status("BAD", "Unexpected line"))
                self._count_bad()
            else:
                await self._dispatch(ev)
                await self.maybe_flush()
        await self.flush()

    def _parse_error(self, exc: ParseError) -> None:
        code = Code.named(exc.code) if exc.code else None
        if exc.code == "BADCHARSET":
            code = Code.badcharset()
        if exc.tag:
            self.send(R.tagged(exc.tag, exc.status, exc.message, code))
        else:
            self.send(R.untagged_status("BAD", exc.message, code))
        if not exc.tag or exc.status == "BAD":
            self._count_bad()

    def _continuation(self, ev: NeedContinuation) -> None:
        """A synchronising literal: "+" or a refusal (RFC 9051 §7.5; RFC 7889 APPENDLIMIT)."""
        tag = ev.tag or "*"
        if ev.command in ("LOGIN", "AUTHENTICATE") and not self.core.auth_allowed:
            self.parser.reject_literal()
            self.send(R.tagged(tag, "NO", "Log in after STARTTLS", Code.PRIVACYREQUIRED))
            return
        if ev.command == "APPEND" and ev.size > self.cfg.imap.appendlimit:
            self.parser.reject_literal()
            self.send(R.tagged(tag, "NO", "Message too large", Code.TOOBIG))
            return
        self.parser.accept_literal()
        self.send(R.continuation("Ready for literal data"))

    # -- capabilities ---------------------------------------------------------------------------

    # -- dispatch -------------------------------------------------------------------------------

    async def _dispatch(self, cmd: C.Command) -> None:
        try:
            await self._dispatch_command(cmd)
        finally:
            if isinstance(cmd, C.Append):  # spooled literals not delivered: their files go
                for msg in cmd.messages:
                    for lit in (msg.message, *(p.data for p in msg.catenate or ())):
                        if not isinstance(lit, bytes):
                            lit.discard()

    async def _dispatch_command(self, cmd: C.Command) -> None:
        tag = cmd.tag
        hint = self.core.refusal(cmd.name)
        if hint is not None:
            self.send(R.tagged(tag, "BAD", f"{cmd.command_name}: {hint}", Code.CLIENTBUG))
            self._count_bad()
            return
        handler = self._handlers.get(type(cmd))
        if handler is None:
            self.send(R.tagged(tag, "BAD", f"{cmd.command_name} is not supported"))
            self._count_bad()
            return
        try:
            result = await handler(self, cmd)
            text, code = result if result else (f"{cmd.command_name} completed", None)
            self.send(R.tagged(tag, "OK", text, code))
            self._bad = 0
        except Refusal as r:
            self.send(R.tagged(tag, r.status, r.text, r.code))
            if r.status == "BAD":
                self._count_bad()
        except _Silent:
            pass
        except StoreError as exc:
            no = _store_reply(exc)
            self.send(R.tagged(tag, no.status, no.text, no.code))
        except _Disconnect:
            self.logout = True
            raise
        except (ConnectionError, asyncio.CancelledError, TimeoutError, ssl.SSLError, CommandTimeout):
            raise
        except Exception:
            log.exception("imap: %s failed for %s", cmd.command_name, self.user.address if self.user else self.peer_ip)
            self.send(R.tagged(tag, "NO", "Internal error; the command was not completed", Code.SERVERBUG))

    # -- any state ------------------------------------------------------------------------------

    async def cmd_capability(self, cmd: C.Capability) -> None:
        self.send(R.capability(self.core.capabilities()))

    async def cmd_noop(self, cmd: C.Noop | C.Check) -> None:
        await self._updates(allow_expunge=True, sync=True)

    async def cmd_logout(self, cmd: C.Logout) -> None:
        self.send(R.bye("Logging out"))
        self.logout = True

    async def cmd_id(self, cmd: C.Id) -> None:
        self.send(R.id_response([("name", "postier"), ("vendor", "postier")]))  # RFC 2971 §3.3

    # -- not authenticated ----------------------------------------------------------------------

    async def cmd_starttls(self, cmd: C.StartTLS) -> tuple[str, ResponseCode | None] | None:
        if not self.core.settings.starttls_ok or self.core.tls:
            raise _bad("STARTTLS is not available", Code.CLIENTBUG)
        self.send(R.tagged(cmd.tag, "OK", "Begin TLS negotiation now"))
        await self.flush()
        # RFC 9051 §6.2.1: anything the client sent after STARTTLS is plaintext injection: drop it
        # (the reader's bytes here, the stream's in start_tls).
        self.parser.discard_buffered()
        ctx = self.services.ssl_context
        assert ctx is not None
        await self.start_tls(ctx)
        self.core.tls_started()
        raise _Silent()

    async def cmd_login(self, cmd: C.Login) -> tuple[str, ResponseCode | None] | None:
        if not self.core.auth_allowed:
            raise _no("Log in after STARTTLS", Code.PRIVACYREQUIRED)  # RFC 9051 §6.2.3
        return await self._check_login(cmd.userid, cmd.password)

    async def cmd_authenticate(self, cmd: C.Authenticate) -> tuple[str, ResponseCode | None] | None:
        """RFC 9051 §6.2.2 AUTHENTICATE (SASL-IR: RFC 4959), one exchange shared with SMTP and POP3."""
        if not self.core.auth_allowed:
            raise _no("Authenticate after STARTTLS", Code.PRIVACYREQUIRED)
        exchange = sasl.ServerExchange.for_name(cmd.mechanism, AUTH_MECHANISMS)
        if exchange is None:
            raise _no("Unsupported authentication mechanism", Code.CANNOT)
        self._refuse_if_blocked()
        res = await settle(exchange, exchange.start(cmd.initial_response), self.services.accounts)
        for _ in range(8):  # SCRAM needs three round trips, LOGIN two
            if not isinstance(res.outcome, sasl.Challenge):
                break
            self.send(R.sasl_challenge(res.outcome.data))
            await self.flush()
            line = await self._read_line()
            if line == b"*":  # RFC 9051 §6.2.2: the client cancels
                raise _bad("AUTHENTICATE cancelled")
            data = sasl.decode_response(line)
            if data is None:
                raise _bad("Invalid base64 in the SASL response")
            res = await settle(exchange, exchange.respond(data), self.services.accounts)
        if isinstance(res.outcome, sasl.Success) and res.user is not None:
            return await self._grant(res.user)
        log.info("imap: %s authentication failed from %s", exchange.name, self.peer_ip)
        await self._login_failed(exchange.name)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _read_line(self) -> bytes:
        """The next raw line (an AUTHENTICATE response, IDLE's DONE)."""
        self.parser.expect_line()
        while True:
            ev = self.parser.next_event()  # ParseError (line too long) ends the command
            if isinstance(ev, RawLine):
                return ev.data
            if ev is not None:
                raise _bad("Unexpected input")
            data = await self._read_command_bytes()
            if not data:
                raise ConnectionError("client went away")
            self.parser.feed(data)

    def _refuse_if_blocked(self) -> None:
        if self.services.throttle.blocked(self.peer_ip):
            self.send(R.bye("Too many failed logins; try again later", Code.UNAVAILABLE))
            raise _Disconnect()

    async def _check_login(self, userid: str, password: str) -> tuple[str, ResponseCode | None]:
        self._refuse_if_blocked()
        user = await self.services.accounts.verify_password_async(userid, password)
        if user is None:
            await self._login_failed()
        assert user is not None
        return await self._grant(user)

    async def _grant(self, user: User) -> tuple[str, ResponseCode | None]:
        """Authenticated (LOGIN or AUTHENTICATE): open the user's mailboxes."""
        self.services.throttle.success(self.peer_ip)
        if user.mailbox_format != "maildir":
            raise _no("This account's mailbox is not served over IMAP", Code.UNAVAILABLE)
        if not self.services.imap_user_connections.admit(user.address, self.cfg.imap.max_connections_per_user):
            raise _no("Too many connections for this user", Code.LIMIT)
        self._counted = True
        self.user = user
        self.mb = await self.call(self.store.acquire, user)
        await self.call(self.mb.ensure_defaults)
        self.core.logged_in()
        if self._preauth is not None:
            self._preauth.reschedule(None)
        self.parser.limits = ReaderLimits.authenticated(self.cfg.imap.appendlimit)
        self.parser.spool = self._spool
        log.info("imap login %s from %s%s", user.address, self.peer_ip, " (TLS)" if self.core.tls else "")
        return "Logged in", Code.capability(self.core.capabilities())

    async def _login_failed(self, mechanism: str = "password") -> None:
        self.services.metrics.auth_failed(self.role, mechanism)
        thr = self.services.throttle
        await thr.penalize(self.peer_ip)
        if thr.blocked(self.peer_ip):
            self.send(R.bye("Too many failed logins", Code.UNAVAILABLE))
            raise _Disconnect()
        raise _no("Authentication failed", Code.AUTHENTICATIONFAILED)

    # -- authenticated --------------------------------------------------------------------------

    async def cmd_enable(self, cmd: C.Enable) -> None:
        self.send(self.core.enable(cmd.capabilities))
        self.parser.utf8 = self.core.utf8

    def _mbox(self) -> Mailboxes:
        assert self.mb is not None
        return self.mb

    def _name(self, name: str) -> str:
        try:
            return normalize_name(name)
        except StoreError as exc:
            raise _store_reply(exc) from None

    async def cmd_select(self, cmd: C.Select) -> tuple[str, ResponseCode | None]:
        core = self.core
        if cmd.qresync is not None and not core.qresync:
            raise _bad("QRESYNC must be enabled first", Code.CLIENTBUG)  # RFC 7162 §3.2.5
        for line in core.leave():
            self.send(line)
        name = self._name(cmd.mailbox)
        mb = self._mbox()
        readonly = cmd.readonly
        snap, recent_from, first = await self.call(mb.select, name, not readonly and not core.rev2, not core.rev2)
        if cmd.condstore:
            core.condstore = True
        view = FolderView(snap.uidvalidity, snap.uids, snap.version, snap.highestmodseq, snap.keywords)
        for line in core.select(name, readonly, view, uidnext=snap.uidnext, keywords=snap.keywords,
                                recent_from=recent_from, first_unseen=first):
            self.send(line)
        if core.rev2:  # RFC 9051 §6.3.2: LIST is a required untagged response of SELECT/EXAMINE
            self.send(R.list_response([], SEPARATOR, name, utf8=True))
        if cmd.qresync is not None and cmd.qresync.uidvalidity == snap.uidvalidity:
            await self._qresync(cmd.qresync)
        return ("EXAMINE completed" if readonly else "SELECT completed",
                Code.READ_ONLY if readonly else Code.READ_WRITE)

    async def _qresync(self, q: C.QResync) -> None:
        """RFC 7162 §3.2.5.2: VANISHED (EARLIER) and the flag changes since the client's MODSEQ."""
        sel = self.core.sel
        assert sel is not None
        mb = self._mbox()
        known = q.known_uids
        vanished = await self.call(mb.vanished_since, sel.name, q.modseq)
        top = max(sel.uids[-1] if sel.uids else 0, 1)
        if vanished is None:  # tombstones pruned: every known UID that is gone
            present = set(sel.uids)
            span = known if known is not None else SequenceSet(((1, top),))
            vanished = [u for u in span.iter(max(top, span.max_number())) if u not in present][:1_000_000]
        elif known is not None:
            vanished = [u for u in vanished if known.contains(u, top)]
        if vanished:
            self.send(R.vanished(SequenceSet.from_ids(vanished), earlier=True))
        rows = await self.call(mb.changed_since, sel.name, q.modseq)
        for uid, flags, kws, modseq in rows:
            i = bisect_left(sel.uids, uid)
            if i < len(sel.uids) and sel.uids[i] == uid:
                self.send(self.core.flag_fetch(i + 1, uid, flags_to_names(flags, kws), modseq, with_modseq=True))
                await self.maybe_flush()

    async def cmd_create(self, cmd: C.Create) -> None:
        use = cmd.special_use[0] if cmd.special_use else None
        if len(cmd.special_use) > 1:
            raise _no("One special-use attribute per mailbox", Code.named("USEATTR"))
        await self.call(self._mbox().create, cmd.mailbox, use)
        await self._names_changed()

    async def cmd_delete(self, cmd: C.Delete) -> None:
        name = self._name(cmd.mailbox)
        await self.call(self._mbox().delete, name)
        self._notify(name)
        await self._names_changed()
        if self.core.sel is not None and self.core.sel.name == name:
            # Deleting the mailbox this session has selected: it is closed, and the session is back
            # in the authenticated state with the tagged OK, as Dovecot does (CLOSED, RFC 7162
            # §3.2.11, where the client can tell); other sessions that have it selected get BYE at
            # their next update.
            for line in self.core.leave():
                self.send(line)

    async def cmd_rename(self, cmd: C.Rename) -> None:
        old = self._name(cmd.mailbox)
        await self.call(self._mbox().rename, old, cmd.new_mailbox)
        self._notify(old)
        await self._names_changed()
        sel = self.core.sel
        if sel is not None and old != "INBOX" and (sel.name == old or sel.name.startswith(old + SEPARATOR)):
            # Renaming the mailbox this session has selected (or a parent of it): it stays selected
            # under its new name, UIDs and UIDVALIDITY unchanged (the store renames the folder, it
            # does not copy it); other sessions that have it selected get BYE at their next update.
            sel.name = self._name(cmd.new_mailbox) + sel.name[len(old):]

    async def cmd_subscribe(self, cmd: C.Subscribe) -> None:
        await self.call(self._mbox().subscribe, cmd.mailbox, True)
        await self._names_changed()

    async def cmd_unsubscribe(self, cmd: C.Unsubscribe) -> None:
        name = self._name(cmd.mailbox)
        mb = self._mbox()
        if name not in await self.call(mb.subscriptions):
            raise _no("Not subscribed", Code.NONEXISTENT)
        await self.call(mb.subscribe, name, False)
        await self._names_changed()

    async def cmd_namespace(self, cmd: C.Namespace) -> None:
        self.send(R.namespace([("", SEPARATOR)], None, None, utf8=self.core.utf8))  # RFC 2342

    # -- LIST / LSUB / STATUS -------------------------------------------------------------------

    async def cmd_list(self, cmd: C.List) -> None:
        mb = self._mbox()
        folders = {f.name: f.special_use for f in await self.call(mb.list_folders)}
        subs = await self.call(mb.subscriptions)
        status = cmd.returns.status
        for e in list_entries(cmd, folders, subs, SEPARATOR):
            self.send(R.list_response(list(e.attributes), SEPARATOR, e.name, utf8=self.core.utf8,
                                      childinfo=list(e.childinfo)))
            if status is not None and e.name in folders:  # RFC 5819 LIST-STATUS
                with contextlib.suppress(StoreError):
                    await self._send_status(e.name, status)
            await self.maybe_flush()

    async def cmd_lsub(self, cmd: C.Lsub) -> None:
        mb = self._mbox()
        subs = await self.call(mb.subscriptions)
        exists = {f.name for f in await self.call(mb.list_folders)}
        for e in lsub_entries(cmd.reference, cmd.pattern, subs, exists, SEPARATOR):
            self.send(R.list_response(list(e.attributes), SEPARATOR, e.name, utf8=self.core.utf8, command="LSUB"))

    async def cmd_status(self, cmd: C.Status) -> None:
        name = self._name(cmd.mailbox)
        await self._send_status(name, cmd.items)

    async def _send_status(self, name: str, items: tuple[str, ...]) -> None:
        info = await self.call(self._mbox().status, name)
        if "HIGHESTMODSEQ" in items:
            for line in self.core.use_condstore():
                self.send(line)
        values = {
            "MESSAGES": info.messages, "UIDNEXT": info.uidnext, "UIDVALIDITY": info.uidvalidity,
            "UNSEEN": info.unseen, "DELETED": info.deleted, "SIZE": info.size, "RECENT": info.recent,
            "HIGHESTMODSEQ": info.highestmodseq, "APPENDLIMIT": self.cfg.imap.appendlimit,
            "DELETED-STORAGE": info.deleted_size // 1024,  # RFC 9208 §4.2, in STORAGE's units (KiB)
        }
        self.send(R.status(name, [(k, values[k]) for k in items if k in values], utf8=self.core.utf8))

    # -- APPEND ---------------------------------------------------------------------------------

    async def cmd_append(self, cmd: C.Append) -> tuple[str, ResponseCode | None]:
        """RFC 9051 §6.3.12 APPEND; RFC 3502 MULTIAPPEND (all messages or none)."""
        name = self._name(cmd.mailbox)
        items: list[tuple[bytes | SpoolFile, list[str], float | None]] = []
        try:
            for msg in cmd.messages:
                if msg.utf8 and not self.core.utf8_accept:  # RFC 6855 §4: only once enabled
                    raise _bad("UTF8 in APPEND needs ENABLE UTF8=ACCEPT", Code.CLIENTBUG)
                data = await self._append_data(msg)
                when = msg.internal_date.timestamp() if msg.internal_date is not None else None
                items.append((data, [f for f in msg.flags if f.upper() != "\\RECENT"], when))
                size = len(data) if isinstance(data, bytes) else data.received
                if not size:
                    raise _no("Empty message", Code.CANNOT)
                if size > self.cfg.imap.appendlimit:
                    raise _no("Message too large", Code.TOOBIG)
            try:
                uidvalidity, uids = await self.call(self._mbox().append_many, name, items)
            except StoreError as exc:
                raise _store_reply(exc, target=True) from None
        finally:  # a CATENATE's spool file not delivered (the literals' go in _dispatch)
            for data, _flags, _when in items:
                if isinstance(data, SpoolFile):
                    data.discard()
        self._notify(name)
        if self.core.sel is not None:
            await self._updates(allow_expunge=True, sync=False)
        return "APPEND completed", Code.appenduid(uidvalidity, SequenceSet.from_ids(uids))  # RFC 4315 §3

    async def _append_data(self, msg: C.AppendMessage) -> bytes | SpoolFile:
        """One APPEND message's content: its literal (in memory or, when large, in a file in the
        Maildir's tmp/: `_spool`), or its CATENATE parts joined (RFC 4469 §3), a piece at a time,
        in memory up to MEMORY_DATA_LIMIT and beyond in a spool file (`_Catenation`)."""
        if msg.catenate is None:
            return _spooled(msg.message)
        out = _Catenation(self._mbox().spool)
        try:
            for part in msg.catenate:
                room = self.cfg.imap.appendlimit - out.received
                if part.kind == "TEXT":
                    text = _spooled(part.data)
                    if isinstance(text, bytes):
                        n = len(text)
                        if n <= room:
                            await self.call(out.write, text)
                    elif text.failed is not None:
                        raise StoreError(f"message not stored: {text.failed}")
                    elif (n := text.size) <= room:
                        await self.call(_copy_pieces, text.pieces(), out.write)
                else:
                    n = await self._url_copy(part.url, out.write, room)
                if n > room:  # RFC 4469 §5: TOOBIG
                    raise _no("Message too large", Code.TOOBIG)
            return out.result()
        except BaseException:
            out.discard()
            raise

    async def _url_copy(self, url: str, write: Callable[[bytes], None], room: int) -> int:
        """Copy the octets a CATENATE URL names to `write` (`imapfetch.url_copy`: nothing when more
        than `room`), only ever from this user's own mailboxes (no URLAUTH, no other users: RFC 4469
        §5 BADURL for anything else); their length."""
        user = self.user
        assert user is not None
        bad = _no("CATENATE URL cannot be used", Code.badurl(url))
        try:
            u = parse_url(url)
        except UrlError as exc:
            raise _no(f"CATENATE URL cannot be used: {exc}", Code.badurl(url)) from None
        if u.user is not None and u.user.lower() not in (user.address.lower(), user.local.lower()):
            raise bad  # another user's mailbox: never
        if u.host is not None and u.host not in (self.cfg.hostname.lower(), user.domain.lower()):
            raise bad  # RFC 5092 §6: another server
        sel = self.core.sel
        if u.mailbox is None:  # relative to the selected mailbox (RFC 5092 §7.1)
            if sel is None:
                raise bad
            name = sel.name
        else:
            name = "INBOX" if u.mailbox.upper() == "INBOX" else u.mailbox
            try:
                name = normalize_name(name)
            except StoreError:
                raise bad from None
        mb = self._mbox()
        try:
            snap = await self.call(mb.snapshot, name, False)
            if u.uidvalidity is not None and u.uidvalidity != snap.uidvalidity:
                raise bad
            n = await self.call(url_copy, mb, name, u.uid, u.section, u.partial, write, room)
        except StoreError:
            raise bad from None
        if n is None:
            raise bad  # expunged or never there
        return n

    def _spool(self, size: int) -> SpoolFile:
        """Where the reader writes a large APPEND literal as it arrives (`CommandReader.spool`):
        a file in the user's Maildir tmp/, delivered by rename (memory per APPEND stays bounded;
        the command's deadline and minimum data rate apply while it arrives, `CommandClock`)."""
        return self._mbox().spool()

    # -- NOTIFY (RFC 5465) ----------------------------------------------------------------------

    async def cmd_notify(self, cmd: C.Notify) -> None:
        self._notify_off()
        if cmd.none:  # RFC 5465 §3: NOTIFY NONE
            return
        self._nplan = notify_plan(cmd)
        if not await self._notify_rewatch(send_status=self._nplan.status):
            raise _no(f"NOTIFY covers more than {NOTIFY_MAX_MAILBOXES} mailboxes", Code.LIMIT)

    def _notify_off(self) -> None:
        for unwatch in self._nwatches:
            unwatch()
        self._nwatches.clear()
        self._nplan = None
        self._nchanged.clear()
        self._nstatus.clear()

    def _on_change(self, name: str) -> None:
        self._nchanged.add(name)
        self._wake.set()

    async def _notify_rewatch(self, send_status: bool) -> bool:
        """Watch what the plan covers now: the mailboxes with message events, and the user's
        names and subscriptions; remember what the client was told (to send only changes).
        False (and NOTIFY off) when the plan covers more than NOTIFY_MAX_MAILBOXES mailboxes."""
        nplan, user = self._nplan, self.user
        assert nplan is not None and user is not None
        # The old watches go only once the new ones are in place, and the names are watched before
        # they are read: a change made while this awaits the store (another node's CREATE, say)
        # wakes the session again instead of falling between an unwatch and a watch.
        old, self._nwatches = self._nwatches, []
        try:
            mb = self._mbox()
            notifier = self.store.notifier
            if nplan.wants_names:
                self._nwatches.append(notifier.watch(user.address, NOTIFY_NAMES, None,
                                                     lambda: self._on_change(NOTIFY_NAMES)))
            # RFC 5465 §5.4: the names and the renames that led to them, read in one step
            view = await self.call(mb.names_since, self._ncursor)
            self._ncursor, self._nrenames = view.cursor, view.renames
            self._nfolders, self._nsubs = set(view.folders), set(view.subscriptions)
            covered = sorted(n for n in self._nfolders
                             if nplan.events_for(n, self._nsubs, SEPARATOR) & notify_message_events)
            if len(covered) > NOTIFY_MAX_MAILBOXES:
                self._notify_off()
                return False
            for name in covered:
                self._nwatches.append(notifier.watch(user.address, name, mb.watch_path(name),
                                                     functools.partial(self._on_change, name)))
                with contextlib.suppress(StoreError):
                    info = await self.call(mb.status, name)
                    self._nstatus[name] = (info.messages, info.uidnext, info.uidvalidity, info.highestmodseq)
                    if send_status and (self.core.sel is None or self.core.sel.name != name):  # RFC 5465 §3 STATUS
                        self.send(R.status(name, self._status_items(info), utf8=self.core.utf8))
            return True
        finally:
            for unwatch in old:
                unwatch()

    async def _notify_rewatch_or_overflow(self) -> bool:
        """`_notify_rewatch` outside NOTIFY itself: too many mailboxes now ends NOTIFY with
        NOTIFICATIONOVERFLOW (RFC 5465 §5.8)."""
        if await self._notify_rewatch(send_status=False):
            return True
        self._notify_overflow("too many mailboxes")
        return False

    def _notify_overflow(self, why: str) -> None:
        """RFC 5465 §5.8: events are lost from here on; the client must assume NOTIFY NONE."""
        self._notify_off()
        self.send(R.untagged_status("OK", f"NOTIFY is off: {why}", Code.named("NOTIFICATIONOVERFLOW")))

    def _status_items(self, info: StatusInfo) -> list[tuple[str, int]]:
        items = [("MESSAGES", info.messages), ("UIDNEXT", info.uidnext), ("UIDVALIDITY", info.uidvalidity)]
        if self.core.condstore:  # RFC 5465 §5.2 with RFC 7162
            items.append(("HIGHESTMODSEQ", info.highestmodseq))
        return items

    async def _names_changed(self) -> None:
        """This session created, deleted, renamed or (un)subscribed a mailbox: tell the user's
        other NOTIFY sessions; this one knows (RFC 5465 §5.4: the client's own change is not echoed)."""
        if self.user is not None:
            self.store.notifier.notify(self.user.address, NOTIFY_NAMES)
        if self._nplan is not None:
            try:
                if await self._notify_rewatch_or_overflow():
                    self._nchanged.discard(NOTIFY_NAMES)
            except StoreError as exc:  # the command itself succeeded: the next event retries
                log.info("imap: NOTIFY rewatch for %s failed: %s", self.user.address if self.user else "-", exc)

    async def _read_between_commands(self) -> bytes:
        """Read the next command's bytes; with NOTIFY on, send its events while waiting."""
        nplan = self._nplan
        if nplan is None or self.parser.in_command or self.user is None:
            return await self._read_command_bytes()
        self.clock.stop()
        unwatch: Callable[[], None] | None = None
        sel = self.core.sel
        if sel is not None and nplan.selected is not None:
            name = sel.name
            unwatch = self.store.notifier.watch(self.user.address, name, self._mbox().watch_path(name),
                                                lambda: self._on_change(name))
        read_task: asyncio.Task[bytes] | None = asyncio.ensure_future(self.reader.read(READ_SIZE))
        deadline = time.monotonic() + self._timeout()
        try:
            while True:
                if self._nchanged:
                    if self._nplan is None:  # NOTIFICATIONOVERFLOW ended NOTIFY in this wait
                        self._nchanged.clear()
                        continue
                    if self._unread() > NOTIFY_MAX_PENDING:  # RFC 5465 §5.8: the client does not keep up
                        self._notify_overflow("the client is not reading its notifications")
                        self._write_out()
                        continue
                    self._notifying = True  # written without waiting for the client: bounded above
                    try:
                        await self._notify_updates(selected=True)
                    except StoreError as exc:  # e.g. a mailbox deleted meanwhile: the next event retries
                        log.info("imap: NOTIFY update for %s failed: %s", self.user.address, exc)
                    finally:
                        self._notifying = False
                    self._write_out()
                    continue
                if self.closing:
                    raise asyncio.CancelledError
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                assert read_task is not None
                read, _woken = await self._read_or_wake(read_task, remaining)
                if read:
                    data = read_task.result()
                    read_task = None
                    return data
                self._wake.clear()
        finally:
            if unwatch is not None:
                unwatch()
            if read_task is not None and not read_task.done():
                read_task.cancel()
                with contextlib.suppress(BaseException):
                    await read_task

    async def _read_or_wake(self, read_task: asyncio.Task[bytes], timeout: float) -> tuple[bool, bool]:
        """Wait up to `timeout` seconds for the client's input (`read_task`) or a wake-up from
        another session (`_wake`): (input arrived, woken). A stopping server interrupts the wait
        (`shutdown`, through `_waiting`)."""
        wake = asyncio.ensure_future(self._wake.wait())
        self._waiting = True
        try:
            done, _pending = await asyncio.wait({read_task, wake}, timeout=timeout,
                                                return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiting = False
            if not wake.done():
                wake.cancel()
        return read_task in done, wake in done

    async def _notify_updates(self, selected: bool) -> None:
        """Send what changed since the client was last told (RFC 5465 §5): the selected mailbox's
        updates (when `selected` and asked for), STATUS of other mailboxes, LIST for names."""
        nplan = self._nplan
        if nplan is None:
            return
        changed, self._nchanged = self._nchanged, set()
        sel = self.core.sel
        if selected and sel is not None and nplan.selected is not None and nplan.selected & notify_message_events:
            top = sel.uids[-1] if sel.uids else 0
            await self._updates(allow_expunge=not nplan.delayed, sync=True,  # RFC 5465 §6 SELECTED-DELAYED
                                flags="FLAGCHANGE" in nplan.selected)
            sel = self.core.sel
            if nplan.fetch and sel is not None:  # RFC 5465 §5.2: MessageNew's FETCH
                targets = [(i + 1, u) for i, u in enumerate(sel.uids) if u > top]
                if targets:
                    opts = FetchOptions(utf8=self.core.utf8, add_uid=True, set_seen=False,
                                        recent_from=self.core.recent_from())
                    pace = FetchPace()
                    with contextlib.suppress(FetchError, StoreError):
                        while targets:
                            batch = await self.call(render_fetch, self._mbox(), sel.name, targets, nplan.fetch, opts,
                                                    pace)
                            for line in batch.data:
                                assert isinstance(line, bytes)  # no StreamedAnswer without opts.stream
                                self.send(line)
                            targets = targets[max(batch.done, 1):]
                            await self.maybe_flush()
        if NOTIFY_NAMES in changed:
            await self._notify_names()
            if self._nplan is None:  # NOTIFICATIONOVERFLOW
                return
        mb = self._mbox()
        for name in sorted(changed - {NOTIFY_NAMES}):
            if sel is not None and sel.name == name:
                continue
            events = nplan.events_for(name, self._nsubs, SEPARATOR)
            if not events & notify_message_events:
                continue
            try:
                info = await self.call(mb.status, name)
            except StoreError:
                continue
            now = (info.messages, info.uidnext, info.uidvalidity, info.highestmodseq)
            last = self._nstatus.get(name)
            self._nstatus[name] = now
            if last is not None and now[:3] == last[:3] and ("FLAGCHANGE" not in events or now[3] == last[3]):
                continue
            self.send(R.status(name, self._status_items(info), utf8=self.core.utf8))
            await self.maybe_flush()

    async def _notify_names(self) -> None:
        """RFC 5465 §5.4/§5.5: LIST for mailboxes created, deleted or renamed (with OLDNAME) and
        for subscriptions changed, by other sessions."""
        nplan, user = self._nplan, self.user
        assert nplan is not None and user is not None
        before, subs_before = self._nfolders, self._nsubs
        if not await self._notify_rewatch_or_overflow():
            return
        after, subs_after = self._nfolders, self._nsubs
        # The store read the names and the renames since the last read in one step (`names_since`):
        # every rename that changed the names is there, so none is told as a deletion and a creation.
        # Without them (a log pruned past this session's position), only the difference is known.
        gone, moved, new = _name_changes(self._nrenames or [], before, after)
        utf8 = self.core.utf8
        for name in sorted(gone):  # first: a name deleted may be taken again by a rename or creation
            if "MAILBOXNAME" in nplan.events_for(name, subs_before, SEPARATOR):
                self.send(R.list_response(["\\NonExistent"], SEPARATOR, name, utf8=utf8))
        for name, oldname in sorted(moved.items()):  # RFC 5465 §5.4, RFC 5258 §3.4: one LIST with OLDNAME
            if "MAILBOXNAME" in nplan.events_for(name, subs_after, SEPARATOR) \
                    or "MAILBOXNAME" in nplan.events_for(oldname, subs_before, SEPARATOR):
                self.send(R.list_response([], SEPARATOR, name, utf8=utf8, oldname=oldname))
        for name in sorted(new):
            if "MAILBOXNAME" in nplan.events_for(name, subs_after, SEPARATOR):
                self.send(R.list_response([], SEPARATOR, name, utf8=utf8))
        for name in sorted(subs_after ^ subs_before):
            if "SUBSCRIPTIONCHANGE" in nplan.events_for(name, subs_after | subs_before, SEPARATOR):
                attrs = ["\\Subscribed"] if name in subs_after else []
                if name not in after:
                    attrs.append("\\NonExistent")
                self.send(R.list_response(attrs, SEPARATOR, name, utf8=utf8))

    # -- IDLE -----------------------------------------------------------------------------------

    async def cmd_idle(self, cmd: C.Idle) -> tuple[str, ResponseCode | None] | None:
        """RFC 2177: report changes as they happen until DONE."""
        if self.core.sel is not None:
            await self._updates(allow_expunge=True, sync=True)
        self.send(R.continuation("idling"))
        if self._nplan is not None and self._nchanged:  # events that came during the last command
            await self._notify_updates(selected=False)
        await self.flush()
        self._wake.clear()
        unwatch: Callable[[], None] | None = None
        if self.core.sel is not None and self.user is not None:
            mb = self._mbox()
            unwatch = self.store.notifier.watch(self.user.address, self.core.sel.name, mb.watch_path(self.core.sel.name),
                                                self._wake.set)
        self.parser.expect_line()
        deadline = time.monotonic() + IDLE_TIMEOUT_AUTH
        read_task: asyncio.Task[bytes] | None = None
        try:
            while True:
                ev = self.parser.next_event()
                if isinstance(ev, RawLine):
                    if ev.data.upper() == b"DONE":
                        return "IDLE terminated", None
                    raise _bad("Expected DONE")
                if ev is not None:
                    raise _bad("Expected DONE")
                if self.closing:
                    raise asyncio.CancelledError
                if read_task is None:
                    read_task = asyncio.ensure_future(self.reader.read(65536))
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                read, woken = await self._read_or_wake(read_task, min(remaining, IDLE_KEEPALIVE))
                if read:
                    data = read_task.result()
                    read_task = None
                    if not data:
                        raise ConnectionError("client went away")
                    self.parser.feed(data)
                    continue
                if woken:
                    self._wake.clear()
                    if self.core.sel is not None:
                        await self._updates(allow_expunge=True, sync=True)
                    if self._nplan is not None:  # RFC 5465: NOTIFY's events are sent in IDLE too
                        await self._notify_updates(selected=False)
                else:
                    self.send(R.untagged_status("OK", "Still here"))
                await self.flush()
        finally:
            if unwatch is not None:
                unwatch()
            if read_task is not None and not read_task.done():
                read_task.cancel()
                with contextlib.suppress(BaseException):
                    await read_task

    def _notify(self, name: str) -> None:
        if self.user is not None:
            self.store.notifier.notify(self.user.address, name)

    # -- selected: updates ----------------------------------------------------------------------

    async def _updates(self, allow_expunge: bool, sync: bool, flags: bool = True) -> None:
        """A notification point: the store's facts in, the core's announcements out (`flags`
        False: flag changes wait for the next notification point, for NOTIFY without FlagChange)."""
        core = self.core
        sel = core.sel
        if sel is None:
            return
        mb = self._mbox()
        old_max = sel.uids[-1] if sel.uids else 0
        claim = not core.rev2 and not sel.readonly
        try:  # what the notification point may need from the store, in one step (`_store_updates`)
            snap, claimed, rows = await self.call(mb.at_once, _store_updates, mb, sel.name, sync, claim, old_max,
                                                  sel.modseq_seen if flags else None)
        except StoreError:
            self.send(R.bye("Selected mailbox no longer exists"))
            raise _Disconnect() from None
        try:
            res = core.sync(FolderView(snap.uidvalidity, snap.uids, snap.version, snap.highestmodseq, snap.keywords),
                            allow_expunge)
        except MailboxGone as exc:
            self.send(R.bye(str(exc)))
            raise _Disconnect() from None
        for line in res.out:
            self.send(line)
        if res.grew and not core.rev2:
            if claimed is None and not sel.readonly:
                claimed = await self.call(mb.claim_recent, sel.name)
            recent = core.recent(claimed, res.old_max)
            if recent is not None:
                self.send(recent)
        if res.flags_since is not None and flags:
            if rows is None or res.flags_since != sel.modseq_seen or res.old_max != old_max:
                rows = await self.call(mb.changed_since, sel.name, res.flags_since, res.old_max)
            changes = [FlagChange(uid, tuple(flags_to_names(flags, kws)), modseq) for uid, flags, kws, modseq in rows]
            for line in core.flag_updates(changes, snap.highestmodseq):
                self.send(line)
                await self.maybe_flush()

    # -- selected: commands ---------------------------------------------------------------------

    async def cmd_close(self, cmd: C.Close) -> None:
        sel = self.core.sel
        assert sel is not None
        if not sel.readonly:  # RFC 9051 §6.4.1: expunge silently
            gone = await self.call(self._mbox().expunge, sel.name, None)
            if gone:
                self._notify(sel.name)
        self.core.deselect()

    async def cmd_unselect(self, cmd: C.Unselect) -> None:
        self.core.deselect()

    async def cmd_expunge(self, cmd: C.Expunge) -> None:
        sel = self.core.sel
        assert sel is not None
        if sel.readonly:
            raise _no("Mailbox is read-only", Code.READ_ONLY)
        uids = None
        if cmd.uid and cmd.sequence_set is not None:
            uids = [u for _s, u in self.core.targets(cmd.sequence_set, True)]
        gone = await self.call(self._mbox().expunge, sel.name, uids)
        if gone:
            self._notify(sel.name)
        await self._updates(allow_expunge=True, sync=False)

    async def cmd_fetch(self, cmd: C.Fetch) -> tuple[str, ResponseCode | None] | None:
        sel = self.core.sel
        assert sel is not None
        if cmd.vanished and not (cmd.uid and self.core.qresync and cmd.changedsince is not None):
            raise _bad("VANISHED needs QRESYNC, UID FETCH and CHANGEDSINCE", Code.CLIENTBUG)  # RFC 7162 §3.2.6
        wants_modseq = any(a.name == "MODSEQ" for a in cmd.attributes)
        if cmd.changedsince is not None or wants_modseq:
            for line in self.core.use_condstore():
                self.send(line)
        await self._updates(allow_expunge=cmd.uid, sync=False)
        mb = self._mbox()
        want_uid = cmd.uid or any(a.name == "UID" for a in cmd.attributes)
        if is_flags_only(cmd.attributes) and cmd.changedsince is None and self.core.covers_all(cmd.sequence_set, cmd.uid):
            # The whole mailbox's flags (clients' resync): from the folder's flag table, one piece.
            data = await self.call(render_all_flags, mb, sel.name, sel.uids, want_uid, wants_modseq,
                                   self.core.recent_from())
            if data is not None:
                self.send(data)
                return None
        targets = self.core.targets(cmd.sequence_set, cmd.uid)
        if cmd.vanished and cmd.changedsince is not None:
            van = await self.call(mb.vanished_since, sel.name, cmd.changedsince)
            top = sel.uids[-1] if sel.uids else 1
            if van is None:
                present = set(sel.uids)
                van = [u for u in cmd.sequence_set.iter(max(top, cmd.sequence_set.max_number()))
                       if u not in present][:1_000_000]
            else:
                van = [u for u in van if cmd.sequence_set.contains(u, top)]
            if van:
                self.send(R.vanished(SequenceSet.from_ids(van), earlier=True))
        add_modseq = cmd.changedsince is not None
        missing = 0
        if is_flags_only(cmd.attributes):
            for i in range(0, len(targets), FLAGS_BATCH):
                chunk = targets[i:i + FLAGS_BATCH]
                lines = await self.call(render_flags, mb, sel.name, chunk, want_uid,
                                        wants_modseq or add_modseq, self.core.recent_from(), cmd.changedsince)
                for line in lines:
                    self.send(line)
                await self.maybe_flush()
        else:
            if cmd.changedsince is not None:  # RFC 7162 §3.1.4.1: only the messages changed since are read
                targets = await self.call(changed_targets, mb, sel.name, targets, cmd.changedsince)
            opts = FetchOptions(utf8=self.core.utf8, add_uid=cmd.uid, add_modseq=add_modseq,
                                changedsince=cmd.changedsince, set_seen=not sel.readonly,
                                recent_from=self.core.recent_from(), stream=True)
            i = 0
            pace = FetchPace()
            while i < len(targets):
                try:
                    batch = await self.call(render_fetch, mb, sel.name, targets[i:], cmd.attributes, opts, pace)
                except FetchError as exc:
                    raise _no(str(exc), Code.named(exc.code)) from None
                try:
                    for answer in batch.data:
                        if isinstance(answer, StreamedAnswer):
                            if not await self._send_streamed(mb, sel.name, answer):
                                missing += 1
                            continue
                        self.send(answer)
                finally:  # the files of answers not sent (the session ended meanwhile)
                    for answer in batch.data:
                        if isinstance(answer, StreamedAnswer):
                            answer.close()
                if batch.seen_modseq:
                    self.core.own_changes(batch.seen_modseq)
                    self._notify(sel.name)
                missing += batch.missing
                i += max(batch.done, 1)
                await self.maybe_flush()
        if missing:
            return f"{cmd.command_name} completed; some messages were expunged meanwhile", Code.EXPUNGEISSUED
        return None

    async def _send_streamed(self, mb: Mailboxes, name: str, answer: StreamedAnswer) -> bool:
        """Send a FETCH answer whose literals are octets of a message's file (the whole message, or
        a part of it, decoded for BINARY), a piece at a time (`Spliced.pieces`: 256 KiB), each
        handed to the client before the next is read (memory: one piece). False when the message
        is gone (expunged meanwhile: nothing of the answer was sent). A file that ends early once its size was announced cannot be
        answered any more: the session ends. The file may be read as it is sent (cluster mode:
        ranged GETs, `answer.partial`): the first piece is read before anything is sent, so the
        storage out of reach then is NO [UNAVAILABLE] as before; once the answer has begun, the
        session ends instead (a literal cannot be taken back)."""
        f = answer.file if answer.file is not None else \
            await self.call(mb.open_message, name, answer.uid, answer.partial)
        if f is None:
            return False
        try:
            size = await asyncio.to_thread(_file_size, f)
            spans = [(part, part.pieces(f, size)) for part in answer.parts if not isinstance(part, bytes)]
            # the first octets read (of the first literal that has any; those before it read nothing)
            primed = next((k for k, (part, _p) in enumerate(spans) if part.length(size)), -1)
            first = b""
            if primed >= 0:
                try:
                    first = await asyncio.to_thread(next, spans[primed][1], b"")
                except E.MessageGone:
                    return False
            for part in answer.parts:
                if isinstance(part, bytes):
                    self.send(part)
                    continue
                left = part.length(size)
                self.send(part.prefix(size))
                pieces = spans.pop(0)[1]
                while left:
                    if first:
                        piece, first = first, b""
                    else:
                        try:
                            piece = await asyncio.to_thread(next, pieces, b"")
                        except StoreError as exc:  # the answer has begun
                            log.error("%s: message %d of %s not read while sent: %s", self.role, answer.uid,
                                      name, exc)
                            raise _Disconnect() from None
                    if not piece:
                        log.error("%s: message %d of %s ended %d octets early while sent", self.role, answer.uid,
                                  name, left)
                        raise _Disconnect()
                    self.send(piece)
                    left -= len(piece)
                    await self.maybe_flush()
        finally:
            f.close()
        return True

    async def cmd_store(self, cmd: C.Store) -> tuple[str, ResponseCode | None] | None:
        sel = self.core.sel
        assert sel is not None
        if sel.readonly:
            raise _no("Mailbox is read-only", Code.READ_ONLY)
        if cmd.unchangedsince is not None:
            for line in self.core.use_condstore():
                self.send(line)
        await self._updates(allow_expunge=cmd.uid, sync=False)
        targets = self.core.targets(cmd.sequence_set, cmd.uid)
        flags = self.core.store_flags(cmd.flags)
        mb = self._mbox()
        res = await self.call(mb.store, sel.name, [u for _s, u in targets], cmd.mode.value, flags,
                              cmd.unchangedsince)
        for line in self.core.keywords_known(res.keywords):  # RFC 9051 §7.3.5: before the FETCH
            self.send(line)
        if cmd.mode is not C.StoreMode.REMOVE and self._junk_folder() is not None and res.changed:
            marks = {f.lower() for f in flags}
            if "$junk" in marks or "$notjunk" in marks:  # the keywords mail clients set for a verdict
                self._learn(sel.name, list(res.changed), spam="$junk" in marks)
        if res.changed:
            self._notify(sel.name)
        lines, code = self.core.store_answer(
            targets, _flag_report(res.changed), _flag_report(res.unchanged), res.conflicts, res.modseq,
            silent=cmd.silent, uid=cmd.uid)
        for line in lines:
            self.send(line)
        await self.maybe_flush()
        if code is not None:
            return "Conditional STORE failed for some messages", code
        return None

    async def cmd_copy(self, cmd: C.Copy | C.Move) -> tuple[str, ResponseCode | None] | None:
        sel = self.core.sel
        assert sel is not None
        move = isinstance(cmd, C.Move)
        if move and sel.readonly:
            raise _no("Mailbox is read-only", Code.READ_ONLY)
        await self._updates(allow_expunge=cmd.uid or move, sync=False)
        targets = self.core.targets(cmd.sequence_set, cmd.uid)
        dest = self._name(cmd.mailbox)
        mb = self._mbox()
        uids = [u for _s, u in targets]
        if not uids:
            return None
        fn = mb.move if move else mb.copy
        try:
            res = await self.call(fn, sel.name, uids, dest)
        except StoreError as exc:
            raise _store_reply(exc, target=True) from None
        self._notify(dest)
        code = None
        if res.dest_uids:
            code = Code.copyuid(res.uidvalidity, SequenceSet.from_ids(res.source_uids),
                                SequenceSet.from_ids(res.dest_uids))
        spam = verdict(sel.name, dest, self._junk_folder())
        if spam is not None:
            self._learn(dest, res.dest_uids, spam=spam)  # the user's verdict trains the filter
        if move:
            self._notify(sel.name)
            if code is not None:
                self.send(R.untagged_status("OK", "Moved UIDs", code))  # RFC 6851 §4.3
            await self._updates(allow_expunge=True, sync=False)
            return "MOVE completed", None
        return "COPY completed", code

    def _junk_folder(self) -> str | None:
        """The folder whose moves in and out train the spam filter (None: no learning configured)."""
        if self.services.learning is None or JUNK not in self.services.config.mailbox.special_use_folders:
            return None
        return JUNK

    def _learn(self, folder: str, uids: list[int], spam: bool) -> None:
        """Queue training requests for these messages, off the reply's path (antispam/learning.py)."""
        learning, user, mb = self.services.learning, self.user, self.mb
        if learning is None or user is None or mb is None or not uids:
            return

        async def run() -> None:
            try:
                await enqueue(learning, self.call, mb, user.address, folder, uids, spam)
            except Exception:  # training is best effort: never an error for the user
                log.exception("imap: queueing %s for learning failed", user.address)

        task = asyncio.ensure_future(run())
        _LEARNING.add(task)
        task.add_done_callback(_LEARNING.discard)

    def _check_charset(self, charset: str | None) -> None:
        """RFC 6855 §3 (errata 4029): once UTF8=ACCEPT is on, strings are UTF-8; a conflicting
        CHARSET is refused with BAD (UTF-8 and its subset US-ASCII are harmless and accepted)."""
        if self.core.utf8_accept and charset is not None and charset not in ("UTF-8", "US-ASCII"):
            raise _bad("CHARSET conflicts with UTF8=ACCEPT", Code.CLIENTBUG)

    async def cmd_search(self, cmd: C.Search) -> None:
        self._check_charset(cmd.charset)
        matches = await self._matches(cmd.criteria, cmd.uid)
        for line in self.core.search_responses(cmd.tag, cmd.uid, matches, cmd.returns, _uses_modseq(cmd.criteria)):
            self.send(line)

    async def _matches(self, criteria: SearchKey, uid: bool) -> list[tuple[int, int, int]]:
        """(seq, uid, modseq) of the selected messages matching ``criteria``, in mailbox order."""
        sel = self.core.sel
        assert sel is not None
        if _uses_modseq(criteria):
            for line in self.core.use_condstore():
                self.send(line)
        await self._updates(allow_expunge=uid, sync=False)
        view = sel.uids
        ctx_saved = frozenset(sel.saved) if sel.saved is not None else None
        ctx = SearchContext(max_seq=len(view), max_uid=view[-1] if view else 0, saved_uids=ctx_saved,
                            now=time.time())  # one clock reading for RFC 5032 OLDER/YOUNGER
        mb = self._mbox()
        # the full-text index answers the text keys it can and names the candidates (store.fts)
        criteria, cands = await self.call(narrow, mb, sel.name, criteria)
        targets = list(enumerate(view, 1)) if cands is None else _in_view(view, cands)
        if cands is not None and isinstance(criteria, AllKey) and not _uses_modseq(criteria):
            return [(s, u, 0) for s, u in targets]  # the index answered: no message to look at
        recent = self.core.recent_from()
        # Batches run two at a time: their file reads overlap (see run_search).
        gate = asyncio.Semaphore(2)

        async def batch(part: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
            async with gate:
                found, _n = await self.call(run_search, mb, sel.name, part, criteria, ctx, recent)
                return found

        parts = [targets[i:i + SEARCH_BATCH] for i in range(0, len(targets), SEARCH_BATCH)]
        return [m for found in await asyncio.gather(*(batch(p) for p in parts)) for m in found]

    async def _sort_items(self, criteria: SearchKey, uid: bool) -> list[SortItem]:
        matches = await self._matches(criteria, uid)
        sel = self.core.sel
        assert sel is not None
        mb = self._mbox()
        items: list[SortItem] = []
        for i in range(0, len(matches), SEARCH_BATCH):
            part = [(s, u) for s, u, _m in matches[i:i + SEARCH_BATCH]]
            items += await self.call(sort_items, mb, sel.name, part, uid)
        return items

    async def cmd_sort(self, cmd: C.Sort) -> None:
        """RFC 5256 SORT (RFC 5957 DISPLAYFROM/DISPLAYTO); with RETURN, RFC 5267 ESORT."""
        self._check_charset(cmd.charset)
        ordered = [i.id for i in sort_messages(await self._sort_items(cmd.criteria, cmd.uid), cmd.sort)]
        if cmd.returns is None:
            self.send(R.sort(ordered))
            return
        if "SAVE" in cmd.returns:  # RFC 5182 §2.4: the saved result, in sort order
            sel = self.core.sel
            assert sel is not None
            self.core.save(ordered if cmd.uid else [sel.uids[n - 1] for n in ordered])
            if set(cmd.returns) == {"SAVE"}:
                return
        self.send(R.esort(cmd.tag, ordered, cmd.returns, uid=cmd.uid, partial=cmd.partial))

    async def cmd_thread(self, cmd: C.Thread) -> None:
        """RFC 5256 THREAD=ORDEREDSUBJECT and THREAD=REFERENCES."""
        self._check_charset(cmd.charset)
        items = await self._sort_items(cmd.criteria, cmd.uid)
        threads = thread_references(items) if cmd.algorithm == "REFERENCES" else thread_orderedsubject(items)
        self.send(R.thread(threads))

    # -- QUOTA (RFC 9208): one quota root, "", over all of the user's folders (store/quota.py) ----

    async def cmd_getquotaroot(self, cmd: C.GetQuotaRoot) -> None:
        name = self._name(cmd.mailbox)
        mb = self._mbox()
        if not await self.call(mb.exists, name):
            raise _no("No such mailbox", Code.NONEXISTENT)
        usage = await self.call(mb.quota_usage)
        roots = [QUOTA_ROOT] if usage.limit is not None else []  # RFC 9208 §4.1.2: maybe none
        self.send(R.quotaroot(name, roots, utf8=self.core.rev2))
        if usage.limit is not None:
            self.send(R.quota(QUOTA_ROOT, [("STORAGE", usage.kib, usage.limit // 1024)]))

    async def cmd_getquota(self, cmd: C.GetQuota) -> None:
        usage = await self.call(self._mbox().quota_usage)
        if cmd.root != QUOTA_ROOT or usage.limit is None:
            raise _no("No such quota root", Code.NONEXISTENT)  # RFC 9208 §4.1.1
        self.send(R.quota(QUOTA_ROOT, [("STORAGE", usage.kib, usage.limit // 1024)]))  # §5.1: KiB

    async def cmd_setquota(self, cmd: C.SetQuota) -> None:
        raise _no("Quotas are set by the administrator (postier user quota)", Code.NOPERM)  # RFC 9208 §4.1.3

    _handlers: dict[type, Callable[..., Awaitable[Any]]] = {}


def _name_changes(renames: Sequence[tuple[str, str]], before: set[str], after: set[str]
                  ) -> tuple[set[str], dict[str, str], set[str]]:
    """How the mailbox names went from `before` to `after` given every rename made in between
    (oldest first; a mailbox's children move with it): the names deleted, the mailboxes renamed
    (new name -> old name, several renames in a row told as one) and the names created. Each
    mailbox of `before` is followed through the renames; a name taken by a rename while the log
    says nothing of its mailbox's deletion is one deleted. A rename of INBOX moves its messages, not
    the mailbox (RFC 9051 §6.3.6): its new name is a creation."""
    where = {name: name for name in before}  # current name -> the name the client knows
    for old, new in renames:
        if old == INBOX:
            continue
        moving = {name: known for name, known in where.items() if name == old or name.startswith(old + SEPARATOR)}
        for name in moving:
            del where[name]
        where.update((new + name[len(old):], known) for name, known in moving.items())
    kept = {name: known for name, known in where.items() if name in after}
    moved = {name: known for name, known in kept.items() if name != known}
    return before - set(kept.values()), moved, after - kept.keys()


def _file_size(f: IO[bytes]) -> int:
    """The size of an open message (the octets its literal announces), read from its start after."""
    end = f.seek(0, os.SEEK_END)
    f.seek(0)
    return end


def _store_updates(mb: Mailboxes, name: str, sync: bool, claim: bool, old_max: int, modseq_seen: int | None
                   ) -> tuple[FolderSnapshot, int | None, list[tuple[int, int, str, int]] | None]:
    """A notification point's reads, in one store step (`Mailboxes.at_once`): the folder's snapshot;
    when it holds messages beyond `old_max` and `claim`, the \\Recent claim (RFC 3501 §2.3.2); when
    its HIGHESTMODSEQ passed `modseq_seen`, the flag changes since then among the known messages."""
    snap = mb.snapshot(name, sync)
    claimed = mb.claim_recent(name) if claim and snap.uids and snap.uids[-1] > old_max else None
    rows = mb.changed_since(name, modseq_seen, old_max) \
        if modseq_seen is not None and snap.highestmodseq > modseq_seen else None
    return snap, claimed, rows


NOTIFY_MAX_MAILBOXES = 1000  # mailboxes one NOTIFY may watch (each is polled while watched)
#: Bytes of events a client may leave unread (beyond the kernel's socket buffers) between commands
#: before NOTIFY ends with NOTIFICATIONOVERFLOW (RFC 5465 §5.8).
NOTIFY_MAX_PENDING = 256 * 1024
_LEARNING: set[asyncio.Future[None]] = set()  # training requests being queued (kept from the GC)


#: RFC 9208 §3.2: the quota root of every folder of a user (their whole storage).
QUOTA_ROOT = ""


class _Silent(Exception):
    """The handler already sent its tagged response (STARTTLS)."""


def _in_view(view: Sequence[int], uids: set[int]) -> list[tuple[int, int]]:
    """(sequence number, UID) of the members of `uids` in `view` (the session's ascending UIDs), in
    order. When they are a few (an index answer of 10,000 UIDs among 100,000) each is looked for
    after the previous one: as UIDs strictly ascend, u can be no further than (u - view[i]) places
    beyond position i, where it stands when no UID in between was expunged (one comparison);
    else a bisection of that stretch. Many: one pass over the view. A view without gaps: arithmetic."""
    n = len(view)
    if not n:
        return []
    first, top = view[0], view[-1]
    if top - first == n - 1:  # no UID missing in between (nothing expunged): seq follows from UID
        return [(u - first + 1, u) for u in sorted(uids) if first <= u <= top]
    if len(uids) > n // 4:
        return [(s, u) for s, u in enumerate(view, 1) if u in uids]
    out: list[tuple[int, int]] = []
    i = 0
    for u in sorted(uids):
        if i >= n:
            break
        hi = min(n, i + u - view[i] + 1)
        if hi <= i:
            continue  # below view[i]: not in the view
        j = hi - 1 if view[hi - 1] == u else bisect_left(view, u, i, hi)
        if j < hi and view[j] == u:
            out.append((j + 1, u))
            j += 1
        i = j
    return out


class _Catenation:
    """The message a CATENATE builds (RFC 4469 §3), written a piece at a time: held in memory up to
    MEMORY_DATA_LIMIT octets, beyond that in a spool file (`Mailboxes.spool`) as a large APPEND
    literal is (CRLF made on the way, as `append_many` makes it for bytes), so that memory stays
    bounded whatever the size of the parts. `write` runs in a worker thread (it may write to disk)."""

    __slots__ = ("_held", "_make", "_spool", "received")

    def __init__(self, make: Callable[[], SpoolFile]) -> None:
        self._make = make
        self._held: list[bytes] = []
        self._spool: SpoolFile | None = None
        self.received = 0

    def write(self, data: bytes) -> None:
        self.received += len(data)
        if self._spool is None and self.received <= MEMORY_DATA_LIMIT:
            self._held.append(data)
            return
        if self._spool is None:
            self._spool = self._make()
            for held in self._held:
                self._spool.write(held)
            self._held = []
        self._spool.write(data)

    def result(self) -> bytes | SpoolFile:
        return self._spool if self._spool is not None else b"".join(self._held)

    def discard(self) -> None:
        if self._spool is not None:
            self._spool.discard()


def _copy_pieces(pieces: Iterator[bytes], write: Callable[[bytes], None]) -> None:
    for piece in pieces:
        write(piece)


def _spooled(data: bytes | C.SpooledLiteral) -> bytes | SpoolFile:
    """A message literal as the store takes it (the reader's spool is always `_spool`'s SpoolFile)."""
    if isinstance(data, bytes):
        return data
    assert isinstance(data, SpoolFile)
    return data


def _flag_report(rows: dict[int, MessageRow]) -> dict[int, tuple[list[str], int]]:
    return {u: (flags_to_names(r.flags, r.keywords), r.modseq) for u, r in rows.items()}


def _uses_modseq(key: SearchKey) -> bool:
    if isinstance(key, ModSeqKey):
        return True
    for attr in ("key", "left", "right"):
        sub = getattr(key, attr, None)
        if sub is not None and _uses_modseq(sub):
            return True
    return any(_uses_modseq(k) for k in getattr(key, "keys", ()))


IMAPSession._handlers = {
    C.Capability: IMAPSession.cmd_capability,
    C.Noop: IMAPSession.cmd_noop,
    C.Check: IMAPSession.cmd_noop,  # RFC 9051 §6.4.1 (CHECK is NOOP in IMAP4rev2)
    C.Logout: IMAPSession.cmd_logout,
    C.Id: IMAPSession.cmd_id,
    C.StartTLS: IMAPSession.cmd_starttls,
    C.Login: IMAPSession.cmd_login,
    C.Authenticate: IMAPSession.cmd_authenticate,
    C.Enable: IMAPSession.cmd_enable,
    C.Select: IMAPSession.cmd_select,
    C.Examine: IMAPSession.cmd_select,
    C.Create: IMAPSession.cmd_create,
    C.Delete: IMAPSession.cmd_delete,
    C.Rename: IMAPSession.cmd_rename,
    C.Subscribe: IMAPSession.cmd_subscribe,
    C.Unsubscribe: IMAPSession.cmd_unsubscribe,
    C.List: IMAPSession.cmd_list,
    C.Sort: IMAPSession.cmd_sort,  # RFC 5256
    C.Thread: IMAPSession.cmd_thread,
    C.Lsub: IMAPSession.cmd_lsub,
    C.Namespace: IMAPSession.cmd_namespace,
    C.Status: IMAPSession.cmd_status,
    C.Append: IMAPSession.cmd_append,
    C.Idle: IMAPSession.cmd_idle,
    C.Close: IMAPSession.cmd_close,
    C.Unselect: IMAPSession.cmd_unselect,
    C.Expunge: IMAPSession.cmd_expunge,
    C.Fetch: IMAPSession.cmd_fetch,
    C.Store: IMAPSession.cmd_store,
    C.Copy: IMAPSession.cmd_copy,
    C.Move: IMAPSession.cmd_copy,
    C.Search: IMAPSession.cmd_search,
    C.GetQuota: IMAPSession.cmd_getquota,  # RFC 9208
    C.GetQuotaRoot: IMAPSession.cmd_getquotaroot,
    C.SetQuota: IMAPSession.cmd_setquota,
    C.Notify: IMAPSession.cmd_notify,  # RFC 5465
}
