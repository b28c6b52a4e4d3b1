"""What happens between "MAIL FROM" and "250" on the submission ports (RFC 6409 message submission,
587 with STARTTLS and 465 with implicit TLS per RFC 8314).

The listener and the SMTP core have already required TLS and AUTH (RFC 4954; MAIL before AUTH is
530 5.7.0), so everything here knows `env.auth_user`. This pipeline decides:

- who the user may send as, in MAIL FROM and in the From (and Sender) header:
  `submission.sender_policy` "own" (their address, aliases that reach them, plus-tags of those),
  "domain" (any address in a domain they have an address in) or "any"; otherwise
  553 5.7.1 (RFC 6409 §6.1 lets the MSA refuse a sender the user may not use);
- how much: `submission.max_messages_per_day` messages per user over a sliding 24 hours, counted
  in the queue database when a message is queued; past it, MAIL gets 450 4.7.1 (temporary: the
  window slides, the client may retry later; a message counts once whatever its recipients);
- where each recipient goes: our own domains straight to the MDA (unknown users are refused at
  RCPT, 550 5.1.1), everything else to the durable queue (authenticated users may relay).

It adds what RFC 6409 §8.2-8.3 lets an MSA add when missing, Date and Message-ID, by putting the new
header fields in the prefix written before the message (the body is never copied), plus a Received
field (RFC 5321 §4.4). The DKIM signer (a `Signer`, when `[mailauth] dkim_sign` is on) sees the
message as it will leave, added fields included.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import secrets
from typing import TYPE_CHECKING, BinaryIO

from ..accounts import Directory, normalize_address
from ..config import Config
from ..message.envelope import MISSING_DOMAIN, MISSING_MAILBOX, parse_addresses
from ..message.mime import header_end
from ..message.received import return_path
from ..message.types import (
    HEADER_LIMIT, AccountError, Action, Enqueuer, Envelope, InboundCheck, MailDelivery, MessageBody, Signer, User,
    remote_targets,
)
from ..proto.smtp.address import Address
from ..proto.smtp.replies import (
    R250_SENDER_OK,
    R451_LOCAL_ERROR,
    R451_TEMP_LOOKUP,
    R530_AUTH_REQUIRED,
    R553_SOURCE_ROUTE,
    Reply,
)
from ..store.errors import StoreUnavailable
from .inbound import R550_RELAY_SYNTAX, SMTPPipeline, relay_trick

if TYPE_CHECKING:
    from collections.abc import Iterable

log = logging.getLogger("postier.submission")

# RFC 6409 §6.1, RFC 3463 X.7.1: "delivery not authorized"
R553_SENDER_NOT_OWNED = Reply(553, "5.7.1", "Sender address not owned by the authenticated user")
R553_FROM_NOT_OWNED = Reply(553, "5.7.1", "From header address not owned by the authenticated user")
R553_NULL_SENDER = Reply(553, "5.7.1", "The null sender is not allowed for submission")
# RFC 3463 X.7.1 with a 4yz code: the sliding 24-hour window will make room again
R450_DAILY_LIMIT = Reply(450, "4.7.1", "Daily message limit reached, try again later")
# RFC 5322 §3.6: exactly one From field, with at least one mailbox
R550_BAD_FROM = Reply(550, "5.6.0", "The message needs exactly one From header with valid addresses")
R550_LITERAL = Reply(550, "5.1.2", "Address literals are not accepted as recipients")  # RFC 3463 X.1.2

_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")


class PrefixedBody(MessageBody):
    """A read-only view of `prefix` + `inner` (the signer sees added header fields; nothing is copied)."""

    def __init__(self, prefix: bytes, inner: MessageBody) -> None:
        super().__init__(inner.spool_dir, inner.memory_limit)
        self._prefix = prefix
        self._inner = inner
        self.size = len(prefix) + inner.size

    def write(self, data: bytes) -> None:
        raise RuntimeError("PrefixedBody is read-only")

    @property
    def in_memory(self) -> bool:
        return self._inner.in_memory

    def getvalue(self) -> bytes:
        return self._prefix + self._inner.getvalue()

    def head(self, limit: int) -> bytes:
        return (self._prefix + self._inner.head(max(0, limit - len(self._prefix))))[:limit]

    def copy_to(self, out: BinaryIO) -> None:
        out.write(self._prefix)
        self._inner.copy_to(out)

    def iter_chunks(self, size: int = 1 << 20) -> Iterable[bytes]:
        if self._prefix:
            yield self._prefix
        yield from self._inner.iter_chunks(size)

    def close(self) -> None:
        pass  # the inner body belongs to the session


def header_fields(head: bytes) -> tuple[list[tuple[str, bytes]], bool]:
    """(name, unfolded value) of each field of the header block at the start of `head`; and whether
    the block ends (blank line) within `head`. Lines that are not fields are skipped."""
    end = header_end(head)
    complete = end >= 0
    block = head[: end - 2] if complete else head
    fields: list[tuple[str, bytes]] = []
    for raw in re.split(rb"\r\n(?![ \t])", block):  # RFC 5322 §2.2.3: folded lines start with WSP
        m = _FIELD_NAME.match(raw)
        if m:
            value = raw[m.end():].replace(b"\r\n", b"").strip(b" \t")
            fields.append((m.group(1).decode("ascii").lower(), value))
    return fields, complete


def header_mailboxes(value: bytes) -> list[str] | None:
    """The addr-specs of an address-list header value; None when one of them is unusable."""
    out = []
    for a in parse_addresses(value):
        if a.host is None:  # group start or end
            continue
        if a.mailbox in (None, MISSING_MAILBOX) or a.host == MISSING_DOMAIN:
            return None
        assert a.mailbox is not None
        out.append(f"{a.mailbox.decode('utf-8', 'replace')}@{a.host.decode('utf-8', 'replace')}")
    return out


class SubmissionPipeline(SMTPPipeline):
    """Ports 587/465: mail from our authenticated users to anyone."""

    __slots__ = ("_owned", "scanner", "signer")

    relay = True

    def __init__(self, config: Config, directory: Directory, mda: MailDelivery, queue: Enqueuer,
                 signer: Signer | None = None, scanner: InboundCheck | None = None) -> None:
        super().__init__(config, directory, mda, queue)
        self.signer = signer  # None: `[mailauth] dkim_sign` is off
        #: `[antispam] scan_outbound`: the content filter sees our users' mail too, so that a compromised
        #: account sending spam is refused (550 5.7.1) instead of relayed.
        self.scanner = scanner
        self._owned: dict[str, set[str]] = {}

    # -- sender policy --------------------------------------------------------------------------

    async def _addresses(self, user: User) -> set[str]:
        owned = self._owned.get(user.address)
        if owned is None:
            owned = await asyncio.to_thread(self.directory.addresses_of, user)
            self._owned[user.address] = owned
        return owned

    async def may_send_as(self, user: User, address: str) -> bool:
        """May `user` use `address` as sender (MAIL FROM, From, Sender)? (`submission.sender_policy`)"""
        policy = self.config.submission.sender_policy
        if policy == "any":
            return True
        try:
            addr = normalize_address(address)
        except AccountError:
            return False
        local, _, domain = addr.rpartition("@")
        owned = await self._addresses(user)
        if policy == "domain":
            return domain in {a.rpartition("@")[2] for a in owned}
        delim = self.config.mailbox.recipient_delimiter
        base = f"{local.split(delim, 1)[0]}@{domain}" if delim and delim in local else addr
        return addr in owned or base in owned

    # -- SMTP stages ----------------------------------------------------------------------------

    async def on_mail(self, env: Envelope, addr: Address, params: dict[str, str | None]) -> Reply:
        user = env.auth_user
        if user is None:  # the core refuses MAIL before AUTH already; never rely on it alone
            return R530_AUTH_REQUIRED
        if addr.source_route:
            return R553_SOURCE_ROUTE
        if addr.is_null:
            if self.config.submission.sender_policy != "any":
                return R553_NULL_SENDER
        else:
            try:
                allowed = await self.may_send_as(user, addr.mailbox)
            except StoreUnavailable as exc:  # cluster mode: the account database is out of reach
                log.error("%s: sender check of %s failed: %s", env.qid, user.address, exc)
                return R451_TEMP_LOOKUP
            if not allowed:
                log.info("%s: %s may not send as <%s>", env.qid, user.address, addr.mailbox)
                return R553_SENDER_NOT_OWNED
        limit = self.config.submission.max_messages_per_day
        if limit:
            try:
                sent = await self.queue.sends_today(user.address)
            except Exception as exc:  # the queue's database is away (cluster mode): try again later
                log.error("%s: daily limit of %s not checked: %s", env.qid, user.address, exc)
                return R451_LOCAL_ERROR
            if sent >= limit:
                log.info("%s: %s reached its daily limit of %d messages", env.qid, user.address, limit)
                return R450_DAILY_LIMIT
        env.mail_from = addr.mailbox
        env.mail_params = params
        return R250_SENDER_OK

    async def on_rcpt(self, env: Envelope, addr: Address, params: dict[str, str | None]) -> Reply:
        if addr.source_route:
            return R553_SOURCE_ROUTE
        if relay_trick(addr):  # RFC 5321 §3.6.1: no % or ! routing, even for our own users
            return R550_RELAY_SYNTAX
        if addr.is_postmaster:
            return await super().on_rcpt(env, addr, params)
        if addr.is_literal:
            return R550_LITERAL
        try:
            res = await asyncio.to_thread(self.directory.resolve, addr.mailbox)
        except StoreUnavailable as exc:  # cluster mode: the account database is out of reach
            log.error("recipient lookup of %s failed: %s", addr.mailbox, exc)
            return R451_TEMP_LOOKUP
        return self.expand(env, addr.mailbox, res, params)

    async def on_message(self, env: Envelope, body: MessageBody) -> list[Reply]:
        n = len(env.recipients)
        user = env.auth_user
        if user is None:
            return [R530_AUTH_REQUIRED] * n
        head = body.head(HEADER_LIMIT)
        refused = self.check_head(head, body.size)
        if refused is not None:
            return [refused] * n
        fields, _complete = header_fields(head)
        # RFC 5322 §3.6: one From; RFC 6409 §6.1: the MSA may check it against the authenticated user
        froms = [v for name, v in fields if name == "from"]
        senders = [v for name, v in fields if name == "sender"]
        if len(froms) != 1 or len(senders) > 1:
            return [R550_BAD_FROM] * n
        mailboxes = header_mailboxes(froms[0])
        sender_mbx = header_mailboxes(senders[0]) if senders else []
        if not mailboxes or sender_mbx is None:
            return [R550_BAD_FROM] * n
        for a in mailboxes + sender_mbx:
            try:
                allowed = await self.may_send_as(user, a)
            except StoreUnavailable as exc:  # cluster mode: the account database is out of reach
                log.error("%s: sender check of %s failed: %s", env.qid, user.address, exc)
                return [R451_TEMP_LOOKUP] * n
            if not allowed:
                log.info("%s: %s may not use From/Sender <%s>", env.qid, user.address, a)
                return [R553_FROM_NOT_OWNED] * n
        names = {name for name, _ in fields}
        added = b""
        if "date" not in names:  # RFC 6409 §8.2
            added += f"Date: {email.utils.formatdate(localtime=True)}\r\n".encode()
        if "message-id" not in names:  # RFC 6409 §8.3
            added += f"Message-ID: <{env.qid}.{secrets.token_hex(8)}@{self.config.hostname}>\r\n".encode()
        if self.scanner is not None:
            verdict = await self.scanner.evaluate(env, body)
            if verdict.action in (Action.REJECT, Action.DEFER):
                log.info("%s: outbound message of %s refused by the spam filter: %s", env.qid, user.address,
                         "; ".join(verdict.reasons))
                return [verdict.reply or R451_LOCAL_ERROR] * n
        received = self.received(env)
        signature = b""
        if self.signer is not None:
            try:
                signature = await self.signer.sign(env, PrefixedBody(added, body) if added else body)
            except StoreUnavailable as exc:  # cluster mode: the key is out of reach (an outage: one line)
                log.error("%s: DKIM signing failed, the client is told to retry: %s", env.qid, exc)
                return [R451_LOCAL_ERROR] * n
            except Exception:
                log.exception("%s: DKIM signing failed", env.qid)
                return [R451_LOCAL_ERROR] * n
        prefix = signature + received + added
        return await self._deliver(env, body, prefix)

    async def _deliver(self, env: Envelope, body: MessageBody, prefix: bytes) -> list[Reply]:
        n = len(env.recipients)
        remote = remote_targets(env.recipients)
        qid = env.qid
        try:
            if remote:
                qid = await self.queue.enqueue(env, remote, prefix, body) or qid
            # local recipients: straight to the MDA ("delivered", not queued)
            local = await self.mda.deliver_recipients(env.recipients, return_path(env.mail_from) + prefix, body,
                                                      env.mail_from)
            if local.failed_users:  # disk trouble for some: the queue retries them
                await self.queue.enqueue(env, list(local.failed_users), prefix, body)
        except StoreUnavailable as exc:  # cluster mode: neither delivered nor queued; the client retries
            log.error("%s: submission failed: %s", env.qid, exc)
            return [R451_LOCAL_ERROR] * n
        except Exception:
            log.exception("%s: submission failed", env.qid)
            return [R451_LOCAL_ERROR] * n
        log.info("%s: submitted by %s from=<%s> to=%s", qid, env.auth_user.address if env.auth_user else "?",
                 env.mail_from, ",".join(r.address for r in env.recipients))
        return [Reply(250, "2.0.0", f"Ok: queued as {qid}")] * n
