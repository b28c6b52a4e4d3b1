"""The composition root: how postier is put together (`build_app`), and the running server (`serve`).

`build_app(config)` makes every shared component once, each from the configuration and the few
other components it uses, and returns them as one frozen `App`; listeners hand the App to their
sessions. `ROLE_SESSIONS` maps each listener role to its session class. Nothing attaches itself
anywhere else: a new component, inbound check, job or listener is a line in `build_app` (and a field
of `App`) or in `ROLE_SESSIONS`. docs/architecture.md walks through it.

`serve(config)` starts each configured listener, runs until SIGTERM or SIGINT, then stops
accepting, lets sessions finish their current step (an SMTP client mid-session gets 421), waits
for deliveries in progress (nothing acknowledged is lost) and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ..accounts import Accounts
from ..config import Config
from ..mailauth.keys import DKIMSigner, KeyStore
from ..mailauth.reports import ReportStore
from ..mailauth.srs import SRS, load_secret
from ..message.types import InboundCheck
from ..pipeline.inbound import LMTPPipeline, MXPipeline, SMTPPipeline
from ..pipeline.jobs import ReportJob
from ..pipeline.mailauth import InboundAuth
from ..pipeline.sieve import SieveFilter
from ..pipeline.submission import SubmissionPipeline
from ..queue.runner import Queue
from ..resolver import BaseResolver, make_resolver
from ..store.delivery import LocalDelivery
from ..store.mailbox import MailStore, on_delivery
from .base import ListenerSet, ProtocolSession, Session
from .imap import IMAPSession
from .managesieve import ManageSieveSession
from .pop3 import POP3Session
from .smtp import SMTPSession
from .throttle import AuthThrottle

__all__ = ["ROLE_SESSIONS", "App", "build_app", "run", "serve"]

log = logging.getLogger("postier")

#: Listener role -> its session class (the roles a config may list under [listeners]).
ROLE_SESSIONS: Mapping[str, type[Session] | type[ProtocolSession]] = {
    "smtp": SMTPSession,
    "submission": SMTPSession,
    "submissions": SMTPSession,
    "lmtp": SMTPSession,
    "imap": IMAPSession,
    "imaps": IMAPSession,
    "pop3": POP3Session,
    "pop3s": POP3Session,
    "managesieve": ManageSieveSession,
}


@dataclass(frozen=True, eq=False)
class App:
    """What every session shares, made once by `build_app`; `start()` and `close()` run it."""

    config: Config
    ssl_context: ssl.SSLContext | None  # None: no certificate configured (no TLS, no STARTTLS)
    accounts: Accounts
    resolver: BaseResolver
    mda: LocalDelivery
    mailstore: MailStore  # IMAP and POP3 read mailboxes through it; deliveries wake IDLE through it
    queue: Queue
    inbound_checks: tuple[InboundCheck, ...]  # run on port 25 at MAIL FROM and end of DATA, in order
    dkim: DKIMSigner | None  # None: `[mailauth] dkim_sign` is off
    dmarc_reports: ReportStore | None  # None: `[mailauth] dmarc` is off
    report_job: ReportJob | None  # None: `[mailauth] dmarc_reports` is off
    throttle: AuthThrottle  # failed logins per client IP, for SMTP AUTH, IMAP, POP3 and ManageSieve
    sieve: SieveFilter | None  # None: `[sieve] enabled = false` (delivery without scripts, no ManageSieve)
    #: SMTP-family role -> a new pipeline for one session.
    pipelines: Mapping[str, Callable[[], SMTPPipeline]]
    #: IMAP: open sessions per user (`[imap] max_connections_per_user`).
    imap_user_connections: Counter[str] = field(default_factory=Counter)
    #: POP3: when each user last logged in (RFC 2449 §6.5 LOGIN-DELAY).
    pop3_last_login: dict[str, float] = field(default_factory=dict)

    async def start(self) -> None:
        await self.queue.start()
        if self.report_job is not None:
            self.report_job.start()

    async def close(self) -> None:
        """Stop the jobs and the queue, then close the stores (each step runs even if one fails)."""
        steps: list[Callable[[], object]] = []
        if self.report_job is not None:
            steps.append(self.report_job.stop)
        steps.append(self.queue.stop)
        if self.dmarc_reports is not None:
            steps.append(self.dmarc_reports.close)
        steps += [self.mailstore.close, self.mda.close, self.accounts.close]
        for step in steps:
            try:
                r = step()
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                log.exception("error while closing")


def build_app(config: Config) -> App:
    """Make every shared component from the configuration, each with the parts it uses."""
    accounts = Accounts(config.accounts_db, config.mailbox.recipient_delimiter, config.mailbox.default_format)
    resolver = make_resolver(config.dns.nameservers, config.dns.timeout, config.dns.cache)
    # Storage: the MDA writes mail (Maildir, mbox); the mail store reads and changes it (IMAP, POP3).
    mda = LocalDelivery(config.mail_root, agent=config.mailbox.delivery_agent)
    mailstore = MailStore(config.mail_root, config.mailbox.special_use_folders,
                          poll_interval=config.imap.idle_poll_interval)
    mda.listeners.append(on_delivery(mailstore))
    srs = SRS(load_secret(config.data_dir / "srs.key"))  # forwarded mail's sender (aliases, redirect)
    queue = Queue(config, accounts, mda, resolver, srs=srs)
    # Mail authentication: the inbound checks of port 25, the DKIM signer of submission, DMARC reports.
    dmarc_reports = ReportStore(config.data_dir / "dmarc.sqlite") if config.mailauth.dmarc else None
    inbound_checks: tuple[InboundCheck, ...] = (
        InboundAuth(config, resolver, dmarc_reports, accounts.list_domains),
    )
    dkim = DKIMSigner(KeyStore(config.dkim_dir)) if config.mailauth.dkim_sign else None
    report_job = None
    if dmarc_reports is not None and config.mailauth.dmarc_reports:
        report_job = ReportJob(config, accounts.list_domains, queue, dmarc_reports, resolver,
                               sign=dkim.sign_bytes if dkim is not None else None)
    sieve = SieveFilter(config, mda, queue, dkim, srs) if config.sieve.enabled else None
    # What happens between MAIL FROM and 250, per SMTP-family role.
    submission = functools.partial(SubmissionPipeline, config, accounts, mda, queue, dkim)
    pipelines: dict[str, Callable[[], SMTPPipeline]] = {
        "smtp": functools.partial(MXPipeline, config, accounts, mda, queue, inbound_checks, sieve, srs),
        "lmtp": functools.partial(LMTPPipeline, config, accounts, mda, queue, sieve=sieve, srs=srs),
        "submission": submission,
        "submissions": submission,
    }
    auth = config.auth
    return App(
        config=config,
        ssl_context=config.ssl_context(),
        accounts=accounts,
        resolver=resolver,
        mda=mda,
        mailstore=mailstore,
        queue=queue,
        inbound_checks=inbound_checks,
        dkim=dkim,
        dmarc_reports=dmarc_reports,
        report_job=report_job,
        throttle=AuthThrottle(auth.failure_delay, auth.max_failures, auth.failure_window),
        sieve=sieve,
        pipelines=pipelines,
    )


async def serve(config: Config, ready: Callable[[list[tuple[str, str, int]]], None] | None = None,
                stop_event: asyncio.Event | None = None) -> None:
    app = build_app(config)
    await app.start()
    listeners = ListenerSet(app, ROLE_SESSIONS)
    try:
        bound = await listeners.start()
    except OSError as exc:
        await app.close()
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
    await app.close()
    log.info("stopped")


def run(config: Config, ready: Callable[[list[tuple[str, str, int]]], None] | None = None) -> None:
    """Run the server until a signal (uses uvloop when installed)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(serve(config, ready))
    else:
        uvloop.run(serve(config, ready))
