"""Each place postier makes a directory for data it acknowledges, under the power-cut model.

One cut after each step of a data directory's life, from nothing: quickstart (data directory,
config, certificate, accounts), the first Maildir delivery, an mbox delivery, the queue spool,
DKIM keys, the DMARC report store, IMAP CREATE / RENAME / DELETE of folders, STORE of flags, and a
delivery into a folder deleted and made again by another process. What each call
returned must still be there after the cut, with nothing else done in between. Each step runs in
a child process that exits before the cut, as a server would be killed (it keeps directory
descriptors open, and nothing may hold the mount at the cut).
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from postier.accounts import Accounts, User
from postier.mailauth.keys import KeyStore
from postier.mailauth.reports import ReportStore
from postier.queue.spool import Spool
from postier.store.mailbox import MailStore
from postier.store.maildir import deliver_maildir, deliver_mbox
from tests.harness import REPO, run_cli

from .mount import CutMount

USER = User("u@example.org", "u", "example.org", "maildir")


def child(step: str, *args: str) -> str:
    """Run `step` (a function of this module) in a child process; its printed result."""
    p = subprocess.run([sys.executable, "-c", f"import sys; from tests.powercut.test_layout import {step}; "
                        f"print({step}(*sys.argv[1:]))", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip()


def sqlite_ok(path: Path) -> bool:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def test_quickstart_data_directory_survives(cutfs: CutMount) -> None:
    run_cli(None, "quickstart", "--domain", "example.org", "--data-dir", str(cutfs.mnt / "srv" / "data"),
            "--port-offset", "20000", "--quiet")
    cutfs.cut()
    data = cutfs.backing / "srv" / "data"
    assert b"[listeners.smtp]" in (data / "postier.toml").read_bytes()
    assert (data / "tls" / "cert.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert (data / "tls" / "key.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert sqlite_ok(data / "accounts.sqlite")
    acc = Accounts(data / "accounts.sqlite")
    assert acc.list_domains() == ["example.org"]
    acc.close()


def deliveries(data_dir: str) -> str:
    data = Path(data_dir)
    maildir = USER.maildir(data / "mail")
    name = deliver_maildir(maildir, b"Return-Path: <a@b.test>\r\n", b"Subject: first\r\n\r\nhello\r\n")
    deliver_maildir(maildir / ".Junk", b"", b"Subject: junk\r\n\r\nspam\r\n")  # a folder made by delivery
    deliver_mbox(USER.mbox(data / "mbox-users"), "a@b.test", b"", b"Subject: mbox\r\n\r\nhi\r\n")
    spool = Spool(data / "spool" / "queue")
    spool.write_file("ABC123", b"", b"Subject: queued\r\n\r\nout\r\n")
    spool.close()
    KeyStore(data / "dkim").generate("example.org", "ed25519-sha256", selector="s1")
    ReportStore(data / "dmarc" / "dmarc.sqlite").close()
    return name


def test_first_deliveries_and_the_spool_survive(cutfs: CutMount) -> None:
    name = child("deliveries", str(cutfs.mnt / "data"))
    cutfs.cut()
    back = cutfs.backing / "data"
    md = USER.maildir(back / "mail")
    assert (md / "new" / name).read_bytes().endswith(b"hello\r\n")
    assert len(list((md / ".Junk" / "new").iterdir())) == 1
    assert b"\nhi\n" in USER.mbox(back / "mbox-users").read_bytes()
    assert (back / "spool" / "queue" / "msg" / "ABC123").read_bytes().endswith(b"out\r\n")
    assert sqlite_ok(back / "spool" / "queue" / "queue.sqlite")
    assert (back / "dkim" / "example.org" / "s1.key").read_bytes().startswith(b"-----BEGIN")
    assert b"s1" in (back / "dkim" / "example.org" / "keys.json").read_bytes()
    assert (back / "dkim" / "example.org" / "s1.txt").read_bytes()
    assert sqlite_ok(back / "dmarc" / "dmarc.sqlite")


def folders_one(mail_root: str) -> int:
    store = MailStore(Path(mail_root), special_use_folders=(), workers=1)
    mb = store.acquire(USER)
    for name in ("Projects", "Old", "Old.Child", "Gone"):
        mb.create(name)
    uid = mb.append("Projects", b"Subject: kept\r\n\r\nbody\r\n")[1]
    store.release(mb)
    store.close()
    return int(uid)


def folders_two(mail_root: str, uid: str) -> str:
    store = MailStore(Path(mail_root), special_use_folders=(), workers=1)
    mb = store.acquire(USER)
    mb.rename("Old", "Renamed")
    mb.delete("Gone")
    mb.create("Gone")  # made again under the name just deleted: a new, empty Maildir
    assert mb.open("Projects").uids[0] == int(uid)
    mb.store("Projects", [int(uid)], "+FLAGS", ["\\Seen", "\\Flagged"])  # STORE answered OK: durable
    store.release(mb)
    store.close()
    return "ok"


def test_imap_create_rename_delete_survive(cutfs: CutMount) -> None:
    root = cutfs.mnt / "mail"
    uid = child("folders_one", str(root))
    cutfs.power_cycle()  # CREATE and APPEND answered OK: durable
    md = USER.maildir(cutfs.backing / "mail")
    assert {p.name for p in md.iterdir() if p.name.startswith(".")} == {".Projects", ".Old", ".Old.Child", ".Gone"}
    assert len(list((md / ".Projects" / "cur").iterdir()) + list((md / ".Projects" / "new").iterdir())) == 1
    assert child("folders_two", str(root), uid) == "ok"
    cutfs.cut()
    assert {p.name for p in md.iterdir() if p.name.startswith(".")} == {".Projects", ".Renamed", ".Renamed.Child", ".Gone"}
    for folder in (".Renamed", ".Renamed.Child", ".Gone"):
        assert all((md / folder / sub).is_dir() for sub in ("cur", "new", "tmp")), folder
    assert sqlite_ok(USER.home(cutfs.backing / "mail") / "postier-index.sqlite")
    projects = md / ".Projects"
    assert [p.name.split(":", 1)[1] for p in (projects / "cur").iterdir()] == ["2,FS"]
    assert list((projects / "new").iterdir()) == []


def folder_recreated(mail_root: str) -> str:
    """One process delivers into a folder, another deletes and recreates it (IMAP DELETE, CREATE),
    the first delivers into it again: its fsync must reach the new folder's new/, not the old one."""
    junk = USER.maildir(Path(mail_root)) / ".Junk"
    deliver_maildir(junk, b"", b"Subject: before\r\n\r\nold\r\n")
    p = subprocess.run([sys.executable, "-c", f"import sys; from tests.powercut.test_layout import recreate_junk; "
                        f"recreate_junk({mail_root!r})"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return deliver_maildir(junk, b"", b"Subject: after\r\n\r\nnew\r\n")


def recreate_junk(mail_root: str) -> None:
    store = MailStore(Path(mail_root), special_use_folders=(), workers=1)
    mb = store.acquire(USER)
    mb.delete("Junk")
    mb.create("Junk")
    store.release(mb)
    store.close()


def test_delivery_into_a_folder_deleted_and_recreated_meanwhile(cutfs: CutMount) -> None:
    name = child("folder_recreated", str(cutfs.mnt / "mail"))
    cutfs.cut()
    junk = USER.maildir(cutfs.backing / "mail") / ".Junk"
    assert [p.name for p in (junk / "new").iterdir()] == [name]


def copy_move_expunge(mail_root: str) -> str:
    store = MailStore(Path(mail_root), special_use_folders=(), workers=1)
    mb = store.acquire(USER)
    mb.create("Archive")
    uids = [mb.append("INBOX", f"Subject: m{i}\r\n\r\nbody {i}\r\n".encode())[1] for i in range(4)]
    store.release(mb)
    store.close()
    return " ".join(map(str, uids))


def copy_move_expunge_two(mail_root: str, uids: str) -> str:
    u = [int(x) for x in uids.split()]
    store = MailStore(Path(mail_root), special_use_folders=(), workers=1)
    mb = store.acquire(USER)
    mb.copy("INBOX", [u[0]], "Archive")  # COPY: a second copy
    mb.move("INBOX", [u[1]], "Archive")  # MOVE: gone here, there
    mb.store("INBOX", [u[2]], "+FLAGS", ["\\Deleted"])
    mb.expunge("INBOX")  # EXPUNGE: gone
    mb.delete_uids("INBOX", [u[3]])  # POP3 DELE at QUIT: gone
    store.release(mb)
    store.close()
    return "ok"


def test_copy_move_expunge_and_pop3_delete_survive(cutfs: CutMount) -> None:
    root = cutfs.mnt / "mail"
    uids = child("copy_move_expunge", str(root))
    cutfs.power_cycle()
    assert child("copy_move_expunge_two", str(root), uids) == "ok"
    cutfs.cut()
    md = USER.maildir(cutfs.backing / "mail")

    def bodies(folder: Path) -> list[bytes]:
        return sorted(f.read_bytes().rsplit(b"\r\n\r\n", 1)[1] for sub in ("cur", "new")
                      for f in (folder / sub).iterdir())

    assert bodies(md) == [b"body 0\r\n"]
    assert bodies(md / ".Archive") == [b"body 0\r\n", b"body 1\r\n"]
