"""Peak memory (tracemalloc) of a Sieve user's delivery of one large spooled message
(pipeline/sieve.py `SieveFilter.deliver`), per kind of script: header-only fileinto, editheader then
fileinto, body :text, redirect (into the real queue's spool).

The message (--size MiB) is a multipart with a text part before and one after a base64 attachment
(bench/fts_large.py), spooled to a file as the SMTP listeners spool it; the delivery writes into a
fresh Maildir in this process (no delivery agent), so everything it allocates is counted. `--tree DIR`
runs on another checkout of postier (e.g. `git archive` of an earlier commit into DIR), to compare
before and after a change:

    .venv/bin/python -m bench sieve-large [--size 30] [--tree DIR]
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from typing import Any
from pathlib import Path

from bench.fts_large import large_message
from bench.trees import size_bench


SCRIPTS = {
    "fileinto": 'require "fileinto";\nif header :contains "subject" "large" { fileinto "Big"; }\n',
    "editheader": 'require ["editheader", "fileinto"];\naddheader "X-Tag" "tagged";\nfileinto "Tagged";\n',
    "body-text": 'require ["body", "fileinto"];\nif body :text :contains "aardvark" { fileinto "Found"; }\n',
    "redirect": 'redirect "carol@b.test";\n',
}
PREFIX = b"Return-Path: <x@remote.test>\r\nReceived: from remote.test; Sat, 5 Dec 2026 02:00:00 +0000\r\n"


async def deliver_through_script(sieve: Any, user: Any, script: str, prefix: bytes, data: bytes,
                                 spool: Path, sender: str = "x@remote.test") -> tuple[Any, int]:
    """`user`'s active script made `script`, `data` spooled in pieces of 1 MiB (a MessageBody in
    `spool`, as SMTP leaves it) and delivered through `sieve` (a `pipeline.sieve.SieveFilter`):
    (its outcome, tracemalloc's peak during the delivery). Shared with the tests of this path."""
    import tracemalloc

    from postier.message.types import Envelope, MessageBody, Recipient

    scripts = sieve.store_for(user)
    scripts.put("main", script.encode())
    scripts.set_active("main")
    body = MessageBody(spool)
    try:
        for i in range(0, len(data), 1 << 20):
            body.write(data[i:i + (1 << 20)])
        assert not body.in_memory, "a message this small is not spooled: nothing large is measured"
        env = Envelope(role="mx", peer_ip="127.0.0.1", mail_from=sender,
                       recipients=[Recipient(user.address, (user,))])
        tracemalloc.start()
        try:
            got = await sieve.deliver(env, env.recipients, prefix, body, None, False)
            return got, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    finally:
        body.close()


async def _one(tmp: Path, script: str, data: bytes) -> int:
    import random

    from postier.accounts import Accounts
    from postier.config import Config
    from postier.message.types import User
    from postier.pipeline.sieve import SieveFilter
    from postier.queue.runner import Queue
    from postier.queue.schedule import ManualClock
    from postier.resolver.fake import FakeResolver
    from postier.store.delivery import LocalDelivery

    config = Config(hostname="mail.a.test", data_dir=tmp)
    accounts = Accounts(config.accounts_db, config.mailbox.recipient_delimiter, config.mailbox.default_format)
    mda = LocalDelivery(config.mail_root, agent=False)
    queue = Queue(config, accounts, mda, FakeResolver(), clock=ManualClock(), rng=random.Random(1))
    user = User("alice@a.test", "alice", "a.test", "maildir")
    sieve = SieveFilter(config, mda, queue, None)
    try:
        got, peak = await deliver_through_script(sieve, user, script, PREFIX, data, config.spool_dir)
        assert got.local.delivered == {user.address}, got
    finally:
        await queue.stop()
        mda.close()
        accounts.close()
    return peak


def _child(size: int) -> dict[str, object]:
    data = large_message(size << 20, "aardvark", "zebrafinch")
    out: dict[str, object] = {}
    for name, script in SCRIPTS.items():
        with tempfile.TemporaryDirectory(prefix="sieve-large-") as tmp:
            out[f"{name}_peak_mib"] = round(asyncio.run(_one(Path(tmp), script, data)) / (1 << 20), 2)
    import postier

    return {"postier": str(Path(postier.__file__).parent), "size_mib": size, **out}


def main(argv: list[str]) -> int:
    return size_bench(argv, "sieve_large", __doc__.splitlines()[0], _child)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
