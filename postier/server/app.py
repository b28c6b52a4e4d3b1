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
from ..antispam.builtin import RateLimiter
from ..antispam.check import SpamCheck
from ..antispam.greylist import Greylist
from ..antispam.learning import LearnQueue
from ..antispam.rspamd import RspamdClient
from ..antispam.screening import Screener, dns_lists
from ..antispam.verdicts import VerdictLog
from ..config import Config
from ..mailauth.keys import DKIMSigner, KeyStore
from ..mailauth.reports import ReportStore
from ..mailauth.tlsrpt import TLSReportStore
from ..http.service import WebService
from ..web import mount as mount_webmail
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
from . import notify, privileges, reload, sockets, stats
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
    report_job: ReportJob | None  # None: `[mailauth] dmarc_reports` and `[tlsrpt] send_reports` are off
    throttle: AuthThrottle  # failed logins per client IP, for SMTP AUTH, IMAP, POP3 and ManageSieve
    sieve: SieveFilter | None  # None: `[sieve] enabled = false` (delivery without scripts, no ManageSieve)
    #: SMTP-family role -> a new pipeline for one session.
    pipelines: Mapping[str, Callable[[], SMTPPipeline]]
    #: Port 25 before the greeting: DNS list screening and the connection rate (None: not configured).
    screener: Screener | None = None
    connection_rate: RateLimiter | None = None
    #: Every inbound decision, in plain words, for `postier why`.
    decisions: VerdictLog | None = None
    #: Junk moves over IMAP train Rspamd through it (None without an Rspamd controller).
    learning: LearnQueue | None = None
    spam: SpamCheck | None = None
    #: TLS reporting (RFC 8460): our outbound sessions' outcomes, the reports sent and received.
    tls_reports: TLSReportStore | None = None
    #: The http/https listeners (ACME challenges, autoconfig, MTA-STS policy) and the ACME renewals.
    web: WebService = field(kw_only=True)
    #: IMAP: open sessions per user (`[imap] max_connections_per_user`).
    imap_user_connections: Counter[str] = field(default_factory=Counter)
    #: POP3: when each user last logged in (RFC 2449 §6.5 LOGIN-DELAY).
    pop3_last_login: dict[str, float] = field(default_factory=dict)
    _tasks: list[asyncio.Future[None]] = field(default_factory=list)

    async def start(self) -> None:
        await self.queue.start()
        if self.report_job is not None:
            self.report_job.start()
        if self.learning is not None and self.spam is not None and self.spam.rspamd is not None:
            self._tasks.append(asyncio.ensure_future(self.learning.run(self.spam.rspamd.learn)))

    async def close(self) -> None:
        """Stop the jobs and the queue, then close the stores (each step runs even if one fails)."""
        steps: list[Callable[[], object]] = [task.cancel for task in self._tasks]
        if self.report_job is not None:
            steps.append(self.report_job.stop)
        steps.append(self.queue.stop)
        for closer in (self.spam, self.learning, self.decisions):
            if closer is not None:
                steps.append(closer.close)
        for store in (self.dmarc_reports, self.tls_reports):
            if store is not None:
                steps.append(store.close)
        steps += [self.mailstore.close, self.mda.close, self.accounts.close]
        for step in steps:
            try:
                r = step()
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                log.exception("error while closing")


