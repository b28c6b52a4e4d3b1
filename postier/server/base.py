"""asyncio listeners shared by every role: sockets, implicit TLS, connection limits, shutdown, and
the mechanisms every driver shares: the command deadline (`CommandClock`) and STARTTLS's discard of
bytes that arrived before the handshake.

A role module (smtp, imap, pop3) provides either a `Session` subclass (a coroutine over asyncio
streams, one task per connection) or a `ProtocolSession` subclass (an `asyncio.Protocol` driven by
callbacks: no task, no stream objects and no timeout object per read, which is what the SMTP hot
path needs). This module accepts connections, enforces the global and per-IP connection limits
before a session starts (the refusal is the role's own "too busy" line, and the accept loop never
waits on a client), and on shutdown asks every session to finish politely (`shutdown()`), then
cancels what is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from ..config import HTTP_ROLES
from . import sockets, unixsock

if TYPE_CHECKING:
    from .app import App
    from .shared import SharedConnections

log = logging.getLogger("postier.server")

READ_SIZE = 65536


class CommandTimeout(Exception):
    """A command was started and not finished within its deadline (see `CommandClock`)."""


class CommandClock:
    """The deadline of one partly received command (slowloris, slow literals and transfers): it must
    be complete within `limits.command_timeout` from its first byte, plus one second per
    `limits.min_data_rate` bytes received since (Postfix's smtpd_per_record_deadline and
    smtpd_min_data_rate; docs/security.md). One clock per session, for every protocol."""

    __slots__ = ("command_timeout", "min_data_rate", "received", "started")

    def __init__(self, command_timeout: float, min_data_rate: float):
        self.command_timeout = command_timeout
        self.min_data_rate = min_data_rate
        self.started: float | None = None  # when the command being received began, if one is
        self.received = 0  # bytes received since then

    def stop(self) -> None:
        """No command is partly received (a line was complete, or nothing came yet)."""
        self.started = None

    def start(self, now: float, received: int = 0) -> None:
        """A command is partly received: its clock runs from `now` unless it already does."""
        if self.started is None:
            self.started, self.received = now, received

    def add(self, n: int) -> None:
        if self.started is not None:
            self.received += n

    def pause(self, now: float) -> None:
        """The server was busy until `now`: its time does not count against the client."""
        if self.started is not None:
            self.started = now

    def deadline(self) -> float | None:
        if self.started is None:
            return None
        return self.started + self.command_timeout + self.received / self.min_data_rate

    async def read(self, read: Callable[[float], Awaitable[bytes]], idle: float, partial: bool,
                   buffered: int = 0) -> bytes:
        """`read(timeout)` the client's next bytes: within `idle` seconds, or, while a command is
        partly received (`partial`; `buffered` bytes of it so far), within what is left of its
        deadline. Raises CommandTimeout when a started command runs out of time."""
        if not partial:
            self.stop()
            return await read(idle)
        now = time.monotonic()
        self.start(now, buffered)
        deadline = self.deadline()
        assert deadline is not None
        left = deadline - now
        if left <= 0:
            raise CommandTimeout()
        try:
            data = await read(min(idle, left))
        except TimeoutError:
            raise CommandTimeout() from None
        self.add(len(data))
        return data


class Session:
    """One client connection of one role. Subclasses implement `run()` and `refuse_line()`."""

    #: The bytes sent to a client refused for load (before any protocol exchange).
    busy_line = b""

    def __init__(self, services: App, role: str, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, tls_implicit: bool):
        self.services = services
        self.role = role
        self.reader = reader
        self.writer = writer
        self.tls_implicit = tls_implicit
        peer = writer.get_extra_info("peername") or ("?", 0)
        if isinstance(writer.get_extra_info("sockname"), (str, bytes)):
            peer = unixsock.LOCAL_PEER  # a Unix socket has no peer address
        self.peer_ip: str = peer[0]
        self.peer_port: int = peer[1]
        sock = writer.get_extra_info("sockname") or ("?", 0)
        self.local_ip: str = sock[0] if self.peer_ip else ""
        self.started = time.monotonic()
        self.closing = False
        self._task: asyncio.Task[Any] | None = None  # the task running this session
        self._waiting = False  # True while it waits for the client (shutdown may interrupt that)
        lim = services.config.limits
        self.clock = CommandClock(lim.command_timeout, lim.min_data_rate)

    @property
    def tls_info(self) -> str | None:
        """'TLSv1.3 TLS_AES_256_GCM_SHA384' when the transport is encrypted, else None."""
        obj = self.writer.get_extra_info("ssl_object")
        if obj is None:
            return None
        cipher = obj.cipher()
        return f"{obj.version()} {cipher[0] if cipher else '?'}"

    async def run(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def shutdown(self) -> None:
        """Server is stopping: a session waiting for its client is interrupted now (its `run()`
        sees CancelledError with `closing` set and says goodbye); a busy one ends at its next read."""
        self.closing = True
        if self._waiting and self._task is not None:
            self._task.cancel()

    async def read(self, timeout: float) -> bytes:
        """Read what the client sent (b'' at EOF); raise TimeoutError after `timeout` idle seconds,
        CancelledError once the server is stopping."""
        if self.closing:
            raise asyncio.CancelledError
        self._task = asyncio.current_task()
        self._waiting = True
        try:
            async with asyncio.timeout(timeout):
                return await self.reader.read(READ_SIZE)
        finally:
            self._waiting = False

    async def read_command(self, idle: float, partial: bool, buffered: int = 0) -> bytes:
        """Read more input: within `idle` seconds, or, while a command is partly received
        (`partial`; `buffered` bytes of it so far), within what is left of its deadline
        (`CommandClock`). Raises CommandTimeout when a started command runs out of time."""
        return await self.clock.read(self.read, idle, partial, buffered)

    async def start_tls(self, ctx: ssl.SSLContext) -> None:
        """Upgrade the connection in place (STARTTLS/STLS). Bytes the client sent before the
        handshake are not commands (plaintext injection: RFC 9051 §6.2.1, RFC 2595 §4, RFC 3207
        §4.2): the caller's protocol core drops what it buffered, this drops what the stream did.
        Nothing can arrive between this and the transport pausing its reads (no await between)."""
        buffered = getattr(self.reader, "_buffer", None)  # the StreamReader's unread bytes, if any
        if isinstance(buffered, bytearray):
            buffered.clear()
        self.clock.stop()
        timeout = self.services.config.limits.tls_handshake_timeout
        await self.writer.start_tls(ctx, ssl_handshake_timeout=timeout)
        self.services.metrics.tls_started(self.role, self.tls_info)


class ProtocolSession(asyncio.Protocol):
    """One client connection of one role, as an asyncio Protocol. Subclasses implement `start()`.

    The transport is ready when `start()` runs (after the TLS handshake on implicit-TLS ports) and
    the connection has been counted against the limits; `connection_lost` then calls `stopped()`.
    """

    busy_line = b""

    def __init__(self, services: App, role: str, listeners: ListenerSet, tls_implicit: bool):
        self.services = services
        self.role = role
        self.listeners = listeners
        self.tls_implicit = tls_implicit
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "?"
        self.peer_port = 0
        self.local_ip = "?"
        self.closing = False
        self._admitted = False
        lim = services.config.limits
        self.clock = CommandClock(lim.command_timeout, lim.min_data_rate)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername") or ("?", 0)
        if isinstance(transport.get_extra_info("sockname"), (str, bytes)):
            peer = unixsock.LOCAL_PEER  # a Unix socket has no peer address
        self.peer_ip, self.peer_port = peer[0], peer[1]
        self.local_ip = (transport.get_extra_info("sockname") or ("?", 0))[0] if peer[0] else ""
        self.started = time.monotonic()
        transport = self.transport
        if not self.listeners.admit(self):
            log.info("%s: refusing %s: too many connections", self.role, self.peer_ip)
            transport.write(self.busy_line)
            self.close_transport()
            return
        self._admitted = True
        try:
            self.start()
        except Exception:  # one session's failure never ends another session or the server
            log.exception("%s: session with %s failed", self.role, self.peer_ip)
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:  # a refused connection never started: nothing to stop
            self._admitted = False
            self.listeners.release(self)
            self.stopped()

    def start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def stopped(self) -> None:
        """The connection is gone (subclasses release what they hold)."""

    def shutdown(self) -> None:
        """Server is stopping: end the session at the next safe point (subclasses refine)."""
        self.closing = True
        self.close_transport()

    def abort(self) -> None:
        """Grace period over: drop the connection now."""
        if self.transport is not None:
            self.transport.abort()

    def close_transport(self) -> None:
        """Close after the pending output is written; abort if the peer does not read it in 5 s."""
        t = self.transport
        if t is None or t.is_closing():
            return
        t.close()
        if t.get_write_buffer_size():
            asyncio.get_running_loop().call_later(5.0, t.abort)

    @property
    def tls_info(self) -> str | None:
        """'TLSv1.3 TLS_AES_256_GCM_SHA384' when the transport is encrypted, else None."""
        obj = self.transport.get_extra_info("ssl_object") if self.transport is not None else None
        if obj is None:
            return None
        cipher = obj.cipher()
        return f"{obj.version()} {cipher[0] if cipher else '?'}"

    async def start_tls(self, ctx: ssl.SSLContext) -> None:
        """Upgrade the connection in place (STARTTLS): the new transport replaces the old one."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        timeout = self.services.config.limits.tls_handshake_timeout
        new = await loop.start_tls(self.transport, self, ctx, server_side=True, ssl_handshake_timeout=timeout)
        if new is None:
            raise ConnectionError("connection closed during the TLS handshake")
        self.transport = new
        self.services.metrics.tls_started(self.role, self.tls_info)


