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
import socket
import ssl
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..accounts import Accounts
from ..antispam.builtin import RateLimiter
from ..antispam.check import SpamCheck
from ..antispam.greylist import Greylist
from ..antispam.learning import LearnQueue
from ..antispam.rspamd import RspamdClient
from ..antispam.screening import Screener, dns_lists
from ..antispam.verdicts import VerdictLog
from ..config import HTTP_ROLES, Config
from ..mailauth import dmarc
from ..mailauth.arc import ARCSealer
from ..mailauth.keys import DKIMSigner
from ..mailauth.reports import ReportStore
from ..http.metrics import MetricsEndpoint
from ..mailauth.tlsrpt import TLSReportStore
from ..http.service import WebService
from ..web import mount as mount_webmail
from ..mailauth.srs import SRS, load_secret
from ..message.types import InboundCheck
from ..metrics import Metrics
from ..pipeline.inbound import LMTPPipeline, MXPipeline, SMTPPipeline
from ..pipeline.jobs import ReportJob
from ..pipeline.mailauth import InboundAuth
from ..pipeline.quota import QuotaWarnings
from ..pipeline.sieve import SieveFilter
from ..pipeline.submission import SubmissionPipeline
from ..queue.runner import Queue
from ..queue.spool import QueueSpool
from ..resolver import BaseResolver, make_resolver
from ..store.accountdb import open_accounts, open_key_store
from ..store.delivery import LocalDelivery
from ..store.mailbox import MailStore, on_delivery
from ..store.sieve import SieveStorage
from ..store.reportdb import open_dmarc_reports, open_tls_reports
from . import notify, privileges, reload, sockets, stats
from .base import ListenerSet, ProtocolSession, Session
from .imap import IMAPSession
from .managesieve import ManageSieveSession
from .pop3 import POP3Session
from .shared import (Bus, SharedConnections, SharedLogins, SharedRateLimiter, SharedThrottle, SharedUserSessions,
                     WorkerContext)
from .smtp import SMTPSession
from .limits import CONNECTIONS, MESSAGES, ClusterLimits, ClusterLogins, ClusterRateLimiter, ClusterUserSessions
from .throttle import AuthThrottle, ClusterThrottle, LastLogins, UserSessions, node_id

if TYPE_CHECKING:
    from ..store.cluster.store import ClusterStore

__all__ = ["ROLE_SESSIONS", "App", "build_app", "run", "run_worker", "serve"]

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
    mailstore: MailStore | ClusterStore  # IMAP and POP3 read mailboxes through it; deliveries wake IDLE through it
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
    #: Prometheus metrics (postier/metrics.py), fed by the listeners, the queue, the MDA, the resolver.
    metrics: Metrics = field(kw_only=True)
    #: IMAP: open sessions per user (`[imap] max_connections_per_user`).
    imap_user_connections: UserSessions = field(default_factory=UserSessions)
    #: POP3: when each user last logged in (RFC 2449 §6.5 LOGIN-DELAY).
    pop3_last_login: LastLogins = field(default_factory=LastLogins)
    #: `[server] workers` > 1: which worker this is, and the wake-ups between workers (server/shared.py).
    worker: WorkerContext | None = None
    bus: Bus | None = None
    _tasks: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def primary(self) -> bool:
        """This process runs what runs once per server (the queue runner, the jobs)."""
        return self.worker is None or self.worker.primary

    async def start(self) -> None:
        if self.bus is not None:
            self.bus.start()
        await self.queue.start(recover=self.worker is None)  # the supervisor recovered the spool
        if isinstance(self.throttle, ClusterThrottle):  # every worker exchanges its own failures
            self._tasks.append(asyncio.ensure_future(self.throttle.run()))
        if not self.primary:
            return
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
        if self.bus is not None:
            steps.append(self.bus.close)
        for step in steps:
            try:
                r = step()
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                log.exception("error while closing")


