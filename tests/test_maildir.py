"""MDA: Maildir delivery protocol (tmp, fsync, rename, fsync dir), spooled bodies, mbox (mboxrd)."""

import os
from pathlib import Path

import pytest

from postier.message.types import MessageBody
from postier.store.maildir import DeliveryError, deliver_maildir, deliver_mbox, mboxrd_quote, size_from_name

MSG = b"Subject: hi\r\n\r\nbody\r\nFrom the start\r\n>From quoted\r\n"


def test_deliver_maildir(tmp_path: Path) -> None:
    md = tmp_path / "Maildir"
    name = deliver_maildir(md, b"Return-Path: <a@b>\r\n", MSG)
    assert sorted(p.name for p in md.iterdir()) == ["cur", "new", "tmp"]
    assert list((md / "tmp").iterdir()) == []
    data = (md / "new" / name).read_bytes()
    assert data == b"Return-Path: <a@b>\r\n" + MSG
    assert size_from_name(name) == len(data)
    assert (md / "new" / name).stat().st_mode & 0o777 == 0o600


def test_spooled_body_spills_to_disk(tmp_path: Path) -> None:
    body = MessageBody(tmp_path / "spool", memory_limit=1000)
    chunk = b"x" * 300 + b"\r\n"
    for _ in range(100):
        body.write(chunk)
    assert not body.in_memory
    assert body.size == 100 * len(chunk)
    name = deliver_maildir(tmp_path / "M", b"H: v\r\n\r\n", body)
    assert (tmp_path / "M" / "new" / name).read_bytes() == b"H: v\r\n\r\n" + chunk * 100
    body.close()
    assert list((tmp_path / "spool").iterdir()) == []


def test_failed_delivery_leaves_nothing(tmp_path: Path) -> None:
    body = MessageBody(tmp_path / "spool", memory_limit=10)
    body.write(b"x" * 100)
    os.unlink(body._file.name)  # type: ignore[union-attr]  # the spool file vanishes mid-delivery
    with pytest.raises(DeliveryError):
        deliver_maildir(tmp_path / "M", b"H: v\r\n", body)
    assert list((tmp_path / "M" / "new").iterdir()) == []
    assert list((tmp_path / "M" / "tmp").iterdir()) == []


def test_mboxrd(tmp_path: Path) -> None:
    assert mboxrd_quote(b"From x\n>From y\nXFrom z\n") == b">From x\n>>From y\nXFrom z\n"
    box = tmp_path / "u" / "mbox"
    deliver_mbox(box, "a@b.test", b"", MSG)
    deliver_mbox(box, "", b"", b"Subject: 2\r\n\r\nsecond")
    text = box.read_bytes()
    assert text.count(b"\nFrom ") + text.startswith(b"From ") == 2
    assert b"\n>From the start\n" in text and b"\n>>From quoted\n" in text
    assert b"\r" not in text
    assert not (tmp_path / "u" / "mbox.lock").exists()
