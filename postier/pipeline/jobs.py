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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..mailauth import tlsrpt
from ..mailauth.reports import (
    DAY, OutgoingReport, ReportStore, build_reports, external_destination_ok, parse_rua, report_message,
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


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One destination's turn with a report (`ReportJob._deliver`): the status logged with `rua`
    ("": nothing logged), the (policy domain, address) it was queued for, whether the destination
    has the report now (queued, or posted: not tried again), and whether the report must be tried
    again next run for it."""

    rua: str = ""
    status: str = ""
    queued: tuple[str, str] | None = None
    reached: bool = False
    again: bool = False


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

    async def _claimed(self, store: ReportDB[Any], name: str, now: float,
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
        end = int(now // DAY * DAY)
        due = [(end // DAY, domain) for domain in await asyncio.to_thread(self.store.pending_domains, end)]
        return await self._send_due(self.store, now, due, functools.partial(self._send_dmarc, now, end))

    async def send_tls(self, now: float, end: int) -> list[tuple[str, str]]:
        """TLS reports (RFC 8460 §4) of the outcomes recorded before `end` (midnight; `now` to report
        today's so far), one per policy domain and day, to the rua of the domain's `_smtp._tls` record,
        each under a claim of its own."""
        assert self.tls is not None
        rua_of: dict[str, tuple[str, ...] | None] = {}
        due = await asyncio.to_thread(self.tls.pending_reports, end)
        return await self._send_due(self.tls, now, due, functools.partial(self._send_tls, now, end, rua_of))

    async def _send_due(self, store: ReportDB[Any], now: float, due: list[tuple[int, str]],
                        send: Callable[[int, str], Awaitable[tuple[list[tuple[str, str]], bool]]]
                        ) -> list[tuple[str, str]]:
        """Each report due ((day, policy domain)) sent by `send` under its claim (`_claimed`, named
        by the store's kind), then the rows older than the kind keeps and the leases that ran out
        forgotten: what was handed to the queue."""
        sent: list[tuple[str, str]] = []
        for day, domain in due:
            sent += await self._claimed(store, claim_name(store.kind.name, day, domain), now,
                                        functools.partial(send, day, domain))
        await asyncio.to_thread(store.prune, now - store.kind.keep_days * DAY)
        await asyncio.to_thread(store.forget_claims, now)
        return sent

    async def _deliver[R, D](self, store: ReportDB[Any], now: float,
                             reports: Sequence[tuple[R, Sequence[tuple[int, int]], Sequence[D]]],
                             attempt: Callable[[R, D], Awaitable[_Attempt]],
                             log_sent: Callable[[R, str, str, float], None]) -> tuple[list[tuple[str, str]], bool]:
        """Each of one claim's reports (report, the (row id, count) pairs it covers, its
        destinations) to each destination (`attempt`), the outcome logged (`log_sent`); the rows of
        a report that every destination is done with are marked reported, one that a destination
        could not take now (DNS trouble, the queue failed) stays for the next run. What was queued,
        and whether the claim may be let go (every report done, or no destination reached)."""
        sent: list[tuple[str, str]] = []
        done: list[tuple[int, int]] = []
        complete, reached = True, False
        for report, taken, destinations in reports:
            finished = True
            for destination in destinations:
                step = await attempt(report, destination)
                if step.status:
                    await asyncio.to_thread(log_sent, report, step.rua, step.status, now)
                if step.queued is not None:
                    sent.append(step.queued)
                reached = reached or step.reached
                finished = finished and not step.again
            if finished:
                done.extend(taken)
            complete = complete and finished
        if done:
            await asyncio.to_thread(store.mark_reported, done)
        return sent, complete or not reached

    async def _send_dmarc(self, now: float, end: int, _day: int, domain: str
                          ) -> tuple[list[tuple[str, str]], bool]:
        """The reports about `domain` (one per policy and rua it published), under its claim."""
        assert self.store is not None
        pending = await asyncio.to_thread(self.store.pending, end, domain)  # read under the claim
        sender = await asyncio.to_thread(self.sender_address)
        outgoing = build_reports(pending, org_name=self.submitter, email=sender, submitter=self.submitter, end=end)

        async def attempt(out: OutgoingReport, target: tuple[str, int | None, int]) -> _Attempt:
            address, limit, size = target
            policy_domain = out.report.policy.domain
            if limit is not None and size > limit:
                log.info("dmarc: report for %s too big for %s (%d > %d bytes)", policy_domain, address, size, limit)
                return _Attempt(address, "too-big")
            ok = await external_destination_ok(policy_domain, address.rpartition("@")[2], self.resolver)
            if ok is None:
                log.info("dmarc: cannot check %s for %s now (DNS); next run", address, policy_domain)
                return _Attempt(again=True)
            if not ok:
                log.info("dmarc: %s did not authorize reports for %s (RFC 7489 §7.1)", address, policy_domain)
                return _Attempt(address, "not-authorized")
            if await self._enqueue(report_message(out, sender, address, now), sender, address):
                return _Attempt(address, "queued", (policy_domain, address), reached=True)
            return _Attempt(again=True)

        reports = []
        for out in outgoing:
            size = len(out.gzipped())
            reports.append((out, out.taken, [(address, limit, size) for address, limit in parse_rua(out.rua)]))
        return await self._deliver(self.store, now, reports, attempt, self.store.log_sent)

    async def _send_tls(self, now: float, end: int, rua_of: dict[str, tuple[str, ...] | None], day: int,
                        domain: str) -> tuple[list[tuple[str, str]], bool]:
        """The report about `domain` on `day`, under its claim."""
        assert self.tls is not None
        pending = await asyncio.to_thread(self.tls.pending, end, day, domain)  # read under the claim
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

        async def attempt(rep: tlsrpt.TLSReport, uri: str) -> _Attempt:
            if uri.lower().startswith("https:"):  # not retried: the other rua may have taken it
                return _Attempt(uri[:200], await self._post_tls(rep, uri), reached=True)
            targets = parse_rua([uri])
            if not targets:
                log.info("tlsrpt: %s: rua %s not usable", domain, uri[:100])
                return _Attempt(uri[:200], "not-supported")
            address = targets[0][0]
            message = tlsrpt.report_message(rep, self.submitter, sender, address, now)
            if not await self._enqueue(message, sender, address, role=TLS_REPORT_ROLE):
                return _Attempt(again=True)
            log.info("tlsrpt: report %s for %s queued for %s (%d ok, %d failed)", rep.report_id, domain,
                     address, rep.successes, rep.failed)
            return _Attempt(address, "queued", (domain, address), reached=True)

        # §3: no rua (no single, valid record): the domain does not want reports
        return await self._deliver(self.tls, now, [(rep, taken, rua)], attempt, self.tls.log_sent)

    async def _post_tls(self, rep: tlsrpt.TLSReport, url: str) -> str:
        """RFC 8460 §3: an https rua gets the gzip'd report in a POST; the status logged."""
        if not isinstance(self.resolver, BaseResolver):
            why = "no resolver for HTTPS"
        else:
            why = await post_report(url, gzip.compress(tlsrpt.report_json(rep), mtime=0), tlsrpt.MEDIA_TYPE,
                                    self.resolver, self.config.outbound.ca_file)
        if why:
            log.info("tlsrpt: report %s for %s not taken by %s: %s", rep.report_id, rep.domains[0], url[:100], why)
        else:
            log.info("tlsrpt: report %s for %s posted to %s", rep.report_id, rep.domains[0], url[:100])
        return "posted" if not why else "post-failed"

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
