"""`postier backup`, `backup verify` and `restore` against a running server under load.

The restored server must serve every message acknowledged before the backup started, with the same
UIDVALIDITY and UIDs (an mbsync run against it transfers nothing), and any message acknowledged
during the backup complete or not at all. `verify` must catch one flipped byte and one missing
file; a backup into a full disk must fail loudly.
"""

from __future__ import annotations

import imaplib
import json
import os
import smtplib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Instance, run_cli
from tests.programs import mbsync, mbsync_config, require

PASSWORD = "password123"


def message(i: int, size: int = 2000) -> bytes:
    body = (f"line {i} " * (size // 8)).encode()
    return (f"From: s@remote.test\r\nTo: alice@b.test\r\nSubject: msg {i}\r\n"
            f"Message-ID: <m{i}@remote.test>\r\n\r\n").encode() + body + b"\r\n"


def send(inst: Instance, i: int) -> None:
    with smtplib.SMTP(*inst.addr("smtp"), timeout=30) as s:
        s.sendmail("s@remote.test", ["alice@b.test"], message(i))


def imap_view(inst: Instance) -> dict[str, object]:
    """UIDVALIDITY and {uid: (flags, subject)} of alice's INBOX and Archive, over IMAPS."""
    c = imaplib.IMAP4_SSL(*inst.addr("imaps"), ssl_context=inst.client_ssl_context())
    try:
        c.login("alice@b.test", PASSWORD)
        out: dict[str, object] = {}
        for folder in ("INBOX", "Archive"):
            typ, _ = c.select(folder)
            assert typ == "OK"
            uv = c.response("UIDVALIDITY")[1][0]
            typ, data = c.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            msgs = {}
            for item in data:
                if isinstance(item, tuple):
                    head = item[0].decode()
                    uid = int(head.split("UID ")[1].split()[0])
                    flags = " ".join(f for f in head.split("FLAGS (")[1].split(")")[0].split()
                                     if f != "\\Recent")  # \Recent belongs to a session
                    msgs[uid] = (flags, item[1].strip().decode())
            out[folder] = (uv, msgs)
        return out
    finally:
        c.logout()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Instance]:
    inst = Instance(tmp_path / "src", "b.test")
    inst.add_user("alice@b.test", PASSWORD)
    inst.start()
    try:
        yield inst
    finally:
        inst.stop()


def test_backup_restore_under_load_same_uids(server: Instance, tmp_path: Path) -> None:
    for i in range(20):
        send(server, i)
    # Some IMAP state to carry over: flags, a keyword, a message in another folder.
    c = imaplib.IMAP4_SSL(*server.addr("imaps"), ssl_context=server.client_ssl_context())
    c.login("alice@b.test", PASSWORD)
    c.select("INBOX")
    c.uid("STORE", "1:5", "+FLAGS", "(\\Seen \\Flagged)")
    c.uid("STORE", "6", "+FLAGS", "($Important)")
    c.uid("COPY", "7:8", "Archive")
    c.logout()
    before = imap_view(server)

    # Deliveries keep arriving while the backup runs; each is recorded once acknowledged.
    acked_during: list[int] = []
    stop = threading.Event()

    def load() -> None:
        i = 1000
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline and i < 1200:
            send(server, i)
            acked_during.append(i)
            i += 1

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(0.2)
        dest = tmp_path / "backup1"
        r = server.cli("backup", str(dest))
        assert "databases" in r.stdout
    finally:
        stop.set()
        t.join()
    assert (dest / "MANIFEST.json").is_file()
    assert not (tmp_path / "backup1.partial").exists()
    r = run_cli(None, "backup", "verify", str(dest))
    assert "verified" in r.stdout

    restored = tmp_path / "restored"
    run_cli(None, "restore", str(dest), "--data-dir", str(restored))
    # The restored copy must not refer to the original's data directory.
    assert 'data_dir = "."' in (restored / "postier.toml").read_text()
    server.stop()
    inst2 = Instance.__new__(Instance)
    inst2.__dict__.update(server.__dict__)
    inst2.root = restored
    inst2.config = restored / "postier.toml"
    inst2.log = restored / "server.log"
    inst2.proc = None
    inst2.start()
    try:
        after = imap_view(inst2)
        for folder in ("INBOX", "Archive"):
            uv0, msgs0 = before[folder]  # type: ignore[misc]
            uv1, msgs1 = after[folder]  # type: ignore[misc]
            assert uv0 == uv1, folder
            for uid, view in msgs0.items():
                assert msgs1.get(uid) == view, (folder, uid)
        # Messages acknowledged during the backup: complete or absent, never half.
        sent_during = {f"msg {i}".encode(): message(i) for i in acked_during}
        for raw in inst2.messages("alice@b.test"):
            subj = raw.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0]
            if subj in sent_during:
                assert raw.endswith(sent_during[subj]), subj
    finally:
        inst2.stop()


