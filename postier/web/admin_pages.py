"""The admin console's status pages: DNS records (RFC 7208 SPF, RFC 6376 DKIM, RFC 7489 DMARC, RFC 7671
DANE, ...) with what the live DNS says, the certificate, the outbound queue (list, show, retry, delete),
received DMARC aggregate reports (RFC 7489 §7.2) as a table and a chart, the inbound decision log with
`postier why`'s explanations, and the server's health.

Every page reuses the code of the matching command, not a second copy: `postier dns records|check`
(`mailauth.records`), `postier cert status` (`acme.store`, `server.health`), `postier queue`
(`queue.spool.Spool`), `postier dmarc reports` (`mailauth.reports.ReportStore`), `postier why`
(`antispam.verdicts.VerdictLog`), `postier status` (`server.health`). Changes (queue retry and delete) are
POSTs with the CSRF token, logged with the admin who made them.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..acme.store import CertStore, certificate_files, tlsa_keys
from ..antispam.verdicts import Verdict
from ..store.accountdb import open_key_store
from ..store.reportdb import open_dmarc_reports
from ..mailauth.records import Finding, Record, check_domain, expected_records, public_addresses
from ..mailauth.reports import ReceivedReport
from ..message.types import User
from ..queue.cluster import open_spool
from ..queue.spool import QUEUED, Attempt, MessageInfo, QueueSpool, RecipientState, valid_id
from ..server import health
from .forms import _field, _form, _q
from .sessions import WebSession

if TYPE_CHECKING:
    from .admin import AdminConsole

__all__ = ["AdminPages"]

log = logging.getLogger("postier.admin")

MAX_QUEUE_ROWS = 1000
MAX_LOG_ROWS = 50
MAX_REPORT_DAYS = 60  # the DMARC chart's width, in days


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if t else "-"


@dataclass
class _DayBar:
    day: str
    passed: int = 0
    failed: int = 0


@dataclass
class _TLSRow:
    day: str
    domain: str
    policy: str  # STS | TLSA | NO_POLICY
    reporter: str
    successes: int
    failures: int
    kinds: str  # the failures' result types with their counts
    authenticated: bool


@dataclass
class _SourceRow:
    day: str
    domain: str
    source: str
    reporter: str
    passed: int = 0
    failed: int = 0


@dataclass
class _Chart:
    width: int
    height: int
    bars: list[dict[str, Any]] = field(default_factory=list)
    top: int = 0


class AdminPages:
    def __init__(self, console: AdminConsole) -> None:
        self.console = console
        self.web = console.web
        self.config = console.web.config

    def mount(self, app: web.Application) -> None:
        w, area = self.web, self.console.area
        for path, fn in (("/admin/dns", self.dns), ("/admin/queue", self.queue), ("/admin/dmarc", self.dmarc),
                         ("/admin/log", self.decisions), ("/admin/health", self.health)):
            app.router.add_get(path, w._wrap(w._authed(fn, area)))
        app.router.add_post("/admin/queue", w._wrap(w._authed(self.queue_action, area)))

    def _render(self, template: str, s: WebSession, user: User, **ctx: Any) -> web.Response:
        return self.web._page(template, admin_user=user.address, csrf=s.csrf, q=_q, when=_when, **ctx)

    # -- DNS and certificate --------------------------------------------------------------------------

    async def dns(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """Every record of `postier dns records` for one domain, with the live check's verdict."""
        domains = await asyncio.to_thread(self.console.accounts.list_domains)
        domain = request.query.get("d") or (domains[0] if domains else "")
        if domain and domain not in domains:
            raise web.HTTPNotFound(text="not a local domain\n")
        cfg = self.config
        records: list[Record] = []
        findings: list[Finding] = []
        if domain:
            def gather() -> tuple[list[Record], Any, list[str], list[tuple[str, str]]]:
                keys = open_key_store(cfg).keys(domain)
                addresses = public_addresses(cfg)
                tlsa = tlsa_keys(cfg)
                return expected_records(cfg, domain, keys, addresses, tlsa), keys, addresses, tlsa
            records, keys, addresses, tlsa = await asyncio.to_thread(gather)
            findings = await check_domain(cfg, domain, self.web.services.resolver, keys, addresses, tlsa)
        cert = await asyncio.to_thread(self._certificate)
        return self._render("admin_dns.html", s, user, domains=domains, domain=domain, records=records,
                            findings=findings, cert=cert)

    def _certificate(self) -> dict[str, Any]:
        """`postier cert status` in short: the certificate in service and the ACME renewals' state."""
        cfg = self.config
        lines = health.Report()
        health._certificate(cfg, lines)
        files = certificate_files(cfg)
        out: dict[str, Any] = {"lines": lines.lines, "file": str(files[0]) if files else "", "acme": cfg.acme.enabled}
        if cfg.acme.enabled:
            st = CertStore(cfg.data_dir).state()
            out.update(last_attempt=_when(st.last_attempt), last_success=_when(st.last_success),
                       last_error=st.last_error, failures=st.failures, next_attempt=_when(st.next_attempt))
        return out

    # -- the outbound queue ---------------------------------------------------------------------------

    def _spool(self) -> QueueSpool:
        return open_spool(self.config)  # as `postier queue` opens it

    async def queue(self, request: web.Request, s: WebSession, user: User, error: str = "", message: str = "",
                    status: int = 200) -> web.StreamResponse:
        msg_id = request.query.get("id", "").upper()

        def gather() -> tuple[list[tuple[MessageInfo, list[RecipientState]]], MessageInfo | None,
                              list[RecipientState], list[Attempt]]:
            spool = self._spool()
            try:
                if msg_id and valid_id(msg_id):
                    info = spool.message(msg_id)
                    if info is not None:
                        return [], info, spool.recipients(msg_id), spool.attempts(msg_id)
                return spool.list_messages(MAX_QUEUE_ROWS), None, [], []
            finally:
                spool.close()
        rows, info, rcpts, attempts = await asyncio.to_thread(gather)
        if msg_id and info is None and not error:
            error = f"No such message in the queue: {msg_id}"
            status = 404
        resp = self._render("admin_queue.html", s, user, rows=rows, info=info, rcpts=rcpts, attempts=attempts,
                            queued=QUEUED, error=error, message=message)
        resp.set_status(status)
        return resp

    async def queue_action(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """Retry (one message or all) or delete (without a DSN), as `postier queue retry|delete`."""
        form = await _form(request)
        op, msg_id = _field(form, "op"), _field(form, "id").strip().upper()
        if op not in ("retry", "retry_all", "delete"):
            raise web.HTTPBadRequest(text="unknown action\n")
        if op != "retry_all" and not valid_id(msg_id):
            raise web.HTTPBadRequest(text="not a queue id\n")

        def run() -> tuple[int, str]:
            spool = self._spool()
            try:
                if op == "retry_all":
                    n = spool.retry(None, time.time())
                    return n, f"queue retry --all: {n} recipient(s) rescheduled"
                found = spool.message(msg_id)
                if found is None:
                    return -1, ""
                if op == "retry":
                    n = spool.retry(msg_id, time.time())
                    return n, f"queue retry {msg_id}: {n} recipient(s) rescheduled"
                pending = [r.address for r in spool.recipients(msg_id) if r.status == QUEUED]
                if not spool.delete(msg_id):
                    return -1, ""
                return 1, (f"queue delete {msg_id}: removed without a DSN, from <{found.sender}>, "
                           f"{len(pending)} undelivered recipient(s) ({', '.join(pending[:10])})")
            finally:
                spool.close()
        n, action = await asyncio.to_thread(run)
        if n < 0:
            return await self.queue(request, s, user, error=f"No such message in the queue: {msg_id}", status=404)
        log.info("%s, by %s (admin console)", action, user.address)  # the audit line, with who did it
        if op != "delete":
            self.web.services.queue.wake()  # the runner picks the rescheduled recipients up now
        raise web.HTTPSeeOther("/admin/queue")

    # -- DMARC reports --------------------------------------------------------------------------------

    async def dmarc(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """Received aggregate reports: pass/fail per day and source, and a bar chart of the days."""
        path = self.config.data_dir / "dmarc.sqlite"
        shared = self.web.services.dmarc_reports  # None with `[mailauth] dmarc` off

        def gather() -> list[ReceivedReport]:
            if shared is not None:  # the server's store (in cluster mode every node's reports)
                return shared.received()
            if not self.config.cluster.dsn and not path.exists():
                return []
            store = open_dmarc_reports(self.config)
            try:
                return store.received()
            finally:
                store.close()
        reports = await asyncio.to_thread(gather)
        days: dict[str, _DayBar] = {}
        rows: dict[tuple[str, str, str, str], _SourceRow] = {}
        for rr in reports:
            rep = rr.report
            day = datetime.datetime.fromtimestamp(rep.begin, datetime.UTC).strftime("%Y-%m-%d")
            bar = days.setdefault(day, _DayBar(day))
            for row in rep.rows:
                ok = row.dkim == "pass" or row.spf == "pass"  # RFC 7489 §6.6.2: either aligned pass
                key = (day, rep.policy.domain, row.source_ip, rep.org_name)
                src = rows.setdefault(key, _SourceRow(*key))
                if ok:
                    bar.passed += row.count
                    src.passed += row.count
                else:
                    bar.failed += row.count
                    src.failed += row.count
        bars = sorted(days.values(), key=lambda b: b.day)[-MAX_REPORT_DAYS:]
        table = sorted(rows.values(), key=lambda r: (r.day, r.domain, -r.failed, r.source), reverse=True)
        tls = await asyncio.to_thread(self._tls_rows)
        return self._render("admin_dmarc.html", s, user, chart=_chart(bars), table=table, reports=len(reports),
                            tls_rows=tls)

    def _tls_rows(self) -> list[_TLSRow]:
        """Received TLS reports (RFC 8460 §4.4), one row per report and policy, newest first."""
        store = self.web.services.tls_reports
        if store is None:
            return []
        out = []
        for rr in reversed(store.received(limit=MAX_LOG_ROWS)):
            rep = rr.report
            day = datetime.datetime.fromtimestamp(rep.start, datetime.UTC).strftime("%Y-%m-%d")
            for p in rep.policies:
                kinds: dict[str, int] = {}
                for f in p.failures:
                    kinds[f.result_type] = kinds.get(f.result_type, 0) + f.count
                out.append(_TLSRow(day, p.policy.domain, p.policy.type, rep.org_name, p.successes, p.failed,
                                   ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items())), rr.authenticated))
        return out

    # -- the decision log -----------------------------------------------------------------------------

    async def decisions(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """`postier why` for a queue id, a Message-ID or an address (sender or recipient)."""
        query = " ".join(request.query.get("q", "").split())[:320]
        found: list[Verdict] = []
        vlog = self.web.services.decisions
        if query and vlog is not None:
            if "@" in query and not query.startswith("<"):
                found = await asyncio.to_thread(vlog.find_address, query, MAX_LOG_ROWS)
            else:
                found = await asyncio.to_thread(vlog.find, query, MAX_LOG_ROWS)
        return self._render("admin_log.html", s, user, query=query, found=found)

    # -- health ---------------------------------------------------------------------------------------

    async def health(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """`postier status`: the process, each listener, the certificate, queue, last hour and disk."""
        cfg = self.config

        report = await asyncio.to_thread(health.check_all, cfg)
        sessions = self.web.services.imap_user_connections.total()
        report.lines.append((True, f"connections: {sessions} IMAP session(s), "
                                   f"{len(self.web.sessions)} webmail session(s) open"))
        return self._render("admin_health.html", s, user, lines=report.lines, problems=report.problems)


def _chart(bars: list[_DayBar], width: int = 640, height: int = 160) -> _Chart:
    """A stacked bar chart (pass below, fail above) as SVG geometry, drawn by the template."""
    chart = _Chart(width, height)
    if not bars:
        return chart
    top = max(b.passed + b.failed for b in bars) or 1
    chart.top = top
    plot = height - 20
    step = width / len(bars)
    w = max(2.0, step * 0.7)
    for i, b in enumerate(bars):
        hp = plot * b.passed / top
        hf = plot * b.failed / top
        x = i * step + (step - w) / 2
        chart.bars.append({"day": b.day, "x": round(x, 1), "w": round(w, 1), "passed": b.passed, "failed": b.failed,
                           "yp": round(plot - hp, 1), "hp": round(hp, 1), "yf": round(plot - hp - hf, 1),
                           "hf": round(hf, 1)})
    return chart
