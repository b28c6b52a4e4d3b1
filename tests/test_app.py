"""The composition root (server/app.py): what build_app makes, and how the MX runs several inbound checks."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from postier.config import HTTP_ROLES, STANDARD_PORTS, Config, Auth, MailAuth
from postier.message.types import Action, Envelope, MessageBody, Verdict
from postier.pipeline.inbound import MXPipeline
from postier.pipeline.jobs import ReportJob
from postier.antispam.check import SpamCheck
from postier.pipeline.mailauth import InboundAuth
from postier.pipeline.submission import SubmissionPipeline
from postier.proto.smtp.address import Address, parse_path
from postier.proto.smtp.replies import Reply
from postier.server.app import ROLE_SESSIONS, App, build_app


def make_app(root: Path, **mailauth: Any) -> App:
    cfg = Config(hostname="mail.a.test", data_dir=root, mailauth=replace(MailAuth(), **mailauth),
                 auth=Auth(argon2_time_cost=1, argon2_memory_kib=8, argon2_parallelism=1))  # fast logins
    app = build_app(cfg)
    app.accounts.add_domain("a.test")
    app.accounts.add_user("alice@a.test", "password123")
    app.accounts.add_user("bob@a.test", "password123")
    return app


def test_every_role_has_a_session_and_every_smtp_role_a_pipeline(tmp_path: Path) -> None:
    assert set(ROLE_SESSIONS) == set(STANDARD_PORTS) - HTTP_ROLES  # http/https: the web service
    app = make_app(tmp_path)
    try:
        assert set(app.pipelines) == {"smtp", "submission", "submissions", "lmtp"}
        mx, sub = app.pipelines["smtp"](), app.pipelines["submission"]()
        assert isinstance(mx, MXPipeline) and isinstance(sub, SubmissionPipeline)
        assert mx is not app.pipelines["smtp"]()  # one per session: sessions keep state in them
        # mail authentication first, then the spam checks (GTUBE and HELO sanity are on by default)
        assert [type(c) for c in mx.checks] == [InboundAuth, SpamCheck] and not app.pipelines["lmtp"]().checks
        assert sub.signer is app.dkim is not None and mx.queue is app.queue is sub.queue
    finally:
        asyncio.run(app.close())


def test_features_the_config_turns_off_are_none(tmp_path: Path) -> None:
    app = make_app(tmp_path / "off", dkim_sign=False, dmarc=False)
    assert app.dkim is None and app.dmarc_reports is None and app.report_job is None
    assert app.pipelines["submission"]().signer is None  # type: ignore[attr-defined]
    asyncio.run(app.close())
    app = make_app(tmp_path / "on", dmarc_reports=True)
    assert app.dmarc_reports is not None and isinstance(app.report_job, ReportJob)

    async def run() -> None:
        await app.start()
        await app.close()

    asyncio.run(run())


class Check:
    """An inbound check that answers what it is told to."""

    def __init__(self, name: str, verdict: Verdict, mail_reply: Reply | None = None) -> None:
        self.name = name
        self.verdict = verdict
        self.mail_reply = mail_reply
        self.seen: list[bytes] = []

    async def check_mail(self, env: Envelope, address: Address) -> Reply | None:
        return self.mail_reply

    async def evaluate(self, env: Envelope, body: MessageBody) -> Verdict:
        self.seen.append(body.getvalue())
        return self.verdict

    async def check_rcpt(self, env: Envelope, address: str) -> Reply | None:
        return None


def _mx(app: App, *checks: Check) -> MXPipeline:
    return MXPipeline(app.config, app.accounts, app.mda, app.queue, checks)


async def _send(pipe: MXPipeline, tmp_path: Path, data: bytes) -> list[Reply]:
    env = Envelope(role="smtp", peer_ip="192.0.2.1", helo="mx.b.test", esmtp=True)
    r = await pipe.on_mail(env, parse_path("<x@b.test>")[0], {})
    if r.code != 250:
        return [r]
    assert (await pipe.on_rcpt(env, parse_path("<bob@a.test>")[0], {})).code == 250
    body = MessageBody(tmp_path / "spool")
    body.write(data)
    try:
        return await pipe.on_message(env, body)
    finally:
        body.close()


def test_inbound_checks_run_in_order(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    new = tmp_path / "mail" / "a.test" / "bob" / "Maildir"
    data = b"From: x@b.test\r\nSubject: hi\r\n\r\nbody\r\n"

    async def main() -> None:
        # headers of every check, the later one on top; junk from any check files the message in Junk
        first = Check("first", Verdict(Action.ACCEPT, headers=b"X-First: 1\r\n"))
        second = Check("second", Verdict(Action.JUNK, headers=b"X-Second: 1\r\n"))
        (r,) = await _send(_mx(app, first, second), tmp_path, data)
        assert r.code == 250 and first.seen == second.seen == [data]
        (msg,) = (new / ".Junk" / "new").iterdir()
        head = msg.read_bytes()
        assert head.index(b"X-Second") < head.index(b"X-First") < head.index(b"Received:")
        # the first refusal ends it: later checks never see the message, nothing is delivered
        refuse = Check("refuse", Verdict(Action.DEFER, Reply(451, "4.7.1", "later")))
        never = Check("never", Verdict(Action.ACCEPT))
        (r,) = await _send(_mx(app, refuse, never), tmp_path, data)
        assert (r.code, never.seen) == (451, [])
        # MAIL FROM: the first check that refuses answers
        no = Check("no", Verdict(), Reply(550, "5.7.23", "SPF"))
        (r,) = await _send(_mx(app, first, no), tmp_path, data)
        assert r.code == 550
        assert not (new / "new").exists() or not list((new / "new").iterdir())
        await app.close()

    asyncio.run(main())
