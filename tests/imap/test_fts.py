"""The full-text index (store.fts): the same SEARCH answers with and without it over a generated
corpus (encoded words, QP, base64, charsets, multipart, encapsulated messages), kept up to date
by APPEND/EXPUNGE/MOVE from two sessions at once, rebuilt by reindex, and used by a real server."""

from __future__ import annotations

import base64
import imaplib
import os
import random
from collections.abc import Sequence
from array import array
from pathlib import Path

import pytest

from postier.message.matching import SearchContext
from postier.message.types import User
from postier.proto.imap.search import AllKey, AndKey, HeaderKey, NotKey, OrKey, SearchKey, TextKey
from postier.server.imap import _in_view
from postier.server.imapfetch import narrow, run_search
from postier.store.fts import FTS_NAME, MAX_NEEDLE, searchable
from postier.store.maildir import deliver_maildir
from postier.store.mailbox import INBOX, MailStore, UserMailbox
from tests.concurrency import together
from tests.message.corpus import ALL as CORPUS

from .conftest import PASSWORD, IMAPServer

USER = User("bob@example.org", "bob", "example.org", "maildir")

WORDS = ["Grüße", "Köln", "straße", "STRASSE", "café", "report", "Zürich", "naïve", "日本語", "résumé",
         "meeting", "x", "ab", "quarterly", "ÆØÅ", "İstanbul"]


def _qp(text: str) -> str:
    return "".join(c if c.isascii() and c not in "=" else "".join(f"={b:02X}" for b in c.encode())
                   for c in text)


