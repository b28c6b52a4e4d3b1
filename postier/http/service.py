"""The web side of one postier process (RFC 9110): HTTP listeners, their routes, ACME challenges.

`WebService` is built beside the mail listeners from the configuration, the accounts (for the list of
local domains) and the mail listeners' TLS context; `tls_contexts` lists every live server context so
that a new certificate reaches them all through `tlsreload.reload_certificates()`.
"""

from __future__ import annotations

from collections.abc import Mapping

import asyncio
import socket
import contextlib
import ssl
from collections.abc import Callable, Iterable

from aiohttp import web

from ..accounts import Accounts
from ..acme.challenges import Challenges
from ..acme.manager import CertManager
from ..config import Config
from ..metrics import Metrics
from ..server.throttle import AuthThrottle
from .clientsetup import ClientSetup
from .policy import policy_route
from .server import HttpServer, Route

__all__ = ["WebService"]


class WebService:
    def __init__(self, config: Config, accounts: Accounts, mail_tls: ssl.SSLContext | None,
                 throttle: AuthThrottle, mounts: Iterable[Callable[[web.Application], None]] = (),
                 https_tls: ssl.SSLContext | None = None, metrics: Metrics | None = None):
        self.config = config
        self.accounts = accounts
        self.challenges = Challenges()
        self.mail_tls = mail_tls
        # Its own context (same settings, same certificate): the tls-alpn-01 SNI switch and the http/1.1
        # ALPN must not reach the mail listeners.
        self.https_tls = https_tls if https_tls is not None else (
            config.ssl_context() if "https" in config.listeners else None)
        routes: list[Route] = []
        routes += ClientSetup(config, accounts, throttle, accounts.list_domains).routes()
        routes.append(policy_route(config))
        self.http = HttpServer(config, accounts.list_domains, self.challenges, self.https_tls, routes, metrics)
        for mount in mounts:  # applications under their own path prefix (the webmail's /mail/)
            mount(self.http.app)
        self.acme = CertManager(config, accounts.list_domains, self.challenges, lambda: self.tls_contexts) \
            if config.acme.enabled else None
        self._acme_task: asyncio.Task[None] | None = None

    def mount(self, mount: Callable[[web.Application], None]) -> None:
        """Add an application under its own path prefix (before `start`)."""
        mount(self.http.app)

    @property
    def tls_contexts(self) -> list[ssl.SSLContext]:
        return [c for c in (self.mail_tls, self.https_tls) if c is not None]

    async def start(self, socks: Mapping[str, socket.socket] | None = None) -> list[tuple[str, str, int]]:
        if self.acme is not None:
            self.acme.install_existing()  # before any listener accepts: serve the issued certificate
        bound = await self.http.start(socks)
        if self.acme is not None:
            self._acme_task = asyncio.create_task(self.acme.run(), name="acme")
        return bound

    async def stop(self) -> None:
        if self._acme_task is not None:
            self._acme_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acme_task
        await self.http.stop()
