"""The full-text rows of large mailbox copies in cluster mode (store/cluster/mailboxes.py `_put_body`,
fulltext.py `text_row_at`) against a real PostgreSQL and moto's S3: a spooled message with a large
attachment gets an exact row of its text parts (before and after the attachment) and is read back
byte for byte; one whose text is beyond TEXT_LIMIT gets an inexact row, so a search leaves it to the
matcher; two large deliveries at once, each to two users; a large body is hashed and uploaded once
for all the users of one delivery; a search's catch-up and `postier reindex` extract a large body
from a download into a file."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from postier.message.matching import TEXT_LIMIT  # noqa: E402
from postier.message.types import MessageBody, User  # noqa: E402
from postier.store.cluster.bodies import PART_SIZE, BodyStore  # noqa: E402
from postier.store.cluster.store import ClusterDelivery, ClusterStore  # noqa: E402
from tests.concurrency import together


ALICE = User("alice@example.org", "alice", "example.org", "maildir")
BOB = User("bob@example.org", "bob", "example.org", "maildir")
CAROL = User("carol@example.org", "carol", "example.org", "maildir")
DAVE = User("dave@example.org", "dave", "example.org", "maildir")
PREFIX = b"Return-Path: <c@example.net>\r\nReceived: from example.net; Sat, 5 Dec 2026 02:00:00 +0000\r\n"


def with_attachment(size: int, before: str, after: str) -> bytes:
    """A text part holding `before`, a base64 attachment making the message `size` bytes, then a text
    part holding `after`."""
    head = (b"From: c@example.net\r\nSubject: the plans\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"=_b\"\r\n\r\n--=_b\r\nContent-Type: text/plain\r\n\r\n"
            + before.encode() + b"\r\n--=_b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n")
    tail = b"--=_b\r\nContent-Type: text/plain\r\n\r\n" + after.encode() + b"\r\n--=_b--\r\n"
    lines = [base64.b64encode(hashlib.sha256(str(i).encode()).digest() * 2)[:76] + b"\r\n"
             for i in range((size - len(head) - len(tail)) // 78)]
    return head + b"".join(lines) + tail


def plain(size: int, word: str) -> bytes:
    head = b"From: c@example.net\r\nSubject: long text\r\n\r\n"
    line = (word + " and more words ") * 4 + "\r\n"
    return head + line.encode() * ((size - len(head)) // len(line))


def spilled(root: Path, data: bytes) -> MessageBody:
    body = MessageBody(root)
    for i in range(0, len(data), 65536):
        body.write(data[i:i + 65536])
    assert not body.in_memory
    return body

def deliver_to_alice(store: ClusterStore, tmp_path: Path, data: bytes) -> None:
    """One delivery of `data` (spooled: above MEMORY_DATA_LIMIT) to ALICE's INBOX, acknowledged."""
    body = spilled(tmp_path, data)
    mda = ClusterDelivery(store, tmp_path)
    try:
        assert mda.deliver_one(ALICE, PREFIX, body, "c@example.net").ok
    finally:
        mda.close()
        body.close()



def text_row(store: ClusterStore, digest: str) -> tuple[bool, str]:
    with store.pool.connection() as conn:
        r = conn.execute("SELECT exact, leaves FROM body_text WHERE hash=%s", (digest,)).fetchone()
    assert r is not None
    return bool(r[0]), str(r[1])


def search(store: ClusterStore, user: User, word: str) -> tuple[set[int], set[int]]:
    mb = store.acquire(user)
    try:
        got = mb.text_search("INBOX", [("BODY", word)])
        assert got is not None
        return got[0][0], got[1]
    finally:
        store.release(mb)


def read_back(store: ClusterStore, user: User) -> list[bytes]:
    mb = store.acquire(user)
    try:
        rows = mb.rows_between("INBOX", 1, 100)
        return [mb.read("INBOX", rows[u]) for u in sorted(rows)]
    finally:
        store.release(mb)


