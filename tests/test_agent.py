"""The delivery agent process (store/agent.py) behind LocalDelivery: in-memory and spilled bodies,
Maildir folders and mbox, several recipients, failures, and an agent that dies."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from postier.message.types import MessageBody, User
from postier.store.delivery import LocalDelivery

PREFIX = b"Return-Path: <a@remote.test>\r\n"


def user(name: str, fmt: str = "maildir") -> User:
    return User(f"{name}@a.test", name, "a.test", fmt)


def files(root: Path, name: str, folder: str = "") -> list[bytes]:
    d = root / "a.test" / name / "Maildir" / folder / "new"
    return [p.read_bytes() for p in sorted(d.iterdir())] if d.is_dir() else []


def body_of(data: bytes, spool: Path, memory_limit: int = 256 * 1024) -> MessageBody:
    b = MessageBody(spool, memory_limit=memory_limit)
    for i in range(0, len(data), 7000):
        b.write(data[i:i + 7000])
    return b


@pytest.fixture
def mda(tmp_path: Path) -> LocalDelivery:
    return LocalDelivery(tmp_path / "mail", workers=2)


def test_in_memory_spilled_folder_mbox_and_several_users(mda: LocalDelivery, tmp_path: Path) -> None:
    root = tmp_path / "mail"
    small = b"Subject: small\r\n\r\nhello\r\n"
    big = b"Subject: big\r\n\r\n" + b"z" * 998 + b"\r\n" + os.urandom(300_000).hex().encode() + b"\r\n"

    async def go() -> None:
        try:
            b1 = body_of(small, tmp_path / "spool")
            r = await mda.deliver([(user("ann"), None), (user("bob"), "Junk"), (user("cy", "mbox"), None)],
                                  PREFIX, b1, "a@remote.test")
            assert [x.ok for x in r] == [True, True, True], r
            b1.close()
            b2 = body_of(big, tmp_path / "spool", memory_limit=1000)
            assert not b2.in_memory
            r = await mda.deliver([(user("ann"), None)], PREFIX, b2, "a@remote.test")
            assert r[0].ok and r[0].detail.endswith(f",S={len(PREFIX) + len(big)}")
            assert b2.spool_path is not None and os.path.exists(b2.spool_path)  # the agent leaves it
            b2.close()
            r = await mda.deliver([(user("dee"), None)], PREFIX, b"raw bytes\r\n", "")
            assert r[0].ok
        finally:
            mda.close()

    asyncio.run(go())
    assert sorted(files(root, "ann")) == sorted([PREFIX + small, PREFIX + big])
    assert files(root, "bob", ".Junk") == [PREFIX + small]
    assert b"From a@remote.test " in (root / "a.test" / "cy" / "mbox").read_bytes()
    assert files(root, "dee") == [PREFIX + b"raw bytes\r\n"]
    assert not os.listdir(tmp_path / "spool")  # the server's spool files are the server's to remove


def test_failure_is_reported_per_recipient(mda: LocalDelivery, tmp_path: Path) -> None:
    broken = tmp_path / "mail" / "a.test" / "eve" / "Maildir"
    broken.mkdir(parents=True)
    for sub in ("cur", "new"):
        (broken / sub).mkdir()
    (broken / "tmp").write_text("not a directory")

    async def go() -> None:
        try:
            r = await mda.deliver([(user("eve"), None), (user("fay"), None)], PREFIX, b"x\r\n", "a@remote.test")
            assert [x.ok for x in r] == [False, True]
        finally:
            mda.close()

    asyncio.run(go())
    assert files(tmp_path / "mail", "fay") == [PREFIX + b"x\r\n"]


def test_a_dead_agent_fails_its_deliveries_and_is_replaced(mda: LocalDelivery, tmp_path: Path) -> None:
    async def go() -> None:
        try:
            r = await mda.deliver([(user("gus"), None)], PREFIX, b"one\r\n", "a@remote.test")
            assert r[0].ok
            assert mda.agent is not None and mda.agent.proc is not None
            first = mda.agent.proc.pid
            os.kill(first, signal.SIGKILL)
            for _ in range(200):  # the server notices the end of the connection
                if mda.agent.proc is None:
                    break
                await asyncio.sleep(0.01)
            r = await mda.deliver([(user("gus"), None)], PREFIX, b"two\r\n", "a@remote.test")
            assert r[0].ok, r
            assert mda.agent.proc is not None and mda.agent.proc.pid != first
        finally:
            mda.close()

    asyncio.run(go())
    assert sorted(files(tmp_path / "mail", "gus")) == [PREFIX + b"one\r\n", PREFIX + b"two\r\n"]


def test_many_concurrent_deliveries(mda: LocalDelivery, tmp_path: Path) -> None:
    async def go() -> None:
        try:
            rs = await asyncio.gather(*(mda.deliver([(user("hal"), None)], PREFIX, b"m%d\r\n" % i, "")
                                        for i in range(200)))
            assert all(r[0].ok for r in rs)
        finally:
            mda.close()

    asyncio.run(go())
    assert len(files(tmp_path / "mail", "hal")) == 200


@pytest.mark.parametrize("agent", [True, False])
def test_flags_suffix_lands_in_cur_and_a_bad_one_is_refused(tmp_path: Path, agent: bool) -> None:
    """The info suffix (Sieve's imap4flags, RFC 5232 §5) names the file in cur/, through the agent
    (batch and spilled paths) and without it; anything but flag letters is refused, nothing left in tmp/."""
    mda = LocalDelivery(tmp_path / "mail", workers=2, agent=agent)
    root = tmp_path / "mail" / "a.test"

    async def go() -> None:
        try:
            r = await mda.deliver([(user("ann"), "Work")], PREFIX, b"flagged\r\n", "", ":2,FSa")
            assert r[0].ok and r[0].detail.endswith(":2,FSa"), r
            spilled = body_of(b"x" * 5000, tmp_path / "spool", memory_limit=1000)
            r = await mda.deliver([(user("ann"), None)], PREFIX, spilled, "", ":2,S")
            spilled.close()
            assert r[0].ok and r[0].detail.endswith(":2,S"), r
            r = await mda.deliver([(user("bob"), None)], PREFIX, b"bad\r\n", "", ":2,S/../../x")
            assert not r[0].ok
        finally:
            mda.close()

    asyncio.run(go())
    assert [p.name[-6:] for p in (root / "ann" / "Maildir" / ".Work" / "cur").iterdir()] == [":2,FSa"]
    assert len(list((root / "ann" / "Maildir" / "cur").iterdir())) == 1
    assert not list((root / "ann" / "Maildir" / "new").iterdir())
    assert not list((root / "bob" / "Maildir" / "tmp").iterdir())
    assert not list((root / "bob" / "Maildir" / "new").iterdir())
