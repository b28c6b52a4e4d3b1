"""The MDA: durable local delivery of one message to several users, off the event loop.

Each recipient gets its own file (Maildir) or append (mbox), written and fsynced by a worker
thread of the delivery agent process (store/agent.py; it says why a process), or of this process
for the rare bodies the agent cannot take (a spilled body with rewritten headers); concurrent
sessions' fsyncs run in parallel, so the disk groups them. Results are per recipient, so LMTP can
answer each one and SMTP can answer 250 only when all succeeded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..message.types import LocalOutcome, MessageBody, Recipient, User
from ..metrics import Metrics
from .agent import MAX_DATA as AGENT_MAX_DATA
from .agent import Agent, AgentError
from .maildir import QuotaHold, deliver_to_user
from .quota import OVER_QUOTA

log = logging.getLogger("postier.mda")

@dataclass(frozen=True)
class DeliveryResult:
    user: User
    ok: bool
    detail: str  # file name on success, the error otherwise


class LocalDelivery:
    def __init__(self, mail_root: Path, workers: int = 16, agent: bool = True, metrics: Metrics | None = None):
        self.mail_root = mail_root
        #: The agent is another process: its deliveries are counted here, from the results it returns.
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mda")
        self.agent = Agent(mail_root) if agent else None
        #: Called (in the event loop) after each successful Maildir delivery: (user, folder).
        self.listeners: list[Callable[[User, str], None]] = []

    def deliver_one(self, user: User, prefix: bytes, body: MessageBody | bytes, envelope_from: str,
                    folder: str | None = None, info: str = "") -> DeliveryResult:
        """Blocking delivery to one user."""
        ok, detail = deliver_to_user(self.mail_root, user, prefix, body, envelope_from, folder, info)
        return DeliveryResult(user, ok, detail)

    def quota_used(self, user: User) -> int:
        """Bytes the user's mailboxes use now, for the RCPT check (store/quota.py; blocking)."""
        return QuotaHold(self.mail_root, user).usage()

    def quota_warning_due(self, user: User) -> int | None:
        """The quota warning level (store/quota.py WARN_LEVELS) the user newly reached, recorded as
        warned, or None (pipeline/quota.py `QuotaWarnings`; blocking)."""
        return QuotaHold(self.mail_root, user).warning_due()

    async def deliver(self, users: list[tuple[User, str | None]], prefix: bytes,
                      body: MessageBody | bytes, envelope_from: str, info: str = "") -> list[DeliveryResult]:
        """Deliver to every (user, folder) in parallel worker threads; one result per user. `info` is
        the Maildir flags suffix of the stored copies (":2,FS", RFC 5232 §5 for Sieve's flags)."""
        results = None
        started = time.monotonic()
        if self.agent is not None:
            results = await self._by_agent(self.agent, users, prefix, body, envelope_from, info)
        if results is None:
            loop = asyncio.get_running_loop()
            futs = [loop.run_in_executor(self.executor, self.deliver_one, u, prefix, body, envelope_from, f, info)
                    for u, f in users]
            results = [await futs[0]] if len(futs) == 1 else list(await asyncio.gather(*futs))
        if self.metrics is not None:
            ok = sum(r.ok for r in results)
            self.metrics.local_delivery(ok, len(results) - ok, time.monotonic() - started)
        for (_u, f), r in zip(users, results, strict=True):
            if r.ok:
                for cb in self.listeners:
                    try:
                        cb(r.user, f or "INBOX")
                    except Exception:  # a listener's bug must not fail a delivery
                        log.exception("delivery listener failed")
        return results

    async def deliver_recipients(self, recipients: Sequence[Recipient], prefix: bytes, body: MessageBody | bytes,
                                 envelope_from: str, folder: str | None = None) -> LocalOutcome:
        """Local delivery after alias expansion, for the pipelines and the queue alike: each distinct
        user once, whatever the number of recipients reaching them (`MailDelivery`)."""
        targets: dict[str, User] = {}
        for r in recipients:
            for u in r.users:
                targets.setdefault(u.address, u)
        if not targets:
            return LocalOutcome(frozenset(r.address for r in recipients), ())
        results = await self.deliver([(u, folder) for u in targets.values()], prefix, body, envelope_from)
        ok = {r.user.address for r in results if r.ok}
        return LocalOutcome(frozenset(r.address for r in recipients if all(u.address in ok for u in r.users)),
                            tuple(r.user.address for r in results if not r.ok),
                            tuple(r.user.address for r in results if not r.ok and r.detail == OVER_QUOTA))

    async def _by_agent(self, agent: Agent, users: list[tuple[User, str | None]], prefix: bytes,
                        body: MessageBody | bytes, envelope_from: str, info: str = "") -> list[DeliveryResult] | None:
        """Deliver through the agent; None when this body cannot go there (delivered here instead)."""
        data: list[bytes] | None = None
        path: str | None = None
        if isinstance(body, bytes):
            data, size = [body], len(body)
        elif body.in_memory:
            data, size = list(body.iter_chunks()), body.size
        elif type(body) is MessageBody:  # a spilled body: the agent reads the spool file
            path, size = body.spool_path, body.size
        else:
            return None
        if data is not None and len(prefix) + size > AGENT_MAX_DATA:
            return None  # a large body handed over in memory (not by the SMTP listeners)
        try:
            got = await agent.deliver(users, prefix, data, path, size, envelope_from, info)
        except AgentError as exc:
            log.error("delivery failed: %s", exc)
            return [DeliveryResult(u, False, str(exc)) for u, _f in users]
        return [DeliveryResult(u, ok, detail) for (u, _f), (ok, detail) in zip(users, got, strict=True)]

    def close(self) -> None:
        if self.agent is not None:
            self.agent.close()
        self.executor.shutdown(wait=True)
