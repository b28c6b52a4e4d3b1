"""Large mailbox copies in cluster mode (store/cluster/store.py `deliver_one`, mailboxes.py `append_many`)
against a real PostgreSQL and moto's S3: a delivered body spooled to a file and an APPEND literal spooled
to a file go up from the file (a multipart upload above 8 MiB), are read back byte for byte and get
their full-text row; a body with bare LFs is stored with CRLF; a part the object store fails leaves
no parts, no object and no message row."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from postier.message.types import MessageBody, User  # noqa: E402
from postier.store.cluster import cache as views  # noqa: E402
from postier.store.cluster import fulltext  # noqa: E402
from postier.store.cluster.bodies import PART_SIZE, BodyStore, body_key  # noqa: E402
from postier.store.cluster.store import ClusterDelivery, ClusterStore  # noqa: E402
from postier.store.errors import StoreUnavailable  # noqa: E402


ALICE = User("alice@example.org", "alice", "example.org", "maildir")
BOB = User("bob@example.org", "bob", "example.org", "maildir")
PREFIX = b"Return-Path: <c@example.net>\r\nReceived: from example.net; Sat, 5 Dec 2026 02:00:00 +0000\r\n"


def big(size: int, word: str, eol: bytes = b"\r\n") -> bytes:
    head = b"From: c@example.net" + eol + b"Subject: large " + word.encode() + eol + eol
    line = (word * 30)[:98].encode() + eol
    return head + line * ((size - len(head)) // len(line))


def spilled(root: Path, data: bytes) -> MessageBody:
    body = MessageBody(root)
    for i in range(0, len(data), 65536):
        body.write(data[i:i + 65536])
    assert not body.in_memory
    return body


def uploads_left(bodies: BodyStore) -> list[Any]:
    return list(bodies.client.list_multipart_uploads(Bucket=bodies.bucket).get("Uploads", []))


def failing_part() -> Any:
    """moto's (the object store's) UploadPart, failing every part 2 (an answer 500 to each try)."""
    from moto.s3.models import S3Backend
    part = S3Backend.upload_part

    def failing(self: Any, bucket_name: str, multipart_id: str, part_id: int, value: bytes) -> Any:
        if int(part_id) == 2:
            raise RuntimeError("the object store failed this part")
        return part(self, bucket_name, multipart_id, part_id, value)
    return failing


def test_a_large_delivery_to_two_users_goes_up_from_its_spool_file(store: ClusterStore, tmp_path: Path) -> None:
    data = big(PART_SIZE + (2 << 20), "quokka")
    body = spilled(tmp_path, data)
    mda = ClusterDelivery(store, tmp_path)
    try:
        results = asyncio.run(mda.deliver([(ALICE, None), (BOB, None)], PREFIX, body, "c@example.net"))
        assert [r.ok for r in results] == [True, True], results
    finally:
        mda.close()
        body.close()
    digest = hashlib.sha256(PREFIX + data).hexdigest()
    for user in (ALICE, BOB):
        mb = store.acquire(user)
        try:
            [row] = mb.rows_between("INBOX", 1, 10).values()
            assert row.base == digest and row.size == len(PREFIX + data)
            assert mb.read("INBOX", row) == PREFIX + data
        finally:
            store.release(mb)
    bodies = store.bodies
    etag = bodies.client.head_object(Bucket=bodies.bucket, Key=body_key(digest))["ETag"]
    assert etag.strip('"').endswith("-2") and uploads_left(bodies) == []
    with store.pool.connection() as conn:
        assert fulltext.has_row(conn, digest)  # searchable as any body
        # its header block too, read from the file's first bytes (header reads need no GET)
        assert views.get_heads(conn, [digest]) == {digest: (PREFIX + data).split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"}


def test_a_large_delivery_with_bare_lfs_is_stored_with_crlf(store: ClusterStore, tmp_path: Path) -> None:
    data = big(2 << 20, "lf", eol=b"\n")
    body = spilled(tmp_path, data)
    mda = ClusterDelivery(store, tmp_path)
    try:
        res = mda.deliver_one(ALICE, PREFIX, body, "c@example.net")
        assert res.ok, res.detail
    finally:
        mda.close()
        body.close()
    mb = store.acquire(ALICE)
    try:
        [row] = mb.rows_between("INBOX", 1, 10).values()
        assert mb.read("INBOX", row) == PREFIX + data.replace(b"\n", b"\r\n")
    finally:
        store.release(mb)


def test_a_large_append_literal_goes_up_from_its_file(store: ClusterStore) -> None:
    mb = store.acquire(ALICE)
    try:
        mb.ensure_defaults()
        data = big(PART_SIZE + (1 << 20), "wombat", eol=b"\n")
        literal = mb.spool()  # as the IMAP server takes a large literal: CRLF made on the way
        for i in range(0, len(data), 50000):
            literal.write(data[i:i + 50000])
        with pytest.MonkeyPatch.context() as mp:
            from moto.s3.models import S3Backend
            mp.setattr(S3Backend, "upload_part", failing_part())
            with pytest.raises(StoreUnavailable):
                mb.append_many("INBOX", [(literal, ["\\Seen"], None)])
        assert not Path(literal.path).exists()  # the literal's file is gone either way
        assert uploads_left(store.bodies) == [] and list(mb.snapshot("INBOX").uids) == []
        assert store.bodies.client.list_objects_v2(Bucket=store.bodies.bucket).get("KeyCount") == 0
        literal = mb.spool()  # the client sends it again; the store is back
        for i in range(0, len(data), 50000):
            literal.write(data[i:i + 50000])
        _v, [uid] = mb.append_many("INBOX", [(literal, ["\\Seen"], None)])
        row = mb.rows("INBOX", [uid])[uid]
        assert mb.read("INBOX", row) == data.replace(b"\n", b"\r\n") and row.flag_names == ["\\Seen"]
        assert uploads_left(store.bodies) == [] and not Path(literal.path).exists()
    finally:
        store.release(mb)
