"""The submission pipeline in-process: the DKIM signer sees the message as it will leave,
PrefixedBody, header parsing, and the queue hook's inputs."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postier.accounts import Accounts
from postier.config import Config, Submission
from postier.pipeline.submission import PrefixedBody, SubmissionPipeline, header_fields, header_mailboxes
from postier.proto.smtp.address import parse_path
from postier.store.delivery import LocalDelivery
from postier.message.types import Envelope, MessageBody


class Signer:
    def __init__(self) -> None:
        self.seen: list[bytes] = []

    async def sign(self, env: Envelope, body: MessageBody) -> bytes:
        self.seen.append(body.getvalue())
        return b"DKIM-Signature: v=1; d=a.test; b=fake\r\n"


class Queue:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], bytes, bytes]] = []

    async def enqueue(self, env: Envelope, recipients: list[str], prefix: bytes, body: MessageBody) -> str:
        self.calls.append((recipients, prefix, body.getvalue()))
        return "ABCDEF0123"

    async def sends_today(self, user: str) -> int:
        return 0


@dataclass
class Parts:
    """What a submission pipeline is made from (as server/app.py build_app makes it)."""

    config: Config
    accounts: Accounts
    mda: LocalDelivery

    def pipeline(self, queue: Queue | None = None, signer: Any = None) -> SubmissionPipeline:
        return SubmissionPipeline(self.config, self.accounts, self.mda, queue or Queue(), signer)

    async def close(self) -> None:
        self.mda.close()
        self.accounts.close()


def services(tmp_path: Path, **sub: Any) -> Parts:
    cfg = Config(hostname="mail.a.test", data_dir=tmp_path, submission=Submission(**sub))
    accounts = Accounts(cfg.accounts_db, cfg.mailbox.recipient_delimiter, cfg.mailbox.default_format)
    accounts.set_hash_cost(1, 8, 1)  # argon2's cheapest: fast logins
    accounts.add_domain("a.test")
    accounts.add_user("alice@a.test", "password123")
    return Parts(cfg, accounts, LocalDelivery(cfg.mail_root, agent=cfg.mailbox.delivery_agent))


def body_of(data: bytes, tmp_path: Path) -> MessageBody:
    b = MessageBody(tmp_path / "spool", memory_limit=64)
    for i in range(0, len(data), 50):
        b.write(data[i:i + 50])
    return b


async def submit(pipe: SubmissionPipeline, env: Envelope, sender: str, rcpts: list[str], data: bytes,
                 tmp_path: Path) -> list[Any]:
    r = await pipe.on_mail(env, parse_path(f"<{sender}>")[0], {})
    assert r.code == 250, r
    for a in rcpts:
        r = await pipe.on_rcpt(env, parse_path(f"<{a}>")[0], {})
        assert r.code == 250, r
    return await pipe.on_message(env, body_of(data, tmp_path))


def test_signer_sees_added_headers_and_queue_gets_prefix(tmp_path: Path) -> None:
    async def main() -> None:
        svc = services(tmp_path)
        signer, queue = Signer(), Queue()
        pipe = svc.pipeline(queue, signer)
        env = Envelope(role="submission", peer_ip="192.0.2.1", helo="laptop", esmtp=True, tls="TLSv1.3 X",
                       auth_user=svc.accounts.get_user("alice@a.test"))
        data = b"From: Alice <alice@a.test>\r\nSubject: hi\r\n\r\n" + b"body " * 40 + b"\r\n"
        replies = await submit(pipe, env, "alice@a.test", ["bob@b.test", "alice@a.test"], data, tmp_path)
        assert [r.code for r in replies] == [250, 250] and "queued as ABCDEF0123" in replies[0].text
        (seen,) = signer.seen
        assert seen.startswith(b"Date: ") and b"\r\nMessage-ID: <" in seen and seen.endswith(data)
        ((rcpts, prefix, body),) = queue.calls
        assert rcpts == ["bob@b.test"] and body == data  # the body itself is never rewritten
        assert prefix.startswith(b"DKIM-Signature: v=1; d=a.test; b=fake\r\nReceived: from laptop ([192.0.2.1])")
        assert prefix.endswith(seen[: len(seen) - len(data)])  # Date/Message-ID as the signer saw them
        (local,) = (tmp_path / "mail" / "a.test" / "alice" / "Maildir" / "new").iterdir()
        assert local.read_bytes() == b"Return-Path: <alice@a.test>\r\n" + prefix + data
        await svc.close()
    asyncio.run(main())


def test_signer_failure_is_temporary(tmp_path: Path) -> None:
    class Broken:
        async def sign(self, env: Envelope, body: MessageBody) -> bytes:
            raise RuntimeError("no key")

    async def main() -> None:
        svc = services(tmp_path)
        pipe = svc.pipeline(Queue(), Broken())
        env = Envelope(role="submission", peer_ip="192.0.2.1", auth_user=svc.accounts.get_user("alice@a.test"))
        data = b"From: alice@a.test\r\nDate: x\r\nMessage-ID: <x@y>\r\n\r\nb\r\n"
        (r,) = await submit(pipe, env, "alice@a.test", ["bob@b.test"], data, tmp_path)
        assert (r.code, r.enhanced) == (451, "4.3.0")
        await svc.close()
    asyncio.run(main())


def test_domain_and_any_policies(tmp_path: Path) -> None:
    async def main() -> None:
        for policy, sender, code in (("domain", "anyone@a.test", 250), ("domain", "x@b.test", 553),
                                     ("any", "x@b.test", 250), ("any", "", 250), ("own", "x@a.test", 553)):
            root = tmp_path / f"{policy}-{code}-{len(sender)}"
            svc = services(root, sender_policy=policy)
            pipe = svc.pipeline()
            env = Envelope(role="submission", peer_ip="192.0.2.1", auth_user=svc.accounts.get_user("alice@a.test"))
            r = await pipe.on_mail(env, parse_path(f"<{sender}>", null_ok=True)[0], {})
            assert r.code == code, (policy, sender, r)
            await svc.close()
    asyncio.run(main())


def test_prefixed_body(tmp_path: Path) -> None:
    inner = body_of(b"x" * 300, tmp_path)  # spilled to a file (memory_limit 64)
    assert not inner.in_memory
    view = PrefixedBody(b"H: 1\r\n", inner)
    assert view.size == 306 and view.getvalue() == b"H: 1\r\n" + b"x" * 300
    assert view.head(10) == b"H: 1\r\nxxxx" and b"".join(view.iter_chunks(100)) == view.getvalue()
    with open(tmp_path / "out", "wb") as f:
        view.copy_to(f)
    assert (tmp_path / "out").read_bytes() == view.getvalue()
    view.close()
    assert inner.getvalue() == b"x" * 300  # closing the view leaves the session's body alone
    inner.close()


def test_header_parsing() -> None:
    fields, complete = header_fields(b"From: a@b\r\nSubject: one\r\n two\r\nX:\r\n\r\nFrom: body@x\r\n")
    assert complete and fields == [("from", b"a@b"), ("subject", b"one two"), ("x", b"")]
    assert header_fields(b"From: a@b\r\nSubj")[1] is False
    assert header_mailboxes(b'"Alice" <alice@a.test>, bob@b.test (Bob)') == ["alice@a.test", "bob@b.test"]
    assert header_mailboxes(b"undisclosed-recipients:;") == []
    assert header_mailboxes(b"alice") is None
