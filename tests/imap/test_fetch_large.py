"""FETCH of a section, a partial range or an uncached BODYSTRUCTURE of a large message
(server/imapfetch.py `_Large`): sent from the message's file (`FileSpan`) and made from a bounded
scan (`textscan.layout_at`), never read whole; every answer is the one the whole-message path
gives, compared by hash. The renderer is compared with the large-message threshold set to 0 over
the message-view corpora and generated large messages; then a running server answers two sessions
at once on a 20 MiB message with an attachment (sections, partials, BINARY of the attachment and of
the whole multipart), its peak RSS measured. CATENATE (RFC 4469) URLs naming a large message or a
section of it are copied from its file in pieces (`imapfetch.url_copy`), compared the same ways."""

from __future__ import annotations

import base64
import hashlib
import imaplib
import re
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from postier.message.mime import parse_message
from postier.message.sections import binary_section, body_section, section_octets
from postier.message.types import User
from postier.proto.imap import Fetch, parse_command
from postier.proto.imap.url import parse_url
from postier.server import imapfetch
from postier.server.imapfetch import FetchError, FetchOptions, FetchPace, StreamedAnswer, render_fetch, url_copy
from postier.store.api import Mailboxes
from postier.store.mailbox import MailStore
from tests.concurrency import together
from tests.imap.test_message_views import COMMENTS, NUL_MESSAGE, QP_MESSAGE
from tests.message import corpus

from .conftest import PASSWORD, IMAPServer
from .test_extensions import _status_kib, appenduid, literal

USER = User("bob@example.org", "bob", "example.org", "maildir")

#: FETCH item lists a client sends for sections, partials and views (Thunderbird: BODY.PEEK[n] and
#: BODYSTRUCTURE; K-9, FairEmail: BODY.PEEK[]<0.n>, BODY.PEEK[n]<o.l>)
ITEMS = [
    "(BODY.PEEK[1])", "(BODY.PEEK[2])", "(UID BODY.PEEK[2.MIME] BODY.PEEK[3])", "(BODY.PEEK[TEXT])",
    "(BODY.PEEK[HEADER] BODY.PEEK[TEXT]<100.5000>)", "(BODY.PEEK[]<0.65536>)", "(BODY.PEEK[]<1500000.5000>)",
    "(BODY.PEEK[2]<1000.70000>)", "(BODY.PEEK[2]<99999999.10>)", "(BODYSTRUCTURE)", "(BODY)", "(ENVELOPE BODY[1])",
    "(UID FLAGS RFC822.SIZE BODYSTRUCTURE ENVELOPE BODY.PEEK[1] BODY.PEEK[2])", "(RFC822.HEADER RFC822.TEXT)",
    "(BODY.PEEK[4.HEADER] BODY.PEEK[4.TEXT] BODY.PEEK[4.1] BODY.PEEK[4.MIME])", "(BODY.PEEK[9] BODY.PEEK[1.2.3])",
    "(BODY.PEEK[3.HEADER.FIELDS (Subject)] BODY.PEEK[HEADER.FIELDS.NOT (To)])", "(RFC822 BODYSTRUCTURE)",
    "(BINARY.PEEK[2]<0.100> BINARY.SIZE[1] BODY.PEEK[1])", "(BODY.PEEK[1.1] BODY.PEEK[2.1])", "(BINARY.PEEK[2])",
    "(BINARY.SIZE[2] BINARY.SIZE[3] BINARY.PEEK[3]<2.100000> BINARY.PEEK[4.1])", "(BINARY.PEEK[1]<5.5> BINARY.PEEK[])",
    "(BINARY[2]<70000.100000> BINARY.PEEK[4])", "(BINARY.SIZE[] BINARY.SIZE[4] BINARY.PEEK[]<100.200000>)",
    "(BINARY.PEEK[4]<10.100> BINARY.SIZE[4.1] BINARY.PEEK[1.1] BINARY.PEEK[]<0.1>)", "(BINARY.PEEK[]<99999999.10>)",
]


