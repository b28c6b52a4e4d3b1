"""`postier import maildir` and `postier import mbox` of large messages (store/transfer.py
`LargeFile`, `_mbox_messages`): a Maildir file above MEMORY_DATA_LIMIT is hashed and copied into the
store's spool in pieces, never read whole (tracemalloc's peak stays a few MiB for a 12 MiB file),
with and without a dovecot-uidlist; an mbox file is read a line at a time and a message above
MEMORY_DATA_LIMIT written on to the spool as it is read. The bytes (bare LF made CRLF, mboxrd
quoting undone), UIDs, flags and dates arrive; a second run copies nothing; no spool file is left
behind. Reading an mbox in tiny pieces (long lines cut, every message spooled) gives the same
messages as reading it whole."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.message.types import User
from postier.proto.crlf import to_crlf
from postier.store.mailbox import MailStore
from postier.store import transfer
from postier.store.transfer import ImportState, import_maildir, import_mbox

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


def mbox_file(big: int) -> tuple[bytes, list[bytes]]:
    """An mbox of a small message, one of about `big` bytes with quoted From lines in its body and
    a small one; and the three messages as they must arrive."""
    body = large(big, "kiwi", b"\n").split(b"\n\n", 1)[1]
    half = len(body) // 2 - len(body) // 2 % 49
    raw = (b"From a@example.net Sat Jan  1 10:00:00 2022\nFrom: a@example.net\nStatus: RO\nSubject: one\n\n"
           b"first\n>From the quoted start\n\n"
           b"From b@example.net Sun Jan  2 11:00:00 2022\nFrom: b@example.net\nX-Status: AF\n"
           b"X-Keywords: Work\nSubject: two\n\n" + body[:half] + b">From here\n>>From there\nFrom mid-line\n"
           + body[half:] + b"\n"
           b"From c@example.net Mon Jan  3 12:00:00 2022\r\nFrom: c@example.net\r\nSubject: three\r\n\r\nlast\r\n")
    want = [b"From: a@example.net\r\nSubject: one\r\n\r\nfirst\r\nFrom the quoted start\r\n",
            b"From: b@example.net\r\nSubject: two\r\n\r\n" + (body[:half] + b"From here\n>From there\nFrom mid-line\n"
                                                               + body[half:]).replace(b"\n", b"\r\n"),
            b"From: c@example.net\r\nSubject: three\r\n\r\nlast\r\n"]
    return raw, want


def test_large_mbox_message_is_read_in_pieces(store: MailStore, tmp_path: Path) -> None:
    raw, want = mbox_file(12 << 20)
    src = tmp_path / "inbox"
    src.write_bytes(raw)
    mb = store.acquire(ALICE)
    try:
        mb.ensure_defaults()
        state = ImportState(tmp_path / "state.sqlite")
        try:
            tracemalloc.start()
            stats = import_mbox(mb, src, state)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            assert stats.copied == 3 and stats.bytes == sum(map(len, want))
            assert peak < 6 << 20, peak  # a line, and a message up to 1 MiB, not the 12 MiB one
            again = import_mbox(mb, src, state)
            assert (again.copied, again.skipped) == (0, 3)
        finally:
            state.close()
        rows = list(mb.rows_between("INBOX", 1, 10).values())
        assert [mb.read("INBOX", r) for r in rows] == want
        assert [sorted(r.flag_names) for r in rows] == [["\\Seen"], ["Work", "\\Answered", "\\Flagged"], []]
        assert [mb.internal_date("INBOX", r) for r in rows] == [1_641_031_200, 1_641_121_200, 1_641_211_200]
    finally:
        store.release(mb)
    assert [p for p in (tmp_path / "mail").rglob("tmp/*") if p.is_file()] == []


EDGES = (b"junk before the first From_ line\n"
         b"From x Sat Jan  1 10:00:00 2022\nStatus: R\n\r\nbody\r\r\n" + b"long " * 40 + b"\r\r\r\n"
         b">>>From deep\n" + b"\r" * 30 + b"\n" + b"a\rb" * 20 + b"\n\n\n"
         b"From y Sun Jan  2 11:00:00 2022\nX-Keywords: k1 k2\n  folded\nStatus: RO\n\n"
         b"From z Mon Jan  3 12:00:00 2022\n\nno header, no final line end")


def test_mbox_read_in_tiny_pieces_gives_the_same_messages(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Long body lines cut in 24-byte pieces and the first and last message spooled, against the same file read
    with the default sizes (everything in memory): the same bytes, flags and dates."""
    src = tmp_path / "inbox"
    src.write_bytes(EDGES)

    def run(name: str) -> list[tuple[bytes, list[str], int]]:
        s = MailStore(tmp_path / name)
        mb = s.acquire(ALICE)
        state = ImportState(tmp_path / f"{name}.sqlite")
        try:
            mb.ensure_defaults()
            assert import_mbox(mb, src, state).copied == 3
            return [(mb.read("INBOX", r), r.flag_names, mb.internal_date("INBOX", r))
                    for r in mb.rows_between("INBOX", 1, 10).values()]
        finally:
            state.close()
            s.release(mb)
            s.close()

    whole = run("whole")
    assert whole[0][0].startswith(b"\r\n\r\nbody\r\nlong ") and b"\r\n>>From deep\r\n" in whole[0][0]
    assert whole[1] == (b"\r\n", ["\\Seen", "k1", "k2", "folded"], 1_641_121_200)
    assert whole[2][0] == b"\r\n\r\nno header, no final line end\r\n"
    monkeypatch.setattr(transfer, "_MBOX_LINE", 24)
    monkeypatch.setattr(transfer, "MEMORY_DATA_LIMIT", 32)
    assert run("pieces") == whole


def test_mbox_message_over_quota_leaves_no_spool_file(tmp_path: Path) -> None:
    """A large message the store refuses (the quota) stops the import with a clear error; its spool
    file is gone."""
    raw, _ = mbox_file(3 << 20)
    (tmp_path / "inbox").write_bytes(raw)
    s = MailStore(tmp_path / "mail")
    mb = s.acquire(User("bob@example.org", "bob", "example.org", "maildir", quota=2 << 20))
    state = ImportState(tmp_path / "state.sqlite")
    try:
        mb.ensure_defaults()
        with pytest.raises(transfer.TransferError, match="not stored"):
            import_mbox(mb, tmp_path / "inbox", state)
    finally:
        state.close()
        s.release(mb)
        s.close()
    assert [p for p in (tmp_path / "mail").rglob("tmp/*") if p.is_file()] == []


def test_verify_hash_of_pieces_is_the_hash_of_the_message_made_crlf() -> None:
    """`import imap --verify` hashes a large message in pieces (transfer._CrlfHash), bare LF made CRLF
    as the store keeps it: the same hash as the whole message's, wherever the pieces are cut (a CRLF
    split between two pieces, empty pieces)."""
    rng = random.Random(5)
    for _ in range(2000):
        data = bytes(rng.choice(b"ab\r\n") for _ in range(rng.randint(0, 40)))
        h = transfer._CrlfHash()
        i = 0
        while i < len(data):
            k = rng.randint(0, 5)
            h.update(data[i:i + k])
            i += k
        assert h.sha.hexdigest() == hashlib.sha256(to_crlf(data)).hexdigest(), data
