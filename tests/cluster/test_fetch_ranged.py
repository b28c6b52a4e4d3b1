"""FETCH of parts of a large message in cluster mode reads only those parts (store/cluster/bodies.py
`RangedBody`, server/imapfetch.py `_Large`): with the message's layout kept (written at upload, or by
the first FETCH that scans it), a section or a partial range is read by ranged GETs. Against a real
PostgreSQL and moto's S3 server, the bytes moto sends counted by a TCP relay in front of it (not a
counter in our code): a 20 MiB message's `BODY.PEEK[2]<0.1000>` or `BODY.PEEK[1]` reads some KiB,
every answer the whole-message path's (by hash); two sessions at once; the layout made by the first
FETCH when it is not kept (one whole download), then ranges; the object store out of reach is
StoreUnavailable, and NO [UNAVAILABLE] on a running node."""

from __future__ import annotations

import hashlib
import imaplib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("psycopg")

from postier.message.textscan import LAYOUT_KIND, Layout, layout_at  # noqa: E402
from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.mailboxes import ClusterMailboxes  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from postier.store.errors import StoreUnavailable  # noqa: E402
from tests.concurrency import together
from tests.harness import free_port  # noqa: E402
from tests.imap.test_fetch_large import fetch_hashes  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_store_large_text import ALICE, BOB, PREFIX, deliver_to_alice, with_attachment  # noqa: E402

SIZE = 20 << 20
#: parts and partial ranges of the message (text part, 20 MiB base64 attachment, text part)
PARTS = ["(BODY.PEEK[2]<0.1000>)", "(BODY.PEEK[1])", "(BODY.PEEK[3])", "(BODY.PEEK[]<0.1000>)",
         "(UID BODY.PEEK[2]<9000000.1000> BODY.PEEK[1] BODY.PEEK[2.MIME])", "(BINARY.PEEK[2]<100.1000>)",
         "(BODY.PEEK[TEXT]<0.2000> BINARY.SIZE[1])", "(BODY.PEEK[]<20000000.100000>)"]
FAR_LESS = 512 << 10  # what a part's FETCH may read at most (the parts and ranges asked are a few KiB)


class Relay:
    """A TCP relay to moto on loopback counting the octets moto sends (`served`); `stop()` closes it
    (the object store out of reach)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port("127.0.0.1")
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.served = 0
        self.cut_at: int | None = None  # when `served` passes it, the connections are cut
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", self.port))
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(256 << 10):
                if count:
                    with self._lock:
                        self.served += len(data)
                        cut = self.cut_at is not None and self.served > self.cut_at
                    if cut:
                        return
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close alone leaves it listening)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            for s in self._conns:
                s.close()


@pytest.fixture(scope="module")
def big(pg: PgServer, s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ClusterStore, Relay]]:
    """A store whose object store is reached through a Relay, ALICE's INBOX holding one 20 MiB message."""
    relay = Relay(int(s3.endpoint.rsplit(":", 1)[1]))
    bodies = BodyStore(relay.endpoint, s3.bucket(), "test", "test", timeout=2.0)
    bodies.ensure_bucket()
    store = ClusterStore(pg.create_db(), bodies, timeout=3.0)
    deliver_to_alice(store, tmp_path_factory.mktemp("big"), with_attachment(SIZE, "before the file", "after it"))
    yield store, relay
    store.close()
    relay.stop()


def served(relay: Relay, mb: ClusterMailboxes, items: str, stream: bool = True) -> tuple[list[str], int]:
    """FETCH 1:* `items` (answer hashes) and the octets moto sent meanwhile."""
    before = relay.served
    got = fetch_hashes(mb, "INBOX", items, stream=stream)
    return got, relay.served - before


