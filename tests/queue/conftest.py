"""In-process queue fixtures: a Queue over real spool/SQLite, a FakeResolver, a manual clock, a fake MX."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from postier.accounts import Accounts
from postier.config import Config, Outbound, Queue as QueueSettings
from postier.queue.runner import Queue
from postier.queue.schedule import ManualClock
from postier.resolver.fake import FakeResolver
from postier.store.delivery import LocalDelivery

from .fakemx import FakeMX


def message(sender: str = "alice@a.test", to: str = "bob@b.test", subject: str = "hello",
            body: str = "Hi.\r\n") -> bytes:
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@a.test>\r\n\r\n"
            f"{body}").encode()


@dataclass
class QEnv:
    queue: Queue
    accounts: Accounts
    mda: LocalDelivery
    config: Config
    dns: FakeResolver
    clock: ManualClock
    mx: FakeMX | None
    root: Path

    def maildir(self, address: str) -> list[bytes]:
        local, domain = address.split("@")
        md = self.root / "mail" / domain / local / "Maildir" / "new"
        return [p.read_bytes() for p in sorted(md.iterdir())] if md.is_dir() else []

    async def state(self, msg_id: str) -> list[Any]:
        return await self.queue._read(self.queue.spool.recipients, msg_id)


@contextlib.asynccontextmanager
async def queue_env(root: Path, mx: FakeMX | None = None, port: int = 0, *, queue: dict[str, Any] | None = None,
                    outbound: dict[str, Any] | None = None, spool: Any = None, **cfg: Any) -> AsyncIterator[QEnv]:
    if mx is not None:
        port = await mx.start()
    config = Config(hostname="mail.a.test", data_dir=root,
                    outbound=Outbound(smtp_port=port or 25, **(outbound or {})),
                    queue=dataclasses.replace(QueueSettings(), **(queue or {})), **cfg)
    accounts = Accounts(config.accounts_db, config.mailbox.recipient_delimiter, config.mailbox.default_format)
    accounts.set_hash_cost(1, 8, 1)  # argon2's cheapest: the queue never checks passwords
    accounts.add_domain("a.test")
    accounts.add_user("alice@a.test", "password123")
    mda = LocalDelivery(config.mail_root, agent=config.mailbox.delivery_agent)
    dns = FakeResolver()
    clock = ManualClock()
    q = Queue(config, accounts, mda, dns, clock=clock, rng=random.Random(1), spool=spool)
    env = QEnv(q, accounts, mda, config, dns, clock, mx, root)
    try:
        yield env
    finally:
        await q.stop()
        if mx is not None:
            await mx.stop()
        mda.close()
        accounts.close()
