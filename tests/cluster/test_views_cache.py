"""Cluster mode's shared parsed-view cache (store/cluster/cache.py) against a real PostgreSQL and S3
server (moto): views computed on one node are read on another without the object store, a COPY
finds the same rows, two nodes storing one view at once, the collector removing them, and the same
FETCH answers with and without the cache over the message-view test corpus; and the same through
two running nodes over IMAP."""

from __future__ import annotations

import contextlib
import imaplib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from postier.proto.imap import Fetch, parse_command  # noqa: E402
from postier.server.imapfetch import FetchOptions, FetchPace, render_fetch  # noqa: E402
from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.gc import collect  # noqa: E402
from postier.store.cluster.mailboxes import ClusterMailboxes  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from postier.store.errors import StoreUnavailable  # noqa: E402
from postier.store.index import CACHE_ITEM_LIMIT  # noqa: E402
from tests.concurrency import together
from tests.harness import free_port  # noqa: E402
from tests.imap.test_message_views import COMMENTS, NUL_MESSAGE, QP_MESSAGE  # noqa: E402
from tests.message import corpus  # noqa: E402
from tests.message.test_dovecot_diff import CORPUS  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import _nodes, imap  # noqa: E402
from .test_store import ALICE, msg  # noqa: E402

ITEMS = b"(UID BODYSTRUCTURE ENVELOPE BODY)"


def messages() -> list[bytes]:
    """The message-view corpora: tests/message (corpus.py and the Dovecot differential test's) and
    the cases of tests/imap/test_message_views.py."""
    return [*corpus.ALL.values(), *(raw for _n, raw in CORPUS), NUL_MESSAGE, QP_MESSAGE, COMMENTS]


@contextlib.contextmanager
def node(dsn: str, bodies: BodyStore) -> Iterator[ClusterMailboxes]:
    """One node's view of alice: its own pool, worker threads and body store."""
    s = ClusterStore(dsn, bodies, timeout=3.0)
    try:
        m = s.acquire(ALICE)
        m.ensure_defaults()
        yield m
    finally:
        s.close()


def unreachable_bodies() -> BodyStore:
    """A body store nobody listens for: every GET fails, so only the view cache can answer."""
    return BodyStore(f"http://127.0.0.1:{free_port()}", "nowhere", "test", "test", timeout=1.0)


def fetch(mb: ClusterMailboxes, name: str, items: bytes = ITEMS, utf8: bool = False) -> list[bytes]:
    """FETCH 1:* through the IMAP driver's renderer (server/imapfetch.py), every batch."""
    cmd = parse_command(b"a FETCH 1:* " + items + b"\r\n")
    assert isinstance(cmd, Fetch)
    targets = list(enumerate(mb.snapshot(name).uids, 1))
    out: list[bytes] = []
    pace = FetchPace()
    while targets:
        batch = render_fetch(mb, name, targets, cmd.attributes, FetchOptions(utf8=utf8, set_seen=False), pace)
        assert batch.missing == 0
        out += batch.data
        targets = targets[batch.done:]
    return out