def test_parts_of_a_20_mib_message_are_read_by_ranges(big: tuple[ClusterStore, Relay]) -> None:
    store, relay = big
    mb = ClusterMailboxes(ALICE, store.pool, store.bodies)
    whole = {}
    for items in PARTS:
        whole[items], n = served(relay, mb, items, stream=False)  # read whole, parsed: the reference
        assert n > SIZE
    with store.pool.connection() as conn:  # the layout was kept at the upload, from the spooled file
        kept = conn.execute("SELECT data FROM body_views WHERE kind=%s", (LAYOUT_KIND,)).fetchone()
    assert kept is not None and len(kept[0]) < 4096
    data = PREFIX + with_attachment(SIZE, "before the file", "after it")
    lay = layout_at(lambda o, n: data[o:o + n], len(data))
    assert lay is not None and Layout.load(bytes(kept[0])).marks == lay.marks
    for items in PARTS:
        got, n = served(relay, mb, items)
        print(f"{items}: {n} octets from the object store")
        assert got == whole[items], items
        assert n < FAR_LESS, (items, n)
    got, n = served(relay, mb, "(BODY.PEEK[2])")  # most of the message: one download, its hash checked
    assert n > SIZE * 0.9
    assert got == fetch_hashes(mb, "INBOX", "(BODY.PEEK[2])", stream=False)


def test_two_sessions_at_once(big: tuple[ClusterStore, Relay]) -> None:
    store, relay = big
    sessions = [ClusterMailboxes(ALICE, store.pool, store.bodies) for _ in range(3)]
    whole = {items: fetch_hashes(sessions[2], "INBOX", items, stream=False) for items in PARTS[:5]}
    got: list[dict[str, list[str]]] = [{}, {}]
    before = relay.served

    def session(k: int) -> None:
        for _ in range(3):
            for items in PARTS[:5] if k == 0 else reversed(PARTS[:5]):
                got[k][items] = fetch_hashes(sessions[k], "INBOX", items, stream=True)

    together(lambda: session(0), lambda: session(1))
    assert got[0] == got[1] == whole
    n = relay.served - before
    print(f"two sessions, 30 FETCHes: {n} octets from the object store")
    assert n < 30 * FAR_LESS


def test_the_first_fetch_keeps_the_layout_when_missing(big: tuple[ClusterStore, Relay]) -> None:
    """A body stored before layouts were kept (or whose row was lost): the first FETCH of a section
    scans one download of it and keeps the layout; the next reads only the span."""
    store, relay = big
    mb = ClusterMailboxes(ALICE, store.pool, store.bodies)
    whole = fetch_hashes(mb, "INBOX", PARTS[0], stream=False)
    with store.pool.connection() as conn:
        conn.execute("DELETE FROM body_views WHERE kind=%s", (LAYOUT_KIND,))
    first, n1 = served(relay, mb, PARTS[0])
    second, n2 = served(relay, mb, PARTS[0])
    assert first == second == whole
    assert n1 > SIZE and n2 < FAR_LESS, (n1, n2)


def test_a_large_body_given_in_memory_keeps_its_layout(big: tuple[ClusterStore, Relay]) -> None:
    """A body above MEMORY_DATA_LIMIT handed over in memory (an APPEND, an import) keeps its layout
    at its upload, as a spooled one does: its first FETCH of a section already reads by ranges."""
    store, relay = big
    mb = ClusterMailboxes(BOB, store.pool, store.bodies)
    mb.ensure_defaults()
    data = PREFIX + with_attachment(3 << 20, "held in memory", "then stored")
    mb.append("INBOX", data)
    digest = store.bodies.digest(data)
    with store.pool.connection() as conn:
        assert conn.execute("SELECT count(*) FROM body_views WHERE body = %s AND kind = %s",
                            (digest, LAYOUT_KIND)).fetchone() == (1,)
    got, n = served(relay, mb, PARTS[1])
    assert n < FAR_LESS, n
    assert got == fetch_hashes(mb, "INBOX", PARTS[1], stream=False)


def test_object_store_out_of_reach_is_unavailable(pg: PgServer, s3: S3Server, tmp_path: Path) -> None:
    """The layout and header in PostgreSQL, the object store gone: the answer is not made up from
    them, the ranged read raises StoreUnavailable before anything is sent."""
    relay = Relay(int(s3.endpoint.rsplit(":", 1)[1]))
    bodies = BodyStore(relay.endpoint, s3.bucket(), "test", "test", timeout=1.0)
    bodies.ensure_bucket()
    store = ClusterStore(pg.create_db(), bodies, timeout=3.0)
    try:
        deliver_to_alice(store, tmp_path, with_attachment(3 << 20, "before", "after"))
        mb = ClusterMailboxes(ALICE, store.pool, store.bodies)
        assert fetch_hashes(mb, "INBOX", PARTS[0], stream=True) == fetch_hashes(mb, "INBOX", PARTS[0], stream=False)
        relay.stop()
        for items in PARTS[:2]:
            with pytest.raises(StoreUnavailable):
                fetch_hashes(mb, "INBOX", items, stream=True)
    finally:
        store.close()
        relay.stop()