@dataclass
class _Bound:
    role: str
    server: asyncio.Server


class ListenerSet:
    """Every configured listener, with shared connection accounting."""

    def __init__(self, services: App, factories: Mapping[str, Callable[..., Session | ProtocolSession]]):
        self.services = services
        self.factories = factories
        self.bound: list[_Bound] = []
        self.sessions: set[Session | ProtocolSession] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.per_ip: Counter[str] = Counter()
        #: With several workers (server/supervisor.py): the limits count every worker's connections.
        self.shared: SharedConnections | None = None

    async def start(self, bound: dict[str, socket.socket] | None = None) -> list[tuple[str, str, int]]:
        """Serve on the sockets `bound` by role (sockets.bind_all; bound here when not given)."""
        cfg = self.services.config
        if bound is None:
            bound = sockets.bind_all(cfg)
        out = []
        for role, sock in bound.items():
            if role in HTTP_ROLES:  # served by postier.http, beside these listeners
                continue
            lst = cfg.listeners[role]
            if await self.serve_socket(role, sock) is not None:
                out.append((role, str(lst.path), 0) if lst.path is not None else (role, lst.address, lst.port))
        # Every listener starts listening in the same loop iteration, once all are bound: a client
        # that finds one port open (a test harness, a monitoring probe) finds all of them open.
        await asyncio.gather(*(b.server.start_serving() for b in self.bound))
        return out

    async def serve_socket(self, role: str, sock: socket.socket) -> asyncio.Server | None:
        """Wrap one bound socket of `role` in an asyncio server (not yet serving)."""
        factory = self.factories.get(role)
        if factory is None:
            log.warning("listener %s: this role is not available in this build; skipped", role)
            sock.close()
            return None
        cfg = self.services.config
        implicit = role in ("submissions", "imaps", "pop3s")
        tls: dict[str, Any] = {"ssl": self.services.ssl_context,
                               "ssl_handshake_timeout": cfg.limits.tls_handshake_timeout} if implicit else {}
        loop = asyncio.get_running_loop()
        unix = sock.family == socket.AF_UNIX
        server: asyncio.Server
        if isinstance(factory, type) and issubclass(factory, ProtocolSession):
            def proto(factory: type[ProtocolSession] = factory) -> ProtocolSession:
                return factory(self.services, role, self, implicit)  # the App of now (a reload replaces it)

            create = loop.create_unix_server if unix else loop.create_server
            server = await create(proto, sock=sock, backlog=sockets.BACKLOG, start_serving=False, **tls)
        else:
            cb = self._make_cb(role, cast("Callable[..., Session]", factory), implicit)
            start = asyncio.start_unix_server if unix else asyncio.start_server
            server = await start(cb, sock=sock, limit=READ_SIZE, backlog=sockets.BACKLOG, start_serving=False,
                                 **tls)
        self.bound.append(_Bound(role, server))
        return server

    def admit(self, session: Session | ProtocolSession) -> bool:
        """Count a new connection, or refuse it when a global or per-IP limit is reached."""
        limits = self.services.config.limits
        ip = session.peer_ip
        admitted = len(self.sessions) < limits.max_connections and self.per_ip[ip] < limits.max_connections_per_ip
        self.services.metrics.connection(session.role, admitted, session.tls_info if session.tls_implicit else None)
        if not admitted:
            return False
        if self.shared is not None and not self.shared.admit(ip, limits.max_connections,
                                                             limits.max_connections_per_ip):
            return False
        self.sessions.add(session)
        self.per_ip[ip] += 1
        return True

    def release(self, session: Session | ProtocolSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.services.metrics.session_closed(session.role)
            ip = session.peer_ip
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
            if self.shared is not None:
                self.shared.release(ip)

    def _make_cb(self, role: str, factory: Callable[..., Session], implicit: bool
                 ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = factory(self.services, role, reader, writer, implicit)
            ip = session.peer_ip
            if not self.admit(session):
                log.info("%s: refusing %s: too many connections", role, ip)
                with contextlib.suppress(Exception):
                    writer.write(session.busy_line)
                    await asyncio.wait_for(writer.drain(), 5)
                writer.close()
                return
            task = asyncio.current_task()
            if task is not None:
                self.tasks.add(task)
            try:
                await session.run()
            except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ssl.SSLError):
                pass
            except asyncio.CancelledError:
                raise
            except Exception:  # one session's failure never ends another session or the server
                log.exception("%s: session with %s failed", role, ip)
            finally:
                self.release(session)
                if task is not None:
                    self.tasks.discard(task)
                with contextlib.suppress(Exception):
                    writer.close()

        return on_connect

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting, ask sessions to finish, wait up to `grace` seconds, cancel the rest."""
        for b in self.bound:
            b.server.close()
        for s in list(self.sessions):
            s.shutdown()
        deadline = time.monotonic() + grace
        while (self.tasks or self.sessions) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for t in list(self.tasks):
            t.cancel()
        for s in list(self.sessions):
            if isinstance(s, ProtocolSession):
                s.abort()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        for b in self.bound:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(b.server.wait_closed(), 1)
