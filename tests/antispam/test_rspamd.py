"""postier's Rspamd client against a real Rspamd: actions, headers, learning, failure."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.antispam.builtin import GTUBE
from postier.antispam.rspamd import Envelope, RspamdClient, SpamDecision, parse_check_reply
from tests.dnsserver import DNSServer

from .rspamd_server import RspamdServer

pytestmark = pytest.mark.slow

HAM = (b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\nSubject: lunch tomorrow\r\n"
       b"Date: Fri, 04 Dec 2026 10:00:00 +0000\r\nMessage-ID: <lunch1@a.test>\r\n"
       b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
       b"Hi Bob, shall we have lunch tomorrow at noon? Alice\r\n")
ENV = Envelope(ip="192.0.2.10", helo="mail.a.test", sender="alice@a.test", recipients=("bob@b.test",),
               queue_id="Q1", hostname="mail.a.test")


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RspamdServer]:
    with DNSServer() as dns:
        # The sender is a well-configured server: forward and reverse DNS agree, the domain has an MX.
        dns.add("mail.a.test", "A", "192.0.2.10")
        dns.add_ptr("192.0.2.10", "mail.a.test")
        dns.add("a.test", "MX", "10 mail.a.test.")
        dns.add("a.test", "A", "192.0.2.10")
        srv = RspamdServer(tmp_path_factory.mktemp("rspamd"), dns.nameserver)
        srv.start()
        try:
            yield srv
        finally:
            srv.stop()


def client(srv: RspamdServer) -> RspamdClient:
    return RspamdClient(srv.url, srv.controller, srv.password, timeout=20)


def run[T](coro_fn: object) -> T:
    return asyncio.run(coro_fn)  # type: ignore[arg-type]


def test_gtube_rejected(rspamd: RspamdServer) -> None:
    async def go() -> None:
        c = client(rspamd)
        try:
            r = await c.check(HAM.replace(b"Alice\r\n", GTUBE + b"\r\n"), ENV)
        finally:
            await c.close()
        assert r.decision is SpamDecision.REJECT, r
        assert "Gtube" in r.smtp_message or "GTUBE" in r.report() or r.action == "reject"
    asyncio.run(go())


def test_clean_message_no_action_with_headers(rspamd: RspamdServer, tmp_path: Path) -> None:
    f = tmp_path / "msg.eml"
    f.write_bytes(HAM)

    async def go() -> None:
        c = client(rspamd)
        try:
            r1 = await c.check(HAM, ENV)
            r2 = await c.check(f, ENV, prefix=b"X-Test: streamed\r\n")  # streamed from a file
        finally:
            await c.close()
        for r in (r1, r2):
            assert r.decision is SpamDecision.ACCEPT, r.report(40)
            assert r.required > 0
            names = {s.name for s in r.symbols}
            assert not any(n.startswith(("R_SPF", "R_DKIM", "DMARC")) for n in names), names
            hdrs = dict(r.spam_headers())
            assert hdrs["X-Spam-Status"].startswith("No, score=")
    asyncio.run(go())


def test_learn_spam_reaches_bayes(rspamd: RspamdServer) -> None:
    async def go() -> None:
        c = client(rspamd)
        try:
            before = (await c.stat()).get("learned", 0)
            ok, why = await c.learn(HAM.replace(b"lunch1", b"spam1").replace(b"lunch tomorrow", b"cheap pills"),
                                    spam=True)
            assert ok, why
            after = (await c.stat()).get("learned", 0)
        finally:
            await c.close()
        assert after == before + 1
    asyncio.run(go())


def test_unreachable_is_unknown() -> None:
    async def go() -> None:
        c = RspamdClient("http://127.0.0.1:9", timeout=2)
        try:
            r = await c.check(HAM, ENV)
        finally:
            await c.close()
        assert r.unavailable and r.spam_headers() == [("X-Spam-Status", "unknown")]
    asyncio.run(go())


def test_parse_reply_actions_and_milter() -> None:
    r = parse_check_reply({"action": "add header", "score": 7.5, "required_score": 15,
                           "symbols": {"BAYES_SPAM": {"score": 5.1}, "X": {"score": 0}},
                           "milter": {"add_headers": {"X-Extra": {"value": "1", "order": 0}},
                                      "remove_headers": {"X-Old": 1}}})
    assert r.decision is SpamDecision.JUNK and r.report() == "BAYES_SPAM(5.1)"
    assert r.add_headers == (("X-Extra", "1"),) and r.remove_headers == (("X-Old", 1),)
    assert parse_check_reply({"action": "soft reject"}).decision is SpamDecision.DEFER
    with pytest.raises(ValueError):
        parse_check_reply({"action": "explode"})


def test_learning_queue_survives_restart_and_retries(rspamd: RspamdServer, tmp_path: Path) -> None:
    from postier.antispam.learning import LearnQueue

    now = [1000.0]
    q = LearnQueue(tmp_path / "learn.sqlite", clock=lambda: now[0])
    q.add("bob@b.test", HAM.replace(b"lunch1", b"learn-q1").replace(b"lunch tomorrow", b"win money"), spam=True)
    q.close()
    q = LearnQueue(tmp_path / "learn.sqlite", clock=lambda: now[0])  # a restart: the request is still there
    assert q.pending() == 1

    async def go() -> None:
        down = RspamdClient("http://127.0.0.1:9", "http://127.0.0.1:9", timeout=2)
        up = client(rspamd)
        try:
            assert await q.run_once(down.learn) == 0  # Rspamd down: kept, retried later
            assert q.pending() == 1
            assert await q.run_once(up.learn) == 0  # not due yet (backoff)
            now[0] += 31
            before = (await up.stat()).get("learned", 0)
            assert await q.run_once(up.learn) == 1
            assert (await up.stat()).get("learned", 0) == before + 1
        finally:
            await down.close()
            await up.close()
    asyncio.run(go())
    assert q.pending() == 0


def test_learning_queue_bounded(tmp_path: Path) -> None:
    from postier.antispam.learning import LearnQueue

    q = LearnQueue(tmp_path / "learn.sqlite", max_pending=3, max_size=10)
    for i in range(5):
        q.add("u@b.test", b"x" * 100 + str(i).encode(), spam=bool(i % 2))
    assert q.pending() == 3