def build_app(config: Config, tls: TLSContexts | None = None, worker: WorkerContext | None = None) -> App:
    """Make every shared component from the configuration, each with the parts it uses (`worker`:
    one of several processes serving the same listeners and data, server/supervisor.py)."""
    accounts = open_accounts(config)  # SQLite, or PostgreSQL in cluster mode (store/accountdb.py)
    accounts.configure_logins(config.auth.login_cache_size, config.auth.login_cache_ttl, config.auth.rehash_passwords)
    # Its own registry; `postier status`'s last hour is fed from the same events. With several
    # workers the values are mapped into files the scraping worker sums (postier/metrics.py).
    metrics = Metrics(shared_dir=worker.metrics_dir if worker is not None else None)
    metrics.outcome_listeners.append(stats.count)
    # The report mailboxes `dns records` publishes (DMARC rua, TLS-RPT rua) reach the admin like
    # postmaster@ unless a user or alias of that name exists: reports sent to them are never refused.
    accounts.role_local_parts |= {a for a in (config.mailauth.report_address, config.tlsrpt.report_address)
                                  if a and "@" not in a}
    resolver = make_resolver(config.dns.nameservers, config.dns.timeout, config.dns.cache, metrics=metrics)
    # Storage: the MDA writes mail (Maildir, mbox); the mail store reads and changes it (IMAP, POP3).
    mda: LocalDelivery
    mailstore: MailStore | ClusterStore
    spool: QueueSpool | None = None  # None: this node's spool (queue/spool.py)
    sieve_storage: SieveStorage | None = None  # None: each user's home (store/sieve.py)
    if config.cluster.dsn:  # cluster mode: PostgreSQL and S3 (docs/scaling.md; the `cluster` extra)
        from ..store.cluster import require_extra
        require_extra()
        from ..queue.cluster import ClusterSpool
        from ..store.cluster.store import open_cluster
        mailstore, mda = open_cluster(config, metrics)
        # the queue every node shares; large messages are downloaded into the spool directory to be sent
        spool = ClusterSpool(mailstore, config.cluster.queue_lease, tmp_dir=config.spool_dir / "cluster-send")
        sieve_storage = mailstore.sieve_storage(config.sieve.max_scripts, config.sieve.max_script_size)
        mda.listeners.append(QuotaWarnings(config, mda).on_delivery)  # 80 % / 95 %, state in PostgreSQL
    else:
        mda = LocalDelivery(config.mail_root, agent=config.mailbox.delivery_agent, metrics=metrics)
        mailstore = MailStore(config.mail_root, config.mailbox.special_use_folders,
                              poll_interval=config.imap.idle_poll_interval, shared=worker is not None)
        mda.listeners.append(on_delivery(mailstore))
        mda.listeners.append(QuotaWarnings(config, mda).on_delivery)  # 80 % / 95 % (pipeline/quota.py)
    srs = SRS(load_secret(config.data_dir / "srs.key"))  # forwarded mail's sender (aliases, redirect)
    # TLS reporting (RFC 8460): the queue records each session's TLS outcome, the MX keeps reports
    # others send to our `_smtp._tls` rua, the report job sends ours.
    tls_reports = open_tls_reports(config)  # in cluster mode, the tables every node shares
    queue = Queue(config, accounts, mda, resolver, srs=srs, metrics=metrics,
                  tls_reports=tls_reports if config.tlsrpt.record else None, spool=spool)
    metrics.watch(queue=queue.spool.summary, data_dir=config.data_dir)  # read at scrape time
    bus = None
    if worker is not None:  # changes and new queue rows reach the other workers (server/shared.py)
        bus = Bus(worker.run_dir, worker.index, worker.workers, worker.abstract_bus)
        if isinstance(mailstore, MailStore):  # (cluster mode: every worker LISTENs to PostgreSQL itself)
            local = mailstore
            local.notifier.forward = lambda address, folder: bus.send(b"N", f"{address}\0{folder}".encode())
            bus.on(b"N", lambda data: local.changed_elsewhere(*data.decode().split("\0", 1)))
        bus.on(b"Q", lambda _data: queue.wake())
        if not worker.primary:
            queue.remote_runner = lambda: bus.send(b"Q", to=0)
    # Mail authentication: the inbound checks of port 25, the DKIM signer of submission, DMARC reports.
    dmarc_reports = open_dmarc_reports(config) if config.mailauth.dmarc else None
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
    decisions = VerdictLog(config.data_dir / "verdicts.sqlite", metrics=metrics)
    inbound_checks: tuple[InboundCheck, ...] = (
        InboundAuth(config, resolver, dmarc_reports, accounts.list_domains, tls_reports=tls_reports),
        *((spam,) if spam.active else ()),
    )
    dkim = DKIMSigner(open_key_store(config)) if config.mailauth.dkim_sign else None
    report_job = None
    send_dmarc = dmarc_reports is not None and config.mailauth.dmarc_reports
    if send_dmarc or config.tlsrpt.send_reports:
        report_job = ReportJob(config, accounts.list_domains, queue, dmarc_reports if send_dmarc else None, resolver,
                               sign=dkim.sign_bytes if dkim is not None else None,
                               tls=tls_reports if config.tlsrpt.send_reports else None)
    # RFC 8617: forwarded copies (aliases, Sieve redirect) sealed with the domain's DKIM key
    arc = ARCSealer(dkim.store, config.authserv_id) if dkim is not None and config.mailauth.arc else None
    sieve = SieveFilter(config, mda, queue, dkim, srs, mailstore, arc,
                        sieve_storage) if config.sieve.enabled else None
    # What happens between MAIL FROM and 250, per SMTP-family role.
    outbound_scan = spam if a.scan_outbound and rspamd is not None else None
    submission = functools.partial(SubmissionPipeline, config, accounts, mda, queue, dkim, outbound_scan)
    pipelines: dict[str, Callable[[], SMTPPipeline]] = {
        "smtp": functools.partial(MXPipeline, config, accounts, mda, queue, inbound_checks, sieve, srs, decisions,
                                  arc),
        "lmtp": functools.partial(LMTPPipeline, config, accounts, mda, queue, sieve=sieve, srs=srs),
        "submission": submission,
        "submissions": submission,
    }
    auth = config.auth
    tls = tls or load_tls(config)
    ssl_context = tls.mail
    # What limits logins and port 25's rates is one process's memory, or with several workers the
    # table they share (server/shared.py: same rules, counted over every worker).
    throttle: AuthThrottle
    connection_rate = RateLimiter(a.max_connections_per_minute) if a.max_connections_per_minute else None
    if worker is None:
        throttle = AuthThrottle(auth.failure_delay, auth.max_failures, auth.failure_window)
        user_sessions, last_logins = UserSessions(), LastLogins()
    else:
        throttle = SharedThrottle(worker.table, auth.failure_delay, auth.max_failures, auth.failure_window)
        user_sessions, last_logins = SharedUserSessions(worker.table, worker.index), SharedLogins(worker.table)
        if connection_rate is not None:
            connection_rate = SharedRateLimiter(worker.table, 0, a.max_connections_per_minute)
        spam.messages = SharedRateLimiter(worker.table, 1, a.max_messages_per_minute)
    if config.cluster.dsn and config.cluster.throttle_interval:
        # Failed logins of every node (docs/scaling.md): this node's count above, plus the others'
        # read in the background. With workers, each writes the failures it saw itself under the
        # node's name (none is written twice, and no worker waits for another) and reads the other
        # nodes' itself; its own node's count is the table the workers share. The same exchange
        # carries port 25's rates, IMAP sessions per user and POP3's last logins (server/limits.py),
        # each worker's under (node, its index).
        from ..store.cluster.throttle import PGThrottleExchange
        node = node_id(config.data_dir)
        interval = config.cluster.throttle_interval
        exchange = PGThrottleExchange(config.cluster.dsn, node, auth.failure_window,
                                      ClusterThrottle.ring_for(auth.max_failures), config.cluster.timeout,
                                      interval, proc=worker.index if worker is not None else 0)
        limits = ClusterLimits(interval)
        if connection_rate is not None:
            connection_rate = ClusterRateLimiter(connection_rate, limits, CONNECTIONS)
        if spam.messages.limit > 0:
            spam.messages = ClusterRateLimiter(spam.messages, limits, MESSAGES)
        user_sessions = ClusterUserSessions(user_sessions, limits)
        last_logins = ClusterLogins(last_logins, limits)
        throttle = ClusterThrottle(throttle, node, exchange, interval, limits)
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
        connection_rate=connection_rate,
        decisions=decisions,
        learning=learning,
        spam=spam,
        tls_reports=tls_reports,
        web=WebService(config, accounts, ssl_context, throttle, https_tls=tls.https, metrics=metrics),
        metrics=metrics,
        imap_user_connections=user_sessions,
        pop3_last_login=last_logins,
        worker=worker,
        bus=bus,
    )
    app.web.mount(lambda http_app: mount_webmail(http_app, app))  # the webmail (/mail/), admin (/admin/)
    acme = app.web.acme
    if bus is not None and acme is not None:  # the primary renews; every worker serves the new certificate
        acme.on_installed = lambda: bus.send(b"C")
        bus.on(b"C", lambda _data: acme.install_existing())
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


