"""FETCH of flags and headers in cluster mode (server/imapfetch.py over store/cluster/mailboxes.py): the
node's flag table, kept up to date from the changes since its HIGHESTMODSEQ, answers byte for byte
what reading every row answers while another node stores flags, appends and expunges; a flag
change made on node B is in node A's next FETCH; header blocks are read only for the messages a
FETCH batch answers for."""

from __future__ import annotations

import imaplib
import random
import threading
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from postier.message.types import User  # noqa: E402
from postier.proto.imap import Fetch, parse_command  # noqa: E402
from postier.server import imapfetch  # noqa: E402
from postier.server.imapfetch import (  # noqa: E402
    FetchOptions,
    FetchPace,
    changed_targets,
    render_all_flags,
    render_fetch,
    render_flags,
)
from postier.store.cluster.bodies import BodyStore  # noqa: E402
from postier.store.cluster.mailboxes import ClusterMailboxes  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from postier.store.index import flags_to_names  # noqa: E402
from tests.concurrency import together
from tests.harness import Instance  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import _nodes, imap  # noqa: E402

ALICE = User("alice@example.org", "alice", "example.org", "maildir")


def msg(n: int | str, pad: int = 0) -> bytes:
    return (f"From: a{n}@example.org\r\nSubject: message {n}\r\nX-Pad: {'p' * pad}\r\n\r\nbody {n}\r\n").encode()


@pytest.fixture
def two(pg: PgServer, bodies_factory: Callable[[], BodyStore]) -> Iterator[tuple[ClusterMailboxes, ClusterMailboxes]]:
    """One user's mailboxes on two nodes (two stores, each its own pool and folder states)."""
    dsn = pg.create_db()
    stores = [ClusterStore(dsn, bodies_factory(), timeout=5.0) for _ in range(2)]
    mbs = [s.acquire(ALICE) for s in stores]
    mbs[0].ensure_defaults()
    yield mbs[0], mbs[1]
    for s, m in zip(stores, mbs, strict=True):
        s.release(m)
        s.close()


def _answers(mb: ClusterMailboxes, view: Any, recent_from: int) -> list[tuple[bytes | None, bytes]]:
    """For each form of FETCH 1:* FLAGS: (the flag table's answer or None, the answer from the rows)."""
    out = []
    targets = list(enumerate(view, 1))
    for want_uid in (False, True):
        for want_modseq in (False, True):
            table = render_all_flags(mb, "INBOX", view, want_uid, want_modseq, recent_from)
            rows = b"".join(render_flags(mb, "INBOX", targets, want_uid, want_modseq, recent_from))
            out.append((table, rows))
    return out


def _same(mb: ClusterMailboxes, view: Any, recent_from: int = 1 << 32, table: bool = True) -> bytes:
    got = _answers(mb, view, recent_from)
    for t, r in got:
        assert (t is not None) == table
        if t is not None:
            assert t == r
    return got[3][1]


