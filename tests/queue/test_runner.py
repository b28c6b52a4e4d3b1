"""The queue runner against scripted MX hosts: retries, bounces, routing, reuse, limits; time injected."""

from __future__ import annotations

import asyncio
from pathlib import Path

from postier.queue.spool import DELIVERED, QUEUED, RecipientSpec

from .conftest import QEnv, message, queue_env
from .fakemx import FakeMX

MX_IP = "127.0.0.12"


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(asyncio.wait_for(coro, 60))


def mx_for(env: QEnv, domain: str, ip: str = MX_IP, pref: int = 10, host: str | None = None) -> None:
    host = host or f"mx.{domain}"
    env.dns.add(domain, "MX", f"{pref} {host}")
    env.dns.add(host, "A", ip)


async def send(env: QEnv, to: list[str], sender: str = "alice@a.test", notify: str = "", **kw: object) -> str:
    return await env.queue.store(sender=sender, recipients=[RecipientSpec(a, notify) for a in to], prefix=b"",
                                 body=kw.pop("body", None) or message(sender, to[0]), **kw)  # type: ignore[arg-type]


def dsns(env: QEnv, address: str = "alice@a.test") -> list[bytes]:
    return env.maildir(address)


def test_delivered_once_and_removed(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP])
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            mid = await send(env, ["bob@b.test"])
            await env.queue.drain()
            assert len(mx.delivered) == 1
            d = mx.delivered[0]
            assert d.mail.startswith("MAIL FROM:<alice@a.test>") and "SIZE=" in d.mail
            assert d.rcpts == ["RCPT TO:<bob@b.test>"]
            assert d.data == message("alice@a.test", "bob@b.test")
            assert await env.state(mid) == []  # rows gone
            assert not env.queue.spool.path(mid).exists()  # file gone
            assert mx.pipelined_groups >= 1  # MAIL, RCPT and DATA went in one group (RFC 2920)
    run(main())


def test_4xx_then_success_is_delivered_once(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], final=["451 4.3.0 Try again later", "250 2.0.0 Ok"])
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            mid = await send(env, ["bob@b.test"])
            await env.queue.drain()
            (st,) = await env.state(mid)
            assert st.status == QUEUED and st.attempts == 1 and st.last_reply.startswith("451 4.3.0")
            assert st.next_attempt == env.clock.time() + 300  # queue.retry_initial
            assert await env.queue.run_once() == 0  # not due yet
            env.clock.advance(300)
            assert await env.queue.run_once() == 1
            assert len(mx.delivered) == 1 and mx.refused == ["451 4.3.0 Try again later"]
            assert await env.state(mid) == []
            assert dsns(env) == []
    run(main())


def test_backoff_grows_and_is_capped(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], final=["421 4.3.2 busy"])
        async with queue_env(tmp_path, mx, queue={"retry_initial": 100.0, "retry_max": 500.0}) as env:
            mx_for(env, "b.test")
            mid = await send(env, ["bob@b.test"])
            await env.queue.drain()
            waits = []
            for _ in range(5):
                (st,) = await env.state(mid)
                waits.append(st.next_attempt - env.clock.time())
                env.clock.advance(waits[-1])
                await env.queue.run_once()
            assert waits == [100, 200, 400, 500, 500]
    run(main())


def test_5xx_sends_one_dsn(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], rcpt_reply=lambda line: "550 5.1.1 <bob@b.test>: no such user")
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            mid = await send(env, ["bob@b.test"])
            await env.queue.drain()
            assert mx.delivered == []
            (dsn,) = dsns(env)  # the sender is local: the DSN is in alice's Maildir
            assert dsn.startswith(b"Return-Path: <>\r\n")
            assert b"Content-Type: multipart/report; report-type=delivery-status;" in dsn
            assert b"Final-Recipient: rfc822; bob@b.test\r\nAction: failed\r\nStatus: 5.1.1\r\n" in dsn
            assert b"Remote-MTA: dns; mx.b.test\r\n" in dsn
            assert b"Diagnostic-Code: smtp; 550 5.1.1 <bob@b.test>: no such user" in dsn
            assert b"Subject: hello\r\n" in dsn  # the original headers come back
            assert f"X-Postier-Queue-ID: {mid}".encode() in dsn
            assert await env.state(mid) == []
            assert env.queue.spool.count() == 0  # the DSN itself was delivered locally
    run(main())


