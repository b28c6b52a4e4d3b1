"""The full-text index (store.fts) over message files above MEMORY_DATA_LIMIT: the search catch-up
and the rebuild read such a file in pieces (message.textscan), so indexing a 12 MiB message with
an attachment holds a few MiB (tracemalloc's peak), and the answers equal the matcher's: words before
and after the attachment found through an exact entry; a large text part leaves an inexact entry
and the matcher answers; bare-LF files read as served (CRLF). Two sessions search at once, in
process and over a real server's IMAP."""

from __future__ import annotations

import imaplib
import threading
import tracemalloc
from pathlib import Path

import pytest

from bench.fts_large import large_message
from postier.message.matching import TEXT_LIMIT
from postier.message.types import MEMORY_DATA_LIMIT, User
from postier.proto.imap.search import HeaderKey, SearchKey, TextKey
from postier.store.maildir import deliver_maildir
from postier.store.fts import CATCH_UP_HELD
from postier.store.mailbox import INBOX, MailStore, UserMailbox

from tests.concurrency import together

from .conftest import PASSWORD, IMAPServer
from .test_fts import _search

USER = User("bob@example.org", "bob", "example.org", "maildir")
SIZE = 12 << 20
# the bounds the tests hold indexing to (each message is 12 MiB): an attachment's message keeps
# its header blocks and text parts (here under 1 MiB with the pieces read); a large text part
# is kept up to TEXT_LIMIT octets before it is given up (inexact)
ATTACHMENT_PEAK = 2 << 20
PEAK = TEXT_LIMIT + (2 << 20)


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = MailStore(tmp_path / "mail")
    yield s
    s.close()