def big_mail(lines: int, nul: bool = False) -> bytes:
    """A text part, a base64 attachment of `lines` lines, a second text part in quoted-printable
    (with a NUL octet: sent as 0x80 in BODY[...], in a literal8 in BINARY[...]), and a
    message/rfc822 part holding a multipart message."""
    inner = (b"From: carol@c.example\r\nSubject: inner\r\nContent-Type: multipart/alternative; boundary=in\r\n\r\n"
             b"--in\r\nContent-Type: text/plain\r\n\r\ninner text\r\n--in\r\nContent-Type: text/html\r\n\r\n"
             b"<p>inner</p>\r\n--in--\r\n")
    return b"".join([
        b"From: Alice <alice@a.example>\r\nTo: bob@b.example\r\nSubject: the report\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\npreamble\r\n"
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nSee the file, Bj\xc3\xb6rn.\r\n-- \r\nAlice\r\n"
        b"--b1\r\nContent-Type: application/pdf; name=r.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n",
        *(base64.b64encode(hashlib.sha256(str(i).encode()).digest() * 2)[:76] + b"\r\n" for i in range(lines)),
        b"--b1\r\nContent-Type: text/plain\r\nSubject: not a header of the message\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n",
        b"words\x00 after\r\n" if nul else b"words after\r\n", b"text line=20\r\n=C3=A9t=C3=A9 soft=\r\n" * min(lines, 5000),
        b"--b1\r\nContent-Type: message/rfc822\r\n\r\n" + inner + b"\r\n--b1--\r\nepilogue\r\n",
    ])


def messages() -> list[bytes]:
    return [*corpus.ALL.values(), NUL_MESSAGE, QP_MESSAGE, COMMENTS, big_mail(3), big_mail(20_000, nul=True),
            b"Subject: one part\r\nContent-Type: image/png\r\n\r\n" + b"A" * 76 * 1000 + b"\r\n",
            b"Subject: no blank line\r\n" + b"X-Long: " + b"y" * 200_000 + b"\r\n"]


def sent(mb: Mailboxes, name: str, answer: bytes | StreamedAnswer) -> bytes:
    """The bytes `IMAPSession._send_streamed` sends for an answer."""
    if isinstance(answer, bytes):
        return answer
    f = answer.file if answer.file is not None else mb.open_message(name, answer.uid, answer.partial)
    assert f is not None
    with f:
        size = f.seek(0, 2)
        out = bytearray()
        for p in answer.parts:
            if isinstance(p, bytes):
                out += p
                continue
            out += p.prefix(size)
            data = b"".join(p.pieces(f, size))
            assert len(data) == p.length(size)
            out += data
    return bytes(out)


STREAMED = {False: 0, True: 0}  # answers sent from the file, without and with FetchOptions.stream


def fetch_hashes(mb: Mailboxes, name: str, items: str, stream: bool) -> list[str]:
    """FETCH 1:* `items` through the renderer, every batch: each answer's SHA-256 (and its start)."""
    cmd = parse_command(b"a FETCH 1:* " + items.encode() + b"\r\n")
    assert isinstance(cmd, Fetch)
    targets = list(enumerate(mb.snapshot(name).uids, 1))
    out: list[str] = []
    pace = FetchPace()
    while targets:
        opts = FetchOptions(set_seen=False, stream=stream)
        try:
            batch = render_fetch(mb, name, targets, cmd.attributes, opts, pace)
        except FetchError:  # NO [UNKNOWN-CTE]: then one message at a time, the one that fails passed
            try:
                batch = render_fetch(mb, name, targets[:1], cmd.attributes, opts, FetchPace())
            except FetchError as exc:
                out.append(exc.code)
                targets = targets[1:]
                continue
        assert batch.missing == 0
        for answer in batch.data:
            STREAMED[stream] += isinstance(answer, StreamedAnswer)
            line = sent(mb, name, answer)
            out.append(hashlib.sha256(line).hexdigest() + " " + repr(line[:60]))
        targets = targets[batch.done:]
    return out


@pytest.fixture
def mb(tmp_path: Path) -> Iterator[Mailboxes]:
    store = MailStore(tmp_path / "mail")
    m = store.acquire(USER)
    try:
        yield m
    finally:
        store.release(m)
        store.close()


