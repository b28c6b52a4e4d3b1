"""IMAP extensions over real sockets: MULTIAPPEND (RFC 3502), CATENATE (RFC 4469), UTF8=ACCEPT
(RFC 6855), WITHIN (RFC 5032); each state-changing one also from two sessions at once."""

from __future__ import annotations

import imaplib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.message.types import User
from postier.server import imapfetch
from postier.store.mailbox import MailStore
from postier.store.maildir import SpoolFile
from tests.concurrency import together

from .conftest import PASSWORD, IMAPServer, RawIMAP, start_instance, wait_for

MSG = b"From: a@example.net\r\nSubject: one\r\n\r\nbody one\r\n"


def literal(data: bytes) -> bytes:
    return b"{%d+}\r\n" % len(data) + data


def appenduid(tagged: bytes) -> tuple[int, str]:
    m = re.search(rb"\[APPENDUID (\d+) ([0-9:,]+)\]", tagged)
    assert m, tagged
    return int(m.group(1)), m.group(2).decode()


def uids_in(c: RawIMAP, box: str) -> list[int]:
    c.ok(f"EXAMINE {box}")
    u = c.ok("UID SEARCH ALL")
    return [int(x) for x in u[0].split()[2:]]


# -- MULTIAPPEND ---------------------------------------------------------------------------------

