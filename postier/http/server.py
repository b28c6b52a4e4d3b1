"""The HTTP and HTTPS listeners (RFC 9110, RFC 9112) in the server's own asyncio loop, on aiohttp.

Why aiohttp's web server (3.14) rather than starlette served by uvicorn:
- It runs on a loop and sockets we own: `web.Server` is a plain asyncio protocol factory, so these
  listeners are `loop.create_server()` calls like the mail ones, given our `ssl.SSLContext` object
  (a certificate that `tlsreload.reload_certificates()` loads into it applies to the next handshake)
  and our TLS handshake deadline. uvicorn builds its own SSLContext from file names in
  `Config.load()` and its `Server` expects to own start-up and signal handling.
- Its C parser (llhttp) bounds the request line, each header field and the number of fields, and the
  Application bounds request bodies (413). uvicorn bounds only the incomplete head (h11's
  max_incomplete_event_size) and has no body limit.
- The same package is the HTTP client that ACME and the MTA-STS policy fetch need: one dependency for
  both directions, where starlette + uvicorn + httpx bring three (and h11, anyio, httpcore).
Neither stack has a deadline for a client that trickles its request head (slowloris) nor a global and
per-IP connection cap: `_Guard` adds both around aiohttp's protocol, with the numbers the mail
listeners use ([limits] command_timeout, max_connections, max_connections_per_ip).

Routing: every request must name one of our hosts (the hostname, each local domain and its
`mta-sts.`, `autoconfig.` and `autodiscover.` names): no Host is 400 (RFC 9112 §3.2), another name
421 (RFC 9110 §15.5.20). Plain http serves only ACME challenges, autoconfig and the MTA-STS policy and
redirects everything else to https (308 keeps the method, RFC 9110 §15.4.9).
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import cast

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from ..acme.challenges import Challenges
from ..config import Config
from ..metrics import Metrics

log = logging.getLogger("postier.http")

__all__ = ["HttpServer", "Route", "PLAIN_HTTP_PATHS"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

#: Paths (prefixes) answered on plain http too; everything else there redirects to https.
PLAIN_HTTP_PATHS = (
    "/.well-known/acme-challenge/",  # RFC 8555 §8.3: validated over port 80
    "/.well-known/autoconfig/",  # Thunderbird tries http after https
    "/mail/config-v1.1.xml",
    "/.well-known/mta-sts.txt",
)

_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 5\r\nContent-Length: 0\r\n\r\n"
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
#: How long a list of local domains (for the Host check) is reused before asking the accounts again.
_NAMES_TTL = 10.0


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler


class _Guard(asyncio.Protocol):
    """aiohttp's protocol behind admission control and a request-head deadline.

    A connection must finish each request head within command_timeout of its start (or of the end of
    the previous response); a handler must answer within command_timeout too (middleware below).
    """

    def __init__(self, owner: HttpServer):
        self.owner = owner
        self.inner: RequestHandler | None = None
        self.transport: asyncio.Transport | None = None
        self.peer_ip = "?"
        self.pending = False  # bytes of a request head arrived since the last response
        self.timer: asyncio.TimerHandle | None = None

    @property
    def role(self) -> str:
        return "http" if self.transport is None or self.transport.get_extra_info("sslcontext") is None else "https"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self.peer_ip = (t.get_extra_info("peername") or ("?", 0))[0]
        admitted = self.owner.admit(self.peer_ip)
        if self.owner.metrics is not None:
            tls = t.get_extra_info("ssl_object")
            self.owner.metrics.connection(self.role, admitted, (tls.version() or "") if tls is not None else None)
        if not admitted:
            log.info("http: refusing %s: too many connections", self.peer_ip)
            t.write(_BUSY)
            t.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.inner = self.owner.protocol()
        self.owner.guards[self.inner] = self
        self.inner.connection_made(transport)
        self.arm()

    def data_received(self, data: bytes) -> None:
        if self.inner is not None:
            self.pending = True
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.inner is not None:
            self.inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm()
        if self.inner is not None:
            self.owner.guards.pop(self.inner, None)
            self.owner.release(self.peer_ip)
            if self.owner.metrics is not None:
                self.owner.metrics.session_closed(self.role)
            inner, self.inner = self.inner, None
            inner.connection_lost(exc)

    def arm(self) -> None:
        self.disarm()
        self.pending = False
        self.timer = asyncio.get_running_loop().call_later(self.owner.config.limits.command_timeout, self.expire)

    def disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def expire(self) -> None:
        """The request head did not arrive in time: 408 if one was started, then close."""
        self.timer = None
        t = self.transport
        if t is None or t.is_closing():
            return
        if self.pending:
            t.write(_TIMEOUT)
        t.close()
        asyncio.get_running_loop().call_later(5.0, t.abort)  # a client that does not read the 408


class HttpServer:
    """The http and https listeners of one postier process, with their routes."""

    def __init__(self, config: Config, domains: Callable[[], Iterable[str]], challenges: Challenges,
                 tls: ssl.SSLContext | None, routes: Iterable[Route] = (), metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics  # connections and open connections per role, like the mail listeners'
        self._domains = domains
        self.challenges = challenges
        self.tls = tls
        if tls is not None:
            tls.set_alpn_protocols(["http/1.1"])
            tls.sni_callback = self._sni
        self.guards: dict[RequestHandler, _Guard] = {}
        self._per_ip: Counter[str] = Counter()
        self._count = 0
        self._names: frozenset[str] = frozenset()
        self._names_at = -_NAMES_TTL
        self._servers: list[asyncio.Server] = []
        h = config.http
        self.app = web.Application(client_max_size=h.max_body, middlewares=[self._guard_mw, self._host_mw],
                                   handler_args={"max_line_size": h.max_request_line,
                                                 "max_field_size": h.max_field_size,
                                                 "max_headers": h.max_headers})
        self.app.on_response_prepare.append(_headers)
        self.app.router.add_get("/.well-known/acme-challenge/{token}", self._acme_http01)
        for r in routes:
            self.app.router.add_route(r.method, r.path, r.handler)
        self._runner: web.AppRunner | None = None
        self._server: web.Server | None = None

    # -- listeners --------------------------------------------------------------------------------

    async def start(self, socks: Mapping[str, socket.socket] | None = None) -> list[tuple[str, str, int]]:
        """Serve the configured http/https listeners on the sockets bound before privileges were
        dropped (`server/sockets.py`), or bind them here; returns (role, address, port) served."""
        limits = self.config.limits
        self._runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                     keepalive_timeout=limits.idle_timeout, lingering_time=2.0,  # our deadline comes first
                                     shutdown_timeout=5.0)
        await self._runner.setup()
        self._server = self._runner.server
        loop = asyncio.get_running_loop()
        bound = []
        for role in ("http", "https"):
            lst = self.config.listeners.get(role)
            if lst is None:
                continue
            if role == "https" and self.tls is None:
                log.warning("listener https: no [tls] certificate; skipped")
                continue
            host = None if lst.address in ("*", "") else lst.address
            ctx = self.tls if role == "https" else None
            handshake = limits.tls_handshake_timeout if ctx else None
            sock = (socks or {}).get(role)
            if sock is not None:
                server = await loop.create_server(lambda: _Guard(self), sock=sock, ssl=ctx,
                                                  ssl_handshake_timeout=handshake, backlog=1024)
            else:
                server = await loop.create_server(
                    lambda: _Guard(self), host=host, port=lst.port, ssl=ctx, ssl_handshake_timeout=handshake,
                    reuse_address=True, backlog=1024)
            self._servers.append(server)
            bound.append((role, lst.address, lst.port))
        return bound

    async def stop(self) -> None:
        for s in self._servers:
            s.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for g in list(self.guards.values()):
            if g.transport is not None:
                g.transport.abort()
        for s in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(s.wait_closed(), 1)

    def protocol(self) -> RequestHandler:
        assert self._server is not None
        return self._server()

    def admit(self, ip: str) -> bool:
        limits = self.config.limits
        if self._count >= limits.max_connections or self._per_ip[ip] >= limits.max_connections_per_ip:
            return False
        self._count += 1
        self._per_ip[ip] += 1
        return True

    def release(self, ip: str) -> None:
        self._count -= 1
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]

    @property
    def connections(self) -> int:
        return self._count

    def _sni(self, obj: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> None:
        """RFC 8737 §3: while a tls-alpn-01 validation of `name` is pending, present its certificate.

        The server name arrives before the ALPN list, so a browser asking for that exact name in the
        seconds of a validation gets the validation certificate too; mail listeners use other contexts.
        """
        if name and self.challenges.tls_alpn01:
            alt = self.challenges.tls_alpn01.get(name.lower())
            if alt is not None:
                obj.context = alt

    # -- middleware ---------------------------------------------------------------------------------

    def names(self) -> frozenset[str]:
        """Host names we answer for: the hostname, and each local domain with its service names."""
        now = time.monotonic()
        if now - self._names_at > _NAMES_TTL:
            out = {self.config.hostname}
            for d in self._domains():
                out.update((d, f"mta-sts.{d}", f"autoconfig.{d}", f"autodiscover.{d}"))
            self._names, self._names_at = frozenset(out), now
        return self._names

    @web.middleware
    async def _guard_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        guard = self.guards.get(request.protocol)
        if guard is not None:
            guard.disarm()
        try:
            async with asyncio.timeout(self.config.limits.command_timeout):
                return await handler(request)
        except TimeoutError:  # a body that trickles in, or a handler stuck on something
            return web.Response(status=408, text="request timeout\n", headers={"Connection": "close"})
        finally:
            if guard is not None:
                guard.arm()

    @web.middleware
    async def _host_mw(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        raw = request.headers.getall("Host", [])
        if len(raw) != 1:  # RFC 9112 §3.2: exactly one Host field, or 400
            return web.Response(status=400, text="exactly one Host header is required\n")
        host = _host_name(raw[0])
        if host is None or host not in self.names():
            return web.Response(status=421, text="this server does not serve that host\n")
        request[HOST_KEY] = host
        if not request.secure and not request.path.startswith(PLAIN_HTTP_PATHS):
            https = self.config.listeners.get("https")
            port = "" if https is None or https.port == 443 else f":{https.port}"
            raise web.HTTPPermanentRedirect(f"https://{host}{port}{request.rel_url}")
        return await handler(request)

    # -- routes -------------------------------------------------------------------------------------

    async def _acme_http01(self, request: web.Request) -> web.StreamResponse:
        """RFC 8555 §8.3: the key authorization of a pending http-01 challenge, as text."""
        answer = self.challenges.key_authorization(request.match_info["token"])
        if answer is None:
            raise web.HTTPNotFound()
        return web.Response(text=answer, content_type="application/octet-stream")


async def _headers(request: web.Request, response: web.StreamResponse) -> None:
    """No software version for scanners; no sniffing of our text and XML as something else."""
    response.headers["Server"] = "postier"
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.secure:
        response.headers.setdefault("Cache-Control", "no-store")


#: Where the host-check middleware leaves the validated, lower-case host name for the handlers.
HOST_KEY = web.RequestKey("postier_host", str)


def _host_name(value: str) -> str | None:
    """The lower-case name of a Host field value (port dropped), or None when it is not a DNS name."""
    value = value.strip().lower()
    if value.startswith("["):  # an IPv6 literal: never one of our names
        return None
    name, _, port = value.partition(":")
    if port and not port.isdigit():
        return None
    name = name.rstrip(".")
    return name or None

