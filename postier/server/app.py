"""The running server: shared services, every listener in one asyncio process, graceful stop.

`serve(config)` starts each configured listener, runs until SIGTERM or SIGINT, then stops
accepting, lets sessions finish their current step (an SMTP client mid-session gets 421), waits
for deliveries in progress (nothing acknowledged is lost) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
import ssl
from collections.abc import Callable
from typing import Any

from ..accounts import Accounts
from ..config import Config
from ..http.service import WebService
from ..store.delivery import LocalDelivery
from . import throttle
from .base import ListenerSet, Session

log = logging.getLogger("postier")

#: role -> "module:attribute" of its Session factory (imported lazily).
ROLE_SESSIONS = {
    "smtp": "postier.server.smtp:SMTPSession",
    "submission": "postier.server.smtp:SMTPSession",
    "submissions": "postier.server.smtp:SMTPSession",
    "lmtp": "postier.server.smtp:SMTPSession",
    "imap": "postier.server.imap:IMAPSession",
    "imaps": "postier.server.imap:IMAPSession",
    "pop3": "postier.server.pop3:POP3Session",
    "pop3s": "postier.server.pop3:POP3Session",
}


class Services:
    """What every session shares: configuration, accounts, the MDA and, when present, the rest.

    Later layers attach themselves here at start-up (queue, resolver, mail authentication,
    auth throttle, mailbox notifier) so sessions find them in one place.
    """

    def __init__(self, config: Config):
        self.config = config
        self.accounts = Accounts(config.accounts_db, config.mailbox.recipient_delimiter,
                                 config.mailbox.default_format)
        self.ssl_context: ssl.SSLContext | None = config.ssl_context()
        self.mda = LocalDelivery(config.mail_root, agent=config.mailbox.delivery_agent)
        self.extensions: dict[str, Any] = {}
        self._closers: list[Callable[[], Any]] = []
        self._starters: list[Callable[[], Any]] = []

    def on_start(self, fn: Callable[[], Any]) -> None:
        self._starters.append(fn)

    def on_close(self, fn: Callable[[], Any]) -> None:
        self._closers.append(fn)

    async def start(self) -> None:
        for fn in self._starters:
            r = fn()
            if asyncio.iscoroutine(r):
                await r

    async def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                r = fn()
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                log.exception("error while closing")
        self.mda.close()
        self.accounts.close()


#: Hooks other layers register to extend Services at start-up (queue, mailauth, ...):
#: each is called with the Services before listeners start.
SERVICE_HOOKS: list[str] = [
    "postier.queue.runner:attach",
    "postier.pipeline.mailauth:attach",
    "postier.server.throttle:attach",
]


def _load(ref: str) -> Any | None:
    mod, _, attr = ref.partition(":")
    try:
        module = importlib.import_module(mod)
    except ModuleNotFoundError as exc:
        if exc.name and (exc.name == mod or mod.startswith(exc.name + ".")):
            return None  # that layer is not part of this build
        raise
    return getattr(module, attr, None)


def session_factories() -> dict[str, Callable[..., Session]]:
    out = {}
    for role, ref in ROLE_SESSIONS.items():
        f = _load(ref)
        if f is not None:
            out[role] = f
    return out


async def build_services(config: Config) -> Services:
    services = Services(config)
    for ref in SERVICE_HOOKS:
        hook = _load(ref)
        if hook is not None:
            r = hook(services)
            if asyncio.iscoroutine(r):
                await r
    await services.start()
    return services


def _web_mounts(services: Services) -> list[Callable[[Any], None]]:
    """The browser applications mounted into the HTTPS app (the webmail under /mail/)."""
    mount = _load("postier.web:mount")
    return [] if mount is None else [lambda app: mount(app, services)]


async def serve(config: Config, ready: Callable[[list[tuple[str, str, int]]], None] | None = None,
                stop_event: asyncio.Event | None = None) -> None:
    services = await build_services(config)
    listeners = ListenerSet(services, session_factories())
    web = WebService(config, services.accounts, services.ssl_context, throttle.get(services),
                     mounts=_web_mounts(services))
    try:
        bound = await web.start()  # serving before the mail ports open: ready means all are up
        bound += await listeners.start()
    except OSError as exc:
        await web.stop()
        await services.close()
        raise SystemExit(f"postier: cannot listen: {exc}") from None
    for role, addr, port in bound:
        log.info("listening: %s on %s:%d", role, addr, port)
    if ready:
        ready(bound)
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await listeners.stop()
    await web.stop()
    await services.close()
    log.info("stopped")


def run(config: Config, ready: Callable[[list[tuple[str, str, int]]], None] | None = None) -> None:
    """Run the server until a signal (uses uvloop when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(config, ready))
    else:
        uvloop.run(serve(config, ready))