def test_multiappend_capability_and_uid_set(server: IMAPServer) -> None:
    user = server.user()
    with server.client(user) as c:
        caps = c.ok("CAPABILITY")[0].split()
        assert b"MULTIAPPEND" in caps
        _u, t = c.cmd(b"APPEND INBOX (\\Seen) " + literal(MSG) + b" (\\Flagged) " + literal(MSG.replace(b"one", b"two"))
                      + b" " + literal(MSG.replace(b"one", b"three")))
        assert b" OK " in t
        _v, uid_set = appenduid(t)
        assert uid_set == "1:3"
        c.ok("SELECT INBOX")
        u = c.ok("FETCH 1:3 (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        text = b"".join(u)
        assert text.index(b"one") < text.index(b"two") < text.index(b"three")
        assert b"\\Seen" in u[0] and b"\\Flagged" in u[1]


def test_multiappend_with_imaplib_synchronising_literals(server: IMAPServer) -> None:
    """A synchronising literal per message: '+' for each (RFC 3502 §6.3.11)."""
    user = server.user()
    with server.client(user) as c:
        c.send(b"m1 APPEND INBOX {%d}\r\n" % len(MSG))
        assert c.line().startswith(b"+ ")
        c.send(MSG + b" {%d}\r\n" % len(MSG))
        assert c.line().startswith(b"+ ")
        c.send(MSG + b"\r\n")
        _u, t = c.until("m1")
        assert appenduid(t)[1] == "1:2"


def test_multiappend_is_all_or_nothing(server: IMAPServer) -> None:
    user = server.user()
    with server.client(user) as c:
        # the second message is empty: nothing of the command is stored
        _u, t = c.cmd(b"APPEND INBOX " + literal(MSG) + b" {0+}\r\n" + b" " + literal(MSG))
        assert t.split()[1] == b"NO", t
        # the third is over APPENDLIMIT: refused, and again nothing of the command is stored
        c.send(b"m2 APPEND INBOX " + literal(MSG) + b" {%d}\r\n" % (1 << 40))
        _u, t = c.until("m2")
        assert t.split()[1] in (b"NO", b"BAD"), t
        _u, t = c.cmd(b"APPEND Nonexistent " + literal(MSG) + b" " + literal(MSG))
        assert b"TRYCREATE" in t
        assert uids_in(c, "INBOX") == []
        assert not any(os.scandir(server.maildir(user) / "tmp")), "tmp/ left with files"


def test_multiappend_rolls_back_when_a_rename_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's all-or-nothing: a failing rename (the disk's fault) takes the others back out."""
    store = MailStore(tmp_path / "mail")
    mb = store.acquire(User("bob@example.org", "bob", "example.org", "maildir"))
    try:
        mb.ensure_defaults()
        real_rename = os.rename
        calls = []

        def rename(src: str, dst: str) -> None:
            calls.append(dst)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            real_rename(src, dst)

        monkeypatch.setattr(os, "rename", rename)
        with pytest.raises(Exception, match="not stored"):
            mb.append_many("INBOX", [(MSG, (), None), (MSG, ("\\Seen",), None), (MSG, (), None)])
        monkeypatch.setattr(os, "rename", real_rename)
        assert len(calls) == 3
        assert mb.status("INBOX").messages == 0
        for sub in ("new", "cur", "tmp"):
            assert not any(os.scandir(mb.root / sub)), sub
        assert mb.append_many("INBOX", [(MSG, (), None), (MSG, (), None)])[1] == [1, 2]
    finally:
        store.release(mb)
        store.close()


def test_multiappend_from_two_sessions_at_once(server: IMAPServer) -> None:
    user = server.user()
    rounds, per = 10, 3
    got: list[list[int]] = [[], []]

    def worker(n: int) -> None:
        with server.client(user) as c:
            for i in range(rounds):
                msgs = b" ".join(literal(MSG.replace(b"one", b"s%d r%d m%d" % (n, i, k))) for k in range(per))
                _u, t = c.cmd(b"APPEND INBOX " + msgs)
                lo, _, hi = appenduid(t)[1].partition(":")
                uids = list(range(int(lo), int(hi or lo) + 1))
                assert len(uids) == per, t
                got[n] += uids

    together(lambda: worker(0), lambda: worker(1), timeout=60)
    for g in got:
        assert g == sorted(g)
    every = got[0] + got[1]
    assert len(set(every)) == 2 * rounds * per
    with server.client(user) as c:
        assert uids_in(c, "INBOX") == sorted(every)


def test_multiappend_with_imaplib_single_append_still_works(server: IMAPServer) -> None:
    user = server.user()
    m = imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=server.inst.client_ssl_context())
    try:
        m.login(user, PASSWORD)
        typ, data = m.append("INBOX", "(\\Seen)", None, MSG)
        assert typ == "OK" and b"APPENDUID" in data[0]
    finally:
        m.logout()


# -- CATENATE ------------------------------------------------------------------------------------

SOURCE = (b"From: a@example.net\r\nSubject: source\r\nMIME-Version: 1.0\r\n"
          b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\n"
          b"part one\r\n--XX\r\nContent-Type: application/octet-stream\r\n\r\nbin\x00ary\r\n--XX--\r\n")
HEADER = SOURCE[:SOURCE.index(b"\r\n\r\n") + 4]


def _fetch_body(c: RawIMAP, box: str, uid: int) -> bytes:
    c.ok(f"EXAMINE {box}")
    u = c.ok(f"UID FETCH {uid} BINARY.PEEK[]")  # literal8: NUL kept
    m = re.search(rb"~?\{(\d+)\}\r\n", u[0])
    assert m, u
    return u[0][m.end():m.end() + int(m.group(1))]


def test_catenate_text_and_urls(server: IMAPServer) -> None:
    user = server.user()
    with server.client(user) as c:
        assert b"CATENATE" in c.ok("CAPABILITY")[0].split()
        _u, t = c.cmd(b"APPEND Drafts " + literal(SOURCE))
        validity, src = appenduid(t)
        text = b"X-Added: yes\r\n"
        _u, t = c.cmd(b'APPEND Drafts (\\Draft) CATENATE (URL "/Drafts;UIDVALIDITY=%d/;UID=%s/;section=HEADER"'
                      b" TEXT %s URL \"/Drafts;UIDVALIDITY=%d/;UID=%s/;SECTION=2\""
                      b" URL \"/Drafts/;UID=%s/;SECTION=1/;PARTIAL=0.4\")"
                      % (validity, src.encode(), literal(text), validity, src.encode(), src.encode()))
        assert b" OK " in t, t
        uid = int(appenduid(t)[1])
        assert _fetch_body(c, "Drafts", uid) == HEADER + text + b"bin\x00ary" + b"part"
        # relative to the selected mailbox (RFC 5092 §7.1), several messages in one command
        c.ok("SELECT Drafts")
        _u, t = c.cmd(b"APPEND INBOX CATENATE (URL \";UID=%s\") CATENATE (TEXT %s URL \";UID=%s/;SECTION=TEXT\")"
                      % (src.encode(), literal(b"Subject: x\r\n\r\n"), src.encode()))
        assert appenduid(t)[1] == "1:2", t
        assert _fetch_body(c, "INBOX", 1) == SOURCE
        assert _fetch_body(c, "INBOX", 2) == b"Subject: x\r\n\r\n" + SOURCE[len(HEADER):]


def test_catenate_bad_urls_store_nothing(server: IMAPServer) -> None:
    user = server.user()
    other = server.user()
    with server.client(other) as o:
        o.cmd(b"APPEND INBOX " + literal(b"Subject: private\r\n\r\nsecret\r\n"))
    with server.client(user) as c:
        _u, t = c.cmd(b"APPEND Drafts " + literal(SOURCE))
        validity, src = appenduid(t)
        local, domain = other.split("@")
        bad_urls = [
            f"/Drafts;UIDVALIDITY={validity + 1}/;UID={src}",  # UIDVALIDITY changed
            f"/Drafts/;UID={int(src) + 5}",  # no such message
            "/NoSuchBox/;UID=1",
            ";UID=1",  # relative, nothing selected
            f"imap://{local}@{domain}/INBOX/;UID=1",  # another user's mailbox
            f"imap://{other.replace('@', '%40')}@{domain}/INBOX/;UID=1",
            "imap://elsewhere.example.com/Drafts/;UID=1",  # another server
            "/../" + local + "/;UID=1", "/Drafts/;UID=1/;URLAUTH=anonymous:internal:00",
            "/Drafts/;UID=1/;SECTION=1.2.3.FOO",
        ]
        for url in bad_urls:
            _u, t = c.cmd(b'APPEND Drafts CATENATE (TEXT {3+}\r\nabc URL "%s")' % url.encode())
            assert t.split()[1] == b"NO" and b"[BADURL " in t, (url, t)
        assert uids_in(c, "Drafts") == [int(src)]
    with server.client(other) as o:
        assert uids_in(o, "INBOX") == [1]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IMAPServer]:
    """A server with a 64 KiB APPENDLIMIT."""
    inst = start_instance(tmp_path_factory.mktemp("imap-small"), "[imap]\nappendlimit = 65536\n")
    try:
        yield IMAPServer(inst)
    finally:
        rc = inst.stop()
        log = inst.log.read_text()
        assert "Traceback" not in log, log[-4000:]
        assert rc == 0, log[-2000:]


def test_catenate_over_appendlimit_is_toobig(small: IMAPServer) -> None:
    user = small.user()
    with small.client(user) as c:
        assert b"APPENDLIMIT=65536" in c.ok("CAPABILITY")[0]
        _u, t = c.cmd(b"APPEND Drafts " + literal(SOURCE + b"x" * 20000 + b"\r\n"))
        src = appenduid(t)[1]
        parts = b" ".join(b'URL "/Drafts/;UID=%s"' % src.encode() for _ in range(4))
        _u, t = c.cmd(b"APPEND Drafts CATENATE (" + parts + b")")
        assert t.split()[1] == b"NO" and b"[TOOBIG]" in t, t
        _u, t = c.cmd(b"APPEND Drafts CATENATE (TEXT " + literal(b"x" * 65500) + b' URL "/Drafts/;UID=%s")' % src.encode())
        assert b"[TOOBIG]" in t, t
        assert uids_in(c, "Drafts") == [int(src)]


def test_catenate_from_two_sessions_at_once(server: IMAPServer) -> None:
    user = server.user()
    with server.client(user) as c:
        _u, t = c.cmd(b"APPEND Drafts " + literal(SOURCE))
        src = appenduid(t)[1]
    got: list[int] = []

    def worker(n: int) -> None:
        with server.client(user) as c:
            for i in range(8):
                _u, t = c.cmd(b'APPEND INBOX CATENATE (TEXT %s URL "/Drafts/;UID=%s/;SECTION=TEXT")'
                              % (literal(b"Subject: s%d m%d\r\n\r\n" % (n, i)), src.encode()))
                got.append(int(appenduid(t)[1]))

    together(lambda: worker(0), lambda: worker(1), timeout=60)
    assert sorted(got) == list(range(1, 17))
    with server.client(user) as c:
        assert uids_in(c, "INBOX") == list(range(1, 17))
        assert _fetch_body(c, "INBOX", 16).endswith(SOURCE[len(HEADER):])


# -- UTF8=ACCEPT ---------------------------------------------------------------------------------

UTF8_MSG = "From: Jürgen <j@example.net>\r\nSubject: Grüße aus Köln\r\n\r\nHallo\r\n".encode()


def test_utf8_accept_names_append_and_headers(server: IMAPServer) -> None:
    user = server.user()
    with server.client(user) as c, server.client(user) as old:
        assert b"UTF8=ACCEPT" in c.ok("CAPABILITY")[0].split()
        # before ENABLE: the UTF8 form is refused, names are modified UTF-7 (as today)
        _u, t = c.cmd(b"APPEND INBOX UTF8 (~{%d+}\r\n%s)" % (len(UTF8_MSG), UTF8_MSG))
        assert t.split()[1] == b"BAD", t
        c.ok('CREATE "Entw&APw-rfe"')
        assert c.ok("ENABLE UTF8=ACCEPT") == [b"* ENABLED UTF8=ACCEPT\r\n"]
        assert any('"Entwürfe"'.encode() in ln for ln in c.ok('LIST "" "*"'))
        c.ok('CREATE "Größe"'.encode())
        _u, t = c.cmd('APPEND "Größe" UTF8 (~{%d+}\r\n'.encode() % len(UTF8_MSG) + UTF8_MSG + b")")
        assert appenduid(t)[1] == "1"
        u = c.ok('STATUS "Größe" (MESSAGES)'.encode())
        assert u == ['* STATUS "Größe" (MESSAGES 1)\r\n'.encode()]
        c.ok('SELECT "Größe"'.encode())
        u = c.ok("FETCH 1 (ENVELOPE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert '"Grüße aus Köln"'.encode() in u[0]  # a quoted UTF-8 string (RFC 6855 §3)
        assert "Subject: Grüße aus Köln\r\n".encode() in u[0]  # the header as stored
        u = c.ok('SEARCH SUBJECT "Köln"'.encode())
        assert u == [b"* SEARCH 1\r\n"]
        _u, t = c.cmd(b"SEARCH CHARSET ISO-8859-1 SUBJECT x")
        assert t.split()[1] == b"BAD", t  # RFC 6855 §3, errata 4029
        c.ok("SEARCH CHARSET UTF-8 ALL")
        # another session that did not enable it sees modified UTF-7 and 8-bit values as literals
        assert any(b'"Gr&APYA3w-e"' in ln for ln in old.ok('LIST "" "*"'))
        old.ok('SELECT "Gr&APYA3w-e"')
        u = old.ok("FETCH 1 ENVELOPE")
        assert re.search(rb"\{\d+\}\r\nGr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln", u[0]), u


def test_utf8_append_from_two_sessions_at_once(server: IMAPServer) -> None:
    user = server.user()
    got: list[int] = []

    def worker(n: int) -> None:
        with server.client(user) as c:
            c.ok("ENABLE UTF8=ACCEPT")
            for i in range(8):
                msg = UTF8_MSG.replace(b"Hallo", b"s%d m%d" % (n, i))
                _u, t = c.cmd(b"APPEND INBOX UTF8 (~{%d+}\r\n%s)" % (len(msg), msg))
                got.append(int(appenduid(t)[1]))

    together(lambda: worker(0), lambda: worker(1), timeout=60)
    assert sorted(got) == list(range(1, 17))
    with server.client(user) as c:
        assert uids_in(c, "INBOX") == list(range(1, 17))


# -- WITHIN --------------------------------------------------------------------------------------

def test_within_older_younger(server: IMAPServer) -> None:
    user = server.user()
    two_days_ago = time.strftime("%d-%b-%Y %H:%M:%S +0000", time.gmtime(time.time() - 2 * 86400))
    with server.client(user) as c:
        assert b"WITHIN" in c.ok("CAPABILITY")[0].split()
        c.cmd(f'APPEND INBOX "{two_days_ago}" '.encode() + literal(MSG))
        c.cmd(b"APPEND INBOX " + literal(MSG))  # now
        c.ok("SELECT INBOX")
        assert c.ok("SEARCH OLDER 3600") == [b"* SEARCH 1\r\n"]
        assert c.ok("SEARCH YOUNGER 3600") == [b"* SEARCH 2\r\n"]
        assert c.ok("UID SEARCH RETURN (COUNT) OLDER 86400")[0].endswith(b"UID COUNT 1\r\n")
        assert c.ok("SEARCH OLDER 400000") == [b"* SEARCH\r\n"]
        assert c.ok("SEARCH OR OLDER 3600 YOUNGER 3600") == [b"* SEARCH 1 2\r\n"]
        assert c.ok("SORT (ARRIVAL) UTF-8 YOUNGER 3600") == [b"* SORT 2\r\n"]
        _u, t = c.cmd("SEARCH OLDER 0")
        assert t.split()[1] == b"BAD"


# -- APPEND streamed to disk ---------------------------------------------------------------------

def test_spool_file_makes_crlf_across_pieces(tmp_path: Path) -> None:
    spool = SpoolFile(tmp_path)
    for piece in (b"A: 1\r", b"\nB: 2\n", b"\n", b"body\r", b"\r\n", b"end\n"):
        spool.write(piece)
    assert Path(spool.path).read_bytes() == b"A: 1\r\nB: 2\r\n\r\nbody\r\r\nend\r\n"
    assert spool.size == len(Path(spool.path).read_bytes()) and spool.received == 23
    spool.discard()
    assert not any(tmp_path.iterdir())


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_20_mib_append_is_streamed_to_disk(server: IMAPServer) -> None:
    """The server's peak RSS grows by far less than the message while it arrives (a literal kept in
    memory costs its size at least twice: the reader's buffer and the parsed command)."""
    proc = server.inst.proc
    assert proc is not None
    pid = proc.pid
    user = server.user()
    size = 20 << 20
    line = b"x" * 998 + b"\r\n"
    body = b"Subject: big\r\n\r\n" + line * ((size - 16) // len(line))
    body += b"y" * (size - len(body))
    with server.client(user) as c:
        c.ok("NOOP")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _status_kib(pid, "VmHWM")
        c.send(b"b1 APPEND INBOX {%d}\r\n" % size)
        assert c.line().startswith(b"+ ")
        for i in range(0, size, 1 << 20):
            c.send(body[i:i + (1 << 20)])
        c.send(b"\r\n")
        _u, t = c.until("b1")
        grown = _status_kib(pid, "VmHWM") - before
        print(f"peak RSS growth during a {size >> 20} MiB APPEND: {grown} KiB")
        assert appenduid(t)[1] == "1", t
        assert grown < 8 * 1024, f"peak RSS grew by {grown} KiB for a {size >> 20} MiB APPEND"
        c.ok("SELECT INBOX")
        u = c.ok("FETCH 1 (RFC822.SIZE BODY.PEEK[]<20971000.1000>)")
        assert b"RFC822.SIZE %d" % size in u[0] and u[0].rstrip(b")\r\n").endswith(b"y" * 100)
    assert not any((server.maildir(user) / "tmp").iterdir())


def test_fetch_of_a_20_mib_message_is_sent_from_its_file(server: IMAPServer) -> None:
    """BODY.PEEK[] alone, BODY.PEEK[] among other items (as Thunderbird asks), and RFC822 (which
    sets \\Seen) of a 20 MiB message, from two sessions at once: each answer is the message byte
    for byte with the right items around it, and the server's peak RSS grows by far less than the
    message (read whole, an answer costs it twice: the file's bytes and the response line)."""
    proc = server.inst.proc
    assert proc is not None
    pid = proc.pid
    user = server.user()
    size = 20 << 20
    line = b"z" * 998 + b"\r\n"
    head = b"Subject: big fetch\r\n\r\n"
    msg = head + line * ((size - len(head)) // len(line))
    ctx = server.inst.client_ssl_context()
    with imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=ctx) as a, \
            imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=ctx) as b:
        a.login(user, PASSWORD)
        b.login(user, PASSWORD)
        assert a.append("INBOX", None, None, msg)[0] == "OK"
        assert a.append("INBOX", None, None, b"Subject: small\r\n\r\nsmall\r\n")[0] == "OK"
        a.select("INBOX")
        b.select("INBOX")
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _status_kib(pid, "VmHWM")
        got: dict[str, list[object]] = {}

        def fetch(key: str, conn: imaplib.IMAP4_SSL, *args: str) -> None:
            typ, data = conn.uid("FETCH", *args)
            assert typ == "OK", data
            got[key] = data

        together(lambda: fetch("peek", a, "1:*", "(BODY.PEEK[])"),
                 lambda: fetch("items", b, "1:*", "(UID RFC822.SIZE FLAGS BODY.PEEK[])"))
        fetch("rfc822", a, "1", "(RFC822)")
        grown = _status_kib(pid, "VmHWM") - before
        print(f"peak RSS growth during three FETCHes of a {size >> 20} MiB message: {grown} KiB")
        peek, items, rfc822 = got["peek"], got["items"], got["rfc822"]
        assert isinstance(peek[0], tuple) and peek[0][1] == msg and peek[0][0].endswith(b"BODY[] {%d}" % len(msg))
        assert isinstance(peek[2], tuple) and peek[2][1] == b"Subject: small\r\n\r\nsmall\r\n"
        assert isinstance(items[0], tuple) and items[0][1] == msg
        assert re.search(rb"UID 1 RFC822\.SIZE %d FLAGS \(\) BODY\[\] \{%d\}$" % (len(msg), len(msg)), items[0][0])
        assert isinstance(rfc822[0], tuple) and rfc822[0][1] == msg and rfc822[0][0].endswith(b"RFC822 {%d}" % len(msg))
        assert b"\\Seen" in rfc822[1]  # RFC 9051 §6.4.5: the flags changed, so FLAGS follows
        assert grown < 8 * 1024, f"peak RSS grew by {grown} KiB for three FETCHes of a {size >> 20} MiB message"


