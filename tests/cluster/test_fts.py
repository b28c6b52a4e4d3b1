"""Cluster mode's full-text index (store.cluster.fulltext) against a real PostgreSQL with pg_trgm and
moto's S3: the same SEARCH answers with and without it (the generator and corpus of
tests/imap/test_fts.py), rows shared across nodes and folders, missing or stale rows left to the
matcher and caught up, rows written while another session searches, gc and reindex, and a real
IMAP SEARCH through two cluster nodes."""

from __future__ import annotations

import hashlib
import imaplib
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from postier.message.types import User  # noqa: E402
from postier.proto.imap.search import HeaderKey, SearchKey, TextKey  # noqa: E402
from postier.server.imapfetch import narrow  # noqa: E402
from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.mailboxes import ClusterMailboxes  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from tests.concurrency import together
from tests.imap.test_fts import USER, _keys, _message, _search_in  # noqa: E402
from tests.harness import start_all  # noqa: E402
from tests.message.corpus import ALL as CORPUS  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import ALICE, PASSWORD, make_nodes  # noqa: E402

INBOX = "INBOX"


@pytest.fixture
def store(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> Iterator[ClusterStore]:
    s = ClusterStore(pg.create_db(), bodies_factory(), timeout=5.0)
    yield s
    s.close()


@pytest.fixture
def mb(store: ClusterStore) -> Iterator[ClusterMailboxes]:
    m = store.acquire(USER)
    m.ensure_defaults()
    yield m
    store.release(m)


def _sql(store: ClusterStore, q: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        cur = conn.execute(q.encode(), args)
        return cur.fetchall() if cur.description else []


def _agree(mb: ClusterMailboxes, keys: list[SearchKey], folder: str = INBOX) -> int:
    total = 0
    for key in keys:
        scan = _search_in(mb, folder, key, index=False)  # type: ignore[arg-type]
        assert _search_in(mb, folder, key, index=True) == scan, key  # type: ignore[arg-type]
        total += len(scan)
    return total


def test_index_and_scan_agree(mb: ClusterMailboxes, store: ClusterStore) -> None:
    rng = random.Random(7)
    msgs = [_message(i, rng) for i in range(60)] + list(CORPUS.values())
    msgs.append(b"Subject: nul\r\n\r\nbefore\x00after needle\r\n")  # NUL: stored without it, inexact
    mb.append_many(INBOX, [(m, (), None) for m in msgs[:30]])  # MULTIAPPEND
    for m in msgs[30:]:
        mb.append(INBOX, m)
    (count, exact), = _sql(store, "SELECT count(*), count(*) FILTER (WHERE exact) FROM body_text")
    assert count == len(set(msgs)) and exact == count - 1  # every row written with its message
    assert len(_sql(store, "SELECT indexname FROM pg_indexes WHERE indexname LIKE 'body_text_trgm_%%'")) == 8
    keys = _keys()[::3] + [TextKey("BODY", "after needle"), TextKey("TEXT", "50%"), HeaderKey("SUBJECT", "_")]
    assert _agree(mb, keys) > 150
    _crit, cands = narrow(mb, INBOX, HeaderKey("SUBJECT", "report"))
    assert cands is not None and len(cands) < len(msgs)  # the index narrowed the candidates
    # the inexact row (NUL) is left to the matcher; the rest are answered by the index alone
    nul_uid = len(msgs)
    _answers, unchecked = mb.text_search(INBOX, [("SUBJECT", "report")]) or ([], {0})
    assert unchecked == {nul_uid}
    assert _search_in(mb, INBOX, TextKey("BODY", "before"), True) == [nul_uid]  # type: ignore[arg-type]


def test_missing_and_stale_rows_are_left_to_the_matcher_then_caught_up(
        mb: ClusterMailboxes, store: ClusterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("postier.store.cluster.mailboxes.CATCH_UP", 3)
    for i in range(8):
        mb.append(INBOX, f"From: a@example.org\r\nSubject: report {i}\r\n\r\nbody {i}\r\n".encode())
    mb.create("Work")
    mb.copy(INBOX, [2, 3], "Work")  # the same bodies: no new row
    assert _sql(store, "SELECT count(*) FROM body_text") == [(8,)]
    # messages stored before the table existed: no row; one row of an older extraction
    _sql(store, "DELETE FROM body_text WHERE hash <> %s",
         (hashlib.sha256(b"From: a@example.org\r\nSubject: report 7\r\n\r\nbody 7\r\n").hexdigest(),))
    _sql(store, "UPDATE body_text SET version = 0, subject = 'stale'")
    key = HeaderKey("SUBJECT", "report")
    got = mb.text_search(INBOX, [("SUBJECT", "report")])
    assert got is not None and got[0] == [{1, 2, 3}] and got[1] == {4, 5, 6, 7, 8}  # 3 caught up
    assert _search_in(mb, INBOX, key, True) == list(range(1, 9))  # type: ignore[arg-type]
    assert _search_in(mb, "Work", key, True) == [1, 2]  # type: ignore[arg-type]
    for _ in range(2):
        mb.text_search(INBOX, [("SUBJECT", "x")])
    assert _sql(store, "SELECT count(*) FROM body_text WHERE version = 1") == [(8,)]
    got = mb.text_search(INBOX, [("SUBJECT", "report 7"), ("BODY", "dy")])
    assert got is not None and got == ([{8}, set(range(1, 9))], set())


def test_a_body_gone_from_the_object_store_is_not_caught_up_again_at_every_search(
        mb: ClusterMailboxes, store: ClusterStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message whose row is missing and whose object is gone for good (deleted behind our back):
    the catch-up notes it once (an inexact empty row: the matcher decides), so it does not pick it
    again at every search, and the folder's later bodies get their rows."""
    from postier.store.cluster import fulltext
    from postier.store.cluster.bodies import body_key

    monkeypatch.setattr("postier.store.cluster.mailboxes.CATCH_UP", 1)
    for i in range(3):
        mb.append(INBOX, f"From: a@example.org\r\nSubject: lost {i}\r\n\r\nbody {i}\r\n".encode())
    _sql(store, "DELETE FROM body_text")
    first = mb.rows(INBOX, [1])[1].base
    mb.bodies.client.delete_object(Bucket=mb.bodies.bucket, Key=body_key(first))
    mb.bodies._cache.clear()
    picked: list[str] = []
    get = mb.bodies.get

    def counting(digest: str) -> bytes:
        picked.append(digest)
        return get(digest)

    monkeypatch.setattr(mb.bodies, "get", counting)
    for _ in range(3):
        mb.text_search(INBOX, [("SUBJECT", "lost")])
    assert picked.count(first) == 1 and len(set(picked)) == 3  # each body read once, the gone one too
    assert _sql(store, "SELECT exact, subject FROM body_text WHERE hash = %s", (first,)) == [(False, "")]
    assert _sql(store, "SELECT count(*) FROM body_text WHERE version = %s", (fulltext.VERSION,)) == [(3,)]


def test_search_on_another_node_gc_and_reindex(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    from postier.store.cluster.gc import collect
    dsn = pg.create_db()
    stores = [ClusterStore(dsn, bodies_factory(), timeout=5.0) for _ in range(2)]
    try:
        a, b = (s.acquire(USER) for s in stores)
        a.ensure_defaults()
        for i in range(10):
            a.append(INBOX, _message(i, random.Random(i)))
        key = HeaderKey("FROM", "jörg")
        assert _search_in(b, INBOX, key, True) == _search_in(b, INBOX, key, False) == [1, 5, 9]  # type: ignore[arg-type]
        a.store(INBOX, [1, 2], "+FLAGS", ["\\Deleted"])
        a.expunge(INBOX)
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert collect(conn, a.bodies, grace=0) == 2
            assert conn.execute("SELECT count(*) FROM body_text").fetchone() == (8,)  # gc dropped 2 rows
            conn.execute("DELETE FROM body_text WHERE hash IN (SELECT hash FROM body_text LIMIT 5)")
        assert b.rebuild_text_index() == 8  # reindex: every body of the user, rewritten
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*) FROM body_text WHERE exact").fetchone() == (8,)
        assert b.text_search(INBOX, [("FROM", "jörg")]) == ([{5, 9}], set())
        for s, m in zip(stores, (a, b), strict=True):
            s.release(m)
    finally:
        for s in stores:
            s.close()


def test_two_sessions_append_while_a_third_searches(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    """Two stores (two nodes) append at once while a third searches: every answer, taken over the
    searcher's view of the folder, is exact for that view (rows commit with their messages)."""
    dsn = pg.create_db()
    stores = [ClusterStore(dsn, bodies_factory(), timeout=5.0) for _ in range(3)]
    try:
        boxes = [s.acquire(USER) for s in stores]
        boxes[0].ensure_defaults()
        kinds: dict[int, bool] = {}
        done = threading.Event()
        seen: list[tuple[list[int], list[int]]] = []

        def write(i: int) -> None:
            for n in range(30):
                report = n % 3 == 0
                subject = f"report {i}-{n}" if report else f"note {i}-{n}"
                _v, uid = boxes[i].append(INBOX, f"From: w{i}@example.org\r\nSubject: {subject}\r\n\r\n"
                                                 f"text {n}\r\n".encode())
                kinds[uid] = report

        def writers() -> None:
            try:
                together(lambda: write(0), lambda: write(1))
            finally:
                done.set()

        def search() -> None:
            for _ in range(200):
                view = boxes[2].snapshot(INBOX).uids
                got = _search_in(boxes[2], INBOX, HeaderKey("SUBJECT", "report"), True, view)  # type: ignore[arg-type]
                seen.append((list(view), got))
                if done.is_set():
                    break

        together(writers, search, timeout=240)
        assert len(kinds) == 60 and len(seen) >= 2
        for view, got in seen:
            assert got == [u for u in view if kinds[u]]
        assert _search_in(boxes[2], INBOX, HeaderKey("SUBJECT", "report"), True) == sorted(  # type: ignore[arg-type]
            u for u, r in kinds.items() if r)
        for s, m in zip(stores, boxes, strict=True):
            s.release(m)
    finally:
        for s in stores:
            s.close()


def test_two_nodes_appending_the_same_bodies_in_opposite_orders(
        pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    """Two users on two nodes MULTIAPPEND the same two bodies at once, in opposite orders: each body
    gets one row, no transaction fails, both users find them."""
    dsn = pg.create_db()
    stores = [ClusterStore(dsn, bodies_factory(), timeout=5.0) for _ in range(2)]
    users = [USER, User("carol@example.org", "carol", "example.org", "maildir")]
    try:
        boxes = [s.acquire(u) for s, u in zip(stores, users, strict=True)]
        for m in boxes:
            m.ensure_defaults()
        gate = threading.Barrier(2, timeout=30)

        def write(i: int) -> None:
            for n in range(10):
                pair = [f"Subject: shared {n} {k}\r\n\r\nbody {k}\r\n".encode() for k in (0, 1)]
                gate.wait()
                boxes[i].append_many(INBOX, [(m, (), None) for m in (pair if i else pair[::-1])])

        together(lambda: write(0), lambda: write(1))
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert conn.execute("SELECT count(*), count(*) FILTER (WHERE exact) FROM body_text").fetchone() == (20, 20)
        for m in boxes:
            assert m.text_search(INBOX, [("SUBJECT", "shared 3 ")]) == ([set(range(7, 9))], set())
        for s, m in zip(stores, boxes, strict=True):
            s.release(m)
    finally:
        for s in stores:
            s.close()


def test_imap_search_through_two_nodes(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    """Mail appended on node A is found by SEARCH on node B, which answers from the index; `postier
    reindex` rewrites the rows."""
    a, b = make_nodes(tmp_path, pg.create_db(), s3)
    start_all((a, b))
    try:
        rng = random.Random(11)
        msgs = [_message(i, rng) for i in range(30)]
        ca = imaplib.IMAP4(*a.addr("imap"), timeout=20)
        ca.starttls(a.client_ssl_context())
        ca.login(ALICE, PASSWORD)
        cb = imaplib.IMAP4(*b.addr("imap"), timeout=20)
        cb.starttls(b.client_ssl_context())
        cb.login(ALICE, PASSWORD)
        try:
            for m in msgs:
                assert ca.append(INBOX, None, None, m)[0] == "OK"
            cb.select(INBOX)
            typ, data = cb.uid("SEARCH", "CHARSET", "UTF-8", "BODY", "quoted")
            assert typ == "OK" and {int(x) for x in data[0].split()} == {i + 1 for i in range(30) if i % 5 == 1}
            typ, data = cb.uid("SEARCH", "NOT", "FROM", "sender")
            assert typ == "OK" and {int(x) for x in data[0].split()} == {i + 1 for i in range(30) if i % 4 == 0}
            out = a.cli("cluster", "status").stdout
            assert "full-text rows 30 " in out and "trigram index: yes" in out, out
            out = a.cli("reindex", ALICE).stdout
            assert "30 message bodies" in out, out
            typ, data = cb.uid("SEARCH", "TO", "team2")
            assert typ == "OK" and {int(x) for x in data[0].split()} == {i + 1 for i in range(30) if i % 3 == 2}
        finally:
            ca.logout()
            cb.logout()
    finally:
        for n in (a, b):
            n.stop()
