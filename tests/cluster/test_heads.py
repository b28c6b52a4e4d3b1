"""Cluster mode's kept header blocks (`body_heads`, store/cluster/cache.py) against a real PostgreSQL
and S3 server (moto): header-only reads (SEARCH on header fields, FETCH BODY.PEEK[HEADER...],
RFC822.HEADER, ENVELOPE, SORT) give the same bytes from the rows as from the object store over the
message-view corpus, with no GET (a node whose object store is out of reach answers them); bodies
without a row are read and then get one; two nodes writing the same rows at once; the collector
removing them; and the same through two running nodes over IMAP with the object store stopped."""

from __future__ import annotations

import imaplib
import logging
import random
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from postier.message.matching import SearchContext  # noqa: E402
from postier.proto.imap.search import AndKey, HeaderKey, NotKey, OrKey, SearchKey  # noqa: E402
from postier.server.imapfetch import run_search  # noqa: E402
from postier.server.imapsort import sort_items  # noqa: E402
from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.gc import collect  # noqa: E402
from postier.store.cluster.mailboxes import ClusterMailboxes  # noqa: E402
from postier.store.errors import StoreUnavailable  # noqa: E402
from postier.store.index import CACHE_ITEM_LIMIT  # noqa: E402
from tests.concurrency import together
from tests.imap.test_fts import _keys, _message  # noqa: E402
from tests.message import corpus  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import ALICE, PASSWORD, _nodes, imap  # noqa: E402
from .test_store import msg  # noqa: E402
from .test_views_cache import fetch, messages, node, unreachable_bodies  # noqa: E402

INBOX = "INBOX"
HEADER_ITEMS = (b"(UID BODY.PEEK[HEADER] BODY.PEEK[HEADER.FIELDS (FROM SUBJECT X-PAD-7)] "
                b"BODY.PEEK[HEADER.FIELDS.NOT (TO DATE)] BODY.PEEK[HEADER]<3.40> RFC822.HEADER)")


