"""The spam checks the MX runs (an `InboundCheck`): at MAIL FROM, at RCPT TO, at the end of DATA.

- MAIL FROM: the per-client message rate (`max_messages_per_minute`), and HELO/EHLO sanity
  (`helo_checks`: "log" notes it, "reject" refuses with 550 5.7.1);
- RCPT TO: greylisting (`greylist`), skipped for DNS-allowlisted clients;
- end of DATA: the GTUBE test string (550 5.7.1), then Rspamd (`rspamd`): its action decides
  (reject 550 5.7.1, soft reject/greylist 451 4.7.1, add header/rewrite subject -> Junk, no action
  -> INBOX) and X-Spam-* headers summarise its score and symbols on the delivered copy. Rspamd
  unreachable: delivered with `X-Spam-Status: unknown` (`fail_open`) or 451.

Connection screening (DNSBL/DNSWL, connection rate) happens before the greeting, in the SMTP
driver, through `Screener`; its findings reach here as `Envelope.notes` / `allowlisted`.
Every step adds a plain-words reason to the verdict, which the MX logs and keeps for `postier why`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

from ..config import Antispam
from ..mailauth.dkim import DKIMResult, DKIMStatus
from ..message.mime import header_section
from ..message.rewrite import RewrittenBody, remove_fields
from ..message.types import HEADER_LIMIT, Action, Envelope, MessageBody, Verdict
from ..proto.smtp.address import Address
from ..proto.smtp.replies import Reply
from ..resolver import BaseResolver, DNSStatus
from .builtin import RateLimiter, contains_gtube, helo_problem
from .greylist import Greylist
from .rspamd import Envelope as RspamdEnvelope
from .rspamd import OUR_SPAM_FIELDS, RspamdClient, SpamDecision

log = logging.getLogger("postier.antispam")

R550_GTUBE = Reply(550, "5.7.1", "Message refused: GTUBE test string (spam test)")
R550_SPAM = Reply(550, "5.7.1", "Message refused as spam")
R451_SPAM = Reply(451, "4.7.1", "Message deferred by the spam filter; try again later")
R451_NO_FILTER = Reply(451, "4.7.1", "Spam filter unavailable; try again later")
R451_GREYLIST = Reply(451, "4.7.1", "Greylisted: please try again later")  # the de-facto greylisting reply
R451_RATE = Reply(451, "4.7.1", "Too many messages from your address; slow down")
R550_HELO = Reply(550, "5.7.1", "Bad HELO/EHLO name")
#: Rspamd reads the first part of a message; larger ones are scanned up to this many octets.
MAX_SCAN = 32 * 1024 * 1024
GTUBE_SCAN = 1024 * 1024


class SpamCheck:
    """The `InboundCheck` of postier/antispam (see the module docstring)."""

    def __init__(self, settings: Antispam, hostname: str, our_addresses: Sequence[str], resolver: BaseResolver,
                 greylist: Greylist | None = None, rspamd: RspamdClient | None = None,
                 resolve_helo: bool = True) -> None:
        self.settings = settings
        self.hostname = hostname
        self.our_addresses = tuple(our_addresses)
        self.resolver = resolver
        self.greylist = greylist
        self.rspamd = rspamd
        self.resolve_helo = resolve_helo  # a HELO name must exist in DNS (off where DNS is not used)
        self.messages = RateLimiter(settings.max_messages_per_minute)

    @property
    def active(self) -> bool:
        s = self.settings
        return bool(self.greylist or self.rspamd or s.gtube or s.helo_checks != "off" or s.max_messages_per_minute)

    # -- MAIL FROM ----------------------------------------------------------------------------------

    async def check_mail(self, env: Envelope, address: Address) -> Reply | None:
        if not self.messages.hit(env.peer_ip):
            log.info("%s: refused: more than %d messages a minute from %s", env.qid,
                     self.settings.max_messages_per_minute, env.peer_ip)
            return R451_RATE
        if self.settings.helo_checks != "off" and "helo_problem" not in env.auth:  # once per transaction
            problem = helo_problem(env.helo, [self.hostname], self.our_addresses)
            if problem is None and self.resolve_helo and env.helo and not env.helo.startswith("["):
                ans = await self.resolver.query(env.helo, "A")
                if ans.status is DNSStatus.NXDOMAIN:
                    problem = f"HELO {env.helo}: the name does not exist in DNS"
            env.auth["helo_problem"] = problem or ""
            if problem and self.settings.helo_checks == "reject":
                log.info("%s: refused: %s (client %s)", env.qid, problem, env.peer_ip)
                return R550_HELO.with_text(f"Refused: {problem}"[:300].replace("\r", " ").replace("\n", " "))
        return None

    # -- RCPT TO ------------------------------------------------------------------------------------

    async def check_rcpt(self, env: Envelope, address: str) -> Reply | None:
        if self.greylist is None or env.allowlisted:
            return None
        if self._trusted(env.mail_from.rpartition("@")[2]):
            # Its signature decides, at the end of DATA (evaluate): a pass skips greylisting.
            env.auth.setdefault("greylist_pending", []).append(address)
            return None
        res = await asyncio.to_thread(self.greylist.check, env.peer_ip, env.mail_from, address)
        if not res.ok:
            log.info("%s: greylisted %s -> %s from %s (retry after %.0f s)", env.qid, env.mail_from or "<>",
                     address, env.peer_ip, res.wait)
            return R451_GREYLIST
        return None

    # -- end of DATA --------------------------------------------------------------------------------

    async def evaluate(self, env: Envelope, body: MessageBody) -> Verdict:
        reasons: list[str] = []
        problem = env.auth.get("helo_problem")
        if problem:
            reasons.append(problem)
        if self.greylist is not None and not env.allowlisted:
            pending: list[str] = env.auth.get("greylist_pending") or []
            signer = self._trusted_signer(env) if pending else None
            if signer is not None:
                reasons.append(f"greylist: skipped (DKIM pass from {signer})")
            else:
                for rcpt in pending:
                    res = await asyncio.to_thread(self.greylist.check, env.peer_ip, env.mail_from, rcpt)
                    if not res.ok:
                        log.info("%s: greylisted %s -> %s from %s at the end of DATA (no trusted DKIM pass)",
                                 env.qid, env.mail_from, rcpt, env.peer_ip)
                        return Verdict(Action.DEFER, R451_GREYLIST, reasons=(
                            *reasons, "greylisted: a trusted domain's sender without its DKIM signature"))
                reasons.append("greylist: passed")
        if self.settings.gtube and await self._gtube(body):
            return Verdict(Action.REJECT, R550_GTUBE, reasons=(*reasons, "refused: GTUBE test string"))
        if self.rspamd is None:
            return Verdict(Action.ACCEPT, reasons=tuple(reasons))
        result = await self.rspamd.check(await self._payload(body), RspamdEnvelope(
            ip=env.peer_ip, helo=env.helo, sender=env.mail_from,
            recipients=tuple(r.address for r in env.recipients), queue_id=env.qid,
            user=env.auth_user.address if env.auth_user is not None else "", hostname=env.peer_name or ""))
        reasons.append(result.explain())
        headers = b"".join(f"{k}: {v}\r\n".encode("utf-8", "replace") for k, v in result.spam_headers())
        headers += b"".join(f"{k}: {v}\r\n".encode("utf-8", "replace") for k, v in result.add_headers
                            if _safe_header(k, v))
        if result.unavailable:
            log.warning("%s: rspamd unavailable: %s", env.qid, result.error)
            if not self.settings.fail_open:
                return Verdict(Action.DEFER, R451_NO_FILTER, reasons=tuple(reasons))
            return Verdict(Action.ACCEPT, headers=headers, reasons=tuple(reasons), body=await self._rewrite(body, ()))
        if result.decision is SpamDecision.REJECT:
            msg = result.smtp_message.replace("\r", " ").replace("\n", " ")[:200]
            return Verdict(Action.REJECT, R550_SPAM.with_text(f"Message refused as spam: {msg}" if msg
                                                              else "Message refused as spam"),
                           reasons=tuple(reasons))
        if result.decision is SpamDecision.DEFER:
            return Verdict(Action.DEFER, R451_SPAM, reasons=tuple(reasons))
        action = Action.JUNK if result.decision is SpamDecision.JUNK else Action.ACCEPT
        return Verdict(action, headers=headers, reasons=tuple(reasons),
                       body=await self._rewrite(body, result.remove_headers))

    @staticmethod
    async def _rewrite(body: MessageBody, remove: tuple[tuple[str, int], ...]) -> MessageBody | None:
        """The body without the header fields Rspamd asked to remove and without the sender's own
        X-Spam-* fields (ours, prepended, are the only ones a client may trust); None: unchanged."""
        raw = body.head(HEADER_LIMIT) if body.in_memory else await asyncio.to_thread(body.head, HEADER_LIMIT)
        header = header_section(raw)
        orders = {name: 0 for name in OUR_SPAM_FIELDS} | {n: o for n, o in remove if _safe_header(n, "")}
        if not any(f"\n{name.lower()}:".encode() in b"\n" + header.lower() for name in orders):
            return None  # the common case: nothing to remove, no copy of the header section
        new = remove_fields(header, orders)
        return RewrittenBody(body, new, len(header)) if new != header else None

    def _trusted(self, domain: str) -> str | None:
        """The `greylist_trusted_dkim` entry this domain is (or is under), if any."""
        domain = domain.lower().rstrip(".")
        for t in self.settings.greylist_trusted_dkim:
            t = t.lower().rstrip(".")
            if domain == t or domain.endswith("." + t):
                return t
        return None

    def _trusted_signer(self, env: Envelope) -> str | None:
        """d= of a passing DKIM signature by the trusted domain of the envelope sender (RFC 6376 §6.1)."""
        want = self._trusted(env.mail_from.rpartition("@")[2])
        for r in env.auth.get("dkim") or ():
            if isinstance(r, DKIMResult) and r.status is DKIMStatus.PASS and want and self._trusted(r.domain) == want:
                return r.domain
        return None

    async def _gtube(self, body: MessageBody) -> bool:
        """The test string in the first GTUBE_SCAN octets (where a test message carries it)."""
        if body.in_memory:
            return contains_gtube([body.getvalue()[:GTUBE_SCAN]])
        return contains_gtube([await asyncio.to_thread(body.head, GTUBE_SCAN)])

    @staticmethod
    async def _payload(body: MessageBody) -> bytes | Path:
        """What Rspamd gets: the bytes in memory, or the spool file streamed (a rewritten body, whose
        file is not what it reads, and a huge one go as their first MAX_SCAN octets)."""
        if body.in_memory:
            return body.getvalue()
        path = body.spool_path if type(body) is MessageBody else None
        if path is not None and body.size <= MAX_SCAN:
            return Path(path)
        return await asyncio.to_thread(body.head, MAX_SCAN)

    async def close(self) -> None:
        if self.rspamd is not None:
            await self.rspamd.close()
        if self.greylist is not None:
            self.greylist.close()


def _safe_header(name: str, value: str) -> bool:
    """Only well-formed, single-line header fields that Rspamd asks for are added."""
    return (bool(name) and all(33 <= ord(c) <= 126 and c != ":" for c in name)
            and "\r" not in value and "\n" not in value and len(name) + len(value) < 998)