def test_one_of_three_recipients_fails(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], rcpt_reply=lambda line: "550 5.1.1 unknown" if "carol" in line else "250 2.1.5 Ok")
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            mx_for(env, "c.test")
            await send(env, ["bob@b.test", "carol@b.test", "dave@c.test"])
            await env.queue.drain()
            got = sorted(r for d in mx.delivered for r in d.rcpts)
            assert got == ["RCPT TO:<bob@b.test>", "RCPT TO:<dave@c.test>"]
            (dsn,) = dsns(env)
            assert b"Final-Recipient: rfc822; carol@b.test" in dsn
            assert b"bob@b.test" not in dsn.split(b"Content-Type: message/delivery-status")[1].split(b"--")[0]
            assert env.queue.spool.count() == 0
    run(main())


def test_dns_servfail_is_retried_not_bounced(tmp_path: Path) -> None:
    async def main() -> None:
        async with queue_env(tmp_path, None, port=9) as env:
            env.dns.tempfail("b.test")
            mid = await send(env, ["bob@b.test"])
            await env.queue.drain()
            for _ in range(3):
                (st,) = await env.state(mid)
                assert st.status == QUEUED and "DNS" in st.last_reply and st.status_code == "4.4.3"
                env.clock.advance(st.next_attempt - env.clock.time())
                await env.queue.run_once()
            assert dsns(env) == []
            attempts = await env.queue._read(env.queue.spool.attempts, mid)
            assert len(attempts) == 4
    run(main())


def test_null_mx_and_nxdomain_bounce_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with queue_env(tmp_path, None, port=9) as env:
            env.dns.add("nomail.test", "MX", "0 .")
            await send(env, ["x@nomail.test", "y@nowhere.test"])
            await env.queue.drain()
            (dsn,) = dsns(env)
            assert b"Final-Recipient: rfc822; x@nomail.test\r\nAction: failed\r\nStatus: 5.1.10" in dsn
            assert b"null MX" in dsn
            assert b"Final-Recipient: rfc822; y@nowhere.test\r\nAction: failed\r\nStatus: 5.1.2" in dsn
            assert env.queue.spool.count() == 0
    run(main())


def test_refused_first_mx_second_used(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP])  # nothing listens on 127.0.0.11
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test", ip="127.0.0.11", pref=10, host="mx1.b.test")
            mx_for(env, "b.test", ip=MX_IP, pref=20, host="mx2.b.test")
            mid = await send(env, ["bob@b.test"])
            await env.queue.drain()
            assert len(mx.delivered) == 1 and mx.delivered[0].ip == MX_IP
            assert await env.state(mid) == []
    run(main())


def test_all_mx_down_defers_whole_destination(tmp_path: Path) -> None:
    async def main() -> None:
        async with queue_env(tmp_path, None, port=9, queue={"concurrency_per_domain": 1}) as env:
            mx_for(env, "b.test", ip="127.0.0.11")
            ids = [await send(env, [f"u{i}@b.test"]) for i in range(3)]
            await env.queue.drain()
            for mid in ids:
                (st,) = await env.state(mid)
                assert st.status == QUEUED and st.status_code == "4.4.1" and "127.0.0.11" in st.last_reply
    run(main())


def test_expiry_bounces_with_last_error(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], final=["452 4.2.2 Mailbox full"])
        async with queue_env(tmp_path, mx, queue={"max_lifetime": 3600.0, "retry_initial": 1000.0,
                                                  "retry_max": 1000.0}) as env:
            mx_for(env, "b.test")
            mid = await send(env, ["bob@b.test"])
            await env.queue.drain()
            for _ in range(3):
                env.clock.advance(1000)
                await env.queue.run_once()
            assert dsns(env) == []
            (st,) = await env.state(mid)
            assert st.next_attempt == env.clock.time() + 600  # capped at the expiry time
            env.clock.advance(600)
            await env.queue.run_once()
            (dsn,) = dsns(env)
            assert b"Action: failed\r\nStatus: 4.2.2\r\n" in dsn
            assert b"gave up after" in dsn and b"452 4.2.2 Mailbox full" in dsn
            assert env.queue.spool.count() == 0
    run(main())


def test_never_bounce_to_null_sender(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], rcpt_reply=lambda line: "550 5.1.1 no")
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            await send(env, ["bob@b.test"], sender="")
            await env.queue.drain()
            assert mx.commands[1] == f"MAIL FROM:<> SIZE={len(message('', 'bob@b.test'))}"
            assert env.queue.spool.count() == 0 and env.queue.stats["dsn"] == 0
    run(main())


