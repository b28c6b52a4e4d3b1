"""Migration in and out: `postier import imap|maildir|mbox` and `postier export --maildir|--mbox`.

The source for `import imap` is a real Dovecot (Debian's, started here on loopback with its own
configuration, as the IMAP benchmark does) holding folders, flags, keywords, a special-use folder
with another name, and odd messages. A second run copies nothing; `--verify` finds no difference;
what postier then serves over IMAP equals the source (bytes, flags, internal dates). An export to
Maildir, served by Dovecot, shows the same UIDVALIDITY and UIDs.
"""

from __future__ import annotations

import imaplib
import os
import re
import shutil
import tempfile
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.imap_bench import PASSWORD as DOVECOT_PASSWORD
from bench.imap_bench import Dovecot
from postier.message.types import User
from postier.store.mailbox import MailStore
from postier.store import transfer
from postier.store.transfer import ImportState, import_imap
from tests.harness import Instance

pytestmark = pytest.mark.slow
PASSWORD = "password123"

MESSAGES = [
    b"From: a@x.test\r\nTo: u@d.test\r\nSubject: plain\r\nMessage-ID: <p1@x.test>\r\n\r\nhello\r\n",
    b"From: a@x.test\r\nSubject: =?utf-8?q?caf=C3=A9?=\r\n\r\n>From the start\r\nFrom here too\r\n",
    b"From: b@x.test\r\nSubject: no final newline\r\n\r\nbody without end",
    (b"From: c@x.test\r\nSubject: multipart\r\nMIME-Version: 1.0\r\n"
     b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\npart\r\n"
     b"--XX--\r\n"),
    b"From: d@x.test\r\nSubject: same\r\n\r\nduplicate\r\n",
    b"From: d@x.test\r\nSubject: same\r\n\r\nduplicate\r\n",  # the same bytes twice: both copied
]


def need(program: str) -> None:
    if shutil.which(program) is None:
        if os.environ.get("POSTIER_REQUIRE_INTEROP") == "1":
            pytest.fail(f"{program} is required (Debian: dovecot-imapd) but not installed")
        pytest.skip(f"{program} not installed")