def test_mbsync_against_restored_server_transfers_nothing(server: Instance, tmp_path: Path) -> None:
    require("mbsync")
    for i in range(5):
        send(server, i)
    local = tmp_path / "local"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"

    def write_rc(inst: Instance) -> None:
        mbsync_config(rc, local, inst.port("imaps"), "alice@b.test", PASSWORD, inst.root / "tls" / "cert.pem")

    def sync() -> str:
        return mbsync(rc, verbose=True)

    write_rc(server)
    sync()

    def tree() -> set[str]:
        return {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file() and ".mbsyncstate" not in p.name}

    synced = tree()
    assert sum(1 for p in synced if "/cur/" in p or "/new/" in p) == 5
    dest = tmp_path / "bk"
    server.cli("backup", str(dest))
    server.stop()
    restored = tmp_path / "restored"
    run_cli(None, "restore", str(dest), "--data-dir", str(restored))
    inst2 = Instance.__new__(Instance)
    inst2.__dict__.update(server.__dict__)
    inst2.root, inst2.config, inst2.log, inst2.proc = restored, restored / "postier.toml", restored / "server.log", None
    inst2.start()
    try:
        before = imap_view(inst2)
        write_rc(inst2)
        out = sync()
        # Nothing transferred: same UIDVALIDITY (no resync), no file added, removed or renamed on the
        # near side, and the far side unchanged.
        assert "UIDVALIDITY" not in out, out
        assert tree() == synced, out
        assert imap_view(inst2) == before
    finally:
        inst2.stop()


def test_verify_catches_flipped_byte_and_missing_file(server: Instance, tmp_path: Path) -> None:
    for i in range(3):
        send(server, i)
    dest = tmp_path / "bk"
    server.cli("backup", str(dest))
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    msgs = [f["path"] for f in manifest["files"] if "/Maildir/" in f["path"] and "/new/" in f["path"]
            or "/cur/" in f["path"]]
    assert len(msgs) >= 2
    victim = dest / msgs[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    (dest / msgs[1]).unlink()
    r = run_cli(None, "backup", "verify", str(dest), check=False)
    assert r.returncode == 1
    assert msgs[0] in r.stderr and "SHA-256" in r.stderr
    assert msgs[1] in r.stderr and "missing" in r.stderr
    # A backup that does not verify is never restored.
    r = run_cli(None, "restore", str(dest), "--data-dir", str(tmp_path / "r"), check=False)
    assert r.returncode == 1 and "does not verify" in r.stderr


def test_restore_refuses_non_empty_dir_and_unsafe_paths(server: Instance, tmp_path: Path) -> None:
    dest = tmp_path / "bk"
    server.cli("backup", str(dest))
    target = tmp_path / "busy"
    target.mkdir()
    (target / "something").write_text("x")
    r = run_cli(None, "restore", str(dest), "--data-dir", str(target), check=False)
    assert r.returncode == 1 and "not empty" in r.stderr
    m = json.loads((dest / "MANIFEST.json").read_text())
    m["files"].append({"path": "../escape", "size": 0, "sha256": "", "mode": 0o600})
    (dest / "MANIFEST.json").write_text(json.dumps(m))
    r = run_cli(None, "backup", "verify", str(dest), check=False)
    assert r.returncode == 1 and "unsafe path" in r.stderr
    assert not (tmp_path / "escape").exists()
    # An existing destination is never overwritten.
    r = server.cli("backup", str(dest), check=False)
    assert r.returncode == 1 and "already exists" in r.stderr


def test_incremental_links_unchanged_files(server: Instance, tmp_path: Path) -> None:
    for i in range(4):
        send(server, i)
    b1 = tmp_path / "b1"
    server.cli("backup", str(b1))
    send(server, 99)
    b2 = tmp_path / "b2"
    r = server.cli("backup", str(b2), "--link-dest", str(b1))
    m2 = json.loads((b2 / "MANIFEST.json").read_text())
    msgs = [f["path"] for f in m2["files"] if "/new/" in f["path"] or "/cur/" in f["path"]]
    linked = [p for p in msgs if os.stat(b2 / p).st_nlink > 1]
    assert len(msgs) == 5 and len(linked) == 4, r.stdout
    assert " 4 linked" in r.stdout or "linked" in r.stdout
    assert run_cli(None, "backup", "verify", str(b2)).returncode == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root (CI runs as root)")
def test_backup_into_full_disk_fails_loudly(server: Instance, tmp_path: Path) -> None:
    for i in range(3):
        send(server, i)
    big = server.root / "mail" / "b.test" / "alice" / "filler.bin"
    big.write_bytes(os.urandom(2 * 1024 * 1024))
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        r = server.cli("backup", str(mnt / "bk"), check=False)
        assert r.returncode == 1, r.stdout
        assert "No space left on device" in r.stderr
        assert not (mnt / "bk").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