def test_two_large_deliveries_at_once_are_searchable(store: ClusterStore, tmp_path: Path) -> None:
    """Two messages of 10 MiB with an attachment (multipart uploads), each to two users, at once:
    read back byte for byte; the words of the text parts on either side of the attachment are found,
    by an exact row; the attachment is not text."""
    one = with_attachment(PART_SIZE + (2 << 20), "quokka before", "numbat after")
    two = with_attachment(PART_SIZE + (1 << 20), "wombat before", "bilby after")
    bodies = [spilled(tmp_path, one), spilled(tmp_path, two)]
    mda = ClusterDelivery(store, tmp_path)

    async def both() -> list[Any]:
        return list(await asyncio.gather(
            mda.deliver([(ALICE, None), (BOB, None)], PREFIX, bodies[0], "c@example.net"),
            mda.deliver([(CAROL, None), (DAVE, None)], PREFIX, bodies[1], "c@example.net")))
    try:
        results = asyncio.run(both())
        assert [r.ok for rs in results for r in rs] == [True] * 4, results
    finally:
        mda.close()
        for b in bodies:
            b.close()
    for users, data, words, other in (((ALICE, BOB), one, ("quokka", "numbat"), "wombat"),
                                      ((CAROL, DAVE), two, ("wombat", "bilby"), "quokka")):
        digest = hashlib.sha256(PREFIX + data).hexdigest()
        exact, leaves = text_row(store, digest)
        assert exact and words[0] in leaves and words[1] in leaves and len(leaves) < 100
        for u in users:
            assert read_back(store, u) == [PREFIX + data]
            for w in words:
                assert search(store, u, w) == ({1}, set())
            assert search(store, u, other) == (set(), set())
            assert search(store, u, "ab/cd") == (set(), set())  # base64 of the attachment: not text


def test_text_beyond_the_limit_is_left_to_the_matcher(store: ClusterStore, tmp_path: Path) -> None:
    data = plain(TEXT_LIMIT + (1 << 20), "platypus")
    deliver_to_alice(store, tmp_path, data)
    assert read_back(store, ALICE) == [PREFIX + data]
    assert text_row(store, hashlib.sha256(PREFIX + data).hexdigest()) == (False, "")
    assert search(store, ALICE, "platypus") == (set(), {1})  # not covered: the matcher decides


def test_a_large_body_is_hashed_and_uploaded_once_per_delivery(store: ClusterStore, tmp_path: Path) -> None:
    """Four users of one delivery: one SHA-256 pass over the spool file, one upload (three copies
    find the object), four rows."""
    from moto.s3.models import S3Backend
    data = with_attachment(3 << 20, "echidna", "dingo")
    body = spilled(tmp_path, data)
    hashed: list[int] = []
    puts: list[str] = []
    digest_stream, put_object = BodyStore.digest_stream, S3Backend.put_object

    def counting_digest(read_at: Any, size: int) -> str:
        hashed.append(size)
        return digest_stream(read_at, size)

    def counting_put(self: Any, bucket_name: str, key_name: str, *args: Any, **kwargs: Any) -> Any:
        puts.append(key_name)
        return put_object(self, bucket_name, key_name, *args, **kwargs)
    mda = ClusterDelivery(store, tmp_path)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(BodyStore, "digest_stream", staticmethod(counting_digest))
            mp.setattr(S3Backend, "put_object", counting_put)
            results = asyncio.run(mda.deliver([(u, None) for u in (ALICE, BOB, CAROL, DAVE)], PREFIX, body,
                                              "c@example.net"))
            assert [r.ok for r in results] == [True] * 4, results
            # a later delivery of the same body (a Sieve user's own copy) is not hashed again either
            assert mda.deliver_one(ALICE, PREFIX, body, "c@example.net", "Archive").ok
    finally:
        mda.close()
        body.close()
    assert hashed == [len(PREFIX + data)] and len(puts) == 1
    for u in (ALICE, BOB, CAROL, DAVE):
        assert read_back(store, u) == [PREFIX + data]
        assert search(store, u, "dingo") == ({1}, set())