def test_cut_off_append_leaves_nothing_in_tmp(server: IMAPServer) -> None:
    user = server.user()
    tmp = server.maildir(user) / "tmp"
    with server.client(user) as c:
        c.send(b"b1 APPEND INBOX {%d+}\r\n" % (5 << 20) + b"z" * (1 << 20))
        assert wait_for(lambda: any(tmp.iterdir()))  # the literal is arriving into tmp/
    assert wait_for(lambda: not any(tmp.iterdir()), timeout=10), list(tmp.iterdir())
    with server.client(user) as c:
        assert uids_in(c, "INBOX") == []


def test_streamed_multiappend_from_two_sessions_at_once(server: IMAPServer) -> None:
    user = server.user()
    big = b"Subject: big\r\n\r\n" + (b"q" * 78 + b"\n") * 2000  # bare LF: stored as CRLF
    got: list[list[int]] = [[], []]

    def worker(n: int) -> None:
        with server.client(user) as c:
            for _ in range(3):
                _u, t = c.cmd(b"APPEND INBOX " + literal(big) + b" " + literal(MSG) + b" " + literal(big))
                lo, _, hi = appenduid(t)[1].partition(":")
                got[n] += list(range(int(lo), int(hi) + 1))

    together(lambda: worker(0), lambda: worker(1), timeout=60)
    assert sorted(got[0] + got[1]) == list(range(1, 19))
    with server.client(user) as c:
        assert uids_in(c, "INBOX") == list(range(1, 19))
        u = c.ok("FETCH 1:18 RFC822.SIZE")
        sizes = {int(re.search(rb"RFC822.SIZE (\d+)", ln)[1]) for ln in u}  # type: ignore[index]
        assert sizes == {len(big) + 2000, len(MSG)}
    assert not any((server.maildir(user) / "tmp").iterdir())


