"""`postier import maildir` of large message files into cluster mode (store/transfer.py `LargeFile`,
mailboxes.py `import_with_uids` and `append_many` with a spool file) against a real PostgreSQL and
moto's S3: a file above MEMORY_DATA_LIMIT goes up from a spool file (a multipart upload for 12 MiB;
tests/imap/test_import_large.py shows the importer's memory stays bounded), is read back byte for
byte (bare LF made CRLF), keeps its UID where the folder's dovecot-uidlist names it, is searchable,
and a second run copies nothing. `postier import mbox` likewise: a 12 MiB message of an mbox file
goes up from the spool file it was written to as the file was read."""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from postier.message.types import User  # noqa: E402
from postier.store.cluster.bodies import body_key  # noqa: E402
from postier.store.cluster.store import ClusterStore  # noqa: E402
from postier.store.transfer import ImportState, TransferError, import_maildir, import_mbox  # noqa: E402
from tests.imap.test_import_large import mbox_file  # noqa: E402


ALICE = User("alice@example.org", "alice", "example.org", "maildir")


def large(size: int, word: str, eol: bytes) -> bytes:
    head = (b"From: c@example.net" + eol + b"Subject: " + word.encode() + eol
            + b"Content-Type: multipart/mixed; boundary=b" + eol + eol + b"--b" + eol + eol
            + word.encode() + b" in the text" + eol + b"--b" + eol + b"Content-Type: application/pdf" + eol
            + b"Content-Transfer-Encoding: base64" + eol + eol)
    line = base64.b64encode(hashlib.sha256(word.encode()).digest() * 2)[:76] + eol
    return head + line * ((size - len(head)) // len(line)) + b"--b--" + eol


def maildir(root: Path) -> dict[str, bytes]:
    """INBOX with a dovecot-uidlist (UIDs 3 and 7, a large file with bare LFs and a small one), and
    Work without one (a large CRLF file); returns the CRLF bytes by name."""
    one = large(12 << 20, "kookaburra", b"\n")
    two = b"From: c@example.net\nSubject: small\n\nsmall body\n"
    three = large(3 << 20, "lyrebird", b"\r\n")
    for d in (root / "cur", root / "new", root / ".Work" / "cur", root / ".Work" / "new"):
        d.mkdir(parents=True)
    (root / "cur" / "1700000000.a.host:2,S").write_bytes(one)
    (root / "cur" / "1700000001.b.host:2,").write_bytes(two)
    (root / "dovecot-uidlist").write_text("3 V1234 N9\n3 :1700000000.a.host\n7 :1700000001.b.host\n")
    (root / ".Work" / "cur" / "1700000002.c.host:2,F").write_bytes(three)
    os.utime(root / "cur" / "1700000000.a.host:2,S", (1_650_000_000, 1_650_000_000))
    return {"one": one.replace(b"\n", b"\r\n"), "two": two.replace(b"\n", b"\r\n"), "three": three}


def test_large_files_are_imported_from_their_files(store: ClusterStore, tmp_path: Path) -> None:
    want = maildir(tmp_path / "src")
    mb = store.acquire(ALICE)
    try:
        mb.ensure_defaults()
        state = ImportState(tmp_path / "state.sqlite")
        try:
            stats = import_maildir(mb, tmp_path / "src", state)
            assert stats.copied == 3
            again = import_maildir(mb, tmp_path / "src", state)
            assert (again.copied, again.skipped) == (0, 3)
        finally:
            state.close()
        snap = mb.snapshot("INBOX")
        assert (snap.uidvalidity, list(snap.uids)) == (1234, [3, 7])
        rows = mb.rows("INBOX", [3, 7])
        assert mb.read("INBOX", rows[3]) == want["one"] and mb.read("INBOX", rows[7]) == want["two"]
        assert rows[3].flag_names == ["\\Seen"] and rows[3].size == len(want["one"])
        assert mb.internal_date("INBOX", rows[3]) == 1_650_000_000
        bodies = store.bodies  # streamed from the file: in parts (a whole body in memory is one PUT)
        assert bodies.client.head_object(Bucket=bodies.bucket, Key=body_key(rows[3].base))["ETag"].endswith('-2"')
        [work] = mb.rows_between("Work", 1, 10).values()
        assert mb.read("Work", work) == want["three"] and work.flag_names == ["\\Flagged"]
        assert mb.text_search("INBOX", [("BODY", "kookaburra")]) == ([{3}], set())
        assert mb.text_search("Work", [("TEXT", "lyrebird")]) == ([{1}], set())
    finally:
        store.release(mb)


def test_large_mbox_message_goes_up_from_its_spool_file(store: ClusterStore, tmp_path: Path) -> None:
    raw, want = mbox_file(12 << 20)
    (tmp_path / "inbox").write_bytes(raw)
    mb = store.acquire(ALICE)
    try:
        mb.ensure_defaults()
        state = ImportState(tmp_path / "state.sqlite")
        try:
            assert import_mbox(mb, tmp_path / "inbox", state).copied == 3
            again = import_mbox(mb, tmp_path / "inbox", state)
            assert (again.copied, again.skipped) == (0, 3)
        finally:
            state.close()
        rows = list(mb.rows_between("INBOX", 1, 10).values())
        assert [mb.read("INBOX", r) for r in rows] == want
        assert [sorted(r.flag_names) for r in rows] == [["\\Seen"], ["Work", "\\Answered", "\\Flagged"], []]
        assert [mb.internal_date("INBOX", r) for r in rows] == [1_641_031_200, 1_641_121_200, 1_641_211_200]
        bodies = store.bodies  # streamed from the spool file: in parts (a whole body in memory is one PUT)
        assert bodies.client.head_object(Bucket=bodies.bucket, Key=body_key(rows[1].base))["ETag"].endswith('-2"')
    finally:
        store.release(mb)


def test_large_mbox_message_refused_before_upload_leaves_no_spool_file(
        store: ClusterStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The quota full after the first message: the large one is refused before any upload, the
    import stops with a clear error and its spool file is gone."""
    raw, want = mbox_file(3 << 20)
    (tmp_path / "inbox").write_bytes(raw)
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    mb = store.acquire(User("bob@example.org", "bob", "example.org", "maildir", quota=len(want[0])))
    state = ImportState(tmp_path / "state.sqlite")
    try:
        mb.ensure_defaults()
        with pytest.raises(TransferError, match="not stored"):
            import_mbox(mb, tmp_path / "inbox", state)
        assert len(mb.rows_between("INBOX", 1, 10)) == 1
    finally:
        state.close()
        store.release(mb)
    assert list(spool_dir.iterdir()) == []