def _message(i: int, rng: random.Random) -> bytes:
    w = rng.sample(WORDS, 4)
    subject = f"{w[0]} {i}" if i % 3 else f"=?UTF-8?B?{base64.b64encode(f'{w[0]} enc {i}'.encode()).decode()}?="
    sender = f"=?ISO-8859-1?Q?J=F6rg_{i}?= <joerg{i % 7}@example.org>" if i % 4 == 0 \
        else f"Sender {i % 5} <s{i % 5}@example.net>"
    head = (f"From: {sender}\r\nTo: bob@example.org, team{i % 3}@example.org\r\n"
            + (f"Cc: Carol <carol{i % 2}@example.com>\r\n" if i % 2 else "")
            + f"Subject: {subject}\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\nMIME-Version: 1.0\r\n")
    kind = i % 5
    if kind == 0:
        body = f"plain {w[1]} text {i}\r\n"
        return (head + "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body).encode()
    if kind == 1:
        return (head + "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable"
                "\r\n\r\n" + _qp(f"quoted {w[1]} {w[2]} {i}") + "\r\n").encode()
    if kind == 2:
        b64 = base64.b64encode(f"base64 {w[2]} body {i}".encode()).decode()
        return (head + "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                + b64 + "\r\n").encode()
    if kind == 3:
        latin = f"latin {w[1]} {i}".encode("latin-1", "replace")
        return (head + "Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
                "Content-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode() \
            + latin + (f"\r\n--b\r\nContent-Type: application/octet-stream\r\nX-Part: {w[3]}\r\n\r\n"
                       f"binary {w[3]}\r\n--b--\r\n").encode()
    inner = (f"From: inner{i}@example.org\r\nSubject: =?UTF-8?Q?{_qp(w[3]).replace(' ', '_')}?=\r\n\r\n"
             f"inner body {w[2]}\r\n")
    return (head + "Content-Type: multipart/mixed; boundary=\"o\"\r\n\r\n--o\r\n"
            "Content-Type: text/plain\r\n\r\nouter\r\n--o\r\nContent-Type: message/rfc822\r\n\r\n"
            + inner + "--o--\r\n").encode()


def _keys() -> list[SearchKey]:
    keys: list[SearchKey] = []
    for w in [*WORDS, "enc", "jörg", "JOERG3", "s1@", "example.org", "team2", "carol1", "inner", "x-part",
              "grüsse", "ss", "1", "e 1", '"q', "zz not there"]:
        for f in ("SUBJECT", "FROM", "TO", "CC", "BCC"):
            keys.append(HeaderKey(f, w))
        keys.append(TextKey("BODY", w))
        keys.append(TextKey("TEXT", w))
    keys += [AndKey((HeaderKey("SUBJECT", "report"), TextKey("BODY", "köln"))),
             OrKey(HeaderKey("FROM", "jörg"), NotKey(TextKey("TEXT", "meeting"))),
             NotKey(HeaderKey("SUBJECT", "café")), HeaderKey("SUBJECT", ""), HeaderKey("X-PART", "æøå")]
    return keys


def _search(mb: UserMailbox, key: SearchKey, index: bool) -> list[int]:
    return _search_in(mb, INBOX, key, index)


def _search_in(mb: UserMailbox, folder: str, key: SearchKey, index: bool, view: array[int] | None = None) -> list[int]:
    """As the server searches: `view` is the session's UIDs (by default the folder's, just synced)."""
    uids = mb.snapshot(folder).uids if view is None else view
    ctx = SearchContext(max_seq=len(uids), max_uid=uids[-1] if uids else 0)
    targets = list(enumerate(uids, 1))
    if index:
        key, cands = narrow(mb, folder, key)
        if cands is not None:
            targets = _in_view(uids, cands)  # as the server maps the index's answer
            if isinstance(key, AllKey):
                return [u for _s, u in targets]  # the index answered: the server reads no message
    return [u for _s, u, _m in run_search(mb, folder, targets, key, ctx, 0)[0]]


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = MailStore(tmp_path / "mail")
    yield s
    s.close()


def test_index_and_scan_agree(store: MailStore) -> None:
    mb = store.acquire(USER)
    try:
        rng = random.Random(7)
        msgs = [_message(i, rng) for i in range(120)] + list(CORPUS.values())
        msgs.append(b"Subject: big\r\n\r\n" + b"filler line\r\n" * 400_000 + b"needle at the end\r\n")
        for m in msgs:
            mb.append(INBOX, m)
        assert (store.index_path(USER).parent / FTS_NAME).exists()
        assert _search(mb, TextKey("BODY", "needle at the end"), True) == [len(msgs)]  # beyond the bound
        for rounds in ("one message left to the matcher", "every message answered by the index"):
            total = 0
            for key in _keys():
                scan = _search(mb, key, index=False)
                assert _search(mb, key, index=True) == scan, (rounds, key)
                total += len(scan)
            assert total > 500  # the corpus exercises the keys
            mb.store(INBOX, [len(msgs)], "+FLAGS", ["\\Deleted"])
            mb.expunge(INBOX)
    finally:
        store.release(mb)


def test_delivered_mail_indexed_by_search_and_reindex(store: MailStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("postier.store.mailbox.CATCH_UP", 50)
    mb = store.acquire(USER)
    try:
        rng = random.Random(3)
        for i in range(50 + 30):  # deliveries bypass the index: a search catches up
            deliver_maildir(mb.root, b"", _message(i, rng))
        key = HeaderKey("SUBJECT", "report")
        scan = _search(mb, key, index=False)
        assert _search(mb, key, index=True) == scan  # 50 indexed, 30 through the matcher
        assert _search(mb, key, index=True) == scan
        ti = mb._text_index()
        assert ti is not None
        assert len(ti.unindexed(mb.state(INBOX).fid, 10**6)) == 0
        for i in range(5):  # later deliveries: the new UIDs are looked at, the rest is known
            deliver_maildir(mb.root, b"", b"Subject: report late %d\r\n\r\nx\r\n" % i)
        late = _search(mb, key, index=False)
        assert len(late) == len(scan) + 5
        assert _search(mb, key, index=True) == late
        assert ti.unchecked(mb.state(INBOX).fid) == set()
        ti.clear()
    finally:
        store.release(mb)
    counts = store.reindex(USER)
    assert counts[INBOX] == 50 + 30 + 5
    mb = store.acquire(USER)
    try:
        ti = mb._text_index()
        assert ti is not None
        assert ti.unchecked(mb.state(INBOX).fid) == set()
        assert _search(mb, key, index=True) == _search(mb, key, index=False)
    finally:
        store.release(mb)


def test_two_sessions_append_expunge_move(store: MailStore) -> None:
    """Two threads (two sessions of one user) append, move and expunge at once; afterwards every
    folder's index answers equal the scan and no entry is left for a message no folder holds."""
    mb = store.acquire(USER)
    mb.create("Archive2")

    def work(n: int) -> None:
        m = store.acquire(USER)
        try:
            rng = random.Random(n)
            for i in range(40):
                _v, uid = m.append(INBOX, _message(n * 100 + i, rng))
                if i % 4 == 0:  # searches meanwhile: the index's per-folder state follows the changes
                    narrow(m, INBOX, HeaderKey("SUBJECT", "report"))
                    narrow(m, "Archive2", TextKey("TEXT", "o"))
                if i % 3 == 0:
                    m.move(INBOX, [uid], "Archive2")
                elif i % 3 == 1:
                    m.store(INBOX, [uid], "+FLAGS", ["\\Deleted"])
                    m.expunge(INBOX, [uid])
        finally:
            store.release(m)

    try:
        together(lambda: work(1), lambda: work(2), timeout=60)
        for key in (HeaderKey("SUBJECT", "report"), TextKey("TEXT", "köln"), HeaderKey("FROM", "jörg"),
                    TextKey("TEXT", "o"), HeaderKey("SUBJECT", "1")):
            assert _search(mb, key, True) == _search(mb, key, False)
            assert _search_in(mb, "Archive2", key, True) == _search_in(mb, "Archive2", key, False)
        archive = list(mb.snapshot("Archive2").uids)
        assert len(archive) == 2 * 14
        ti = mb._text_index()
        assert ti is not None
        assert ti.unchecked(mb.state("Archive2").fid) == set()  # moved files kept their entries
        for f in (INBOX, "Archive2"):  # each exact entry maps to its message here, none to a gone one
            g = ti._gaps(mb.state(f).fid)
            assert sorted(u for u in g.uid_of if u) == list(mb.snapshot(f).uids) and g.exact == len(g.uid_of) - g.uid_of.count(0)
        live = {r.base for f in (INBOX, "Archive2") for r in mb.all_rows(f)}
        docs = {b for (b,) in mb.index.conn.execute("SELECT base FROM fts.docs")}
        assert docs == live  # expunged ones were dropped
    finally:
        store.release(mb)


def _bench_like(i: int) -> bytes:
    subject = f"report {i} x" if i % 10 == 0 else f"note {i}"
    return (f"From: Sender {i % 7} <sender{i % 7}@example.net>\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{i}.t@example.net>\r\n\r\nMessage number {i}.\r\n").encode()


def test_many_hits_short_needles_and_removed_files(store: MailStore) -> None:
    """Needles of one or two characters (no trigram: a pass over the stored text) and needles that
    hit a tenth, most or all of the folder give the matcher's answers, in a folder and in a copy of
    it sharing the entries; files removed behind the store's back, expunged messages and an entry
    id reused after an expunge never show up in an answer."""
    mb = store.acquire(USER)
    try:
        mb.create("Copy")
        for i in range(400):
            mb.append(INBOX, _bench_like(i))
        view = mb.snapshot(INBOX).uids
        uids = list(view)
        mb.copy(INBOX, uids[::3], "Copy")
        keys: list[SearchKey] = [HeaderKey("SUBJECT", n) for n in ("x", "report", "report 3", "NOTE", "o", "1", "12")]
        keys += [HeaderKey("FROM", "s"), HeaderKey("FROM", "sender3@"), TextKey("BODY", "m"),
                 TextKey("BODY", "number 31"), TextKey("TEXT", "r"), TextKey("TEXT", "<12.t@"),
                 NotKey(HeaderKey("SUBJECT", "x")), OrKey(HeaderKey("SUBJECT", "x"), TextKey("BODY", "9."))]

        def agree(view: array[int] | None = None) -> None:
            for folder in (INBOX, "Copy"):
                for key in keys:
                    v = view if folder == INBOX else None
                    assert _search_in(mb, folder, key, True, v) == _search_in(mb, folder, key, False, v), (folder, key)

        agree()
        crit, cands = narrow(mb, INBOX, HeaderKey("SUBJECT", "x"))
        assert isinstance(crit, AllKey) and cands is not None and len(cands) == 40  # the index alone answered
        assert len(_search(mb, HeaderKey("SUBJECT", "o"), True)) == 400
        # removed by another program: the store notices at its next sync; the index knows nothing
        md = mb.root
        gone = sorted(p for sub in ("cur", "new") for p in (md / sub).iterdir())[:30:10]
        for p in gone:
            os.unlink(p)
        for sub in ("cur", "new"):
            st = os.stat(md / sub)
            os.utime(md / sub, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        assert len(mb.snapshot(INBOX).uids) == 400 - len(gone)
        agree(view)  # a session not told yet: its view still holds them, they match nothing
        agree()
        # expunged here, then new mail: the newest entry's id is used again
        last = mb.snapshot(INBOX).uids[-1]
        mb.store(INBOX, [last, *uids[:20]], "+FLAGS", ["\\Deleted"])
        mb.expunge(INBOX)
        mb.append(INBOX, b"Subject: fresh x\r\n\r\nnew\r\n")
        agree()
        assert _search(mb, HeaderKey("SUBJECT", "x"), True)[-1] == mb.snapshot(INBOX).uids[-1]
    finally:
        store.release(mb)


def test_long_needles_go_to_the_matcher(store: MailStore) -> None:
    """A needle longer than MAX_NEEDLE is not a phrase query (one trigram iterator each: a 60,000-
    character SEARCH TEXT over 1,700 messages took the server from 85 to 466 MB, found by a chaos
    run): the matcher answers it, with the same answer as for the index's needles."""
    assert searchable("TEXT", "a" * MAX_NEEDLE) and not searchable("TEXT", "a" * (MAX_NEEDLE + 1))
    mb = store.acquire(USER)
    try:
        long_word = "abcdefghij" * 200  # 2,000 characters, in one message
        for i in range(40):
            mb.append(INBOX, f"Subject: m{i}\r\n\r\n{'a' * 3000 if i % 2 else 'b' * 50}\r\n".encode())
        mb.append(INBOX, f"Subject: long\r\n\r\nsee {long_word} here\r\n".encode())
        uids = mb.snapshot(INBOX).uids
        for needle, want in (("a" * 2500, list(uids[1:40:2])), (long_word.upper(), [uids[-1]]), ("a" * 900, list(uids[1:40:2]))):
            key = TextKey("TEXT", needle)
            crit, cands = narrow(mb, INBOX, key)
            assert (cands is None) == (len(needle) > MAX_NEEDLE)  # the index is asked only for short ones
            assert _search(mb, key, True) == _search(mb, key, False) == want
    finally:
        store.release(mb)


def test_in_view() -> None:
    """The server's mapping of an index answer to (seq, UID): dense and gapped views, few and many."""
    for view in (array("I", range(3, 3000, 3)), array("I", range(7, 3000)), array("I")):
        for uids in ({3, 4, 2997, 3000, 9}, set(range(0, 3001, 2)), set(), set(range(3000))):
            assert _in_view(view, uids) == [(s, u) for s, u in enumerate(view, 1) if u in uids]
    rng = random.Random(5)
    for _ in range(2000):
        lo = rng.randint(1, 500)
        view = array("I", sorted(rng.sample(range(1, 1000), rng.randint(0, 300)))) if rng.random() < 0.7 \
            else array("I", range(lo, lo + rng.randint(0, 300)))
        uids = set(rng.sample(range(0, 1100), rng.randint(0, len(view) // 4 + 3)))
        assert _in_view(view, uids) == [(s, u) for s, u in enumerate(view, 1) if u in uids], (view, uids)


def test_real_server_search(server: IMAPServer) -> None:
    addr = server.user("fts")
    rng = random.Random(11)
    msgs = [_message(i, rng) for i in range(60)]
    ctx = server.inst.client_ssl_context()
    with imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=ctx) as a, \
            imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=ctx) as b:
        a.login(addr, PASSWORD)
        b.login(addr, PASSWORD)
        for i, m in enumerate(msgs):
            (a if i % 2 else b).append("INBOX", None, None, m)
        a.select("INBOX")
        b.select("INBOX")
        expect = {i + 1 for i, m in enumerate(msgs) if b"report" in m.split(b"\r\n\r\n")[0].lower()
                  and b"=?UTF-8?B?" not in m.split(b"\r\n\r\n")[0]}
        typ, data = a.uid("SEARCH", "SUBJECT", "report")
        assert typ == "OK"
        got = {int(x) for x in data[0].split()}
        assert expect <= got  # plus the base64-encoded subjects holding the word
        typ, data2 = b.uid("SEARCH", "CHARSET", "UTF-8", "BODY", "quoted")
        assert typ == "OK"
        assert {int(x) for x in data2[0].split()} == {i + 1 for i in range(60) if i % 5 == 1}
        b.uid("STORE", ",".join(str(u) for u in sorted(got)), "+FLAGS", "(\\Deleted)")
        b.expunge()
        typ, data = a.uid("SEARCH", "SUBJECT", "report")
        assert typ == "OK" and data[0].split() == []
        typ, data = a.uid("SEARCH", "TEXT", "e")  # short: the index scans its stored text
        assert typ == "OK" and len(data[0].split()) == 60 - len(got)



def test_webmail_search_uses_the_index(store: MailStore) -> None:
    """The webmail search scans the newest messages first (a common word fills the page there), then
    asks the index for the older ones; the answer is the matcher's either way."""
    from postier.web.mail import _search as web_search
    mb = store.acquire(USER)
    try:
        mb.append(INBOX, b"From: Old <old@example.org>\r\nSubject: rare word quixotic\r\n\r\nold\r\n")
        for i in range(300):
            mb.append(INBOX, b"From: a@example.org\r\nSubject: note %d\r\n\r\nnothing\r\n" % i)
        uids = list(mb.snapshot(INBOX).uids)
        calls: list[object] = []
        real = mb.text_search

        def counting(name: str, queries: Sequence[tuple[str, str]]) -> object:
            calls.append(queries)
            return real(name, queries)

        mb.text_search = counting  # type: ignore[method-assign,assignment]
        assert web_search(mb, INBOX, uids, "QUIXOTIC", False, 50) == ([uids[0]], False)
        assert len(calls) == 1
        found, more = web_search(mb, INBOX, uids, "note", True, 50)
        assert len(found) >= 50 and more and found[0] == uids[-1]
        assert len(calls) == 1  # filled from the newest messages: no index needed
    finally:
        store.release(mb)