def compare(mb: Mailboxes, raws: list[bytes], monkeypatch: pytest.MonkeyPatch) -> int:
    """Each item list on folders Whole (read whole) and Parts (from the file, every message taken as
    large), fresh folders for each (no cached view), the same answers. Returns how many answers."""
    monkeypatch.setattr(imapfetch, "STREAM_FROM", 0)
    reads: list[str] = []
    read = mb.read
    monkeypatch.setattr(mb, "read", lambda name, row: reads.append(name) or read(name, row))
    n = 0
    for k, items in enumerate(ITEMS):
        for name in (f"Whole{k}", f"Parts{k}"):
            mb.create(name)
            for raw in raws:
                mb.append(name, raw)
        whole = fetch_hashes(mb, f"Whole{k}", items, stream=False)
        parts = fetch_hashes(mb, f"Parts{k}", items, stream=True)
        assert parts == whole, items
        # again, each layout read back from the view cache (textscan.LAYOUT_KIND, Layout.load)
        assert fetch_hashes(mb, f"Parts{k}", items, stream=True) == whole, items
        n += len(whole)
    parted = [r for r in reads if r.startswith("Parts")]
    print(f"{len(reads) - len(parted)} messages read whole for Whole*, {len(parted)} for Parts*, {STREAMED}")
    assert len(parted) < 2 * (len(reads) - len(parted)) / 3  # both passes
    return n


def test_sections_partials_and_views_are_the_whole_paths(mb: Mailboxes, monkeypatch: pytest.MonkeyPatch) -> None:
    assert compare(mb, messages(), monkeypatch) >= len(ITEMS) * len(messages())


def test_in_small_pieces(mb: Mailboxes, monkeypatch: pytest.MonkeyPatch) -> None:
    """The scan's pieces and kept lines tiny, so that every boundary falls inside a line."""
    from postier.message import textscan
    monkeypatch.setattr(textscan, "PIECE", 7)
    monkeypatch.setattr(textscan, "SKIP_LINE", 24)
    compare(mb, [corpus.NESTED, corpus.ATTACHMENT, corpus.DIGEST, big_mail(300, nul=True)], monkeypatch)


# -- a running server: two sessions at once on a 20 MiB message

def _sha(data: object) -> str:
    assert isinstance(data, bytes)
    return hashlib.sha256(data).hexdigest()


def test_sections_and_partials_of_a_20_mib_message_from_two_sessions(server: IMAPServer) -> None:
    """Thunderbird opening the attachment (BODY.PEEK[2]) in one session while another asks what K-9
    and FairEmail do (BODYSTRUCTURE, BODY.PEEK[]<0.65536>, a partial of the attachment, the text
    parts): each literal is the whole-message path's (`body_section` of the parsed message, by
    hash), and the server's peak RSS grows by far less than the message."""
    proc = server.inst.proc
    assert proc is not None
    pid = proc.pid
    user = server.user()
    msg = big_mail(20 * (1 << 20) // 78)
    whole = parse_message(msg)

    def section(spec: str) -> bytes:
        cmd = parse_command(b"a FETCH 1 (BODY.PEEK[" + spec.encode() + b"])\r\n")
        assert isinstance(cmd, Fetch) and cmd.attributes[0].section is not None
        return body_section(whole, cmd.attributes[0].section)

    want = {"attachment": _sha(section("2")), "start": _sha(msg[:65536]), "range": _sha(section("2")[1000:2001000]),
            "text1": _sha(section("1")), "text3": _sha(section("3")), "inner": _sha(section("4.1"))}
    ctx = server.inst.client_ssl_context()
    with imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=ctx) as a, \
            imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=ctx) as b:
        a.login(user, PASSWORD)
        b.login(user, PASSWORD)
        assert a.append("INBOX", None, None, msg)[0] == "OK"
        a.select("INBOX")
        b.select("INBOX")
        got: dict[str, list[object]] = {}
        grown: dict[str, int] = {}

        def fetch(key: str, conn: imaplib.IMAP4_SSL, items: str) -> None:
            typ, data = conn.uid("FETCH", "1", items)
            assert typ == "OK", data
            got[key] = data

        def measured(what: str, *fetches: tuple[str, imaplib.IMAP4_SSL, str]) -> None:
            """Run the FETCHes at once; the growth of the server's peak RSS (VmHWM) meanwhile."""
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
            before = _status_kib(pid, "VmHWM")
            together(*(partial(fetch, *f) for f in fetches))
            grown[what] = _status_kib(pid, "VmHWM") - before
            print(f"{len(msg) >> 20} MiB message with an attachment, peak RSS growth, {what}: {grown[what]} KiB")

        partials = "(BODYSTRUCTURE BODY.PEEK[]<0.65536> BODY.PEEK[2]<1000.2000000> BODY.PEEK[1] BODY.PEEK[3])"
        measured("section FETCH BODY.PEEK[2]", ("a", a, "(BODY.PEEK[2])"))
        measured("uncached BODYSTRUCTURE and partials", ("b", b, partials))
        measured("BINARY.PEEK[2] (base64 undone)", ("bin", a, "(BINARY.PEEK[2])"))
        measured("both from two sessions at once", ("a", a, "(BODY.PEEK[2])"), ("b2", b, partials.replace("BODYSTRUCTURE ", "")))
        measured("BINARY.PEEK[] and BINARY.SIZE[] (the whole multipart decoded) from two sessions at once",
                 ("all", a, "(BINARY.SIZE[] BINARY.PEEK[])"), ("all2", b, "(BINARY.PEEK[]<1000.2000000> BINARY.PEEK[4])"))
        fetch("c", a, "(BODY.PEEK[4.1])")
        first, second, third = got["a"], got["b"], got["c"]
        assert isinstance(got["bin"][0], tuple) and _sha(got["bin"][0][1]) == _sha(binary_section(whole, (2,)))
        entity = binary_section(whole, ())
        assert isinstance(got["all"][0], tuple) and b"BINARY.SIZE[] %d " % len(entity) in got["all"][0][0]
        assert _sha(got["all"][0][1]) == _sha(entity)
        assert [_sha(p[1]) for p in got["all2"] if isinstance(p, tuple)] == [
            _sha(entity[1000:2001000]), _sha(binary_section(whole, (4,)))]
        assert isinstance(first[0], tuple) and first[0][0].endswith(b"BODY[2] {%d}" % len(section("2")))
        assert _sha(first[0][1]) == want["attachment"]
        assert [_sha(p[1]) for p in second if isinstance(p, tuple)] == [
            want["start"], want["range"], want["text1"], want["text3"]]
        assert re.search(rb'"APPLICATION" "PDF" \("NAME" "r.pdf"\) NIL NIL "BASE64" %d' % len(section("2")),
                         second[0][0], re.IGNORECASE)  # type: ignore[index, arg-type]
        assert isinstance(third[0], tuple) and _sha(third[0][1]) == want["inner"]
        assert [_sha(p[1]) for p in got["b2"] if isinstance(p, tuple)] == [
            want["start"], want["range"], want["text1"], want["text3"]]
        assert all(k < 8 * 1024 for k in grown.values()), grown


