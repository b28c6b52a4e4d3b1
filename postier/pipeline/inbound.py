"""What happens between "MAIL FROM" and "250" on port 25 (MX) and on the LMTP listener, and what
every SMTP-family pipeline shares (`SMTPPipeline`; the submission ports subclass it).

The MX accepts mail for local domains only: relay tricks and foreign domains are refused at RCPT
(never queued), unknown users are refused at RCPT (no backscatter), mail loops and unbounded
header blocks are refused at the end of DATA, and the message is delivered durably before the
final 250. The inbound checks (`InboundCheck`: mail authentication today) run at MAIL FROM and at
the end of DATA; alias targets in foreign domains go to the outbound queue (`Enqueuer`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence

from ..accounts import Directory, Lookup, Resolution
from ..config import Config
from ..mailauth.arc import ARCSealer
from ..message.mime import header_end
from ..mailauth.srs import SRS, SRSError, is_srs
from ..message.received import count_received, protocol_name, received_header, return_path
from ..message.types import (
    HEADER_LIMIT, Action, DecisionLog, Enqueuer, Envelope, InboundCheck, MailDelivery, MessageBody, Recipient,
    message_id, remote_targets,
)
from ..proto.smtp.address import Address
from ..store.errors import StoreUnavailable
from .quota import full_recipients, quota_reply, rcpt_refusal
from .sieve import SieveFilter
from ..proto.smtp.replies import (
    R250_RCPT_OK,
    R250_SENDER_OK,
    R451_LOCAL_ERROR,
    R451_TEMP_LOOKUP,
    R550_NO_SUCH_USER,
    R553_SOURCE_ROUTE,
    R554_RELAY_DENIED,
    Reply,
)

log = logging.getLogger("postier.inbound")

R554_LOOP = Reply(554, "5.4.0", "Too many Received headers: mail loop")  # RFC 5321 §6.3
R550_RELAY_SYNTAX = Reply(550, "5.7.1", "Relay syntax (%, !, quoted @) not accepted")  # RFC 5321 §3.6.1
R250_DELIVERED = Reply(250, "2.0.0", "Ok: delivered")
R552_HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header too large")  # RFC 3463 X.3.4
R550_BAD_SRS = Reply(550, "5.1.1", "Invalid or expired SRS address")  # RFC 3463 X.1.1


def relay_trick(addr: Address) -> bool:
    """The classic ways to smuggle a relay through a local domain (RFC 5321 §3.6.1, Appendix C)."""
    return addr.percent_hack or addr.bang_path or addr.quoted_at


def header_complete(head: bytes) -> bool:
    """Does the header block end (blank line) within `head`, the first octets of a message?"""
    return header_end(head) >= 0


class SMTPPipeline:
    """Decisions for one SMTP-family session. Subclasses: the MX, LMTP, submission.

    Made per session by the factories of `server/app.py`, with the parts it uses: the accounts
    (`Directory`), local delivery (`MailDelivery`), the outbound queue (`Enqueuer`) and, on port 25,
    the inbound checks.
    """

    __slots__ = ("arc", "checks", "config", "directory", "mda", "queue", "sieve", "srs")  # one per session: kept small

    lmtp = False  # RFC 2033: one reply per recipient, local users only
    relay = False  # recipients outside our domains may be accepted (authenticated submission)

    def __init__(self, config: Config, directory: Directory, mda: MailDelivery, queue: Enqueuer,
                 checks: Sequence[InboundCheck] = (), sieve: SieveFilter | None = None,
                 srs: SRS | None = None, arc: ARCSealer | None = None) -> None:
        self.config = config
        self.srs = srs  # None: forwarded mail keeps its sender (submission)
        self.arc = arc  # seals the copies we forward (RFC 8617); given to the MX only
        self.sieve = sieve  # None: no Sieve here (submission) or `[sieve] enabled = false`
        self.directory = directory
        self.mda = mda
        self.queue = queue
        self.checks = tuple(checks)

    # -- shared steps ---------------------------------------------------------------------------

    def expand(self, env: Envelope, address: str, res: Resolution, params: dict[str, str | None]) -> Reply:
        """Recipient expansion: accept `address` with the local users and remote targets it resolved
        to (aliases, catch-all), or say why not."""
        if res.status is Lookup.UNKNOWN_USER:
            return R550_NO_SUCH_USER
        if res.status is Lookup.NOT_LOCAL:
            if not self.relay:
                return R554_RELAY_DENIED  # RFC 5321 §3.6.2, §7.1: no relaying for strangers
            res = Resolution(Lookup.FOUND, (), (address,))
        if res.remote and self.lmtp:  # LMTP hands mail to local users only: alias targets elsewhere are dropped
            if not res.users:
                return R550_NO_SUCH_USER
            res = Resolution(res.status, res.users, ())
        env.recipients.append(Recipient(address, res.users, res.remote, params))
        return R250_RCPT_OK

    def check_head(self, head: bytes, size: int) -> Reply | None:
        """Header bounds: the header block must end within HEADER_LIMIT octets (DESIGN: every header
        block has a cap), and a message that went round too often is a loop (RFC 5321 §6.3)."""
        if size > len(head) and not header_complete(head):
            return R552_HEADER_TOO_BIG
        if count_received(head) >= self.config.limits.max_received_headers:
            return R554_LOOP
        return None

    def received(self, env: Envelope) -> bytes:
        """Our Received field for this transaction (RFC 5321 §4.4)."""
        proto = protocol_name(env.esmtp, env.tls is not None, env.auth_user is not None, self.lmtp)
        single = env.recipients[0].address if len(env.recipients) == 1 else None
        return received_header(helo=env.helo, peer_ip=env.peer_ip, peer_name=env.peer_name,
                               by_host=self.config.hostname, protocol=proto, qid=env.qid, tls=env.tls,
                               recipient=single)

    def forwarding(self, env: Envelope) -> Envelope:
        """The envelope of the copies forwarded to remote alias targets: the sender rewritten by SRS
        at the forwarding address's domain, so that SPF passes at the destination."""
        if self.srs is None or not env.mail_from:
            return env
        sender = self.srs.forward(env.mail_from, self._forwarder(env))
        return env if sender == env.mail_from else dataclasses.replace(env, mail_from=sender)

    @staticmethod
    def _forwarder(env: Envelope) -> str:
        """The domain forwarding the copies: the first recipient with targets elsewhere."""
        via = next(r.address for r in env.recipients if r.remote)
        return via.rpartition("@")[2].lower()

    async def _sealed(self, env: Envelope, trace: bytes, body: MessageBody) -> bytes:
        """RFC 8617 §4: the ARC set of the forwarding domain over the copy we forward (b"": none)."""
        if self.arc is None:
            return b""
        message = trace + await asyncio.to_thread(body.getvalue)
        return await self.arc.seal(message, self._forwarder(env))

    def _decided(self, env: Envelope, head: bytes, action: str, reasons: Sequence[str]) -> None:
        """Record an inbound decision (the MX does; other roles have nothing to explain)."""

    # -- SMTP stages ----------------------------------------------------------------------------

    async def on_mail(self, env: Envelope, addr: Address, params: dict[str, str | None]) -> Reply:
        if addr.source_route:
            return R553_SOURCE_ROUTE
        for check in self.checks:
            reply = await check.check_mail(env, addr)
            if reply is not None:
                return reply
        env.mail_from = addr.mailbox
        env.mail_params = params
        return R250_SENDER_OK

    async def on_rcpt(self, env: Envelope, addr: Address, params: dict[str, str | None]) -> Reply:
        # RFC 5321 §3.6.2 / §7.1: refuse anything that would make us relay for strangers.
        if addr.source_route or relay_trick(addr):
            return R550_RELAY_SYNTAX if not addr.source_route else R553_SOURCE_ROUTE
        if addr.is_literal and not addr.is_postmaster:
            return R554_RELAY_DENIED
        found: Reply | tuple[Resolution, bool] | None = self._lookup_cached(addr)
        if found is None:
            try:  # in a worker thread: in cluster mode the accounts are a network round trip away
                found = await asyncio.to_thread(self._lookup, addr)
            except StoreUnavailable as exc:  # the account database is out of reach: try again later
                log.error("recipient lookup of %s failed: %s", addr.mailbox, exc)
                return R451_TEMP_LOOKUP
        if isinstance(found, Reply):
            return found
        res, srs_bounce = found
        if srs_bounce:
            return self.expand(env, addr.mailbox, res, params)
        reply = self.expand(env, addr.mailbox, res, params)
        if reply.is_success:
            full = await rcpt_refusal(self.config, env, env.recipients[-1], self.mda)  # pipeline/quota.py
            if full is not None:
                env.recipients.pop()
                return full
            for check in self.checks:  # e.g. greylisting: only for recipients we would accept
                refused = await check.check_rcpt(env, addr.mailbox)
                if refused is not None:
                    env.recipients.pop()
                    return refused
        return reply

    def _lookup_cached(self, addr: Address) -> tuple[Resolution, bool] | None:
        """`_lookup`'s answer for a plain address when the accounts know it fresh without blocking
        (`Directory.resolve_cached`), else None. Postmaster and SRS addresses take the thread."""
        if addr.is_postmaster or (self.srs is not None and is_srs(addr.mailbox.rpartition("@")[0])):
            return None
        res = self.directory.resolve_cached(addr.mailbox)
        return None if res is None else (res, False)

    def _lookup(self, addr: Address) -> Reply | tuple[Resolution, bool]:
        """Where `addr` goes (blocking): a refusal, or its resolution and whether it is the bounce of
        mail we forwarded (SRS, sent back to the original sender)."""
        if addr.is_postmaster:  # RFC 5321 §4.5.1: <postmaster> must be accepted
            res = self.directory.resolve(f"postmaster@{self.config.hostname}")
            domains = self.directory.list_domains()
            if res.status is not Lookup.FOUND and domains:
                res = self.directory.resolve(f"postmaster@{domains[0]}")
            if res.status is Lookup.NOT_LOCAL:
                return R554_RELAY_DENIED
            return res, False
        local, _, domain = addr.mailbox.rpartition("@")
        if self.srs is not None and is_srs(local) and domain.lower() in self.directory.list_domains():
            try:  # a bounce to mail we forwarded: back to the original sender, if the address is ours
                back = self.srs.reverse(addr.mailbox)
            except SRSError:
                return R550_BAD_SRS
            return Resolution(Lookup.FOUND, (), (back,)), True
        return self.directory.resolve(addr.mailbox), False

    async def on_message(self, env: Envelope, body: MessageBody) -> list[Reply]:
        """Deliver; one reply per accepted recipient (identical for SMTP, per recipient for LMTP)."""
        n = len(env.recipients)
        head = body.head(HEADER_LIMIT)
        bad_head = self.check_head(head, body.size)
        if bad_head is not None:
            return [bad_head] * n
        headers = b""
        junk = False
        reasons: list[str] = list(env.notes)
        for check in self.checks:
            verdict = await check.evaluate(env, body)
            reasons += verdict.reasons
            if verdict.action in (Action.REJECT, Action.DEFER):
                self._decided(env, head, verdict.action.value, reasons)
                return [verdict.reply or R451_LOCAL_ERROR] * n
            if verdict.body is not None:
                body = verdict.body
            headers = verdict.headers + headers
            junk = junk or verdict.action is Action.JUNK
        if self.checks:
            self._decided(env, head, "junk" if junk else "inbox", reasons)
        trace = headers + self.received(env)
        prefix = return_path(env.mail_from) + trace
        refused: dict[str, Reply] = {}
        if self.sieve is not None:  # each user's script, after the verdicts (Junk: the implicit keep's folder)
            got = await self.sieve.deliver(env, env.recipients, prefix, body, "Junk" if junk else None, self.lmtp)
            local, refused = got.local, got.refused
        else:
            local = await self.mda.deliver_recipients(env.recipients, prefix, body, env.mail_from,
                                                      "Junk" if junk else None)
        remote = sorted(remote_targets(env.recipients))
        remote_ok = True
        if remote:
            try:
                arc = await self._sealed(env, trace, body)
                await self.queue.enqueue(self.forwarding(env), remote, arc + trace, body)
            except Exception:
                log.exception("%s: queueing forwarded copies failed", env.qid)
                remote_ok = False
        replies = []
        delivered = R250_DELIVERED.with_trusted_text(f"Ok: delivered as {env.qid}")
        full = full_recipients(env.recipients, local)  # quota: nothing stored for them (pipeline/quota.py)
        if full and not self.lmtp and len(full) < n and len(full) + len(local.delivered) == n:
            try:  # others got it: the full mailboxes' copies are retried (or bounced) by the queue
                await self.queue.enqueue(env, sorted(set(local.over_quota)), trace, body)
                local = dataclasses.replace(local, delivered=local.delivered | full)
                full = set()
            except Exception:
                log.exception("%s: queueing copies for full mailboxes failed", env.qid)
        for r in env.recipients:
            ok = r.address in local.delivered and (remote_ok or not r.remote)
            failure = quota_reply(self.config) if r.address in full else R451_LOCAL_ERROR
            replies.append(refused.get(r.address) or (delivered if ok else failure))
        if not self.lmtp and full and len(full) == n and not refused:
            replies = [quota_reply(self.config)] * n  # nobody got it: one reply says why
        elif not self.lmtp and any(not x.is_success for x in replies) and not refused:
            # One reply for the whole message: the client retries every recipient (RFC 5321 §4.2.5).
            replies = [R451_LOCAL_ERROR] * n
        log.info("%s: from=<%s> to=%s result=%s", env.qid, env.mail_from,
                 ",".join(r.address for r in env.recipients), replies[0].code if replies else "-")
        return replies


class MXPipeline(SMTPPipeline):
    """Port 25: mail from the Internet for our own domains."""

    __slots__ = ("decisions",)

    def __init__(self, config: Config, directory: Directory, mda: MailDelivery, queue: Enqueuer,
                 checks: Sequence[InboundCheck] = (), sieve: SieveFilter | None = None, srs: SRS | None = None,
                 decisions: DecisionLog | None = None, arc: ARCSealer | None = None) -> None:
        super().__init__(config, directory, mda, queue, checks, sieve, srs, arc)
        self.decisions = decisions

    def _decided(self, env: Envelope, head: bytes, action: str, reasons: Sequence[str]) -> None:
        """One log line per inbound decision, and its record for `postier why`."""
        log.info("%s: %s from %s: %s", env.qid, action, env.peer_ip, "; ".join(reasons) or "no checks")
        if self.decisions is not None:
            mid = message_id(head)  # the header section on_message already read
            self.decisions.record_later(env.qid, mid, env.peer_ip, env.mail_from,
                                        [r.address for r in env.recipients], action, reasons)


class LMTPPipeline(SMTPPipeline):
    """RFC 2033: another MTA (Postfix) hands us mail for local users; per-recipient replies."""

    __slots__ = ()

    lmtp = True