# -- IMAP4rev2 SELECT ----------------------------------------------------------------------------

def test_rev2_select_sends_list(server: IMAPServer) -> None:
    user = server.user()
    with server.client(user) as c:
        assert not any(ln.startswith(b"* LIST") for ln in c.ok("SELECT INBOX"))  # IMAP4rev1: none
        c.ok("UNSELECT")
        c.ok("ENABLE IMAP4rev2")
        c.ok('CREATE "Größe"'.encode())
        assert b'* LIST () "." "INBOX"\r\n' in c.ok("EXAMINE inbox")
        assert '* LIST () "." "Größe"\r\n'.encode() in c.ok('SELECT "Größe"'.encode())


# -- NOTIFY --------------------------------------------------------------------------------------

def nxt(c: RawIMAP) -> bytes:
    """The next response line that is not IMAP4rev1's RECENT."""
    while re.fullmatch(rb"\* \d+ RECENT\r\n", ln := c.line()):
        pass
    return ln


def test_notify_selected_and_personal_events(server: IMAPServer) -> None:
    user = server.user()
    with server.client(user) as a, server.client(user) as b:
        assert b"NOTIFY" in a.ok("CAPABILITY")[0].split()
        a.ok("SELECT INBOX")
        u = a.ok("NOTIFY SET STATUS (SELECTED (MessageNew (UID) MessageExpunge FlagChange))"
                 " (PERSONAL (MessageNew MessageExpunge MailboxName SubscriptionChange))")
        assert any(ln.startswith(b'* STATUS "Sent" (MESSAGES 0 UIDNEXT 1 UIDVALIDITY ') for ln in u), u
        assert not any(b'STATUS "INBOX"' in ln for ln in u)  # the selected mailbox: not as STATUS
        # A sends nothing from here on: every line it reads is unsolicited
        b.cmd(b"APPEND INBOX " + literal(MSG))
        assert nxt(a) == b"* 1 EXISTS\r\n"
        assert re.fullmatch(rb"\* 1 FETCH \(UID 1\)\r\n", nxt(a))
        b.cmd(b"APPEND Sent " + literal(MSG))
        ln = nxt(a)
        assert ln.startswith(b'* STATUS "Sent" (MESSAGES 1 UIDNEXT 2 UIDVALIDITY '), ln
        b.ok("SELECT INBOX")
        b.ok("STORE 1 +FLAGS (\\Flagged)")
        assert re.fullmatch(rb"\* 1 FETCH \((UID 1 )?FLAGS \(\\Flagged( \\Recent)?\)\)\r\n", nxt(a))
        b.ok("CREATE Projekt")
        assert nxt(a) == b'* LIST () "." "Projekt"\r\n'
        b.ok("SUBSCRIBE Projekt")
        assert nxt(a) == b'* LIST (\\Subscribed) "." "Projekt"\r\n'
        b.ok("DELETE Projekt")
        assert nxt(a) == b'* LIST (\\NonExistent) "." "Projekt"\r\n'
        b.ok("STORE 1 +FLAGS (\\Deleted)")
        assert re.match(rb"\* 1 FETCH \((UID 1 )?FLAGS \(", nxt(a))
        b.ok("EXPUNGE")
        assert nxt(a) == b"* 1 EXPUNGE\r\n"
        # A's own changes are not echoed as names; its commands still work as usual
        a.ok("CREATE Mine")
        a.ok("NOTIFY NONE")
        b.cmd(b"APPEND Sent " + literal(MSG))
        assert a.ok("NOOP") == []