def test_a_node_answers_unavailable(pg: PgServer, s3: S3Server, tmp_path: Path) -> None:
    """A running node: a section of a large message with the object store out of reach is NO
    [UNAVAILABLE] (nothing of the answer sent), and the session goes on; the object store lost
    while an answer is under way ends the session (never a literal with other octets)."""
    from .test_nodes import imap, make_nodes

    relay = Relay(int(s3.endpoint.rsplit(":", 1)[1]))
    through = SimpleNamespace(endpoint=relay.endpoint, bucket=s3.bucket)
    (inst,) = make_nodes(tmp_path, pg.create_db(), through, count=1)  # type: ignore[arg-type]
    inst.start()
    try:
        data = with_attachment(3 << 20, "before", "after")
        c = imap(inst)
        try:
            assert c.append("INBOX", None, None, data)[0] == "OK"
            c.select("INBOX")
            typ, got = c.fetch("1", "(BODY.PEEK[2]<0.1000> BODY.PEEK[1])")  # the layout kept, if it was not
            attachment = data[data.index(b"base64\r\n\r\n") + 10:]
            assert typ == "OK" and isinstance(got[0], tuple) and got[0][1] == attachment[:1000]
        finally:
            c.logout()
        c = imap(inst)
        c.select("INBOX")
        relay.cut_at = relay.served + (600 << 10)  # in the second GET of the answer (256 KiB, then 512)
        with pytest.raises(imaplib.IMAP4.abort):
            c.fetch("1", "(BODY.PEEK[2]<0.1400000>)")
        relay.cut_at = None
        c = imap(inst)
        try:
            c.select("INBOX")
            typ, got = c.fetch("1", "(BODY.PEEK[2]<0.1400000>)")
            assert typ == "OK" and isinstance(got[0], tuple)
            assert hashlib.sha256(got[0][1]).digest() == hashlib.sha256(attachment[:1400000]).digest()
            relay.stop()
            for items in ("(BODY.PEEK[2]<0.1000>)", "(BODY.PEEK[1])", "(BODY.PEEK[]<0.100>)"):
                typ, got = c.fetch("1", items)
                assert typ == "NO" and b"[UNAVAILABLE]" in got[-1], (items, typ, got)
            assert c.noop()[0] == "OK"
        finally:
            c.logout()
    finally:
        inst.stop()
        relay.stop()


def test_ranged_body_reads(bodies_factory: object) -> None:
    """`RangedBody` on its own: a read at a new position asks for what it reads, reads going on ask
    for doubling windows (a 6 MiB body read through in 256 KiB pieces: 5 GETs), seeks anywhere,
    the bytes the object's; a body shorter than the index says reads short; a missing one is MessageGone."""
    import random

    from postier.store.cluster.bodies import RANGE_MAX, RangedBody
    from postier.store.errors import MessageGone

    bodies = bodies_factory()  # type: ignore[operator]
    data = random.Random(5).randbytes(6 << 20)
    digest = bodies.put(data)
    f = RangedBody(bodies, digest, len(data))
    got = hashlib.sha256()
    while piece := f.read(256 << 10):
        got.update(piece)
    assert got.digest() == hashlib.sha256(data).digest() and f.requests == 5  # 256K, 512K, 1M, 2M, then the rest
    assert RANGE_MAX == 4 << 20
    rng = random.Random(7)
    for _ in range(20):
        at, n = rng.randrange(len(data) + 10), rng.randrange(1, 4096)
        f.seek(at)
        assert f.read(n) == data[at:at + n]
    f.seek(-10, 2)
    assert f.read(100) == data[-10:] and f.read(5) == b""
    f.close()
    short = RangedBody(bodies, digest, len(data) + 100)
    short.seek(len(data) - 5)
    assert short.read(50) == data[-5:]
    short.close()
    with pytest.raises(MessageGone):
        RangedBody(bodies, "0" * 64, 10).read(5)