def test_notify_never_and_success(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], rcpt_reply=lambda line: "550 5.1.1 no" if "bad" in line else "250 2.1.5 Ok")
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            await send(env, ["bad@b.test"], notify="NEVER")
            await env.queue.drain()
            assert dsns(env) == []
            await send(env, ["good@b.test"], notify="SUCCESS")  # the fake has no DSN extension: "relayed"
            await env.queue.drain()
            (dsn,) = dsns(env)
            assert b"Action: relayed\r\nStatus: 2.0.0" in dsn and b"Successful Mail Delivery Report" in dsn
    run(main())


def test_dsn_parameters_passed_to_a_dsn_server(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], caps=["PIPELINING", "DSN", "8BITMIME"])
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            await env.queue.store(sender="alice@a.test", recipients=[
                RecipientSpec("bob@b.test", "SUCCESS,FAILURE", "rfc822;bob+x@b.test")], prefix=b"",
                body=message(), ret="HDRS", envid="id 1")
            await env.queue.drain()
            (d,) = mx.delivered
            assert d.mail == "MAIL FROM:<alice@a.test> RET=HDRS ENVID=id+201"
            assert d.rcpts == ["RCPT TO:<bob@b.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob+2Bx@b.test"]
            assert dsns(env) == []  # the next hop reports success itself
    run(main())


def test_delay_warning_once(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], final=["451 4.3.0 later"])
        async with queue_env(tmp_path, mx, queue={"delay_warning": 3000.0, "retry_initial": 1000.0,
                                                  "retry_max": 1000.0}) as env:
            mx_for(env, "b.test")
            mid = await send(env, ["bob@b.test"])
            await env.queue.drain()
            for _ in range(5):
                env.clock.advance(1000)
                await env.queue.run_once()
            (dsn,) = dsns(env)
            assert b"Action: delayed\r\nStatus: 4.3.0" in dsn and b"Will-Retry-Until:" in dsn
            (st,) = await env.state(mid)
            assert st.status == QUEUED and st.dsn == ""
    run(main())


def test_connection_reuse(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP])
        async with queue_env(tmp_path, mx, queue={"concurrency_per_domain": 1}) as env:
            mx_for(env, "b.test")
            env.queue._stopping = True
            for i in range(5):
                await send(env, [f"u{i}@b.test"])
            env.queue._stopping = False
            await env.queue.run_once()
            assert len(mx.delivered) == 5
            assert mx.connections == 1  # the first job opens it, the other four reuse it
            assert [c for c in mx.commands if c.startswith(("EHLO", "QUIT", "RSET"))] == ["EHLO mail.a.test", "QUIT"]
    run(main())


def test_concurrency_per_destination(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP])
        async with queue_env(tmp_path, mx, queue={"concurrency_per_domain": 3}) as env:
            mx_for(env, "b.test")
            env.queue._stopping = True  # queue without dispatching...
            for i in range(12):
                await send(env, [f"u{i}@b.test"])
            env.queue._stopping = False
            assert await env.queue.run_once() == 12  # ...then dispatch all at once
            assert len(mx.delivered) == 12 and mx.connections == 3
    run(main())


def test_size_8bitmime_smtputf8_checks(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], caps=["PIPELINING", "SIZE 1000"])
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            await send(env, ["big@b.test"], body=message(body="x" * 2000 + "\r\n"))
            await send(env, ["eight@b.test"], body=message(body="caf\u00e9\r\n"), eightbit=True)
            await env.queue.store(sender="alice@a.test", recipients=[RecipientSpec("j\u00f6rg@b.test")], prefix=b"",
                                  body=message(), smtputf8=True)
            await env.queue.drain()
            assert mx.delivered == []
            text = b"".join(dsns(env))
            assert b"Status: 5.3.4" in text and b"Status: 5.6.3" in text and b"Status: 5.6.7" in text
            assert b"utf-8; j\xc3\xb6rg@b.test" in text  # RFC 6533 address type
    run(main())


def test_drop_after_dot_is_retried(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], final=["DROP", "250 2.0.0 Ok"])
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            mid = await send(env, ["bob@b.test"])
            await env.queue.drain()
            (st,) = await env.state(mid)
            assert st.status == QUEUED and st.status_code == "4.4.2"
            env.clock.advance(300)
            await env.queue.run_once()
            assert len(mx.delivered) == 1 and await env.state(mid) == []
    run(main())


