"""The Prometheus scrape endpoint (RFC 9110 GET, RFC 6750 bearer token): /metrics on a listener of its own.

Off unless `[metrics] listen` is set. The listener is separate from the web service's so that the
metrics never share a port with the webmail or the Internet-facing http/https listeners: it is meant
for loopback or a management network. Every request is checked twice before anything is read: the
client address must be in `[metrics] allow` (403 otherwise), and when a token file is configured the
request must carry `Authorization: Bearer TOKEN` (401 otherwise, compared in constant time). The
socket is bound by `bind()` before privileges are dropped (a port below 1024 and a root-only token
file both work), like the other listeners. The text is rendered in a worker thread: the queue's size
is read from its database at scrape time.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import socket

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..config import MetricsSettings
from ..metrics import Metrics

__all__ = ["MetricsEndpoint"]

log = logging.getLogger("postier.metrics")

MAX_REQUEST = 8190  # request line and each header field; scrapes send short ones


class MetricsEndpoint:
    """GET /metrics for the allowed clients; `bind()` (as root if need be), then `start()`, `stop()`."""

    def __init__(self, settings: MetricsSettings) -> None:
        self.settings = settings
        self.allow = tuple(ipaddress.ip_network(n, strict=False) for n in settings.allow)
        self.token: bytes | None = None
        self.sock: socket.socket | None = None
        self.metrics: Metrics | None = None
        self._runner: web.AppRunner | None = None

    def bind(self) -> None:
        """Bind the listening socket and read the token file (before privileges are dropped)."""
        s = self.settings
        if s.token_file is not None:
            lines = s.token_file.read_text().splitlines()
            token = lines[0].strip() if lines else ""
            if not token:
                raise OSError(f"metrics.token_file: {s.token_file} is empty")
            self.token = token.encode()
        host, port = s.address()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(16)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.sock = sock

    def allowed(self, peer: str | None) -> bool:
        try:
            ip = ipaddress.ip_address((peer or "").partition("%")[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow)

    def authorized(self, header: str | None) -> bool:
        if self.token is None:
            return True
        scheme, _, value = (header or "").partition(" ")
        # RFC 6750 §2.1: "Bearer" (case-insensitive scheme) and the token
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self.allowed(request.remote):
            log.info("metrics: refused %s (not in metrics.allow)", request.remote)
            return web.Response(status=403, text="forbidden\n")
        if not self.authorized(request.headers.get("Authorization")):
            return web.Response(status=401, text="a bearer token is required\n",
                                headers={"WWW-Authenticate": 'Bearer realm="postier metrics"'})  # RFC 6750 §3
        if request.path != "/metrics":
            return web.Response(status=404, text="not found: try /metrics\n")
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        assert self.metrics is not None
        body = await asyncio.to_thread(generate_latest, self.metrics.exposed)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self, metrics: Metrics) -> tuple[str, str, int]:
        """Serve the bound socket; returns ("metrics", address, port) for the start-up log."""
        assert self.sock is not None
        self.metrics = metrics
        app = web.Application(client_max_size=1024, handler_args={
            "max_line_size": MAX_REQUEST, "max_field_size": MAX_REQUEST, "max_headers": 32})
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, keepalive_timeout=30.0,
                                     shutdown_timeout=2.0)
        await self._runner.setup()
        await web.SockSite(self._runner, self.sock).start()
        host, port = self.sock.getsockname()[:2]
        return "metrics", host, port

    def close(self) -> None:
        """Close the socket without serving it (a worker that leaves the endpoint to the primary)."""
        if self._runner is None and self.sock is not None:
            self.sock.close()
            self.sock = None

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        elif self.sock is not None:
            self.sock.close()
