"""What happens between "MAIL FROM" and "250" on port 25 (MX) and on the LMTP listener.

The MX accepts mail for local domains only: relay tricks and foreign domains are refused at RCPT
(never queued), unknown users are refused at RCPT (no backscatter), mail loops are refused at the
end of DATA, and the message is delivered durably before the final 250. Mail authentication
(SPF/DKIM/DMARC) plugs in through `services.extensions["mailauth"]` (see `MailAuthHook`), and
alias targets in foreign domains go to the outbound queue through `services.extensions["queue"]`
(see `QueueHook`) when that layer is present.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..accounts import Lookup, User
from ..message.received import count_received, protocol_name, queue_id, received_header, return_path
from ..proto.smtp.address import Address
from ..proto.smtp.replies import (
    R250_RCPT_OK,
    R250_SENDER_OK,
    R451_LOCAL_ERROR,
    R550_NO_SUCH_USER,
    R553_SOURCE_ROUTE,
    R554_RELAY_DENIED,
    Reply,
)
from ..store.maildir import MessageBody

if TYPE_CHECKING:
    from ..server.app import Services

log = logging.getLogger("postier.inbound")

R554_LOOP = Reply(554, "5.4.0", "Too many Received headers: mail loop")  # RFC 5321 §6.3
R550_RELAY_SYNTAX = Reply(550, "5.7.1", "Relay syntax (%, !, quoted @) not accepted")  # RFC 5321 §3.6.1
R451_NO_QUEUE = Reply(451, "4.3.0", "Forwarding temporarily unavailable")
R250_DELIVERED = Reply(250, "2.0.0", "Ok: delivered")
R552_HEADER_TOO_BIG = Reply(552, "5.3.4", "Message header too large")  # RFC 3463 X.3.4
HEADER_LIMIT = 256 * 1024  # the header block must end within this many octets


@dataclass
class Recipient:
    """One accepted RCPT and where it resolved to."""

    address: str
    users: tuple[User, ...] = ()
    remote: tuple[str, ...] = ()
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Envelope:
    """Everything known about one SMTP transaction (reset by RSET and after each message)."""

    role: str
    peer_ip: str
    local_ip: str = ""
    peer_name: str | None = None
    helo: str = ""
    esmtp: bool = False
    tls: str | None = None
    auth_user: User | None = None
    mail_from: str = ""
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    _qid: str = field(default="", repr=False)
    #: Per-transaction results of mail authentication (SPF at MAIL FROM; see pipeline/mailauth.py).
    auth: dict[str, Any] = field(default_factory=dict)

    @property
    def qid(self) -> str:
        """The transaction's queue id, made when first asked for (most sessions never need one)."""
        if not self._qid:
            self._qid = queue_id()
        return self._qid

    @qid.setter
    def qid(self, value: str) -> None:
        self._qid = value

    def reset(self) -> None:
        self.mail_from = ""
        self.mail_params = {}
        self.recipients = []
        self._qid = ""
        if self.auth:
            self.auth = {}


@dataclass(frozen=True)
class Verdict:
    """Mail authentication's decision for one message (DESIGN.md policy: accept/junk/defer/reject)."""

    action: str = "accept"  # "accept" | "junk" | "defer" | "reject"
    reply: Reply | None = None  # for defer/reject
    headers: bytes = b""  # Authentication-Results etc., prepended
    body: MessageBody | None = None  # a replacement body (e.g. forged A-R headers removed)


class MailAuthHook(Protocol):
    async def check_mail(self, env: Envelope, address: Address) -> Reply | None: ...

    async def evaluate(self, env: Envelope, body: MessageBody) -> Verdict: ...


class QueueHook(Protocol):
    async def enqueue(self, env: Envelope, recipients: list[str], prefix: bytes, body: MessageBody) -> None:
        """Durably queue the message for `recipients` (remote addresses); raises on failure."""


def relay_trick(addr: Address) -> bool:
    """The classic ways to smuggle a relay through a local domain (RFC 5321 §3.6.1, Appendix C)."""
    return addr.percent_hack or addr.bang_path or addr.quoted_at