def write_maildir(md: Path, folder: str, items: list[tuple[bytes, str, int]], keywords: list[str] = ()) -> None:
    d = md if folder == "INBOX" else md / ("." + folder)
    for sub in ("cur", "new", "tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    if keywords:
        (d / "dovecot-keywords").write_text("".join(f"{i} {k}\n" for i, k in enumerate(keywords)))
    for i, (raw, flags, when) in enumerate(items):
        p = d / "cur" / f"{when}.M{i}P{os.getpid()}.src:2,{flags}"
        p.write_bytes(raw)
        os.utime(p, (when, when))


def view(host: str, port: int, user: str, password: str, ssl_ctx: object | None = None) -> dict[str, list]:
    """{folder: [(flags, internaldate, bytes)]} over IMAP, folders by name, \\Recent left out."""
    c = (imaplib.IMAP4_SSL(host, port, ssl_context=ssl_ctx) if ssl_ctx is not None  # type: ignore[arg-type]
         else imaplib.IMAP4(host, port))
    try:
        c.login(user, password)
        out: dict[str, list] = {}
        typ, listing = c.list('""', "*")
        for item in listing:
            m = re.match(r'\(([^)]*)\) (?:"[^"]*"|NIL) (.*)$', item.decode()) if isinstance(item, bytes) else None
            if m is None:
                continue
            name = m.group(2).strip('"')
            if "\\Noselect" in m.group(1) or "\\NonExistent" in m.group(1):
                continue
            typ, _ = c.select(f'"{name}"', readonly=True)
            assert typ == "OK", (name, _)
            typ, data = c.uid("FETCH", "1:*", "(FLAGS INTERNALDATE BODY.PEEK[])")
            msgs = []
            for it in data:
                if isinstance(it, tuple):
                    head = it[0].decode()
                    flags = sorted(f for f in re.search(r"FLAGS \(([^)]*)\)", head).group(1).split()  # type: ignore[union-attr]
                                   if f != "\\Recent")
                    msgs.append((tuple(flags), imaplib.Internaldate2tuple(it[0]), it[1]))
            out[name] = sorted(msgs, key=lambda m: (m[2], m[0]))
        return out
    finally:
        c.logout()


@pytest.fixture
def dovecot() -> Iterator[Dovecot]:
    need("dovecot")
    # Dovecot serves mail as nobody: its directories must not sit under pytest's 0700 tmp_path.
    top = Path(tempfile.mkdtemp(prefix="postier-dovecot-"))
    top.chmod(0o711)
    d = Dovecot(top / "dovecot", 10)
    # A special-use folder whose name is not ours ("Sent Items" with \Sent, RFC 6154).
    d.conf.write_text(d.conf.read_text() + """
namespace inbox {
  inbox = yes
  separator = /
  mailbox "Sent Items" {
    special_use = \\Sent
  }
}
""")
    md = d.home("olduser") / "Maildir"
    # (Dovecot serves a file without a final line end with one added, so MESSAGES[2] is not used here.)
    write_maildir(md, "INBOX", [(MESSAGES[0], "S", 1_600_000_000), (MESSAGES[1], "FS", 1_600_000_100),
                                (MESSAGES[2] + b"\r\n", "", 1_600_000_200), (MESSAGES[4], "a", 1_600_000_300),
                                (MESSAGES[5], "", 1_600_000_400)], keywords=["$Important"])
    write_maildir(md, "Sent Items", [(MESSAGES[3], "RS", 1_600_000_500)])
    write_maildir(md, "Projects.Alpha", [(MESSAGES[0], "T", 1_600_000_600)])
    d.start()
    try:
        yield d
    finally:
        d.stop()
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def target(tmp_path: Path) -> Iterator[Instance]:
    inst = Instance(tmp_path / "postier", "d.test")
    inst.add_user("u@d.test", PASSWORD)
    inst.add_user("v@d.test", PASSWORD)
    yield inst
    inst.stop()


def _import(inst: Instance, dove: Dovecot, *extra: str) -> str:
    r = inst.cli("import", "imap", "--host", "127.0.0.1", "--port", str(dove.port), "--user", "olduser",
                 "--password-stdin", "--security", "none", "--into", "u@d.test", *extra,
                 stdin=DOVECOT_PASSWORD + "\n", check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_import_imap_from_dovecot_resumable_and_verified(dovecot: Dovecot, target: Instance) -> None:
    out = _import(target, dovecot)
    assert "7 messages copied" in out, out
    out = _import(target, dovecot, "--verify")
    assert "0 messages copied" in out and "verify: no difference" in out, out
    target.start("imaps")
    ours = view(*target.addr("imaps"), "u@d.test", PASSWORD, target.client_ssl_context())
    theirs = view("127.0.0.1", dovecot.port, "olduser", DOVECOT_PASSWORD)
    assert ours["INBOX"] == theirs["INBOX"]
    assert ours["Sent"] == theirs["Sent Items"]  # mapped by its special-use attribute
    assert ours["Projects.Alpha"] == theirs["Projects/Alpha"]  # "/" levels become "."
    assert any("$Important" in m[0] for m in ours["INBOX"])
    # A new message at the source: the next run copies just that one.
    write_maildir(dovecot.home("olduser") / "Maildir", "INBOX", [(MESSAGES[3], "", 1_600_000_900)])
    if os.geteuid() == 0:
        shutil.chown(dovecot.home("olduser") / "Maildir" / "cur", dovecot.uid, dovecot.gid)
        for f in (dovecot.home("olduser") / "Maildir" / "cur").iterdir():
            os.chown(f, dovecot.uid, dovecot.gid)
    out = _import(target, dovecot)
    assert "1 messages copied" in out, out


def test_export_maildir_keeps_uids_under_dovecot(dovecot: Dovecot, target: Instance, tmp_path: Path) -> None:
    _import(target, dovecot)
    target.start("imaps")
    c = imaplib.IMAP4_SSL(*target.addr("imaps"), ssl_context=target.client_ssl_context())
    c.login("u@d.test", PASSWORD)
    c.select("INBOX")
    uv_ours = c.response("UIDVALIDITY")[1][0]
    c.uid("STORE", "2", "+FLAGS", "(\\Answered $Later)")
    c.expunge()
    typ, data = c.uid("FETCH", "1:*", "(UID FLAGS)")
    ours = sorted(re.findall(rb"UID (\d+) FLAGS \(([^)]*)\)", b" ".join(x for x in data if isinstance(x, bytes))))
    c.logout()
    target.stop()
    dest = dovecot.home("exported") / "Maildir"
    r = target.cli("export", "u@d.test", "--maildir", str(dest))
    assert "messages" in r.stdout
    if os.geteuid() == 0:
        for p in [dest.parent, *dest.parent.rglob("*")]:
            os.chown(p, dovecot.uid, dovecot.gid)
    c2 = imaplib.IMAP4("127.0.0.1", dovecot.port)
    c2.login("exported", DOVECOT_PASSWORD)
    c2.select("INBOX")
    assert c2.response("UIDVALIDITY")[1][0] == uv_ours
    typ, data = c2.uid("FETCH", "1:*", "(UID FLAGS)")
    theirs = sorted(re.findall(rb"UID (\d+) FLAGS \(([^)]*)\)", b" ".join(x for x in data if isinstance(x, bytes))))
    c2.logout()

    def norm(rows: list[tuple[bytes, bytes]]) -> list[tuple[int, set[bytes]]]:
        return [(int(u), set(f.split()) - {b"\\Recent"}) for u, f in rows]

    assert norm(theirs) == norm(ours)


def test_mbox_and_maildir_round_trip(target: Instance, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_maildir(src, "INBOX", [(m, fl, 1_600_000_000 + i) for i, (m, fl) in
                                 enumerate(zip(MESSAGES[:4], ["S", "FS", "", "RT"], strict=True))])
    write_maildir(src, "Old", [(MESSAGES[4], "a", 1_600_001_000)], keywords=["Work"])
    r = target.cli("import", "maildir", str(src), "--into", "u@d.test")
    assert "5 messages copied" in r.stdout, r.stdout
    r = target.cli("import", "maildir", str(src), "--into", "u@d.test")
    assert "0 messages copied" in r.stdout
    mbox_dir = tmp_path / "mbox"
    target.cli("export", "u@d.test", "--mbox", str(mbox_dir))
    raw = (mbox_dir / "INBOX.mbox").read_bytes()
    assert b"\n>>From the start" in raw and b"\n>From here too" in raw  # mboxrd quoting
    r = target.cli("import", "mbox", str(mbox_dir), "--into", "v@d.test")
    assert "5 messages copied" in r.stdout, r.stdout
    target.start("imaps")
    u = view(*target.addr("imaps"), "u@d.test", PASSWORD, target.client_ssl_context())
    v = view(*target.addr("imaps"), "v@d.test", PASSWORD, target.client_ssl_context())
    # mbox cannot tell a message without a final line end from one with it: the one such message
    # comes back with CRLF added, everything else byte for byte.
    def final_crlf(msgs: list) -> list:
        return sorted((f, d, b if b.endswith(b"\r\n") else b + b"\r\n") for f, d, b in msgs)

    assert final_crlf(u["INBOX"]) == final_crlf(v["INBOX"]) and u["Old"] == v["Old"]
    assert sum(1 for a, b in zip(sorted(u["INBOX"]), sorted(v["INBOX"]), strict=True) if a != b) <= 1
    assert any("Work" in m[0] for m in v["Old"])


def _by_uid(folder: Path) -> tuple[str, dict[int, tuple[str, bytes]]]:
    """An exported folder: (its dovecot-uidlist header without the GUID, {uid: (flag letters, bytes)})."""
    lines = (folder / "dovecot-uidlist").read_text().splitlines()
    files = {f.name.partition(":2,")[0]: f for f in (folder / "cur").iterdir()}
    out = {}
    for line in lines[1:]:
        uid, _, base = line.partition(" :")
        f = files[base]
        out[int(uid)] = (f.name.partition(":2,")[2], f.read_bytes())
    return " ".join(w for w in lines[0].split() if not w.startswith("G")), out


def test_maildir_export_then_import_into_a_new_user_is_uid_exact(target: Instance, tmp_path: Path) -> None:
    """single-machine -> Maildir -> single-machine (another user): the same UIDVALIDITY, UIDNEXT and
    UIDs (gaps included) with the same flags and bytes; a second import copies nothing."""
    src = tmp_path / "src"
    write_maildir(src, "INBOX", [(m, fl, 1_600_000_000 + i) for i, (m, fl) in
                                 enumerate(zip(MESSAGES[:4], ["S", "FS", "", "RT"], strict=True))])
    write_maildir(src, "Old", [(MESSAGES[4], "a", 1_600_001_000)], keywords=["Work"])
    target.cli("import", "maildir", str(src), "--into", "u@d.test")  # no uidlist: UIDs 1..n
    mbox_dir = tmp_path / "mbox"
    target.cli("export", "u@d.test", "--mbox", str(mbox_dir))  # (reads every folder: they exist)
    out1, out2 = tmp_path / "out1", tmp_path / "out2"
    target.cli("export", "u@d.test", "--maildir", str(out1))
    # a gap: UID 2 of INBOX left out of the export, as if expunged before it
    head, *rest = (out1 / "dovecot-uidlist").read_text().splitlines()
    gone = next(line for line in rest if line.startswith("2 :")).partition(" :")[2]
    next(f for f in (out1 / "cur").iterdir() if f.name.startswith(gone)).unlink()
    (out1 / "dovecot-uidlist").write_text("\n".join([head, *(x for x in rest if not x.startswith("2 :"))]) + "\n")
    r = target.cli("import", "maildir", str(out1), "--into", "v@d.test")
    assert "4 messages copied" in r.stdout, r.stdout
    r = target.cli("import", "maildir", str(out1), "--into", "v@d.test")
    assert "0 messages copied" in r.stdout, r.stdout
    target.cli("export", "v@d.test", "--maildir", str(out2))
    for folder in (Path(""), Path(".Old")):
        first, second = _by_uid(out1 / folder), _by_uid(out2 / folder)
        assert first == second, folder
    assert sorted(_by_uid(out2)[1]) == [1, 3, 4] and "N5" in _by_uid(out2)[0]


def test_import_imap_spools_a_large_literal(tmp_path: Path) -> None:
    """A fetched literal above MEMORY_DATA_LIMIT (12 MiB here) goes to a spool file of the store as
    it arrives (tracemalloc's peak stays a few MiB); bytes, flags and dates arrive; a second run and
    --verify find nothing to do; no spool file is left behind."""
    need("dovecot")
    top = Path(tempfile.mkdtemp(prefix="postier-dovecot-"))
    top.chmod(0o711)
    d = Dovecot(top / "dovecot", 4)
    big = b"From: big@x.test\r\nSubject: big\r\n\r\n" + (b"y" * 98 + b"\r\n") * ((12 << 20) // 100)
    write_maildir(d.home("olduser") / "Maildir", "INBOX", [(MESSAGES[0], "S", 1_600_000_000),
                                                          (big, "F", 1_600_000_100)])
    d.start()
    store = MailStore(tmp_path / "mail")
    mb = store.acquire(User("w@d.test", "w", "d.test", "maildir"))
    state = ImportState(tmp_path / "state.sqlite")
    client = imaplib.IMAP4("127.0.0.1", d.port)
    try:
        mb.ensure_defaults()
        client.login("olduser", DOVECOT_PASSWORD)
        tracemalloc.start()
        stats = import_imap(mb, client, "imap://test", state)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert stats.copied == 2 and stats.bytes == len(MESSAGES[0]) + len(big)
        assert peak < 6 << 20, peak  # pieces of 1 MiB, not the 12 MiB literal
        again = import_imap(mb, client, "imap://test", state, verify=True)
        assert (again.copied, again.differences) == (0, [])
        rows = list(mb.rows_between("INBOX", 1, 10).values())
        assert [(mb.read("INBOX", r), r.flag_names) for r in rows] == [(MESSAGES[0], ["\\Seen"]), (big, ["\\Flagged"])]
        assert mb.internal_date("INBOX", rows[1]) == 1_600_000_100
    finally:
        client.logout()
        state.close()
        store.release(mb)
        store.close()
        d.stop()
        shutil.rmtree(top, ignore_errors=True)
    assert [p for p in (tmp_path / "mail").rglob("tmp/*") if p.is_file()] == []


def test_import_imap_verify_fetches_in_bounded_batches(tmp_path: Path) -> None:
    """`--verify` fetches the source in UID ranges of at most BATCH messages and VERIFY_BYTES of
    literals held in memory, and hashes a literal above MEMORY_DATA_LIMIT as it arrives: over 150
    messages (20 of 900 KB, 4 of 4 MiB; 34 MiB in all) its peak stays far below the folder's size,
    and it still finds a message that differs in its last byte, and one missing."""
    need("dovecot")
    top = Path(tempfile.mkdtemp(prefix="postier-dovecot-"))
    top.chmod(0o711)
    d = Dovecot(top / "dovecot", 4)

    def sized(i: int, size: int) -> bytes:
        head = f"From: s{i}@x.test\r\nSubject: sized {i}\r\n\r\n".encode()
        return head + (f"{i:>6} ".encode() + b"z" * 91 + b"\r\n") * ((size - len(head)) // 100)

    items = [(b"From: a@x.test\r\nSubject: small %d\r\n\r\nhello %d\r\n" % (i, i), "S", 1_600_000_000 + i)
             for i in range(126)]
    items[10:10] = [(sized(i, 900_000), "", 1_600_001_000 + i) for i in range(20)]
    items[40:40] = [(sized(100 + i, 4 << 20), "F", 1_600_002_000 + i) for i in range(4)]
    write_maildir(d.home("olduser") / "Maildir", "INBOX", items)
    d.start()
    store = MailStore(tmp_path / "mail")
    mb = store.acquire(User("w@d.test", "w", "d.test", "maildir"))
    state = ImportState(tmp_path / "state.sqlite")
    client = imaplib.IMAP4("127.0.0.1", d.port)
    fetched: list[str] = []
    uid = client.uid

    def spy(command: str, *args: str) -> tuple[str, list[object]]:
        if command == "FETCH" and "BODY.PEEK[]" in args[-1]:
            fetched.append(args[0])
        return uid(command, *args)

    try:
        mb.ensure_defaults()
        client.login("olduser", DOVECOT_PASSWORD)
        assert import_imap(mb, client, "imap://test", state).copied == 150
        client.uid = spy  # type: ignore[method-assign]
        tracemalloc.start()
        again = import_imap(mb, client, "imap://test", state, verify=True)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (again.copied, again.differences) == (0, [])
        assert peak < 16 << 20, peak  # at most VERIFY_BYTES of literals, not the folder's 34 MiB
        spans = [tuple(map(int, r.split(":"))) for r in fetched]
        assert len(spans) >= 5 and all(hi - lo < transfer.BATCH for lo, hi in spans), spans
        assert [u for lo, hi in spans for u in range(lo, hi + 1)] == list(range(1, 151))  # each UID once, in order
        # a large message that differs in its last byte, and a small one gone: both found
        rows = mb.rows_between("INBOX", 1, 200)
        large = next(r for r in rows.values() if r.size > 4_000_000)
        data = mb.read("INBOX", large)
        mb.append("INBOX", data[:-3] + b"Z\r\n")
        mb.store("INBOX", [large.uid, 1], "+FLAGS", ["\\Deleted"])
        assert sorted(mb.expunge("INBOX")) == [1, large.uid]
        found = transfer._verify_imap(mb, client, "INBOX", "INBOX")
        assert found == ["INBOX -> INBOX: 2 source message(s) missing here",
                         "INBOX -> INBOX: 1 message(s) here that the source does not have"], found
    finally:
        client.logout()
        state.close()
        store.release(mb)
        store.close()
        d.stop()
        shutil.rmtree(top, ignore_errors=True)
    assert [p for p in (tmp_path / "mail").rglob("tmp/*") if p.is_file()] == []