def long_header(n: int) -> bytes:
    """A message whose header block is about `n` bytes (X-Pad fields), with a short body."""
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 70) for i in range(n // 82 + 1))
    return b"From: pad@example.org\r\nSubject: padded %d\r\n" % n + pad + b"\r\nbody\r\n"


def corpus_messages() -> list[bytes]:
    """The view corpus, generated header-rich messages and the edges of the header block: none
    (no empty line), bare LF line ends, a block longer than the first ranged GET (16 KiB)."""
    rng = random.Random(11)
    return [*messages(), *(_message(i, rng) for i in range(40)),
            b"Subject: only a header\r\nFrom: h@example.org\r\n",
            b"Subject: bare LF\nFrom: lf@example.org\nX-Pad-7: lf\n\nbody\n",
            long_header(30_000)]


def header_keys() -> list[SearchKey]:
    """The header criteria of tests/imap/test_fts.py and some on fields no index answers."""
    def header_only(k: SearchKey) -> bool:
        match k:
            case HeaderKey():
                return True
            case NotKey(key=x):
                return header_only(x)
            case OrKey(left=x, right=y):
                return header_only(x) and header_only(y)
            case AndKey(keys=xs):
                return all(header_only(x) for x in xs)
        return False
    return [k for k in _keys() if header_only(k)][::2] + [
        HeaderKey("X-PAD-7", "p"), HeaderKey("X-PAD-7", ""), HeaderKey("MESSAGE-ID", "@"),
        HeaderKey("CONTENT-TYPE", "multipart"), NotKey(HeaderKey("DATE", "2024"))]


def search(mb: ClusterMailboxes, key: SearchKey, name: str = INBOX) -> list[int]:
    """SEARCH as the IMAP driver runs it without the full-text index (server/imapfetch.py)."""
    uids = mb.snapshot(name).uids
    ctx = SearchContext(max_seq=len(uids), max_uid=uids[-1] if uids else 0)
    return [u for _s, u, _m in run_search(mb, name, list(enumerate(uids, 1)), key, ctx, 0)[0]]


def header_answers(mb: ClusterMailboxes, name: str = INBOX) -> list[object]:
    """Every header-only read: read_header of each message, SEARCH, FETCH and SORT."""
    rows = mb.rows_between(name, 1, 2**32 - 1)
    uids = list(mb.snapshot(name).uids)
    return [[mb.read_header(name, rows[u]) for u in uids], [mb.read_header(name, rows[u], 100) for u in uids],
            [search(mb, k, name) for k in header_keys()],
            fetch(mb, name, HEADER_ITEMS), fetch(mb, name, b"(ENVELOPE)"),
            sort_items(mb, name, list(enumerate(uids, 1)), True)]


def sql(dsn: str, q: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute(q.encode(), args)
        return cur.fetchall() if cur.description else []


def head_rows(dsn: str) -> dict[str, bytes]:
    return {str(b): bytes(cast(bytes, h)) for b, h in sql(dsn, "SELECT body, head FROM body_heads")}


def count_gets(bodies: BodyStore) -> list[int]:
    """A counter of the GetObject calls `bodies` makes (botocore's event hook, before each call)."""
    n = [0]

    def seen(**_kw: object) -> None:
        n[0] += 1
    bodies.client.meta.events.register("before-call.s3.GetObject", seen)
    return n


def test_header_reads_from_the_rows_are_the_object_store_s_bytes(
        pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    dsn = pg.create_db()
    raws = corpus_messages()
    store_a = bodies_factory()
    gets = count_gets(store_a)
    with node(dsn, store_a) as a, node(dsn, unreachable_bodies()) as b:
        a.append_many(INBOX, [(raw, (), None) for raw in raws[:20]])  # MULTIAPPEND
        for raw in raws[20:]:
            a.append(INBOX, raw)
        written = head_rows(dsn)
        rows = a.rows_between(INBOX, 1, len(raws))
        assert set(written) == {r.base for r in rows.values()}  # a row for every body, at its upload
        for r in rows.values():
            assert written[r.base] == a.bodies.get(r.base).partition(b"\r\n\r\n")[0] + (
                b"\r\n\r\n" if b"\r\n\r\n" in a.bodies.get(r.base) else b"")
        # the object store's answers: no rows (bodies stored before the table), no cached views
        sql(dsn, "DELETE FROM body_heads")
        sql(dsn, "DELETE FROM body_views")
        gets[0] = 0
        a.bodies._cache.clear()
        from_gets = header_answers(a)
        assert gets[0] >= len(raws)
        assert head_rows(dsn) == written  # each block kept again from what was read: the same bytes
        # from the rows: node B cannot read any body (a GET there fails: StoreUnavailable)
        sql(dsn, "DELETE FROM body_views")
        assert header_answers(b) == from_gets
        gets[0] = 0
        sql(dsn, "DELETE FROM body_views")
        assert header_answers(a) == from_gets
        assert gets[0] == 0
        assert sum(map(len, cast(list[list[int]], from_gets[2]))) > 100  # the searches found things
        with pytest.raises(StoreUnavailable):  # the body itself is really out of reach on B
            b.read(INBOX, rows[1])


def test_a_header_block_over_the_bound_is_read_from_the_object_store(
        pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    dsn = pg.create_db()
    with node(dsn, bodies_factory()) as a, node(dsn, unreachable_bodies()) as b:
        big = long_header(CACHE_ITEM_LIMIT + 2000)
        a.append(INBOX, big)
        a.append(INBOX, msg("small"))
        rows = a.rows(INBOX, [1, 2])
        assert set(head_rows(dsn)) == {rows[2].base}  # the long block is not kept
        head = big[: big.index(b"\r\n\r\n") + 4]
        assert a.read_header(INBOX, rows[1]) == head and a.peek_header(INBOX, rows[1]) is None
        assert set(head_rows(dsn)) == {rows[2].base}  # nor after it was read
        assert search(a, HeaderKey("X-PAD-5", "p")) == [1]
        assert b.read_header(INBOX, rows[2]) == a.read_header(INBOX, rows[2])
        with pytest.raises(StoreUnavailable):  # B has no way to it
            b.read_header(INBOX, rows[1])


def test_two_nodes_keeping_the_same_blocks_at_once(pg: PgServer, bodies_factory: Callable[[], BodyStore],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Both fill the rows of the same bodies from their reads (a search, each block in its own
    transaction) and write overlapping sets in opposite orders: no deadlock, one row each."""
    dsn = pg.create_db()
    with node(dsn, bodies_factory()) as a, node(dsn, bodies_factory()) as b:
        a.append_many(INBOX, [(msg(n), (), None) for n in range(200)])
        written = head_rows(dsn)
        items = sorted(written.items())
        key = HeaderKey("SUBJECT", "1")
        expected = search(a, key)
        start = threading.Barrier(3)  # the two nodes and a third, which empties the table
        answers: list[list[int]] = []

        def run(mb: ClusterMailboxes, order: list[tuple[str, bytes]]) -> None:
            for _ in range(3):
                start.wait(60)
                answers.append(search(mb, key))  # GETs, and keeps each block it read
                start.wait(60)
                start.wait(60)
                mb._keep_heads(order)  # many rows in one transaction
                start.wait(60)

        def empty() -> None:
            for _ in range(3):
                sql(dsn, "DELETE FROM body_heads")
                start.wait(60)  # both search
                start.wait(60)
                assert head_rows(dsn) == written
                sql(dsn, "DELETE FROM body_heads")
                start.wait(60)  # both write every row
                start.wait(60)

        with caplog.at_level(logging.WARNING, logger="postier.store"):
            together(lambda: run(a, items), lambda: run(b, items[::-1]), empty)
        assert not [r for r in caplog.records if "not kept" in r.getMessage()]
        assert answers == [expected] * 6
        assert head_rows(dsn) == written


def test_gc_removes_the_blocks_of_the_bodies_it_collects(
        pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    dsn = pg.create_db()
    with node(dsn, bodies_factory()) as a:
        a.append(INBOX, msg("gone"))
        a.append(INBOX, msg("kept"))
        gone, kept = (a.rows(INBOX, [1, 2])[u].base for u in (1, 2))
        assert set(head_rows(dsn)) == {gone, kept}
        a.store(INBOX, [1], "+FLAGS", ["\\Deleted"])
        assert a.expunge(INBOX) == [1]
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert collect(conn, a.bodies, grace=0) == 1
        assert set(head_rows(dsn)) == {kept}
        a._keep_heads([(gone, b"Subject: late\r\n\r\n")])  # no `bodies` row any more: left out
        assert set(head_rows(dsn)) == {kept}


def _imap_answers(c: imaplib.IMAP4) -> list[object]:
    out: list[object] = []
    for args in (("SEARCH", "HEADER", "X-Pad-7", "p"), ("SEARCH", "HEADER", "Message-ID", "@"),
                 ("SEARCH", "FROM", "example"), ("SEARCH", "SUBJECT", "padded"),
                 ("FETCH", "1:*", "(BODY.PEEK[HEADER] BODY.PEEK[HEADER.FIELDS (SUBJECT)] ENVELOPE)"),
                 ("SORT", "(SUBJECT FROM DATE)", "UTF-8", "ALL")):
        typ, data = c.uid(*args)
        assert typ == "OK", (args, data)
        out.append(list(data))
    return out


def test_header_commands_on_node_b_with_the_object_store_stopped(tmp_path: Path, pg: PgServer) -> None:
    """Two `postier serve` nodes: mail appended on A; with the object store stopped, B (which never
    read a body) answers header SEARCHes, header FETCHes and SORT as A did."""
    own = S3Server()
    a, b = _nodes(tmp_path, pg.create_db(), own)
    try:
        c = imap(a)
        try:
            raws = [corpus.ALTERNATIVE, corpus.NESTED, corpus.ATTACHMENT, long_header(20_000),
                    *(_message(i, random.Random(3)) for i in range(10))]
            for raw in raws:
                assert c.append("INBOX", None, None, raw)[0] == "OK"
            c.select("INBOX")
            on_a = _imap_answers(c)
        finally:
            c.logout()
        own.stop()
        c = imap(b)
        try:
            assert c.select("INBOX")[1] == [str(len(raws)).encode()]
            assert _imap_answers(c) == on_a
            _typ, data = c.fetch("1", "(BODY.PEEK[])")  # the object store is really out of reach:
            assert not any(isinstance(d, tuple) for d in data), data  # no body comes back
        finally:
            c.logout()
        with b.web(b.hostname) as web:  # the webmail's message list reads the header blocks too
            assert web.post("/mail/login", data={"address": ALICE, "password": PASSWORD}).status_code == 303
            r = web.get("/mail/folder", params={"f": "INBOX"})
            assert r.status_code == 200 and "padded 20000" in r.text, r.text[:2000]
            assert len(set(re.findall(r'href="/mail/msg\?f=INBOX&amp;u=(\d+)"', r.text))) == len(raws)
    finally:
        a.stop()
        b.stop()