def build_app(config: Config, tls: TLSContexts | None = None) -> App:
    """Make every shared component from the configuration, each with the parts it uses."""
    accounts = Accounts(config.accounts_db, config.mailbox.recipient_delimiter, config.mailbox.default_format)
    accounts.configure_logins(config.auth.login_cache_size, config.auth.login_cache_ttl, config.auth.rehash_passwords)
    # The report mailboxes `dns records` publishes (DMARC rua, TLS-RPT rua) reach the admin like
    # postmaster@ unless a user or alias of that name exists: reports sent to them are never refused.
    accounts.role_local_parts |= {a for a in (config.mailauth.report_address, config.tlsrpt.report_address)
                                  if a and "@" not in a}
    resolver = make_resolver(config.dns.nameservers, config.dns.timeout, config.dns.cache)
    # Storage: the MDA writes mail (Maildir, mbox); the mail store reads and changes it (IMAP, POP3).
    mda = LocalDelivery(config.mail_root, agent=config.mailbox.delivery_agent)
    mailstore = MailStore(config.mail_root, config.mailbox.special_use_folders,
                          poll_interval=config.imap.idle_poll_interval)
    mda.listeners.append(on_delivery(mailstore))
    srs = SRS(load_secret(config.data_dir / "srs.key"))  # forwarded mail's sender (aliases, redirect)
    # TLS reporting (RFC 8460): the queue records each session's TLS outcome, the MX keeps reports
    # others send to our `_smtp._tls` rua, the report job sends ours.
    tls_reports = TLSReportStore(config.data_dir / "tlsrpt.sqlite")
    queue = Queue(config, accounts, mda, resolver, srs=srs,
                  tls_reports=tls_reports if config.tlsrpt.record else None)
    # Mail authentication: the inbound checks of port 25, the DKIM signer of submission, DMARC reports.
    dmarc_reports = ReportStore(config.data_dir / "dmarc.sqlite") if config.mailauth.dmarc else None
    # Spam defence at the MX (postier/antispam): DNS lists before the greeting, then after mail
    # authentication the built-in checks, greylisting and Rspamd; decisions kept for `postier why`.
    a = config.antispam
    screener = Screener(resolver, dns_lists(a.dnsbl), dns_lists(a.dnswl), a.threshold, a.pregreet_weight,
                        a.screen_timeout) if a.dnsbl or a.dnswl else None
    rspamd = RspamdClient(a.rspamd, a.rspamd_controller, _secret(config, a.rspamd_password_file),
                          a.rspamd_timeout) if a.rspamd else None
    greylist = Greylist(config.data_dir / "greylist.sqlite", a.greylist_delay, a.greylist_retry_window,
                        auto_allow=a.greylist_auto_allow, max_entries=a.greylist_max_entries) if a.greylist else None
    smtp_address = config.listeners["smtp"].address if "smtp" in config.listeners else ""
    spam = SpamCheck(a, config.hostname, [smtp_address], resolver, greylist, rspamd,
                     resolve_helo=config.mailauth.spf)
    learning = LearnQueue(config.data_dir / "learn.sqlite") if rspamd is not None and a.rspamd_controller else None
    decisions = VerdictLog(config.data_dir / "verdicts.sqlite")
    inbound_checks: tuple[InboundCheck, ...] = (
        InboundAuth(config, resolver, dmarc_reports, accounts.list_domains, tls_reports=tls_reports),
        *((spam,) if spam.active else ()),
    )
    dkim = DKIMSigner(KeyStore(config.dkim_dir)) if config.mailauth.dkim_sign else None
    report_job = None
    send_dmarc = dmarc_reports is not None and config.mailauth.dmarc_reports
    if send_dmarc or config.tlsrpt.send_reports:
        report_job = ReportJob(config, accounts.list_domains, queue, dmarc_reports if send_dmarc else None, resolver,
                               sign=dkim.sign_bytes if dkim is not None else None,
                               tls=tls_reports if config.tlsrpt.send_reports else None)
    sieve = SieveFilter(config, mda, queue, dkim, srs) if config.sieve.enabled else None
    # What happens between MAIL FROM and 250, per SMTP-family role.
    outbound_scan = spam if a.scan_outbound and rspamd is not None else None
    submission = functools.partial(SubmissionPipeline, config, accounts, mda, queue, dkim, outbound_scan)
    pipelines: dict[str, Callable[[], SMTPPipeline]] = {
        "smtp": functools.partial(MXPipeline, config, accounts, mda, queue, inbound_checks, sieve, srs, decisions),
        "lmtp": functools.partial(LMTPPipeline, config, accounts, mda, queue, sieve=sieve, srs=srs),
        "submission": submission,
        "submissions": submission,
    }
    auth = config.auth
    tls = tls or load_tls(config)
    ssl_context = tls.mail
    throttle = AuthThrottle(auth.failure_delay, auth.max_failures, auth.failure_window)
    app = App(
        config=config,
        ssl_context=ssl_context,
        accounts=accounts,
        resolver=resolver,
        mda=mda,
        mailstore=mailstore,
        queue=queue,
        inbound_checks=inbound_checks,
        dkim=dkim,
        dmarc_reports=dmarc_reports,
        report_job=report_job,
        throttle=throttle,
        sieve=sieve,
        pipelines=pipelines,
        screener=screener,
        connection_rate=RateLimiter(a.max_connections_per_minute) if a.max_connections_per_minute else None,
        decisions=decisions,
        learning=learning,
        spam=spam,
        tls_reports=tls_reports,
        web=WebService(config, accounts, ssl_context, throttle, https_tls=tls.https),
    )
    app.web.mount(lambda http_app: mount_webmail(http_app, app))  # the webmail (/mail/), admin (/admin/)
    return app