def test_flag_table_answers_as_the_rows_while_another_node_writes(
        two: tuple[ClusterMailboxes, ClusterMailboxes]) -> None:
    a, b = two
    for n in range(40):
        b.append("INBOX", msg(n))
    view = a.snapshot("INBOX").uids
    first = _same(a, view, recent_from=38)
    assert first.count(b"\\Recent") == 3 and b"FLAGS ()" in first
    b.store("INBOX", [3, 7], "+FLAGS", ["\\Seen", "$Label1"])
    b.store("INBOX", [7], "-FLAGS", ["$Label1"])
    b.store("INBOX", [9], "FLAGS", ["\\Flagged", "\\Answered", "Work"])
    ans = _same(a, view, recent_from=38)  # node A's next FETCH shows node B's changes
    assert b"UID 3 FLAGS (\\Seen $Label1)" in ans and b"UID 7 FLAGS (\\Seen)" in ans
    assert b"UID 9 FLAGS (\\Answered \\Flagged Work)" in ans
    b.append("INBOX", msg(40))  # beyond the view: not answered for until A learns of it
    assert b"UID 41 " not in _same(a, view)
    view = a.snapshot("INBOX").uids  # the view grows: the table is extended, not read again
    assert b"* 41 FETCH (UID 41 FLAGS () MODSEQ" in _same(a, view)
    b.expunge("INBOX", [])  # nothing flagged \Deleted: no change
    b.store("INBOX", [5], "+FLAGS", ["\\Deleted"])
    assert b.expunge("INBOX") == [5]
    ans = _same(a, view, table=False)  # a message of the view is gone: the rows answer, without it
    assert b"UID 5 " not in ans and b"* 6 FETCH (UID 6 " in ans
    view = a.snapshot("INBOX").uids
    assert b"* 5 FETCH (UID 6 " in _same(a, view)
    # a few messages far apart (read by UID), and CHANGEDSINCE (the rows changed since): the lines
    # reading the whole range gives for them
    targets = list(enumerate(view, 1))
    dense = render_flags(a, "INBOX", targets, True, True, 1 << 32)
    assert render_flags(a, "INBOX", [targets[0], targets[-1]], True, True, 1 << 32) == [dense[0], dense[-1]]
    since = sorted({int(re.findall(rb"MODSEQ \((\d+)\)", line)[0]) for line in dense})[-3]
    assert render_flags(a, "INBOX", targets, True, True, 1 << 32, changedsince=since) == [
        line for line in dense if int(re.findall(rb"MODSEQ \((\d+)\)", line)[0]) > since] != []


def test_flag_table_follows_a_random_run_of_changes_on_another_node(
        two: tuple[ClusterMailboxes, ClusterMailboxes]) -> None:
    """After every change B makes (flags, keywords, appends, expunges), A's answer is what reading the
    rows gives, whether or not A took in the folder's new UID list since (its sync point)."""
    a, b = two
    b.append_many("INBOX", [(msg(n), (), None) for n in range(60)])
    rng = random.Random(7)
    view = a.snapshot("INBOX").uids
    names = ["\\Seen", "\\Flagged", "\\Answered", "\\Draft", "$Junk", "Project"]
    for step in range(80):
        uids = list(b.snapshot("INBOX").uids)
        op = rng.random()
        if op < 0.55 and uids:
            b.store("INBOX", rng.sample(uids, min(len(uids), rng.randint(1, 5))), rng.choice(["+FLAGS", "-FLAGS", "FLAGS"]),
                    rng.sample(names, rng.randint(0, 3)))
        elif op < 0.8:
            b.append("INBOX", msg(f"r{step}"), rng.sample(names, rng.randint(0, 2)))
        elif uids:
            b.delete_uids("INBOX", rng.sample(uids, 1))
        if rng.random() < 0.4:
            view = a.snapshot("INBOX").uids
        got = _answers(a, view, recent_from=rng.choice([1, 30, 1 << 32]))
        for t, r in got:
            assert t is None or t == r, step
    view = a.snapshot("INBOX").uids
    final = _same(a, view)
    rows = a.rows_between("INBOX", 1, 1 << 31)
    assert final.count(b"\r\n") == len(rows) == len(view)
    for seq, (uid, row) in enumerate(sorted(rows.items()), 1):
        flags = " ".join(flags_to_names(row.flags, row.keywords)).encode()
        assert b"* %d FETCH (UID %d FLAGS (%s) MODSEQ (%d))\r\n" % (seq, uid, flags, row.modseq) in final


class _Peeks:
    """ClusterMailboxes with its calls to peek_headers recorded (the real store answers)."""

    def __init__(self, mb: ClusterMailboxes) -> None:
        self._mb = mb
        self.peeked: list[int] = []
        self.rows_read = 0

    def rows(self, name: str, uids: Any) -> dict[int, Any]:
        uids = list(uids)
        self.rows_read += len(uids)
        return self._mb.rows(name, uids)

    def peek_headers(self, name: str, rows: Any) -> dict[int, bytes]:
        rows = list(rows)
        self.peeked += [r.uid for r in rows]
        return self._mb.peek_headers(name, rows)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._mb, attr)


