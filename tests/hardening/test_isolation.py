"""One session's failure never ends another: a RecursionError or MemoryError inside a session is
caught at the session boundary (server/base.py), and hostile deep-nesting input on a real IMAP
server gets a clean answer while another session keeps working."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from postier.config import Config, Limits, Listener
from postier.metrics import Metrics
from postier.server.base import ListenerSet, Session
from tests.harness import Instance

from .conftest import Line, add_cheap_user


class _Tricky(Session):
    """Echoes lines; "recurse" overflows the stack, "memory" raises MemoryError, "value" a bug."""

    busy_line = b"busy\r\n"

    async def run(self) -> None:
        self.writer.write(b"hello\r\n")
        await self.writer.drain()
        for _ in range(100):
            data = await self.read(5)
            if not data:
                return
            if data.startswith(b"recurse"):
                def down(n: int) -> int:
                    return down(n + 1) + 1
                down(0)
            if data.startswith(b"memory"):
                raise MemoryError("simulated allocation failure")
            if data.startswith(b"value"):
                raise ValueError("simulated bug")
            self.writer.write(b"echo " + data)
            await self.writer.drain()


def test_exceptions_in_one_session_spare_the_others(tmp_path: Path) -> None:
    async def scenario() -> None:
        cfg = Config(hostname="t.test", data_dir=tmp_path, listeners={"imap": Listener("127.0.0.1", 0)},
                     limits=Limits(max_connections=10, max_connections_per_ip=10))
        services = SimpleNamespace(config=cfg, ssl_context=None, extensions={}, metrics=Metrics())
        ls = ListenerSet(services, {"imap": _Tricky})  # type: ignore[arg-type]
        await ls.start()
        port = ls.bound[0].server.sockets[0].getsockname()[1]
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert await r.readline() == b"hello\r\n"
            for poison in (b"recurse\r\n", b"memory\r\n", b"value\r\n"):
                r2, w2 = await asyncio.open_connection("127.0.0.1", port)
                assert await r2.readline() == b"hello\r\n"
                w2.write(poison)
                assert await asyncio.wait_for(r2.read(100), 10) == b""  # that session ends...
                w2.close()
                w.write(b"still there?\r\n")  # ...the other one keeps working
                assert await asyncio.wait_for(r.readline(), 5) == b"echo still there?\r\n"
            for _ in range(50):  # and the accounting was released (no leaked slots)
                if len(ls.sessions) == 1 and sum(ls.per_ip.values()) == 1:
                    break
                await asyncio.sleep(0.02)
            assert len(ls.sessions) == 1 and sum(ls.per_ip.values()) == 1
            w.close()
        finally:
            await ls.stop(grace=1)

    asyncio.run(scenario())


@pytest.fixture(scope="module")
def imap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    inst = Instance(tmp_path_factory.mktemp("iso"), "i.test", extra_config="[auth]\nallow_plaintext = true\n")
    inst.start(wait_role="imap")
    yield inst
    inst.stop()


def _deep_mime(depth: int) -> bytes:
    head = b"From: a@i.test\r\nSubject: nest\r\n"
    out = b""
    for i in range(depth):
        out += b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
    out += b"Content-Type: text/plain\r\n\r\ncore\r\n"
    for i in reversed(range(depth)):
        out += b"--b%d--\r\n" % i
    return head + out


def _deep_rfc822(depth: int) -> bytes:
    return b"Subject: outer\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * depth + b"Subject: core\r\n\r\nx\r\n"


def test_deep_nesting_in_one_imap_session_while_another_works(imap: Instance) -> None:
    user = add_cheap_user(imap, "nest@i.test")
    ok = b"LOGIN " + user.encode() + b" password123"
    with Line(imap.addr("imap")) as good, Line(imap.addr("imap")) as evil:
        good.line()
        evil.line()
        assert good.imap(b"g0", ok)[1].startswith(b"g0 OK")
        assert evil.imap(b"e0", ok)[1].startswith(b"e0 OK")
        assert evil.imap(b"e1", b"SELECT INBOX")[1].startswith(b"e1 OK")
        assert good.imap(b"g1", b"SELECT INBOX")[1].startswith(b"g1 OK")
        hostile = [
            b"SEARCH " + b"(" * 4000 + b"ALL" + b")" * 4000,
            b"SEARCH " + b"NOT " * 2000 + b"ALL",
            b"SEARCH " + b"OR ALL " * 1300 + b"ALL",
            b"FETCH 1:* (" + b"(" * 3000 + b"FLAGS" + b")" * 3000 + b")",
            b"STORE 1 FLAGS (" + b"(" * 3000 + b")",
            b"LIST \"\" " + b"%" * 7000,
            b"SEARCH CHARSET UTF-8 SUBJECT \"" + b"\xff" * 100 + b"\"",
        ]
        for i, msg in enumerate([_deep_mime(300), _deep_rfc822(300)]):
            u, t = evil.imap(b"a%d" % i, b"APPEND INBOX {%d+}\r\n" % len(msg) + msg)
            assert t.startswith(b"a%d OK" % i), t
        hostile += [b"FETCH 1:* (BODYSTRUCTURE ENVELOPE BODY.PEEK[1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1.1])",
                    b"FETCH 1:* (BODY.PEEK[" + b"1." * 2000 + b"1])",
                    b"SEARCH BODY core"]
        for i, cmd in enumerate(hostile):
            tag = b"h%d" % i
            u, t = evil.imap(tag, cmd)
            assert re.match(rb"h\d+ (OK|NO|BAD)", t), t
            assert good.imap(b"n%d" % i, b"NOOP")[1].startswith(b"n%d OK" % i)
        assert evil.imap(b"z", b"NOOP")[1].startswith(b"z OK")  # the hostile session survives too
    log = imap.log.read_text()
    assert "Traceback" not in log and "failed" not in log, log[-3000:]