def view_rows(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return [(b, k) for b, k in conn.execute("SELECT body, kind FROM body_views ORDER BY body, kind")]


def test_views_from_node_a_answer_on_node_b_and_after_copy_without_the_object_store(
        pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    dsn = pg.create_db()
    raws = messages()
    with node(dsn, bodies_factory()) as a, node(dsn, unreachable_bodies()) as b:
        for raw in raws:
            a.append("INBOX", raw)
        computed = {u8: fetch(a, "INBOX", utf8=u8) for u8 in (False, True)}  # nothing cached yet
        bodies = {r.base for r in a.rows_between("INBOX", 1, len(raws)).values()}
        kinds = {k for _b, k in view_rows(dsn)}
        assert len(kinds) == 5  # env, bs, body; env and bs again for UTF8=ACCEPT (RFC 6855)
        assert {b for b, _k in view_rows(dsn)} == bodies
        for u8 in (False, True):
            assert fetch(a, "INBOX", utf8=u8) == computed[u8]  # from the cache, the same bytes
            assert fetch(b, "INBOX", utf8=u8) == computed[u8]  # node B: no body can be read there
        with pytest.raises(StoreUnavailable):
            b.read("INBOX", b.rows("INBOX", [1])[1])
        b.create("Copies")
        b.copy("INBOX", list(range(1, len(raws) + 1)), "Copies")
        assert fetch(b, "Copies") == computed[False]  # same bodies: the same rows, nothing new
        assert len(view_rows(dsn)) == len(bodies) * 5


def test_two_nodes_caching_the_same_views_at_once(pg: PgServer, bodies_factory: Callable[[], BodyStore],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    dsn = pg.create_db()
    with node(dsn, bodies_factory()) as a, node(dsn, bodies_factory()) as b:
        for n in range(200):
            a.append("INBOX", msg(n))
        items = [(u, kind, b"view %d %s" % (u, kind.encode())) for u in range(1, 201) for kind in ("x1", "y1")]
        start = threading.Barrier(2)

        def put(mb: ClusterMailboxes, order: Sequence[tuple[int, str, bytes]]) -> None:
            start.wait(30)
            for _ in range(5):
                mb.cache_put("INBOX", order)

        with caplog.at_level(logging.WARNING, logger="postier.cluster"):
            together(lambda: put(a, items), lambda: put(b, items[::-1]))  # opposite orders
        assert not [r for r in caplog.records if "not cached" in r.getMessage()]
        assert len(view_rows(dsn)) == 400
        assert a.cache_get("INBOX", list(range(1, 201)), "y1") == {u: b"view %d y1" % u for u in range(1, 201)}
        assert b.cache_get("INBOX", [7, 999], "x1") == {7: b"view 7 x1"}


def test_gc_removes_the_views_of_the_bodies_it_collects(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> None:
    dsn = pg.create_db()
    with node(dsn, bodies_factory()) as a:
        a.append("INBOX", msg("gone"))
        a.append("INBOX", msg("kept"))
        fetch(a, "INBOX", b"(ENVELOPE BODYSTRUCTURE)")
        gone, kept = (a.rows("INBOX", [1, 2])[u].base for u in (1, 2))
        assert view_rows(dsn) == sorted((h, k) for h in (gone, kept) for k in ("bs2", "env2"))
        a.store("INBOX", [1], "+FLAGS", ["\\Deleted"])
        assert a.expunge("INBOX") == [1]
        a.cache_put("INBOX", [(1, "late", b"x")])  # expunged meanwhile: not stored
        with psycopg.connect(dsn, autocommit=True) as conn:
            assert collect(conn, a.bodies, grace=0) == 1
        assert view_rows(dsn) == [(kept, "bs2"), (kept, "env2")]
        a.cache_put("INBOX", [(2, "big", b"x" * (CACHE_ITEM_LIMIT + 1)), (2, "small", b"x")])  # too big: left out
        assert a.cache_get("INBOX", [1, 2], "small") == {2: b"x"} and a.cache_get("INBOX", [2], "big") == {}
        with psycopg.connect(dsn, autocommit=True) as conn:  # a body without its `bodies` row (collected
            conn.execute("DELETE FROM bodies WHERE hash=%s", (kept,))  # under a FETCH, or a legacy upload)
        assert view_rows(dsn) == []  # its views went with the row
        a.cache_put("INBOX", [(2, "small", b"x")])  # no row to refer to: left out, no error
        assert view_rows(dsn) == [] and a.cache_get("INBOX", [2], "small") == {}


def test_a_view_stored_while_its_body_is_collected_leaves_no_row(
        pg: PgServer, bodies_factory: Callable[[], BodyStore], caplog: pytest.LogCaptureFixture) -> None:
    """The interleaving the foreign key is for: the collector holds the body's row and deletes it;
    a cache_put that already saw the row waits on that lock, then fails its check: no orphan row."""
    dsn = pg.create_db()
    with node(dsn, bodies_factory()) as a, psycopg.connect(dsn) as collector:
        a.append("INBOX", msg("raced"))
        digest = a.rows("INBOX", [1])[1].base
        collector.execute("SELECT hash FROM bodies WHERE hash=%s FOR UPDATE", (digest,))  # as gc.collect
        collector.execute("DELETE FROM bodies WHERE hash=%s", (digest,))
        with caplog.at_level(logging.WARNING, logger="postier.cluster"):
            putter = threading.Thread(target=a.cache_put, args=("INBOX", [(1, "env2", b"view")]))
            putter.start()
            with psycopg.connect(dsn, autocommit=True) as watch:
                for _ in range(600):  # until the INSERT waits on the collector's row lock (bounded)
                    if watch.execute("SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                     "AND query LIKE 'INSERT INTO body_views%%'").fetchone():
                        break
                    putter.join(0.05)
                else:
                    pytest.fail("the cache_put never waited on the collector")
            collector.commit()
            putter.join(30)
        assert not putter.is_alive()
        assert any("not cached" in r.getMessage() for r in caplog.records)
        assert view_rows(dsn) == []


def test_cache_failures_never_fail_a_fetch(pg_own: PgServer, bodies_factory: Callable[[], BodyStore],
                                           caplog: pytest.LogCaptureFixture) -> None:
    dsn = pg_own.create_db()
    with node(dsn, bodies_factory()) as a:
        for raw in (corpus.ALTERNATIVE, corpus.NESTED):
            a.append("INBOX", raw)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE body_views")
        with caplog.at_level(logging.WARNING, logger="postier.cluster"):
            first = fetch(a, "INBOX")  # missing table: computed, not cached, answered
            assert fetch(a, "INBOX") == first
        assert any("not cached" in r.getMessage() for r in caplog.records)
        pg_own.stop()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="postier.cluster"):
            a.cache_put("INBOX", [(1, "env2", b"x")])  # PostgreSQL down: logged, not raised
        assert any("not cached" in r.getMessage() for r in caplog.records)
        with pytest.raises(StoreUnavailable):  # as every read of the index
            a.cache_get("INBOX", [1], "env2")


def _fetch_views(c: imaplib.IMAP4) -> list[object]:
    typ, data = c.fetch("1:*", "(BODYSTRUCTURE ENVELOPE)")
    assert typ == "OK", data
    return list(data)


def test_fetch_on_node_b_with_the_object_store_stopped_after_node_a(tmp_path: Path, pg: PgServer) -> None:
    """Two `postier serve` nodes: FETCH BODYSTRUCTURE ENVELOPE on A caches the views; with the object
    store stopped, B (which never read a body) answers the same from PostgreSQL, also after a COPY."""
    own = S3Server()
    a, b = _nodes(tmp_path, pg.create_db(), own)
    try:
        c = imap(a)
        try:
            raws = [corpus.ALTERNATIVE, corpus.NESTED, corpus.ATTACHMENT, corpus.DIGEST, COMMENTS, QP_MESSAGE]
            for raw in raws:
                assert c.append("INBOX", None, None, raw)[0] == "OK"
            c.select("INBOX")
            on_a = _fetch_views(c)
        finally:
            c.logout()
        own.stop()
        c = imap(b)
        try:
            assert c.select("INBOX")[1] == [str(len(raws)).encode()]
            assert _fetch_views(c) == on_a
            _typ, data = c.fetch("1", "(BODY.PEEK[])")  # the object store is really out of reach:
            assert not any(isinstance(d, tuple) for d in data), data  # no body comes back
            assert c.create("Copies")[0] == "OK" and c.copy("1:*", "Copies")[0] == "OK"
            c.select("Copies")
            assert _fetch_views(c) == on_a
        finally:
            c.logout()
    finally:
        a.stop()
        b.stop()