@dataclass
class Prepared:
    """What is made as root before privileges are dropped, and inherited by every worker."""

    socks: dict[str, socket.socket]
    tls: TLSContexts
    metrics: MetricsEndpoint | None = None  # [metrics] listen: bound, its token file read


def prepare(config: Config) -> Prepared:
    """Bind every listener (as root when started as root), read the certificates, then drop
    privileges (server/privileges.py): every component, child process and session after this runs
    as the service user."""
    endpoint = MetricsEndpoint(config.metrics) if config.metrics.listen else None
    try:
        socks = sockets.bind_all(config)
        if endpoint is not None:
            endpoint.bind()  # [metrics] listen, and its token file
    except OSError as exc:
        raise SystemExit(f"postier: cannot listen: {exc}") from None
    try:
        tls = load_tls(config)  # certificate files are read before root is given up
        privileges.after_bind(config.server.user, config.server.group, config.server.allow_root,
                              sockets.owned_paths(config))
    except (privileges.PrivilegeError, OSError, ssl.SSLError) as exc:
        for s in socks.values():
            s.close()
        if endpoint is not None:
            endpoint.close()
        raise SystemExit(f"postier: {exc}") from None
    return Prepared(socks, tls, endpoint)


async def serve(config: Config, ready: Callable[[list[tuple[str, str, int]]], None] | None = None,
                stop_event: asyncio.Event | None = None,
                prepared: Prepared | None = None, worker: WorkerContext | None = None) -> None:
    """Serve until SIGTERM/SIGINT (or `stop_event`). `prepared`, `worker`: the sockets and TLS
    contexts a supervisor made before forking this worker (server/supervisor.py)."""
    prep = prepared if prepared is not None else prepare(config)
    socks, tls, endpoint = prep.socks, prep.tls, prep.metrics
    app = build_app(config, tls, worker)
    await app.start()
    listeners = ListenerSet(app, ROLE_SESSIONS)
    if worker is not None:
        listeners.shared = SharedConnections(worker.table, worker.index)
    web = app.web
    reloader = reload.Reloader(listeners, rebind=worker is None,
                               handed=worker.handed_sockets if worker is not None else None)
    with contextlib.suppress(NotImplementedError, RuntimeError):
        # SIGHUP, `postier reload`: before the first client can see us (a supervisor keeps the pid file)
        reload.install(reloader, config, write_pid=worker is None)
    try:
        if app.primary:
            bound = await web.start(socks)  # serving before the mail ports open: ready means all are up
            if endpoint is not None:  # every worker's counts, summed (postier/metrics.py)
                bound.append(await endpoint.start(app.metrics))
        else:
            # http/https are served by the primary worker alone: web sessions, ACME challenges and
            # renewals live in its memory (docs/scaling.md); this worker leaves those sockets to it.
            bound = []
            if web.acme is not None:
                web.acme.install_existing()  # the issued certificate for this worker's mail listeners
            for role in HTTP_ROLES:
                if role in socks:
                    socks.pop(role).close()
            if endpoint is not None:
                endpoint.close()
                endpoint = None
        bound += await listeners.start(socks)
    except OSError as exc:
        if endpoint is not None:
            await endpoint.stop()
        await web.stop()
        await app.close()
        raise SystemExit(f"postier: cannot listen: {exc}") from None
    for role, addr, port in bound:
        if app.primary:
            log.info("listening: %s on %s", role, f"{addr}:{port}" if port else addr)  # port 0: a Unix socket
    if ready:
        ready(bound)
    if worker is not None:
        worker.ready()
    stop = stop_event or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    reloader.started.set()
    # made once, off the loop, before a first login or DMARC check would wait for them
    loop.run_in_executor(None, app.accounts.dummy_hash)
    loop.run_in_executor(None, dmarc.suffix_list)
    if worker is None:
        stats.clear_workers(config.data_dir)  # (a supervisor clears them before forking)
    # `postier status`'s last hour: each worker writes its own counts (server/stats.py)
    stats_task = asyncio.create_task(stats.writer(config.data_dir, worker.index if worker is not None else 0))
    notify.ready(f"{len(bound)} listeners")  # bound, privileges dropped, serving (sd_notify READY=1)
    await stop.wait()
    notify.stopping()
    if worker is None:
        reload.uninstall(config)
    stats_task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stats_task
    log.info("shutting down")
    await listeners.stop()
    await web.stop()
    if endpoint is not None:
        await endpoint.stop()
    await app.close()
    log.info("stopped")


def run(config: Config, ready: Callable[[list[tuple[str, str, int]]], None] | None = None) -> None:
    """Run the server until a signal (uses uvloop when installed); `[server] workers` > 1: a
    supervisor and its worker processes (server/supervisor.py)."""
    from .supervisor import supervise, worker_count

    n = worker_count(config)
    if n > 1:
        code = supervise(config, n, prepare, run_worker)
        if code:
            raise SystemExit(code)
        return
    _loop_run(serve(config, ready))


def run_worker(config: Config, prepared: Prepared, worker: WorkerContext) -> None:
    """One worker of a supervisor: serve on the sockets it bound, until SIGTERM."""
    _loop_run(serve(config, prepared=prepared, worker=worker))


def _loop_run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main)
    else:
        uvloop.run(main)