def test_catch_up_and_reindex_extract_a_large_body_from_a_download(store: ClusterStore, tmp_path: Path) -> None:
    """A large body without a row (stored before the index) gets its exact row from a search's catch-up,
    downloaded into a file and extracted from it; `postier reindex` rewrites it the same way."""
    data = with_attachment(3 << 20, "bandicoot", "wallaby")
    deliver_to_alice(store, tmp_path, data)
    digest = hashlib.sha256(PREFIX + data).hexdigest()
    with store.pool.connection() as conn:
        conn.execute("DELETE FROM body_text WHERE hash=%s", (digest,))
    assert search(store, ALICE, "wallaby") == ({1}, set())  # caught up, then answered by the row
    exact, leaves = text_row(store, digest)
    assert exact and "bandicoot" in leaves and "wallaby" in leaves
    with store.pool.connection() as conn:
        conn.execute("UPDATE body_text SET exact=false, leaves='' WHERE hash=%s", (digest,))
    mb = store.acquire(ALICE)
    try:
        assert mb.rebuild_text_index() == 1
    finally:
        store.release(mb)
    assert text_row(store, digest)[0] and search(store, ALICE, "bandicoot") == ({1}, set())


def test_open_message_downloads_a_large_body_in_pieces(store: ClusterStore, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`open_message` (POP3 RETR, `import imap --verify`) of a large body gives a file downloaded a
    piece at a time, not the body in memory; two sessions open it at once; closing removes it."""
    import tempfile

    data = with_attachment(6 << 20, "quokka", "numbat")
    deliver_to_alice(store, tmp_path, data)
    mb = store.acquire(ALICE)
    try:
        before = set(Path(tempfile.gettempdir()).glob("postier-open-*"))
        whole: list[str] = []
        get = store.bodies.get
        # moto answers in this process, so its own copy of the object would count in a tracemalloc
        # peak: the test asks instead that the body is never read whole (`get`), only downloaded
        monkeypatch.setattr(store.bodies, "get", lambda d, limit=None: whole.append(d) or get(d, limit))
        f = mb.open_message("INBOX", 1)
        assert f is not None and whole == []
        with f:
            assert set(Path(tempfile.gettempdir()).glob("postier-open-*")) == before  # unnamed already
            assert f.read() == PREFIX + data

        def read() -> bytes:
            g = mb.open_message("INBOX", 1)
            assert g is not None
            with g:
                return hashlib.sha256(g.read()).digest()

        assert together(read, read, timeout=60) == [hashlib.sha256(PREFIX + data).digest()] * 2
        assert mb.open_message("INBOX", 99) is None
    finally:
        store.release(mb)


def test_fetch_of_sections_of_a_large_body_from_its_download(store: ClusterStore, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """FETCH of sections, partials, BINARY and an uncached BODYSTRUCTURE of a large body (server/imapfetch.py
    `_Large`) comes from `open_message`'s download, the body never read whole (`get`), two sessions
    at once; every answer is the whole-message path's (by hash), the views computed again there."""

    from tests.imap.test_fetch_large import ITEMS, big_mail, fetch_hashes

    deliver_to_alice(store, tmp_path, big_mail(30_000, nul=True))
    items = [i for i in ITEMS if "BINARY.PEEK[]" not in i and "BINARY.PEEK[4])" not in i]  # these read whole
    mb = store.acquire(ALICE)
    try:
        whole = {i: fetch_hashes(mb, "INBOX", i, stream=False) for i in items}
        with store.pool.connection() as conn:
            conn.execute("DELETE FROM body_views")  # the views are made again, from the layout
        read_whole: list[str] = []
        get = store.bodies.get
        monkeypatch.setattr(store.bodies, "get", lambda d, limit=None: read_whole.append(d) or get(d, limit))
        got: list[dict[str, list[str]]] = [{}, {}]

        def session(n: int) -> None:
            for i in items if n == 0 else reversed(items):
                got[n][i] = fetch_hashes(mb, "INBOX", i, stream=True)

        together(lambda: session(0), lambda: session(1))
        assert got[0] == got[1] == whole
        assert read_whole == []
    finally:
        store.release(mb)