def test_a_batch_holds_few_files_open(mb: Mailboxes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Partials of sections of many large messages: a batch stops at FILES_HELD answers holding
    their file (in cluster mode, a download each), the next batch goes on."""
    monkeypatch.setattr(imapfetch, "STREAM_FROM", 0)
    for _ in range(20):
        mb.append("INBOX", corpus.ATTACHMENT)
    cmd = parse_command(b"a FETCH 1:* (BODY.PEEK[2]<0.10>)\r\n")
    assert isinstance(cmd, Fetch)
    targets = list(enumerate(mb.snapshot("INBOX").uids, 1))
    batch = render_fetch(mb, "INBOX", targets, cmd.attributes, FetchOptions(set_seen=False, stream=True))
    held = [a for a in batch.data if isinstance(a, StreamedAnswer) and a.file is not None]
    assert batch.done == len(held) == imapfetch.FILES_HELD
    for a in held:
        a.close()
    assert len(fetch_hashes(mb, "INBOX", "(BODY.PEEK[2]<0.10>)", stream=True)) == 20


# -- CATENATE (RFC 4469) of a large message: copied from its file in pieces (imapfetch.url_copy)

#: URL tails naming the message, sections and partial ranges of it (RFC 5092 §3)
URLS = ["", "/;PARTIAL=5.100", "/;SECTION=2", "/;SECTION=1", "/;SECTION=4.1", "/;SECTION=HEADER",
        "/;SECTION=TEXT/;PARTIAL=100", "/;SECTION=2/;PARTIAL=1000.70000", "/;SECTION=3.HEADER.FIELDS%20(Subject)",
        "/;SECTION=2.MIME", "/;SECTION=9", "/;SECTION=4.HEADER", "/;PARTIAL=99999999.10"]


def test_catenate_urls_are_the_whole_paths(mb: Mailboxes, monkeypatch: pytest.MonkeyPatch) -> None:
    """What each URL names, copied in pieces from the file of every message taken as large, is what
    reading it whole gives (by hash); more than the room left: its length, nothing written."""
    raws = messages()
    for raw in raws:
        mb.append("INBOX", raw)
    uids = mb.snapshot("INBOX").uids
    for tail in URLS:
        for uid in uids:
            u = parse_url(f"/INBOX/;UID={uid}{tail}")
            got: dict[bool, tuple[int | None, str]] = {}
            for large in (False, True):
                monkeypatch.setattr(imapfetch, "STREAM_FROM", 0 if large else 1 << 40)
                pieces: list[bytes] = []
                n = url_copy(mb, "INBOX", uid, u.section, u.partial, pieces.append, 1 << 40)
                assert not large or all(len(p) <= 256 << 10 for p in pieces)
                data = b"".join(pieces)
                assert n == len(data)
                got[large] = n, hashlib.sha256(data).hexdigest()
                if n:
                    nothing: list[bytes] = []
                    assert url_copy(mb, "INBOX", uid, u.section, u.partial, nothing.append, n - 1) == n
                    assert not nothing
            assert got[True] == got[False], (tail, uid)
    assert url_copy(mb, "INBOX", uids[-1] + 1, None, None, list[bytes]().append, 1 << 40) is None


def test_catenate_of_a_20_mib_message_from_two_sessions(server: IMAPServer) -> None:
    """Two sessions at once build messages from a 20 MiB message by CATENATE: the whole of it with
    a TEXT part, and a new header with its attachment, a partial range of a text part, a part of
    its encapsulated message and a 3 MiB TEXT literal (spooled as it arrives, copied on in pieces);
    each new message is what the parts give read whole (by hash), and the server's peak RSS grows
    by far less than the message. A MULTIAPPEND whose second message fails leaves no spool file."""
    proc = server.inst.proc
    assert proc is not None
    pid = proc.pid
    user = server.user()
    msg = big_mail(20 * (1 << 20) // 78)
    whole = parse_message(msg)

    def sec(spec: str) -> bytes:
        u = parse_url(f"/Drafts/;UID=1/;SECTION={spec}")
        assert u.section is not None
        return section_octets(whole, u.section)

    note = b"\r\n-- \r\nforwarded\r\n"
    head = b"From: bob@example.org\r\nSubject: Fwd: the report\r\nContent-Type: application/pdf\r\n\r\n"
    bulk = b"".join(b"line %07d of a large text part\r\n" % i for i in range(3 * (1 << 20) // 32))
    want = [_sha(msg + note), _sha(head + sec("2") + sec("1")[:10] + sec("4.1") + bulk)]
    ctx = server.inst.client_ssl_context()
    with imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=ctx) as i:
        i.login(user, PASSWORD)
        assert i.append("Drafts", None, None, msg)[0] == "OK"
        commands = [b'APPEND INBOX CATENATE (URL "/Drafts/;UID=1" TEXT ' + literal(note) + b")",
                    b"APPEND INBOX CATENATE (TEXT " + literal(head) + b' URL "/Drafts/;UID=1/;SECTION=2"'
                    b' URL "/Drafts/;UID=1/;SECTION=1/;PARTIAL=0.10" URL "/Drafts/;UID=1/;SECTION=4.1" TEXT '
                    + literal(bulk) + b")"]
        with server.client(user) as a, server.client(user) as b:
            a.ok("NOOP")
            b.ok("NOOP")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
            before = _status_kib(pid, "VmHWM")
            tagged = together(lambda: a.cmd(commands[0])[1], lambda: b.cmd(commands[1])[1])
            grown = _status_kib(pid, "VmHWM") - before
            print(f"{len(msg) >> 20} MiB message, two CATENATEs of it at once, peak RSS growth: {grown} KiB")
            assert sorted(appenduid(t)[1] for t in tagged) == ["1", "2"], tagged
            # MULTIAPPEND, all or nothing: the first message's spool file goes when the second fails
            _u, t = a.cmd(b'APPEND INBOX CATENATE (URL "/Drafts/;UID=1") CATENATE (URL "/Drafts/;UID=9")')
            assert b"NO [BADURL" in t, t
        i.select("INBOX", readonly=True)
        typ, data = i.uid("FETCH", "1:2", "(BODY.PEEK[])")
        assert typ == "OK"
        got = sorted(_sha(p[1]) for p in data if isinstance(p, tuple))
        assert got == sorted(want)
        assert grown < 8 * 1024, grown
    assert not any((server.maildir(user) / "tmp").iterdir())