def test_notify_fetches_every_new_message_of_one_change(server: IMAPServer) -> None:
    """RFC 5465 §5.2: MessageNew's FETCH answers for each message one COPY brings, over several FETCH
    batches (a command's first batch reads FIRST_SLICE rows)."""
    user = server.user()
    with server.client(user) as a, server.client(user) as b:
        b.ok("CREATE Work")
        for n in range(imapfetch.FIRST_SLICE + 36):
            b.cmd(b"APPEND Work " + literal(MSG.replace(b"one", b"n%d" % n)))
        a.ok("SELECT INBOX")
        a.ok("NOTIFY SET (SELECTED (MessageNew (UID ENVELOPE) MessageExpunge))")
        b.ok("SELECT Work")
        b.ok(f"COPY 1:{imapfetch.FIRST_SLICE + 36} INBOX")
        total = imapfetch.FIRST_SLICE + 36
        assert nxt(a) == b"* %d EXISTS\r\n" % total
        for n in range(total):
            ln = nxt(a)
            assert ln.startswith(b"* %d FETCH (UID %d ENVELOPE (" % (n + 1, n + 1)) and b'"n%d"' % n in ln, ln
        assert not any(b"ENVELOPE" in ln for ln in a.ok("NOOP"))  # each once


def test_notify_in_idle_and_selected_delayed(server: IMAPServer) -> None:
    user = server.user()
    with server.client(user) as a, server.client(user) as b:
        a.ok("SELECT INBOX")
        a.ok("NOTIFY SET (SELECTED-DELAYED (MessageNew MessageExpunge)) (INBOXES (MessageNew MessageExpunge))"
             " (MAILBOXES Sent (MessageNew MessageExpunge))")
        b.cmd(b"APPEND INBOX " + literal(MSG))
        assert nxt(a) == b"* 1 EXISTS\r\n"
        b.ok("SELECT INBOX")
        b.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        b.ok("EXPUNGE")  # SELECTED-DELAYED: no EXPUNGE until a command that allows one
        b.cmd(b"APPEND Drafts " + literal(MSG))  # not covered: nothing
        a.send(b"i1 IDLE\r\n")
        assert nxt(a) == b"* 1 EXPUNGE\r\n"  # IDLE allows the delayed expunge
        assert nxt(a).startswith(b"+ ")
        b.cmd(b"APPEND Sent " + literal(MSG))
        assert nxt(a).startswith(b'* STATUS "Sent" (MESSAGES 1 UIDNEXT 2 ')
        a.send(b"DONE\r\n")
        u, t = a.until("i1")
        assert b"OK" in t and u == []
        assert a.ok("NOOP") == []


