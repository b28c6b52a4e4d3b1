"""Mail authentication at the MX: SPF (RFC 7208), DKIM (RFC 6376, RFC 8463), DMARC (RFC 7489, RFC 9989), RFC 8601.

`InboundAuth` is the `InboundCheck` the MX runs (wired in server/app.py `build_app`, with the shared
resolver and, with `[mailauth] dmarc`, the report store `data_dir/dmarc.sqlite`, in cluster mode PostgreSQL).

What happens to one message on port 25:
1. MAIL FROM: SPF for the MAIL FROM identity and for HELO, kept in `env.auth`. SPF "fail" alone
   refuses the sender only with `[mailauth] spf_fail_reject` (DMARC decides otherwise).
2. End of DATA: the From header must hold exactly one address (RFC 5322 §3.6, RFC 7489 §6.6.1;
   otherwise 550 5.7.1, no bypass); every DKIM signature is verified; DMARC is evaluated with the
   aligned SPF and DKIM results. p=reject -> 550 5.7.1, p=quarantine -> the user's Junk folder,
   p=none -> delivered. A DNS temporary failure that could change the outcome -> 451 4.7.1, never
   a 5xx. Authentication-Results with our authserv-id is prepended and incoming ones claiming that
   id are removed (RFC 8601 §5).
3. The DMARC outcome is recorded for aggregate reports; a DMARC aggregate report addressed to our
   DMARC rua mailbox, or a TLS report (RFC 8460 §5.3) addressed to our `_smtp._tls` rua mailbox, is
   parsed and stored (the message is delivered as well; an unreadable report is logged, never refused).

Large messages: DKIM needs the whole message in memory, so verification is skipped above
`[mailauth] max_verify_size` (dkim=neutral). Such a message can then pass DMARC only through SPF;
if it fails, a p=reject is softened to Junk rather than refusing mail we could not check. At most
`VERIFY_SLOTS` verifications run at once, bounding memory.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable

from ..config import Config
from ..message.mime import header_section
from ..message.rewrite import RewrittenBody
from ..message.types import HEADER_LIMIT, Action, Envelope, MessageBody, Verdict
from ..mailauth.arc import has_chain, verify_chain_async
from ..mailauth.authresults import authentication_results, strip_forged
from ..mailauth.dkim import DKIMResult, DKIMStatus, verify_all_async
from ..mailauth.dmarc import DMARCPolicy, DMARCResult, DMARCStatus, FromProblem, evaluate, from_domain
from ..mailauth.reports import (
    MAX_REPORT_MESSAGE, DKIMAuth, Evaluation, PolicyPublished, ReportError, ReportStore, SPFAuth,
    extract_reports,
)
from ..mailauth.tlsrpt import TLSReportStore, extract_tls_reports
from ..mailauth.spf import SPFResult, SPFStatus, check_spf, check_spf_helo
from ..proto.smtp.address import Address
from ..proto.smtp.replies import Reply
from ..resolver import BaseResolver

__all__ = ["InboundAuth", "RewrittenBody", "R550_DMARC", "R550_FROM", "R451_TEMPERROR",
           "R550_SPF"]

log = logging.getLogger("postier.mailauth")

VERIFY_SLOTS = 4

R550_FROM = Reply(550, "5.7.1", "Message refused: the From header must hold exactly one address")
R550_DMARC = Reply(550, "5.7.1", "Message refused by the sender domain's DMARC policy")
R451_TEMPERROR = Reply(451, "4.7.1", "Temporary mail authentication failure (DNS); try again later")
R550_SPF = Reply(550, "5.7.23", "SPF validation failed")  # RFC 7372 §3.2


def _dkim_auth(results: Iterable[DKIMResult]) -> tuple[DKIMAuth, ...]:
    return tuple(DKIMAuth(r.domain, r.selector, r.status.value) for r in results if r.domain)[:10]


def _spf_auth(spf: SPFResult | None, helo: SPFResult | None) -> tuple[SPFAuth, ...]:
    out = []
    if spf is not None:
        out.append(SPFAuth(spf.domain, "helo" if spf.scope == "helo" else "mfrom", spf.status.value))
    if helo is not None and (spf is None or spf.scope != "helo"):
        out.append(SPFAuth(helo.domain, "helo", helo.status.value))
    return tuple(out)


class InboundAuth:
    """The `InboundCheck` for port 25 (see the module docstring)."""

    def __init__(self, config: Config, resolver: BaseResolver, reports: ReportStore | None = None,
                 local_domains: Callable[[], list[str]] | None = None, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, tls_reports: TLSReportStore | None = None):
        self.config = config
        self.settings = config.mailauth
        self.resolver = resolver
        self.reports = reports
        self.tls_reports = tls_reports
        self.local_domains = local_domains or (lambda: [])
        self.clock = clock
        self.rng = rng
        self._slots: asyncio.Semaphore | None = None

    # -- MAIL FROM ----------------------------------------------------------------------------------

    async def _spf(self, env: Envelope, mail_from: str) -> tuple[SPFResult, SPFResult]:
        receiver = self.config.hostname
        helo = await check_spf_helo(env.peer_ip, env.helo, self.resolver, receiver=receiver)
        if not mail_from:
            return helo, helo  # RFC 7208 §2.4: the null sender is checked as postmaster@HELO
        spf = await check_spf(env.peer_ip, mail_from, env.helo, self.resolver, receiver=receiver)
        return spf, helo

    async def check_rcpt(self, env: Envelope, address: str) -> Reply | None:
        return None  # mail authentication has nothing to say per recipient

    async def check_mail(self, env: Envelope, address: Address) -> Reply | None:
        if not self.settings.spf:
            return None
        spf, helo = await self._spf(env, address.mailbox)
        env.auth["spf"], env.auth["helo"] = spf, helo
        if self.settings.spf_fail_reject and spf.status is SPFStatus.FAIL:  # RFC 7208 §8.4
            return R550_SPF.with_text(f"SPF validation failed for {spf.domain}: {spf.explanation}"[:300]
                                      .replace("\r", " ").replace("\n", " "))
        return None

    # -- end of DATA --------------------------------------------------------------------------------

    async def _verify(self, body: MessageBody, header: bytes) -> tuple[list[DKIMResult], bool]:
        """DKIM results and whether verification was skipped for size."""
        if b"dkim-signature" not in header.lower():
            return [], False  # dkim=none (RFC 8601 §2.7.1), without reading the message or a thread hop
        if body.size > self.settings.max_verify_size:
            return [DKIMResult("", "", DKIMStatus.NEUTRAL, "message too large to verify", "")], True
        if self._slots is None:
            self._slots = asyncio.Semaphore(VERIFY_SLOTS)
        async with self._slots:
            message = await asyncio.to_thread(body.getvalue)
            return await verify_all_async(message, self.resolver), False

    async def _verify_arc(self, body: MessageBody) -> tuple[str, str] | None:
        """The ARC chain's validation: (none / pass / fail, the reason); None: too large to read
        (not recorded, so a copy we forward is not sealed on top of a chain we did not check)."""
        if body.size > self.settings.max_verify_size:
            return None
        if self._slots is None:
            self._slots = asyncio.Semaphore(VERIFY_SLOTS)
        async with self._slots:
            message = await asyncio.to_thread(body.getvalue)
            result = await verify_chain_async(message, self.resolver)
        return result.status, result.reason

    async def evaluate(self, env: Envelope, body: MessageBody) -> Verdict:
        s = self.settings
        authserv_id = self.config.authserv_id
        # An in-memory body needs no thread (the common case: a thread hop costs more than this).
        header = header_section(body.head(HEADER_LIMIT) if body.in_memory
                                 else await asyncio.to_thread(body.head, HEADER_LIMIT))
        # RFC 8601 §5 (the quick test spares the parse when there is no such field at all)
        stripped = strip_forged(header, authserv_id) if b"authentication-results" in header.lower() else header
        new_body = RewrittenBody(body, stripped, len(header)) if stripped != header else None

        author: str | None = None
        if s.dmarc:
            found = from_domain(stripped)
            if isinstance(found, FromProblem):  # RFC 7489 §6.6.1: no evaluation of several authors
                log.info("%s: refused: %s", env.qid, found.value)
                return Verdict(Action.REJECT, R550_FROM.with_text(f"Message refused: {found.value}"))
            author = found

        spf: SPFResult | None = env.auth.get("spf")
        helo: SPFResult | None = env.auth.get("helo")
        if s.spf and spf is None:
            spf, helo = await self._spf(env, env.mail_from)
        dkim: list[DKIMResult] | None = None
        too_big = False
        if s.dkim_verify:
            dkim, too_big = await self._verify(body, header)

        env.auth["dkim"] = dkim or []  # for later checks (greylisting's trusted signers)
        dmarc: DMARCResult | None = None
        if author is not None:
            dmarc = await evaluate(author, spf, dkim or [], self.resolver, rng=self.rng)
        arc: tuple[str, str] | None = None
        if s.arc and has_chain(header):  # RFC 8617 §5.2, recorded for our seal's cv= when we forward
            arc = await self._verify_arc(body)

        headers = authentication_results(authserv_id, spf=spf, helo=helo, dkim=dkim, dmarc=dmarc, arc=arc)
        verdict = self._decide(dmarc, spf, dkim or [], too_big, headers, new_body)
        if s.spf or s.dkim_verify or s.dmarc:
            words = (f"spf={spf.status if spf else '-'}"
                     f" dkim={','.join(r.status for r in dkim) if dkim else ('none' if s.dkim_verify else '-')}"
                     f" dmarc={dmarc.status if dmarc else '-'}"
                     + (f" ({dmarc.domain}: {dmarc.reason})" if dmarc is not None and dmarc.reason else ""))
            verdict = dataclasses.replace(verdict, reasons=(words,))
        if verdict.action is Action.DEFER:
            log.info("%s: deferred: DMARC %s for %s", env.qid, dmarc.status if dmarc else "-", author)
            return verdict
        if dmarc is not None and dmarc.record is not None and self.reports is not None:
            await self._record(env, dmarc, spf, helo, dkim or [], verdict, too_big)
        if verdict.action in (Action.ACCEPT, Action.JUNK):
            await self._take_reports(env, new_body or body, dmarc)
        if s.spf or s.dkim_verify or s.dmarc:  # with every check off there is nothing to log
            log.info("%s: mailauth spf=%s dkim=%s dmarc=%s -> %s", env.qid, spf.status if spf else "-",
                     ",".join(r.status for r in dkim) if dkim else "-", dmarc.status if dmarc else "-",
                     verdict.action)
        return verdict

    def _decide(self, dmarc: DMARCResult | None, spf: SPFResult | None, dkim: list[DKIMResult], too_big: bool,
                headers: bytes, body: MessageBody | None) -> Verdict:
        if dmarc is None or dmarc.status in (DMARCStatus.NONE, DMARCStatus.PERMERROR, DMARCStatus.PASS):
            return Verdict(Action.ACCEPT, headers=headers, body=body)
        if dmarc.status is DMARCStatus.TEMPERROR:
            return Verdict(Action.DEFER, R451_TEMPERROR)
        # DMARC fail. A temporary error in an input could have made it pass (RFC 7489 §6.6.2):
        # try again later rather than reject or junk on a DNS hiccup.
        if dmarc.disposition is not DMARCPolicy.NONE and (
                (spf is not None and spf.status is SPFStatus.TEMPERROR)
                or any(r.status is DKIMStatus.TEMPERROR for r in dkim)):
            return Verdict(Action.DEFER, R451_TEMPERROR)
        if dmarc.disposition is DMARCPolicy.REJECT and not too_big:
            return Verdict(Action.REJECT, R550_DMARC.with_text(
                f"Message refused by the DMARC policy of {dmarc.domain} ({dmarc.reason})"[:300]))
        if dmarc.disposition in (DMARCPolicy.REJECT, DMARCPolicy.QUARANTINE):
            return Verdict(Action.JUNK, headers=headers, body=body)
        return Verdict(Action.ACCEPT, headers=headers, body=body)

    async def _record(self, env: Envelope, dmarc: DMARCResult, spf: SPFResult | None, helo: SPFResult | None,
                      dkim: list[DKIMResult], verdict: Verdict, too_big: bool) -> None:
        assert self.reports is not None and dmarc.record is not None
        rec = dmarc.record
        disposition = {Action.REJECT: "reject", Action.JUNK: "quarantine"}.get(verdict.action, "none")
        reasons: tuple[str, ...] = ()
        if dmarc.status is DMARCStatus.FAIL and disposition != dmarc.policy.value:
            # RFC 7489 Appendix C PolicyOverrideType
            reasons = ("sampled_out",) if "not sampled" in dmarc.reason else ("local_policy",)
        policy = PolicyPublished(dmarc.record_domain, rec.policy.value,
                                 rec.subdomain_policy.value if rec.subdomain_policy else "",
                                 rec.adkim.value, rec.aspf.value, rec.pct, ":".join(rec.fo))
        ev = Evaluation(self.clock(), env.peer_ip, dmarc.domain, env.mail_from.rpartition("@")[2].lower(), policy,
                        rec.rua, disposition, dmarc.dkim_aligned, dmarc.spf_aligned, _dkim_auth(dkim),
                        _spf_auth(spf, helo), reasons)
        try:
            await asyncio.to_thread(self.reports.record, ev)
        except Exception:  # reporting must never cost a message
            log.exception("%s: recording the DMARC result failed", env.qid)

    @staticmethod
    def _is_report_address(target: str, address: str, ours: set[str]) -> bool:
        """Is `address` the report mailbox `target` (a local part in each of our domains, or an address)?"""
        local, _, domain = address.lower().rpartition("@")
        if "@" in target:
            return address.lower() == target
        return bool(target) and local == target and domain in ours

    async def _take_reports(self, env: Envelope, body: MessageBody, dmarc: DMARCResult | None) -> None:
        """A DMARC aggregate report (RFC 7489 §7.2) or a TLS report (RFC 8460 §5.3) sent to the rua
        address we publish for it: parse and keep it."""
        if body.size > MAX_REPORT_MESSAGE:
            return
        kinds = [(target.lower(), store) for target, store in
                 ((self.settings.report_address, self.reports), (self.config.tlsrpt.report_address, self.tls_reports))
                 if target and store is not None]
        # cheap test first: does any recipient have a report mailbox's local part?
        kinds = [(t, st) for t, st in kinds
                 if any(r.address.lower().startswith(t.partition("@")[0] + "@") for r in env.recipients)]
        if not kinds:
            return
        ours = set(await asyncio.to_thread(self.local_domains))
        for target, store in kinds:
            if not any(self._is_report_address(target, r.address, ours) for r in env.recipients):
                continue
            try:
                if isinstance(store, TLSReportStore):
                    await self._take_tls_reports(env, body, dmarc, store, ours)
                else:
                    await self._take_dmarc_reports(env, body, dmarc, ours)
            except Exception:  # a report must never cost the message it came in
                log.exception("%s: reading a report failed", env.qid)

    async def _take_tls_reports(self, env: Envelope, body: MessageBody, dmarc: DMARCResult | None,
                                store: TLSReportStore, ours: set[str]) -> None:
        try:
            found = await asyncio.to_thread(extract_tls_reports, await asyncio.to_thread(body.getvalue))
        except ReportError as exc:
            log.info("%s: unreadable TLS report: %s", env.qid, exc)
            return
        authenticated = dmarc is not None and dmarc.status is DMARCStatus.PASS
        for report in found:
            mine = [d for d in report.domains if d in ours or any(d.endswith("." + o) for o in ours)]
            if not mine:
                log.info("%s: TLS report about %s, not one of our domains: ignored", env.qid,
                         ",".join(report.domains)[:200])
                continue
            try:
                new = await asyncio.to_thread(store.store_received, report, authenticated, self.clock())
            except Exception:
                log.exception("%s: storing a TLS report failed", env.qid)
                continue
            log.info("%s: TLS report %s from %s for %s (%d successful, %d failed sessions)%s", env.qid,
                     report.report_id, report.org_name, ",".join(mine), report.successes, report.failed,
                     "" if new else " (duplicate)")

    async def _take_dmarc_reports(self, env: Envelope, body: MessageBody, dmarc: DMARCResult | None,
                                  ours: set[str]) -> None:
        assert self.reports is not None
        try:
            found = await asyncio.to_thread(extract_reports, await asyncio.to_thread(body.getvalue))
        except ReportError as exc:
            log.info("%s: unreadable DMARC report: %s", env.qid, exc)
            return
        authenticated = dmarc is not None and dmarc.status is DMARCStatus.PASS
        for report in found:
            if report.policy.domain not in ours and not any(report.policy.domain.endswith("." + d) for d in ours):
                log.info("%s: DMARC report about %s, not one of our domains: ignored", env.qid, report.policy.domain)
                continue
            try:
                new = await asyncio.to_thread(self.reports.store_received, report, authenticated, self.clock())
            except Exception:
                log.exception("%s: storing a DMARC report failed", env.qid)
                continue
            log.info("%s: DMARC report %s from %s for %s (%d messages)%s", env.qid, report.report_id,
                     report.org_name, report.policy.domain, report.messages, "" if new else " (duplicate)")