def test_local_recipients_go_to_the_mda(tmp_path: Path) -> None:
    async def main() -> None:
        async with queue_env(tmp_path, None, port=9) as env:
            mx_for(env, "remote.test", ip="127.0.0.11")  # nothing listens there: the DSN waits
            await send(env, ["alice@a.test", "nobody@a.test"], sender="x@remote.test")
            await env.queue.drain()
            (got,) = env.maildir("alice@a.test")
            assert got.startswith(b"Return-Path: <x@remote.test>\r\n")
            assert env.queue.stats["bounced"] == 1  # nobody@a.test: unknown user, DSN to a remote sender
            assert env.queue.spool.count() == 1  # that DSN waits for x@remote.test's MX
    run(main())


def test_a_large_message_goes_to_local_mailboxes_from_its_spool_file(tmp_path: Path) -> None:
    """Over MEMORY_DATA_LIMIT, the local copy is made from the queue's file (the delivery agent
    reads it by path) and is byte-exact; the file stays for the remote recipient still queued, who
    then gets the same bytes."""
    from postier.message.types import MEMORY_DATA_LIMIT

    async def main() -> None:
        mx = FakeMX([MX_IP], final=["451 4.3.0 Try again later", "250 2.0.0 Ok"])
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            big = message("x@b.test", "alice@a.test") + b"0123456789abcdef" * (MEMORY_DATA_LIMIT // 8) + b"\r\n"
            mid = await send(env, ["alice@a.test", "bob@b.test"], sender="x@b.test", body=big)
            await env.queue.drain()
            (got,) = env.maildir("alice@a.test")
            assert got == b"Return-Path: <x@b.test>\r\n" + big
            assert env.queue.spool.path(mid).exists()  # bob's copy is still due: the file stays
            env.clock.advance(300)
            await env.queue.run_once()
            assert [d.data for d in mx.delivered] == [big] and await env.state(mid) == []
            assert env.maildir("alice@a.test") == [got]  # delivered locally once
    run(main())


def test_restart_resumes_and_cleans_debris(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP])
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            env.queue._stopping = True  # accepted, not yet delivered, then "crash"
            mid = await send(env, ["bob@b.test"])
            (env.queue.spool.msg_dir / "0123456789ABCDEF").write_bytes(b"half-written, never acknowledged")
            env.queue._stopping = False
            from postier.queue.runner import Queue

            q2 = Queue(env.config, env.accounts, env.mda, env.dns, clock=env.clock)
            await q2.start()
            try:
                for _ in range(100):
                    if mx.delivered:
                        break
                    await asyncio.sleep(0.05)
                await q2.drain()
            finally:
                await q2.stop()
            assert len(mx.delivered) == 1
            assert not (env.queue.spool.msg_dir / "0123456789ABCDEF").exists()
            assert await env.state(mid) == []
    run(main())


def test_statuses_recorded(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP], rcpt_reply=lambda line: "450 4.2.0 greylisted" if "grey" in line else "250 Ok")
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            mid = await send(env, ["grey@b.test", "ok@b.test"])
            await env.queue.drain()
            assert {(s.address, s.status) for s in await env.state(mid)} == {("grey@b.test", QUEUED),
                                                                            ("ok@b.test", DELIVERED)}
            attempts = await env.queue._read(env.queue.spool.attempts, mid)
            assert {(a.address, a.reply[:3]) for a in attempts} == {("grey@b.test", "450"), ("ok@b.test", "250")}
            assert attempts[0].mx == f"mx.b.test[{MX_IP}]" and attempts[0].tls == "none"
    run(main())


def test_client_never_sends_bare_cr_or_lf(tmp_path: Path) -> None:
    async def main() -> None:
        mx = FakeMX([MX_IP])
        async with queue_env(tmp_path, mx) as env:
            mx_for(env, "b.test")
            raw = b"Subject: x\n\nline\n.\nsmuggle\r.\rMAIL FROM:<evil@x>\r\n.leading\r\n"
            await send(env, ["bob@b.test"], body=raw)
            await env.queue.drain()
            (d,) = mx.delivered
            assert d.data == (b"Subject: x\r\n\r\nline\r\n.\r\nsmuggle\r\n.\r\nMAIL FROM:<evil@x>\r\n"
                              b".leading\r\n")
            assert not any(c.startswith("MAIL FROM:<evil") for c in mx.commands)
    run(main())