@dataclass(frozen=True)
class TLSContexts:
    """The server TLS contexts: the mail listeners' and the https listener's (its own, for ACME's
    tls-alpn-01 and HTTP/1.1 ALPN). Loaded before privileges are dropped, so certificate files only
    root may read still work; a reload or renewal later reads files the service user can read."""

    mail: ssl.SSLContext | None
    https: ssl.SSLContext | None


def load_tls(config: Config) -> TLSContexts:
    return TLSContexts(config.ssl_context(), config.ssl_context() if "https" in config.listeners else None)


def _secret(config: Config, path: str) -> str:
    """A password kept in a file (relative to the data directory), first line; "" without a file."""
    if not path:
        return ""
    p = config.data_dir / path
    try:
        return p.read_text().splitlines()[0].strip() if p.stat().st_size else ""
    except (OSError, IndexError) as exc:
        raise SystemExit(f"postier: antispam.rspamd_password_file: cannot read {p}: {exc}") from None


async def serve(config: Config, ready: Callable[[list[tuple[str, str, int]]], None] | None = None,
                stop_event: asyncio.Event | None = None) -> None:
    # Bind first (as root when started as root), then drop privileges (server/privileges.py): every
    # component, child process and session after this line runs as the service user.
    try:
        socks = sockets.bind_all(config)
    except OSError as exc:
        raise SystemExit(f"postier: cannot listen: {exc}") from None
    try:
        tls = load_tls(config)  # certificate files are read before root is given up
        privileges.after_bind(config.server.user, config.server.group, config.server.allow_root,
                              sockets.owned_paths(config))
    except (privileges.PrivilegeError, OSError, ssl.SSLError) as exc:
        for s in socks.values():
            s.close()
        raise SystemExit(f"postier: {exc}") from None
    app = build_app(config, tls)
    await app.start()
    listeners = ListenerSet(app, ROLE_SESSIONS)
    web = app.web
    reloader = reload.Reloader(listeners)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        reload.install(reloader, config)  # SIGHUP, `postier reload`: before the first client can see us
    try:
        bound = await web.start(socks)  # serving before the mail ports open: ready means all are up
        bound += await listeners.start(socks)
    except OSError as exc:
        await web.stop()
        await app.close()
        raise SystemExit(f"postier: cannot listen: {exc}") from None
    for role, addr, port in bound:
        log.info("listening: %s on %s", role, f"{addr}:{port}" if port else addr)  # port 0: a Unix socket
    if ready:
        ready(bound)
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    reloader.started.set()
    stats_task = asyncio.create_task(stats.writer(config.data_dir))  # for `postier status`
    notify.ready(f"{len(bound)} listeners")  # bound, privileges dropped, serving (sd_notify READY=1)
    await stop.wait()
    notify.stopping()
    reload.uninstall(config)
    stats_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stats_task
    log.info("shutting down")
    await listeners.stop()
    await web.stop()
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
