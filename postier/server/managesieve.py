"""The asyncio driver of ManageSieve (RFC 5804, port 4190): a short loop between a connection and the
sans-IO core (``proto.managesieve``), answering its events from the script store (``store.sieve``).

Kept free of the listener plumbing on purpose: ``serve()`` takes a reader/writer pair and a
``ManageSieveBackend`` (password and SCRAM look-ups, the user's store, the TLS context), so the
composition root can mount it on a listener role with a two-line ``Session`` subclass. PUTSCRIPT and
CHECKSCRIPT compile the script (``postier.sieve``) and answer every error with its line number;
literals are accepted only up to the store's script size limit. Plaintext pipelined after STARTTLS is
discarded (the CVE-2011-0411 class of bug). Disk and password work run in threads. The bounds of the
other protocols hold (docs/security.md): a command once started must be complete within
`limits.command_timeout` plus its size at `limits.min_data_rate` (`base.CommandClock`), and before
login the whole session lasts at most `limits.session_timeout`.

AUTHENTICATE runs as in SMTP, IMAP and POP3: ``proto.sasl.ServerExchange`` answered by
``server/auth.settle`` from the accounts, every failure (PLAIN or SCRAM) counted in the login throttle
shared with the other protocols, and a client over its limit gets BYE. With the account database out
of reach (cluster mode's PostgreSQL) the answer is ``NO (TRYLATER)``, as SMTP answers 454 and IMAP
``NO [UNAVAILABLE]``, and nothing is counted against the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field

from ..proto import managesieve as core
from ..proto import sasl
from ..sieve import CAPABILITIES, CompileError, compile_script
from ..store.errors import StoreError, StoreUnavailable
from ..store.sieve import ScriptError, Scripts
from ..metrics import Metrics
from .auth import AccountLookup, settle
from .base import CommandClock, CommandTimeout, Session
from .throttle import AuthThrottle

log = logging.getLogger("postier.managesieve")

__all__ = ["ManageSieveBackend", "ManageSieveSession", "serve"]

READ_SIZE = 65536
FLUSH_TIMEOUT = 5.0  # for the last words to a client that is dropped


@dataclass(frozen=True)
class ManageSieveBackend:
    accounts: AccountLookup  # what `settle` answers SASL exchanges from
    store_for: Callable[[str], Scripts]
    tls_context: ssl.SSLContext | None
    settings: core.ManageSieveSettings
    idle_timeout: float = 600.0
    #: A command once started must be complete within command_timeout + its bytes / min_data_rate
    #: (`base.CommandClock`, as in SMTP, IMAP and POP3); before login the whole session lasts at
    #: most session_timeout (docs/security.md).
    command_timeout: float = 60.0
    min_data_rate: float = 500.0
    session_timeout: float = 1800.0
    throttle: AuthThrottle = field(default_factory=AuthThrottle)  # the server's: shared with IMAP & co.
    metrics: Metrics | None = None  # failed logins counted (postier/metrics.py)


class _Auth:
    """One AUTHENTICATE at a time: the exchange between the core's AuthStart/AuthResponse events."""

    def __init__(self, conn: core.ManageSieveConnection, backend: ManageSieveBackend, peer_ip: str) -> None:
        self.conn = conn
        self.backend = backend
        self.ip = peer_ip
        self.exchange: sasl.ServerExchange | None = None

    async def start(self, mechanism: str, initial: bytes | None) -> None:
        throttle = self.backend.throttle
        if throttle.blocked(self.ip):
            self.conn.bye("Too many failed logins; try again later")
            return
        # RFC 5804 §2.1: SCRAM's server signature rides in the OK (SASL "...")
        self.exchange = sasl.ServerExchange.for_name(mechanism, self.backend.settings.mechanisms,
                                                     success_data=True)
        if self.exchange is None:  # offered but not implemented: a configuration mistake
            self.conn.auth_failure()
            return
        await self._step(self.exchange.start(initial))

    async def respond(self, data: bytes) -> None:
        if self.exchange is None:  # pragma: no cover - the core sends responses only mid-exchange
            self.conn.auth_failure()
            return
        await self._step(self.exchange.respond(data))

    async def _step(self, outcome: sasl.Outcome) -> None:
        assert self.exchange is not None
        try:
            res = await settle(self.exchange, outcome, self.backend.accounts)
        except StoreUnavailable as exc:  # cluster mode: the account database is out of reach
            log.error("managesieve: authentication from %s impossible: %s", self.ip, exc)
            self.exchange = None
            self.conn.auth_unavailable()  # RFC 5804 §1.3 TRYLATER; not counted as a failed login
            return
        if isinstance(res.outcome, sasl.Challenge):
            self.conn.auth_challenge(res.outcome.data)
            return
        name, self.exchange = self.exchange.name, None
        throttle = self.backend.throttle
        if isinstance(res.outcome, sasl.Success) and res.user is not None:
            throttle.success(self.ip)
            self.conn.auth_success(res.user.address, res.outcome.additional)
            log.info("managesieve login %s from %s (%s)", res.user.address, self.ip, name)
            return
        log.info("managesieve: %s authentication failed from %s", name, self.ip)
        if self.backend.metrics is not None:
            self.backend.metrics.auth_failed("managesieve", name)
        await throttle.penalize(self.ip)
        if throttle.blocked(self.ip):
            self.conn.bye("Too many failed logins")
        else:
            self.conn.auth_failure()


