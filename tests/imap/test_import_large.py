"""`postier import maildir` of large message files (store/transfer.py `LargeFile`): a file above
MEMORY_DATA_LIMIT is hashed and copied into the store's spool in pieces, never read whole
(tracemalloc's peak stays a few MiB for a 12 MiB file), with and without a dovecot-uidlist; the
bytes (bare LF made CRLF), UIDs, flags and dates arrive; a second run copies nothing; no spool file
is left behind."""

from __future__ import annotations

import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.message.types import User
from postier.store.mailbox import MailStore
from postier.store.transfer import ImportState, import_maildir

ALICE = User("alice@example.org", "alice", "example.org", "maildir")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MailStore]:
    s = MailStore(tmp_path / "mail")
    yield s
    s.close()


def large(size: int, word: str, eol: bytes) -> bytes:
    head = b"From: c@example.net" + eol + b"Subject: " + word.encode() + eol + eol
    line = (word * 12)[:98].encode() + eol
    return head + line * ((size - len(head)) // len(line))


def test_large_files_are_imported_in_pieces(store: MailStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for d in (src / "cur", src / "new", src / ".Work" / "cur", src / ".Work" / "new"):
        d.mkdir(parents=True)
    one, two = large(12 << 20, "cassowary", b"\n"), large(3 << 20, "emu", b"\r\n")
    (src / "cur" / "1700000000.a.host:2,S").write_bytes(one)
    (src / "dovecot-uidlist").write_text("3 V4321 N6\n5 :1700000000.a.host\n")
    (src / ".Work" / "cur" / "1700000001.b.host:2,F").write_bytes(two)
    os.utime(src / "cur" / "1700000000.a.host:2,S", (1_650_000_000, 1_650_000_000))
    mb = store.acquire(ALICE)
    try:
        mb.ensure_defaults()
        state = ImportState(tmp_path / "state.sqlite")
        try:
            tracemalloc.start()
            stats = import_maildir(mb, src, state)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert stats.copied == 2 and stats.bytes == len(one) + len(two)
            assert peak < 6 << 20, peak  # pieces of 1 MiB, not the 12 MiB file
            again = import_maildir(mb, src, state)
            assert (again.copied, again.skipped) == (0, 2)
        finally:
            state.close()
        snap = mb.snapshot("INBOX")
        assert (snap.uidvalidity, list(snap.uids)) == (4321, [5])
        row = mb.rows("INBOX", [5])[5]
        assert mb.read("INBOX", row) == one.replace(b"\n", b"\r\n") and row.flag_names == ["\\Seen"]
        assert mb.internal_date("INBOX", row) == 1_650_000_000
        [work] = mb.rows_between("Work", 1, 10).values()
        assert mb.read("Work", work) == two and work.flag_names == ["\\Flagged"]
    finally:
        store.release(mb)
    assert [p for p in (tmp_path / "mail").rglob("tmp/*") if p.is_file()] == []