def test_notify_rename_is_one_list_with_oldname(server: IMAPServer) -> None:
    """RFC 5465 §5.4: a rename by another session is LIST with OLDNAME (RFC 5258 §3.4), children too;
    a deletion and a later creation stay two events."""
    user = server.user()
    with server.client(user) as a, server.client(user) as b:
        b.ok("CREATE Alt")
        b.ok("CREATE Alt.Kind")
        a.ok("NOTIFY SET (PERSONAL (MailboxName))")
        b.ok("RENAME Alt Neu")
        assert nxt(a) == b'* LIST () "." "Neu" ("OLDNAME" ("Alt"))\r\n'
        assert nxt(a) == b'* LIST () "." "Neu.Kind" ("OLDNAME" ("Alt.Kind"))\r\n'
        b.ok("DELETE Neu.Kind")
        assert nxt(a) == b'* LIST (\\NonExistent) "." "Neu.Kind"\r\n'
        b.ok("CREATE Alt")
        assert nxt(a) == b'* LIST () "." "Alt"\r\n'
        a.ok("RENAME Alt Mine")  # A's own rename is not echoed
        assert a.ok("NOOP") == []


def test_notify_overflow_when_the_client_does_not_read(server: IMAPServer) -> None:
    """RFC 5465 §5.8: a client that leaves its events unread (beyond the kernel's socket buffers and
    NOTIFY_MAX_PENDING) gets NOTIFICATIONOVERFLOW, then no more events; its session goes on."""
    user = server.user()
    big = MSG + b"x" * 200_000 + b"\r\n"
    a = RawIMAP(server.inst, rcvbuf=4096)
    try:
        a.ok(f"LOGIN {user} {PASSWORD}")
        a.ok("SELECT INBOX")
        a.ok("NOTIFY SET (SELECTED (MessageNew (UID BODY.PEEK[]) MessageExpunge))")
        with server.client(user) as b:
            for _ in range(APPENDS_FOR_OVERFLOW):  # A stops reading; each APPEND is 200 KB of events for A
                _u, t = b.cmd(b"APPEND INBOX " + literal(big))
                assert b" OK " in t
            a.sock.settimeout(10)
            fetched = 0
            while not (ln := a.line()).startswith(b"* OK [NOTIFICATIONOVERFLOW]"):
                assert re.fullmatch(rb"\* \d+ (EXISTS|RECENT)\r\n", ln) or ln.endswith(big + b")\r\n"), ln[:80]
                fetched += b" FETCH " in ln
            assert 0 < fetched < APPENDS_FOR_OVERFLOW
            # NOTIFY is off: the selected mailbox's updates come with a command again, without BODY[]
            u = a.ok("NOOP")
            assert b"* %d EXISTS\r\n" % APPENDS_FOR_OVERFLOW in u and not any(b"BODY[]" in ln for ln in u), u[:3]
    finally:
        a.sock.close()


APPENDS_FOR_OVERFLOW = 60  # 12 MB of events: more than the kernel's socket buffers and NOTIFY_MAX_PENDING


def test_notify_refusals(server: IMAPServer) -> None:
    user = server.user()
    with server.client(user) as c:
        _u, t = c.cmd("NOTIFY SET (PERSONAL (AnnotationChange))")
        assert t.split()[1] == b"NO" and b"[BADEVENT (MessageNew MessageExpunge FlagChange MailboxName" in t, t
        for bad in ("NOTIFY SET (PERSONAL (MessageNew))", "NOTIFY SET (PERSONAL (FlagChange))",
                    "NOTIFY SET (INBOXES (MessageNew (UID) MessageExpunge))", "NOTIFY SET (PERSONAL (Bogus))",
                    "NOTIFY SET (SELECTED NONE) (SELECTED NONE)", "NOTIFY SET (NOWHERE NONE)", "NOTIFY"):
            _u, t = c.cmd(bad)
            assert t.split()[1] == b"BAD", (bad, t)
        c.ok("NOTIFY SET (SELECTED NONE) (SUBTREE (Archive INBOX) (MessageNew MessageExpunge))")
        c.ok("NOTIFY NONE")