def _messages() -> list[bytes]:
    """Delivered in this order (UIDs 1..4): CRLF with attachment, the same with bare LF, a large
    text part (its text beyond TEXT_LIMIT: inexact), a small one."""
    crlf = large_message(SIZE, "aardvark", "zebrafinch")
    lf = large_message(SIZE, "pangolin", "zebrafinch").replace(b"\r\n", b"\n")
    text = b"Subject: long text\r\n\r\n" + b"filler line of text\r\n" * (SIZE // 21) + b"okapi at the end\r\n"
    return [crlf, lf, text, b"Subject: small zebrafinch\r\n\r\naardvark too\r\n"]


def _keys() -> list[SearchKey]:
    return [TextKey("BODY", "aardvark"), TextKey("TEXT", "zebrafinch"), TextKey("BODY", "pangolin opens"),
            TextKey("BODY", "okapi"), TextKey("TEXT", "application/octet-stream"), TextKey("BODY", "AAECAwQF"),
            HeaderKey("SUBJECT", "large"), TextKey("BODY", "closes it")]


def _deliver(mb: UserMailbox, messages: list[bytes]) -> None:
    for m in messages:
        deliver_maildir(mb.root, b"", m)
    mb.snapshot(INBOX)
    assert [r.size > MEMORY_DATA_LIMIT for r in mb.all_rows(INBOX)] == [True, True, True, False][:len(mb.all_rows(INBOX))]


def _peak_of_search(mb: UserMailbox, queries: list[tuple[str, str]]) -> tuple[int, tuple[list[set[int]], set[int]] | None]:
    tracemalloc.start()
    try:
        got = mb.text_search(INBOX, queries)
        return tracemalloc.get_traced_memory()[1], got
    finally:
        tracemalloc.stop()


def test_large_delivered_messages_indexed_in_pieces(store: MailStore) -> None:
    mb = store.acquire(USER)
    try:
        msgs = _messages()
        _deliver(mb, msgs[:2])
        peak, got = _peak_of_search(mb, [("BODY", "aardvark")])
        assert peak < ATTACHMENT_PEAK, peak  # pieces of 256 KiB and a bounded copy, not the 12 MiB files
        assert got == ([{1}], set())
        _deliver(mb, msgs[2:])
        peak, got = _peak_of_search(mb, [("BODY", "aardvark"), ("TEXT", "zebrafinch"), ("BODY", "okapi")])
        assert peak < PEAK, peak
        assert got is not None
        answers, unchecked = got
        assert answers == [{1, 4}, {1, 2, 4}, set()] and unchecked == {3}  # 3: inexact, the matcher's
        for key in _keys():
            assert _search(mb, key, True) == _search(mb, key, False), key
        assert _search(mb, TextKey("BODY", "okapi"), True) == [3]
        assert _search(mb, TextKey("BODY", "AAECAwQF"), True) == []  # the attachment is not searched
        tracemalloc.start()
        try:
            assert mb.rebuild_text_index() == 4  # `postier reindex`
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < PEAK, peak
        ti = mb._text_index()
        assert ti is not None and ti.unchecked(mb.state(INBOX).fid) == {3}
        for key in _keys():
            assert _search(mb, key, True) == _search(mb, key, False), key
    finally:
        store.release(mb)


def test_two_sessions_search_large_messages_at_once(store: MailStore) -> None:
    """Two sessions of the user search at once while the large messages are not indexed yet: both
    get the matcher's answers, and each file gets one entry."""
    mb = store.acquire(USER)
    try:
        _deliver(mb, _messages())
        expect = {str(k): _search(mb, k, False) for k in _keys()}
    finally:
        store.release(mb)
    start = threading.Barrier(2)

    def work(order: int) -> dict[str, list[int]]:
        m = store.acquire(USER)
        try:
            start.wait(30)
            keys = _keys()[::order]
            return {str(k): _search(m, k, True) for k in keys}
        finally:
            store.release(m)

    assert together(lambda: work(1), lambda: work(-1)) == [expect, expect]
    mb = store.acquire(USER)
    try:
        docs = mb.index.conn.execute("SELECT count(*), sum(exact) FROM fts.docs").fetchone()
        assert tuple(docs) == (4, 3)
    finally:
        store.release(mb)


def test_real_server_append_and_search_from_two_sessions(server: IMAPServer) -> None:
    """APPEND of a 12 MiB message (streamed to a file: indexed by the next search's catch-up), then
    SEARCH BODY/TEXT from two sessions at once find the words before and after the attachment."""
    addr = server.user("ftslarge")
    ctx = server.inst.client_ssl_context()
    msg = large_message(SIZE, "aardvark", "zebrafinch")
    with imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=ctx) as a, \
            imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=ctx) as b:
        a.login(addr, PASSWORD)
        b.login(addr, PASSWORD)
        typ, _ = a.append("INBOX", None, None, msg)
        assert typ == "OK"
        b.append("INBOX", None, None, b"Subject: small\r\n\r\nnothing here\r\n")
        a.select("INBOX")
        b.select("INBOX")

        def search(conn: imaplib.IMAP4_SSL, *crit: str) -> list[bytes]:
            typ, data = conn.uid("SEARCH", *crit)
            assert typ == "OK"
            uids: list[bytes] = data[0].split()
            return uids

        assert together(lambda: search(a, "BODY", "aardvark"),
                        lambda: search(b, "TEXT", "\"zebrafinch closes\"")) == [[b"1"], [b"1"]]
        typ, data = a.uid("SEARCH", "BODY", "AAECAwQF")  # inside the attachment: not searched
        assert typ == "OK" and data[0].split() == []
        typ, data = b.uid("SEARCH", "NOT", "TEXT", "aardvark")
        assert typ == "OK" and data[0].split() == [b"2"]


def test_a_catch_up_of_many_messages_under_the_limit_holds_a_bounded_part_of_them(store: MailStore) -> None:
    """Messages of up to MEMORY_DATA_LIMIT are read whole, but a catch-up indexes them each time
    what it holds reaches CATCH_UP_HELD, so 40 of 900 KiB (36 MiB) never sit in memory together;
    every one is indexed (exact) and found."""
    mb = store.acquire(USER)
    try:
        filler = b"plain filler text for the index\r\n" * (900 * 1024 // 34)
        for i in range(40):
            deliver_maildir(mb.root, b"", b"Subject: part %d\r\n\r\nword%dword\r\n" % (i, i) + filler)
        mb.snapshot(INBOX)
        rows = mb.all_rows(INBOX)
        assert len(rows) == 40 and all(r.size <= MEMORY_DATA_LIMIT for r in rows)
        assert sum(r.size for r in rows) > 2 * CATCH_UP_HELD
        peak, got = _peak_of_search(mb, [("BODY", "word7word"), ("BODY", "word39word")])
        assert peak < CATCH_UP_HELD + (12 << 20), peak  # one part read, plus its text being indexed
        assert got is not None
        assert got[0] == [{8}, {40}] and not got[1]  # every message has an exact entry
    finally:
        store.release(mb)
