"""Jobs the server runs on its own schedule: the daily DMARC aggregate reports (RFC 7489 §7.2).

A job sends mail like any other sender, through the outbound queue (`Enqueuer`); what it sends is
built by the pure functions of `mailauth/reports.py`. Jobs are made and started by
`server/app.py` `build_app`; time and sleep are injectable, so tests step them by hand.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import Config
from ..mailauth.reports import (
    DAY, KEEP_DAYS, OutgoingReport, ReportStore, build_reports, external_destination_ok, parse_rua, report_message,
)
from ..message.types import Enqueuer, Envelope, MessageBody
from ..resolver import AsyncLookup

__all__ = ["Clock", "ReportJob", "Sleep"]

log = logging.getLogger("postier.dmarc")

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[Any]]


@dataclass
class ReportJob:
    """The daily aggregate report run, inside the server.

    Each run (at 00:00 UTC) reports every result recorded before that midnight, then forgets
    results older than KEEP_DAYS. A report whose destination cannot be checked (DNS trouble) or
    queued (the queue failed) stays pending for the next run.
    """

    config: Config
    local_domains: Callable[[], list[str]]
    queue: Enqueuer
    store: ReportStore
    resolver: AsyncLookup
    clock: Clock = time.time
    sleep: Sleep = asyncio.sleep
    sign: Callable[[bytes], Awaitable[bytes]] | None = None  # the DKIM signer's `sign_bytes`, when signing
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
        end = int(now // DAY * DAY)
        pending = await asyncio.to_thread(self.store.pending, end)
        sender = await asyncio.to_thread(self.sender_address)
        outgoing = build_reports(pending, org_name=self.submitter, email=sender, submitter=self.submitter, end=end)
        sent: list[tuple[str, str]] = []
        done: list[int] = []
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
                if await self._enqueue(out, sender, address, now):
                    sent.append((out.report.policy.domain, address))
                    await asyncio.to_thread(self.store.log_sent, out, address, "queued", now)
                else:
                    finished = False
            if finished:
                done.extend(out.evaluation_ids)
        await asyncio.to_thread(self.store.mark_reported, done)
        await asyncio.to_thread(self.store.prune, now - KEEP_DAYS * DAY)
        return sent

    async def _enqueue(self, out: OutgoingReport, sender: str, address: str, now: float) -> bool:
        message = report_message(out, sender, address, now)
        prefix = b""
        if self.sign is not None:
            try:
                prefix = await self.sign(message)
            except Exception:
                log.exception("dmarc: signing the report failed; sending it unsigned")
        env = Envelope(role="dmarc-report", peer_ip="127.0.0.1", helo=self.config.helo_name, mail_from=sender)
        body = MessageBody(self.config.spool_dir / "outgoing")
        body.write(message)
        try:
            await self.queue.enqueue(env, [address], prefix, body)
        except Exception:
            log.exception("dmarc: queueing the report for %s failed; kept for the next run", address)
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
                log.exception("dmarc: report run failed")

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="dmarc-reports")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