def _fetch_all(mb: Any, spec: bytes, targets: list[tuple[int, int]], first: Callable[[], object] | None = None,
               **opts: Any) -> tuple[list[bytes], int]:
    """Every batch of one FETCH, as the IMAP driver runs them (`first`: called after the first)."""
    cmd = parse_command(b"a FETCH 1:* " + spec + b"\r\n")
    assert isinstance(cmd, Fetch)
    out: list[bytes] = []
    batches = 0
    pace = FetchPace()
    while targets:
        batch = render_fetch(mb, "INBOX", targets, cmd.attributes, FetchOptions(set_seen=False, **opts), pace)
        out += batch.data
        targets = targets[max(batch.done, 1):]
        batches += 1
        if batches == 1 and first is not None:
            first()
    return out, batches


def test_header_blocks_are_read_only_for_what_the_batch_answers(
        two: tuple[ClusterMailboxes, ClusterMailboxes], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = two
    b.append_many("INBOX", [(msg(n, pad=900), (), None) for n in range(300)])
    targets = list(enumerate(a.snapshot("INBOX").uids, 1))
    spec = b"(BODY.PEEK[HEADER])"
    whole, _n = _fetch_all(a, spec, targets)  # one batch: every block once
    monkeypatch.setattr(imapfetch, "BATCH_BYTES", 20_000)  # about 20 answers a batch
    spy = _Peeks(a)
    got, batches = _fetch_all(spy, spec, targets)
    assert got == whole and batches >= 10
    # The first batch reads FIRST_SLICE rows and FIRST_PEEK blocks before its answers tell their size
    # (test_the_first_batch_reads_a_bounded_number_of_rows_and_header_blocks); later ones what their
    # budget takes, and a quarter more (where reading 200 blocks and up to 2,000 rows a batch took
    # about 2,000 and 3,000)
    assert len(spy.peeked) < len(targets) + imapfetch.FIRST_SLICE + 6 * batches, len(spy.peeked)
    assert spy.rows_read < len(targets) + imapfetch.FIRST_SLICE + 6 * batches, spy.rows_read
    monkeypatch.setattr(imapfetch, "BATCH_BYTES", 2 * 1024 * 1024)

    spy = _Peeks(a)  # ENVELOPEs now cached: no header block is read
    env, _n = _fetch_all(spy, b"(ENVELOPE)", targets)
    assert _fetch_all(spy, b"(ENVELOPE)", targets)[0] == env and len(spy.peeked) == 300
    spy.peeked.clear()
    assert _fetch_all(spy, b"(ENVELOPE)", targets)[0] == env and spy.peeked == []
    b.store("INBOX", [10, 20], "+FLAGS", ["\\Seen"])  # CHANGEDSINCE: only those two are read
    top = max(r.modseq for r in a.rows("INBOX", [1]).values())
    spy = _Peeks(a)
    got, _n = _fetch_all(spy, b"(BODY.PEEK[HEADER.FIELDS (SUBJECT)])", targets, changedsince=top, add_modseq=True)
    assert [re.sub(rb" MODSEQ \(\d+\)", b"", g).split(b"{")[0] for g in got] == [
        b"* 10 FETCH (BODY[HEADER.FIELDS (SUBJECT)] ", b"* 20 FETCH (BODY[HEADER.FIELDS (SUBJECT)] "]
    assert spy.peeked == [10, 20]


def test_the_first_batch_reads_a_bounded_number_of_rows_and_header_blocks(
        two: tuple[ClusterMailboxes, ClusterMailboxes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing tells a command's first batch how large its answers are: it reads FIRST_SLICE rows and
    peeks at FIRST_PEEK header blocks before its first answers tell (it read up to 2,000 rows and
    200 blocks), and the answers are the same bytes."""
    a, b = two
    b.append_many("INBOX", [(msg(n, pad=30_000), (), None) for n in range(150)])
    targets = list(enumerate(a.snapshot("INBOX").uids, 1))
    spec = b"(BODY.PEEK[HEADER])"
    whole, _n = _fetch_all(a, spec, targets)
    assert len(whole) == 150
    monkeypatch.setattr(imapfetch, "BATCH_BYTES", 400_000)  # about 13 answers of 30 KB a batch
    spy = _Peeks(a)
    first: list[tuple[int, int]] = []
    got, batches = _fetch_all(spy, spec, targets, first=lambda: first.append((spy.rows_read, len(spy.peeked))))
    assert got == whole and batches >= 10
    assert first == [(imapfetch.FIRST_SLICE, imapfetch.FIRST_PEEK)], first
    # later batches read what their budget takes, and a quarter more
    assert len(spy.peeked) < len(targets) + imapfetch.FIRST_PEEK + 5 * batches, len(spy.peeked)
    assert spy.rows_read < len(targets) + imapfetch.FIRST_SLICE + 5 * batches, spy.rows_read
    monkeypatch.setattr(imapfetch, "BATCH_BYTES", 2 * 1024 * 1024)
    for n, (seq, uid) in ((1, targets[0]), (2, targets[-1])):  # FETCH 1, FETCH 150: one row, one block
        spy = _Peeks(a)
        got, batches = _fetch_all(spy, b"(BODY.PEEK[HEADER] ENVELOPE)", [(seq, uid)])
        assert batches == 1 and spy.rows_read == 1 and spy.peeked == [uid] and len(got) == 1, n
    # a first batch of answers that are all gone (expunged meanwhile) reads twice as many next time
    spy = _Peeks(a)
    gone = [(i, 10**6 + i) for i in range(1, 301)]
    got, batches = _fetch_all(spy, b"(ENVELOPE)", gone)
    assert got == [] and batches == 3 and spy.rows_read == 300  # 64, 128, then the rest


def test_content_fetch_with_changedsince_reads_only_the_changed_rows(
        two: tuple[ClusterMailboxes, ClusterMailboxes]) -> None:
    """FETCH of content with CHANGEDSINCE (RFC 7162 §3.1.4.1) reads the MODSEQ index first, then rows
    and header blocks of the changed messages only, while node B changes flags: its answer is the
    unfiltered path's (every row read, those at or below CHANGEDSINCE skipped), each answer holds
    the changes B made before it, and answers only grow (a MODSEQ only grows)."""
    a, b = two
    b.append_many("INBOX", [(msg(n, pad=300), (), None) for n in range(400)])
    targets = list(enumerate(a.snapshot("INBOX").uids, 1))
    since = max(r.modseq for r in a.rows("INBOX", [u for _s, u in targets]).values())
    spec = b"(UID FLAGS ENVELOPE BODY.PEEK[HEADER.FIELDS (SUBJECT)])"

    def filtered() -> tuple[list[bytes], _Peeks, list[tuple[int, int]]]:
        spy = _Peeks(a)
        changed = changed_targets(spy, "INBOX", targets, since)
        got, _n = _fetch_all(spy, spec, changed, changedsince=since, add_modseq=True)
        return got, spy, changed

    rng = random.Random(3)
    done: set[int] = set()
    for step in range(4):
        uids = rng.sample(range(1, 401), 7)
        b.store("INBOX", uids, "+FLAGS", [f"$S{step}"])
        done |= set(uids)
        got, spy, changed = filtered()
        assert {u for _s, u in changed} == done and spy.rows_read == len(done) and len(spy.peeked) <= len(done)
        assert got == _fetch_all(a, spec, targets, changedsince=since, add_modseq=True)[0]
        assert [int(re.findall(rb"UID (\d+)", g)[0]) for g in got] == sorted(done)
    made: list[set[int]] = []  # B's changes, in order, each recorded once it is committed
    written = threading.Event()

    def write() -> None:
        try:
            for k in range(25):
                uids = rng.sample(range(1, 401), 3)
                b.store("INBOX", uids, "+FLAGS", ["\\Seen", f"$W{k}"])
                made.append(set(uids))
        finally:
            written.set()

    def watch() -> None:
        last: set[int] = set()
        rounds = 0
        while (not written.is_set() or rounds == 0) and rounds < 100:
            before = done.union(*made)
            got, spy, changed = filtered()
            answered = {int(re.findall(rb"UID (\d+)", g)[0]) for g in got}
            assert before <= answered and last <= answered and spy.rows_read == len(changed) == len(answered)
            assert all(int(re.findall(rb"MODSEQ \((\d+)\)", g)[0]) > since for g in got)
            last = answered
            rounds += 1

    together(write, watch)
    got, spy, changed = filtered()
    assert spy.rows_read == len(done.union(*made)) < 400
    assert got == _fetch_all(a, spec, targets, changedsince=since, add_modseq=True)[0]


# -- two IMAP sessions on two nodes -----------------------------------------------------------------

def _command(c: imaplib.IMAP4, line: str) -> list[bytes]:
    """The untagged lines of one command (after checking its OK), literals left out."""
    tag = c._new_tag().decode()
    c.send(f"{tag} {line}\r\n".encode())
    out: list[bytes] = []
    while True:
        got = c.readline()
        if got.startswith(tag.encode()):
            assert b" OK " in got, got
            return out
        out.append(got)


def _db_rows(dsn: str) -> dict[int, tuple[bytes, int]]:
    with psycopg.connect(dsn) as conn:
        return {u: (" ".join(flags_to_names(f, k)).encode(), m) for u, f, k, m in conn.execute(
            "SELECT m.uid, m.flags, m.keywords, m.modseq FROM messages m JOIN folders f ON f.id = m.folder "
            "WHERE f.name = 'INBOX' ORDER BY m.uid")}


_LINE = re.compile(rb"\* (\d+) FETCH \(UID (\d+) FLAGS \(([^)]*)\) MODSEQ \((\d+)\)\)\r\n")


def _answer(c: imaplib.IMAP4, spec: str) -> dict[int, tuple[int, bytes, int]]:
    """seq -> (uid, flags, modseq): the last FETCH line of each message (updates come first)."""
    out = {}
    for line in _command(c, spec):
        m = _LINE.fullmatch(line)
        if m is not None:
            out[int(m[1])] = (int(m[2]), m[3].replace(b" \\Recent", b"").replace(b"\\Recent", b""), int(m[4]))
    return out


def test_two_sessions_on_two_nodes(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    """Session A (node 1) fetches flags while session B (node 2) stores, appends and expunges: each
    of A's answers holds B's changes made before it, for the messages of A's view still there."""
    dsn = pg.create_db()
    nodes: list[Instance] = _nodes(tmp_path, dsn, s3)
    try:
        ca, cb = imap(nodes[0]), imap(nodes[1])
        for n in range(30):
            assert cb.append("INBOX", None, None, msg(n))[0] == "OK"
        assert ca.select("INBOX")[1] == [b"30"] and cb.select("INBOX")[0] == "OK"
        view = {s: u for s, (u, _f, _m) in _answer(ca, "FETCH 1:* (UID FLAGS MODSEQ)").items()}
        assert list(view.values()) == list(range(1, 31))

        def check(spec: str = "FETCH 1:* (UID FLAGS MODSEQ)") -> None:
            db = _db_rows(dsn)
            want = {s: (u, *db[u]) for s, u in view.items() if u in db}
            got = _answer(ca, spec)
            if spec.startswith("FETCH 1:*"):
                assert got == want
            else:
                assert all(got[s] == want[s] for s in got) and got

        check()
        for step in range(6):
            assert cb.store(f"{step + 1}:{step + 3}", "+FLAGS", f"(\\Seen $Step{step})")[0] == "OK"
            assert cb.store(str(step + 2), "-FLAGS", "(\\Seen)")[0] == "OK"
            check()  # B's flag changes, in A's next FETCH
            check(f"FETCH 1,{len(view)} (UID FLAGS MODSEQ)")
        assert cb.append("INBOX", None, None, msg("new"))[0] == "OK"
        check()  # not in A's view yet: not answered for
        assert cb.store("4,9", "+FLAGS", "(\\Deleted)")[0] == "OK" and cb.expunge()[0] == "OK"
        assert cb.store("10", "+FLAGS", "(\\Flagged)")[0] == "OK"
        check()  # A was not told of the expunges: answers for the messages still there
        _command(ca, "NOOP")  # A's sync point: the expunges and the new message
        view = {s: u for s, (u, _f, _m) in _answer(ca, "FETCH 1:* (UID FLAGS MODSEQ)").items()}
        assert list(view.values()) == [u for u in range(1, 32) if u not in (4, 9)]
        assert cb.uid("STORE", "31", "+FLAGS", "(\\Answered)")[0] == "OK"
        check()
        for c in (ca, cb):
            c.logout()
    finally:
        for inst in nodes:
            inst.stop()


def test_fetches_on_node_a_while_node_b_writes_at_the_same_time(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    """Session B (node 2) adds keywords, appends and expunges from a thread while session A (node 1)
    fetches every message's flags over and over: each message's flags and MODSEQ only grow from one
    of A's answers to the next (B only adds), a message gone from an answer never comes back, and
    after B stops A's answer at its next sync point is what PostgreSQL holds."""
    dsn = pg.create_db()
    nodes: list[Instance] = _nodes(tmp_path, dsn, s3)
    try:
        ca, cb = imap(nodes[0]), imap(nodes[1])
        for n in range(20):
            assert cb.append("INBOX", None, None, msg(n))[0] == "OK"
        assert ca.select("INBOX")[1] == [b"20"] and cb.select("INBOX")[0] == "OK"
        written = threading.Event()

        def write() -> None:
            try:
                for k in range(30):
                    assert cb.uid("STORE", str(k % 20 + 1), "+FLAGS", f"($K{k})")[0] == "OK"
                    if k % 7 == 3:
                        assert cb.append("INBOX", None, None, msg(f"w{k}"))[0] == "OK"
                    if k % 10 == 5:
                        u = str(k // 10 * 6 + 2)
                        assert cb.uid("STORE", u, "+FLAGS", "(\\Deleted)")[0] == "OK"
                        assert cb.uid("EXPUNGE", u)[0] == "OK"
            finally:
                written.set()

        def watch() -> None:
            last: dict[int, tuple[set[bytes], int]] = {}
            gone: set[int] = set()
            rounds = 0
            while (not written.is_set() or rounds == 0) and rounds < 300:
                got = {u: (set(f.split()), m) for u, f, m in _answer(ca, "FETCH 1:* (UID FLAGS MODSEQ)").values()}
                assert not gone & set(got)
                for u, (flags, modseq) in got.items():
                    if u in last:
                        assert last[u][0] <= flags and last[u][1] <= modseq, (u, last[u], flags, modseq)
                gone |= set(last) - set(got)
                last = got
                rounds += 1

        together(write, watch)
        _command(ca, "NOOP")  # A's sync point
        final = {u: (f, m) for u, f, m in _answer(ca, "FETCH 1:* (UID FLAGS MODSEQ)").values()}
        assert final == _db_rows(dsn) and len(final) == 20 + 4 - 3
        for c in (ca, cb):
            c.logout()
    finally:
        for inst in nodes:
            inst.stop()