class SMTPPipeline:
    """Decisions for one SMTP-family role. Subclasses: the MX, LMTP, submission."""

    lmtp = False

    def __init__(self, services: Services, role: str):
        self.services = services
        self.role = role
        self.config = services.config

    @property
    def mailauth(self) -> MailAuthHook | None:
        hook: Any = self.services.extensions.get("mailauth")
        return hook if self.role == "smtp" else None

    @property
    def queue(self) -> QueueHook | None:
        hook: Any = self.services.extensions.get("queue")
        return hook

    async def on_mail(self, env: Envelope, addr: Address, params: dict[str, str | None]) -> Reply:
        if addr.source_route:
            return R553_SOURCE_ROUTE
        if self.mailauth is not None:
            reply = await self.mailauth.check_mail(env, addr)
            if reply is not None:
                return reply
        env.mail_from = addr.mailbox
        env.mail_params = params
        return R250_SENDER_OK

    async def on_rcpt(self, env: Envelope, addr: Address, params: dict[str, str | None]) -> Reply:
        # RFC 5321 §3.6.2 / §7.1: refuse anything that would make us relay for strangers.
        if addr.source_route or relay_trick(addr):
            return R550_RELAY_SYNTAX if not addr.source_route else R553_SOURCE_ROUTE
        if addr.is_postmaster:  # RFC 5321 §4.5.1: <postmaster> must be accepted
            target = f"postmaster@{self.config.hostname}"
            res = self.services.accounts.resolve(target)
            domains = self.services.accounts.list_domains()
            if res.status is not Lookup.FOUND and domains:
                res = self.services.accounts.resolve(f"postmaster@{domains[0]}")
        else:
            if addr.is_literal:
                return R554_RELAY_DENIED
            res = self.services.accounts.resolve(addr.mailbox)
        if res.status is Lookup.NOT_LOCAL:
            return R554_RELAY_DENIED
        if res.status is Lookup.UNKNOWN_USER:
            return R550_NO_SUCH_USER
        if res.remote and (self.queue is None or self.lmtp):
            if not res.users:
                return R451_NO_QUEUE if not self.lmtp else R550_NO_SUCH_USER
            res = type(res)(res.status, res.users, ())
        env.recipients.append(Recipient(addr.mailbox, res.users, res.remote, params))
        return R250_RCPT_OK

    async def on_message(self, env: Envelope, body: MessageBody) -> list[Reply]:
        """Deliver; one reply per accepted recipient (identical for SMTP, per recipient for LMTP)."""
        n = len(env.recipients)
        head = body.head(HEADER_LIMIT)
        if body.size > len(head) and b"\r\n\r\n" not in head and not head.startswith(b"\r\n"):
            return [R552_HEADER_TOO_BIG] * n  # DESIGN: every header block has a cap
        if count_received(head) >= self.config.limits.max_received_headers:
            return [R554_LOOP] * n
        verdict = Verdict()
        if self.mailauth is not None:
            verdict = await self.mailauth.evaluate(env, body)
            if verdict.action in ("reject", "defer"):
                return [verdict.reply or R451_LOCAL_ERROR] * n
            if verdict.body is not None:
                body = verdict.body
        folder = "Junk" if verdict.action == "junk" else None
        proto = protocol_name(env.esmtp, env.tls is not None, env.auth_user is not None, self.lmtp)
        single = env.recipients[0].address if n == 1 else None
        received = received_header(helo=env.helo, peer_ip=env.peer_ip, peer_name=env.peer_name,
                                   by_host=self.config.hostname, protocol=proto, qid=env.qid, tls=env.tls,
                                   recipient=single)
        trace = verdict.headers + received
        # Local deliveries: each distinct user once, whatever the number of RCPTs reaching them.
        targets: dict[str, User] = {}
        for r in env.recipients:
            for u in r.users:
                targets.setdefault(u.address, u)
        results = await self.services.mda.deliver(
            [(u, folder) for u in targets.values()], return_path(env.mail_from) + trace, body, env.mail_from)
        ok_users = {r.user.address for r in results if r.ok}
        remote = sorted({a for r in env.recipients for a in r.remote})
        remote_ok = True
        if remote:
            try:
                assert self.queue is not None
                await self.queue.enqueue(env, remote, trace, body)
            except Exception:
                log.exception("%s: queueing forwarded copies failed", env.qid)
                remote_ok = False
        replies = []
        delivered = R250_DELIVERED.with_trusted_text(f"Ok: delivered as {env.qid}")
        for r in env.recipients:
            ok = all(u.address in ok_users for u in r.users) and (remote_ok or not r.remote)
            replies.append(delivered if ok else R451_LOCAL_ERROR)
        if not self.lmtp and any(not x.is_success for x in replies):
            # One reply for the whole message: the client retries every recipient (RFC 5321 §4.2.5).
            replies = [R451_LOCAL_ERROR] * n
        log.info("%s: from=<%s> to=%s result=%s", env.qid, env.mail_from,
                 ",".join(r.address for r in env.recipients), replies[0].code if replies else "-")
        return replies


class MXPipeline(SMTPPipeline):
    """Port 25: mail from the Internet for our own domains."""


class LMTPPipeline(SMTPPipeline):
    """RFC 2033: another MTA (Postfix) hands us mail for local users; per-recipient replies."""

    lmtp = True