def _check(data: bytes) -> None:
    try:
        compile_script(data)
    except CompileError as e:
        raise ScriptError("\r\n".join(str(err) for err in e.errors)) from None


def _answer(conn: core.ManageSieveConnection, store: Scripts, ev: core.ScriptCommand) -> None:
    """One script command against the store (blocking: run in a thread)."""
    args = [a.decode("utf-8", "replace") if isinstance(a, bytes) else a for a in ev.args]
    try:
        match ev.name:
            case "PUTSCRIPT":
                data = ev.args[1]
                assert isinstance(data, bytes)
                store.put(str(args[0]), data, _check)
                conn.ok()
            case "CHECKSCRIPT":
                data = ev.args[0]
                assert isinstance(data, bytes)
                _check(data)
                conn.ok()
            case "HAVESPACE":
                store.have_space(str(args[0]), int(args[1]))
                conn.ok()
            case "SETACTIVE":
                store.set_active(str(args[0]))
                conn.ok()
            case "GETSCRIPT":
                conn.script(store.get(str(args[0])))
            case "LISTSCRIPTS":
                conn.listing(store.list())
            case "DELETESCRIPT":
                store.delete(str(args[0]))
                conn.ok()
            case "RENAMESCRIPT":
                store.rename(str(args[0]), str(args[1]))
                conn.ok()
            case _:  # pragma: no cover - the core only emits the commands above
                conn.no("unsupported command")
    except ScriptError as e:
        conn.no(str(e), e.code or None)
    except (OSError, StoreError):  # a disk error, or cluster mode's PostgreSQL unreachable
        conn.no("temporary storage failure", "TRYLATER")


