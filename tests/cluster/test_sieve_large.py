"""A Sieve user's delivery of a large spooled message in cluster mode (pipeline/sieve.py over
store/cluster/store.py `ClusterDelivery`), against a real PostgreSQL and moto's S3: a header-only
fileinto uploads the spooled body itself, an editheader copy is written into a new spool a piece at
a time and uploaded from it, a body :text test finds the text before the attachment; each copy
reads back byte for byte. (The memory bound is measured in tests/sieve/test_large_delivery.py: here
moto's S3 server runs in this process and holds the objects, so tracemalloc would count them.)"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from bench.fts_large import large_message  # noqa: E402
from bench.sieve_large import deliver_through_script  # noqa: E402
from postier.config import Config  # noqa: E402
from postier.message.types import User  # noqa: E402
from postier.pipeline.sieve import SieveFilter  # noqa: E402
from postier.store.cluster.store import ClusterDelivery, ClusterStore  # noqa: E402

USER = User("alice@example.org", "alice", "example.org", "maildir")
PREFIX = b"Return-Path: <c@example.net>\r\nReceived: from example.net; Sat, 5 Dec 2026 02:00:00 +0000\r\n"
DATA = large_message(12 << 20, "aardvark", "zebrafinch")
SCRIPT = ('require ["body", "editheader", "fileinto", "copy"];\n'
          'if size :over 10M { fileinto :copy "Big"; }\n'
          'if body :text :contains "aardvark" { fileinto :copy "Found"; }\n'
          'addheader "X-Tag" "tagged";\nfileinto "Tagged";\n')


def read_folder(store: ClusterStore, folder: str) -> list[str]:
    """The SHA-256 of each message of `folder` (a failed comparison of 12 MiB bytes would make pytest
    diff them for minutes)."""
    mb = store.acquire(USER)
    try:
        rows = mb.rows_between(folder, 1, 100)
        return [sha(mb.read(folder, rows[u])) for u in sorted(rows)]
    finally:
        store.release(mb)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_large_delivery_through_a_script(store: ClusterStore, tmp_path: Path) -> None:
    config = Config(hostname="mail.example.org", data_dir=tmp_path)
    mda = ClusterDelivery(store, config.mail_root)
    sieve = SieveFilter(config, mda, None, None, mailstore=store)  # type: ignore[arg-type]  # nothing is queued
    try:
        got, _peak = asyncio.run(deliver_through_script(sieve, USER, SCRIPT, PREFIX, DATA, config.spool_dir,
                                                        "c@example.net"))
    finally:
        mda.close()
    assert got.local.delivered == {USER.address} and not got.refused
    # RFC 5293 §7: the copies filed before the addheader are the message as received (the spooled
    # body itself, uploaded once for both), the one filed after it carries the new field
    assert read_folder(store, "Big") == read_folder(store, "Found") == [sha(PREFIX + DATA)]
    assert read_folder(store, "Tagged") == [sha(b"X-Tag: tagged\r\n" + PREFIX + DATA)]
    assert read_folder(store, "INBOX") == []
