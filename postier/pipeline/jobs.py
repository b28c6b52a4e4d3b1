"""Jobs the server runs on its own schedule: the daily reports, DMARC aggregate (RFC 7489 §7.2) and
SMTP TLS (RFC 8460 §4, §5.3).

A job sends mail like any other sender, through the outbound queue (`Enqueuer`), DKIM-signed when
signing is on; what it sends is built by the pure functions of `mailauth/reports.py` and
`mailauth/tlsrpt.py`. Jobs are made and started by `server/app.py` `build_app` (`postier tls
report-now` runs the TLS half once, from the command line); time and sleep are injectable, so tests
step them by hand.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..mailauth import tlsrpt
from ..mailauth.reports import (
    DAY, KEEP_DAYS, ReportStore, build_reports, external_destination_ok, parse_rua, report_message,
)
from ..mailauth.reportdb import ReportDB, claim_name
from ..mailauth.tlsrpt import TLSReportStore
from ..message.types import Enqueuer, Envelope, MessageBody
from ..queue.spool import TLS_REPORT_ROLE
from ..queue.tlsrpt import post_report
from ..resolver import AsyncLookup, BaseResolver, DNSStatus

__all__ = ["Clock", "ReportJob", "Sleep"]

log = logging.getLogger("postier.dmarc")

Clock = Callable[[], float]
CLAIM_LEASE = 3600.0  # seconds a run holds one report's claim at most (longer than sending one takes)
Sleep = Callable[[float], Awaitable[Any]]


@dataclass
class ReportJob:
    """The daily report run, inside the server: DMARC aggregate reports (with `store`) and TLS reports
    (with `tls`).

    Each run (at 00:00 UTC) reports every result recorded before that midnight, then forgets
    results older than KEEP_DAYS. A run holds one report's claim while it sends that report
    (`_claimed`): in cluster mode every node runs the job on the shared store, the nodes share the
    reports between them and each is sent once. A report whose destination cannot be checked (DNS
    trouble) or queued (the queue failed) stays pending for the next run.
    """

    config: Config
    local_domains: Callable[[], list[str]]
    queue: Enqueuer
    store: ReportStore | None
    resolver: AsyncLookup
    clock: Clock = time.time
    sleep: Sleep = asyncio.sleep
    sign: Callable[[bytes], Awaitable[bytes]] | None = None  # the DKIM signer's `sign_bytes`, when signing
    tls: TLSReportStore | None = None
    _task: asyncio.Task[None] | None = field(default=None, init=False)

    @property
    def submitter(self) -> str:
        return self.config.hostname

    def sender_address(self) -> str:
        domains = self.local_domains()
        return f"postmaster@{domains[0] if domains else self.config.hostname}"

    async def run_once(self, now: float | None = None) -> list[tuple[str, str]]:
        """Send what is due; returns (policy domain, rua address) per report handed to the queue."""
        now = self.clock() if now is None else now
        sent = await self.send_dmarc(now) if self.store is not None else []
        if self.tls is not None:
            sent += await self.send_tls(now, int(now // DAY * DAY))
        return sent

    async def _claimed(self, store: ReportDB, name: str, now: float,
                       run: Callable[[], Awaitable[tuple[list[tuple[str, str]], bool]]]) -> list[tuple[str, str]]:
        """`run` (one report: it reads that report's rows, sends it and marks them reported; it
        returns what it sent and whether the report is done) under the store's claim `name`
        (`reportdb.claim_name`): with the store shared (cluster mode) the job may run on every node
        at once; each report is sent by the node that takes its claim, while the others go on with
        the next one, and a run that takes the claim after the holder let go finds the rows
        reported and sends nothing. A report that some destinations took while others did not (DNS
        trouble, the queue refused it for one) stays pending and keeps its claim until the lease
        (CLAIM_LEASE) runs out, so that no other node sends it again that night to the destinations
        that have it: the next day's run does, as on one machine; so does a node that dies
        mid-send. One that no destination took is let go (`run` says it may be), and may be tried
        again at once."""
        until = now + CLAIM_LEASE
        if not await asyncio.to_thread(store.claim, name, until, now):
            log.info("%s: another process is sending this report now", name)
            return []
        sent, done = await run()
        if done:
            await asyncio.to_thread(store.release, name, until)
        return sent

    async def send_dmarc(self, now: float) -> list[tuple[str, str]]:
        """DMARC aggregate reports (RFC 7489 §7.2) of the results recorded before midnight, each
        policy domain's under a claim of its own."""
        assert self.store is not None
        store = self.store
        end = int(now // DAY * DAY)
        sent: list[tuple[str, str]] = []
        for domain in await asyncio.to_thread(store.pending_domains, end):
            sent += await self._claimed(store, claim_name("dmarc", end // DAY, domain), now,
                                        functools.partial(self._send_dmarc, now, end, domain))
        await asyncio.to_thread(store.prune, now - KEEP_DAYS * DAY)
        await asyncio.to_thread(store.forget_claims, now)
        return sent

    async def send_tls(self, now: float, end: int) -> list[tuple[str, str]]:
        """TLS reports (RFC 8460 §4) of the outcomes recorded before `end` (midnight; `now` to report
        today's so far), one per policy domain and day, to the rua of the domain's `_smtp._tls` record,
        each under a claim of its own."""
        assert self.tls is not None
        store = self.tls
        sent: list[tuple[str, str]] = []
        rua_of: dict[str, tuple[str, ...] | None] = {}
        for day, domain in await asyncio.to_thread(store.pending_reports, end):
            sent += await self._claimed(store, claim_name("tlsrpt", day, domain), now,
                                        functools.partial(self._send_tls, now, end, day, domain, rua_of))
        await asyncio.to_thread(store.prune, now - tlsrpt.KEEP_DAYS * DAY)
        await asyncio.to_thread(store.forget_claims, now)
        return sent

    async def _send_dmarc(self, now: float, end: int, domain: str) -> tuple[list[tuple[str, str]], bool]:
        """The reports about `domain` (one per policy and rua it published), under its claim: what
        was sent, and whether its claim may be let go (every report done, or none sent)."""
        assert self.store is not None
        pending = await asyncio.to_thread(self.store.pending, end, domain)  # read under the claim
        sender = await asyncio.to_thread(self.sender_address)
        outgoing = build_reports(pending, org_name=self.submitter, email=sender, submitter=self.submitter, end=end)
        sent: list[tuple[str, str]] = []
        done: list[tuple[int, int]] = []
        complete = True
        for out in outgoing:
            finished = True
            data = out.gzipped()
            for address, limit in parse_rua(out.rua):
                if limit is not None and len(data) > limit:
                    log.info("dmarc: report for %s too big for %s (%d > %d bytes)", out.report.policy.domain,
                             address, len(data), limit)
                    await asyncio.to_thread(self.store.log_sent, out, address, "too-big", now)
                    continue
                ok = await external_destination_ok(out.report.policy.domain, address.rpartition("@")[2],
                                                   self.resolver)
                if ok is None:
                    finished = False
                    log.info("dmarc: cannot check %s for %s now (DNS); next run", address, out.report.policy.domain)
                    continue
                if not ok:
                    log.info("dmarc: %s did not authorize reports for %s (RFC 7489 §7.1)", address,
                             out.report.policy.domain)
                    await asyncio.to_thread(self.store.log_sent, out, address, "not-authorized", now)
                    continue
                if await self._enqueue(report_message(out, sender, address, now), sender, address):
                    sent.append((out.report.policy.domain, address))
                    await asyncio.to_thread(self.store.log_sent, out, address, "queued", now)
                else:
                    finished = False
            if finished:
                done.extend(out.taken)
            complete = complete and finished
        await asyncio.to_thread(self.store.mark_reported, done)
        return sent, complete or not sent

    async def _send_tls(self, now: float, end: int, day: int, domain: str,
                        rua_of: dict[str, tuple[str, ...] | None]) -> tuple[list[tuple[str, str]], bool]:
        """The report about `domain` on `day`, under its claim: what was sent, and whether its claim
        may be let go (the report done, or no destination reached)."""
        assert self.tls is not None
        store = self.tls
        pending = await asyncio.to_thread(store.pending, end, day, domain)  # read under the claim
        if not pending:
            return [], True  # another node sent it after we listed it
        sender = await asyncio.to_thread(self.sender_address)
        [rep] = tlsrpt.build_reports([(d, r, n) for _, d, r, n in pending], org_name=self.submitter,
                                     contact=sender, submitter=self.submitter, end=end)
        taken = [(rid, n) for rid, _, _, n in pending]
        if domain not in rua_of:
            rua_of[domain] = await self._tlsrpt_rua(domain)
        rua = rua_of[domain]
        if rua is None:  # DNS trouble: next run
            return [], False
        sent: list[tuple[str, str]] = []
        finished = True
        posted = False
        for uri in rua:  # §3: none (no single, valid record): the domain does not want reports
            if uri.lower().startswith("https:"):
                await self._post_tls(rep, uri, now)  # not retried: the other rua may have taken it
                posted = True
                continue
            targets = parse_rua([uri])
            if not targets:
                log.info("tlsrpt: %s: rua %s not usable", domain, uri[:100])
                await asyncio.to_thread(store.log_sent, rep, uri[:200], "not-supported", now)
                continue
            address = targets[0][0]
            message = tlsrpt.report_message(rep, self.submitter, sender, address, now)
            if await self._enqueue(message, sender, address, role=TLS_REPORT_ROLE):
                sent.append((domain, address))
                await asyncio.to_thread(store.log_sent, rep, address, "queued", now)
                log.info("tlsrpt: report %s for %s queued for %s (%d ok, %d failed)", rep.report_id, domain,
                         address, rep.successes, rep.failed)
            else:
                finished = False
        if finished:
            await asyncio.to_thread(store.mark_reported, taken)
        return sent, finished or not (sent or posted)

    async def _post_tls(self, rep: tlsrpt.TLSReport, url: str, now: float) -> None:
        """RFC 8460 §3: an https rua gets the gzip'd report in a POST."""
        assert self.tls is not None
        if not isinstance(self.resolver, BaseResolver):
            why = "no resolver for HTTPS"
        else:
            why = await post_report(url, gzip.compress(tlsrpt.report_json(rep), mtime=0), tlsrpt.MEDIA_TYPE,
                                    self.resolver, self.config.outbound.ca_file)
        if why:
            log.info("tlsrpt: report %s for %s not taken by %s: %s", rep.report_id, rep.domains[0], url[:100], why)
        else:
            log.info("tlsrpt: report %s for %s posted to %s", rep.report_id, rep.domains[0], url[:100])
        await asyncio.to_thread(self.tls.log_sent, rep, url[:200], "posted" if not why else "post-failed", now)

    async def _tlsrpt_rua(self, domain: str) -> tuple[str, ...] | None:
        """The rua of `domain`'s `_smtp._tls` record (RFC 8460 §3); () without one, None on DNS trouble."""
        ans = await self.resolver.query(f"_smtp._tls.{domain}", "TXT")
        if ans.status is DNSStatus.TEMPFAIL:
            log.info("tlsrpt: cannot look up _smtp._tls.%s now (DNS); next run", domain)
            return None
        return tlsrpt.parse_record(bytes(r).decode("utf-8", "replace") for r in ans.records) or ()

    async def _enqueue(self, message: bytes, sender: str, address: str, role: str = "dmarc-report") -> bool:
        prefix = b""
        if self.sign is not None:  # RFC 8460 §5.3: a report mail MUST be DKIM-signed
            try:
                prefix = await self.sign(message)
            except Exception:
                log.exception("%s: signing the report failed; sending it unsigned", role)
        env = Envelope(role=role, peer_ip="127.0.0.1", helo=self.config.helo_name, mail_from=sender)
        body = MessageBody(self.config.spool_dir / "outgoing")
        body.write(message)
        try:
            await self.queue.enqueue(env, [address], prefix, body)
        except Exception:
            log.exception("%s: queueing the report for %s failed; kept for the next run", role, address)
            return False
        finally:
            body.close()
        return True

    async def _loop(self) -> None:
        while True:
            now = self.clock()
            await self.sleep(max(1.0, (now // DAY + 1) * DAY - now + 60))  # a minute after midnight UTC
            try:
                await self.run_once()
            except Exception:
                log.exception("report run failed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="daily-reports")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