async def _open(backend: ManageSieveBackend, user: str) -> Scripts | None:
    """The user's scripts; None while the account database is out of reach (asked again later)."""
    try:
        return await asyncio.to_thread(backend.store_for, user)
    except StoreError as exc:
        log.error("managesieve: scripts of %s unavailable: %s", user, exc)
        return None


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, backend: ManageSieveBackend,
                *, tls_active: bool = False, peer_ip: str | None = None) -> None:
    """Run one ManageSieve session until LOGOUT, EOF or the idle timeout."""
    settings = backend.settings
    conn = core.ManageSieveConnection(
        dataclasses.replace(settings, tls_available=backend.tls_context is not None), tls_active=tls_active)
    if peer_ip is None:
        peer = writer.get_extra_info("peername")
        peer_ip = str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
    auth = _Auth(conn, backend, peer_ip)
    store: Scripts | None = None
    owner: str | None = None
    clock = CommandClock(backend.command_timeout, backend.min_data_rate)

    async def read_within(timeout: float) -> bytes:
        async with asyncio.timeout(timeout):
            return await reader.read(READ_SIZE)

    async def read() -> bytes:
        """The client's next bytes within the idle timeout, or within what is left of the deadline
        of the command it has started (CommandTimeout)."""
        return await clock.read(read_within, backend.idle_timeout, conn.partial_input)

    try:
        writer.write(conn.data_to_send())
        await writer.drain()
        async with asyncio.timeout(backend.session_timeout) as preauth:  # reset at login
            while True:
                ev = conn.next_event()
                if ev is core.NEED_DATA:
                    out = conn.data_to_send()
                    if out:
                        writer.write(out)
                        await writer.drain()
                    data = await read()
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(ev, core.Authenticated):
                    preauth.reschedule(None)
                match ev:
                    case core.StartTLS():
                        assert backend.tls_context is not None
                        conn.drop_input()  # RFC 5804 §2.2: nothing sent before the handshake counts
                        writer.write(conn.data_to_send())
                        await writer.drain()
                        await writer.start_tls(backend.tls_context)
                        conn.tls_started()
                    case core.AuthStart(mechanism=mechanism, initial=initial):
                        await auth.start(mechanism, initial)
                    case core.AuthResponse(data=response):
                        await auth.respond(response)
                    case core.Authenticated(user=user):
                        owner = user
                        store = await _open(backend, owner)
                    case core.NeedLiteral(size=size):
                        if store is None and owner is not None:
                            store = await _open(backend, owner)
                        limit = store.max_script_size if store is not None else settings.max_line
                        conn.accept_literal() if size <= limit else conn.reject_literal()
                    case core.ScriptCommand():
                        if store is None and owner is not None:
                            store = await _open(backend, owner)
                        if store is not None:
                            await asyncio.to_thread(_answer, conn, store, ev)
                        elif owner is not None:  # the account database out of reach since the login
                            conn.no("temporary storage failure", "TRYLATER")
                        else:  # pragma: no cover - the core allows these only after login
                            conn.no("not authenticated")
                    case core.Logout():
                        writer.write(conn.data_to_send())
                        await writer.drain()
                        return
    except CommandTimeout:
        log.info("managesieve: %s did not finish a command in time", peer_ip)
        with contextlib.suppress(TimeoutError, ConnectionError, OSError, ssl.SSLError):
            async with asyncio.timeout(FLUSH_TIMEOUT):
                writer.write(b'BYE "Command not received in time"\r\n')  # RFC 5804 §1.3
                await writer.drain()
    except (TimeoutError, ConnectionError, ssl.SSLError):
        return
    finally:
        writer.close()


class ManageSieveSession(Session):
    """The `managesieve` listener role (port 4190): the driver above over the App's accounts, login
    throttle and TLS context, with each user's scripts where delivery reads them."""

    busy_line = b'BYE "Too many connections"\r\n'

    async def run(self) -> None:
        app = self.services
        sieve = app.sieve
        accounts = app.accounts

        def store_for(name: str) -> Scripts:
            user = accounts.get_user(name)
            if user is None or sieve is None:  # removed meanwhile: an empty store nobody reads
                raise ConnectionError("account vanished")
            return sieve.store_for(user)

        cfg = app.config
        backend = ManageSieveBackend(
            accounts=accounts, throttle=app.throttle, store_for=store_for, metrics=app.metrics,
            tls_context=app.ssl_context,
            settings=core.ManageSieveSettings(
                sieve_extensions=tuple(sorted(CAPABILITIES)), max_literal=cfg.sieve.max_script_size,
                max_redirects=cfg.sieve.max_redirects, allow_plaintext=cfg.auth.allow_plaintext),
            idle_timeout=cfg.limits.command_timeout, command_timeout=cfg.limits.command_timeout,
            min_data_rate=cfg.limits.min_data_rate, session_timeout=cfg.limits.session_timeout)
        await serve(self.reader, self.writer, backend, tls_active=self.tls_implicit, peer_ip=self.peer_ip)
