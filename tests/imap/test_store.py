"""Mailbox store: folder names and containment, sync with other programs, UIDs kept across an index
rebuild, flags in file names, append/copy/move/expunge, MODSEQ and QRESYNC tombstones, POP3 API."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from postier.message.types import User
from postier.store.errors import MailboxExists, MailboxNotFound, StoreError
from postier.store.index import INDEX_NAME, UIDLIST_NAME, read_journal
from postier.store.mailbox import MailStore, UserMailbox, folder_dir_name, normalize_name
from postier.store.maildir import deliver_maildir

MSG = b"From: a@example.org\r\nSubject: hello\r\n\r\nbody\r\n"
USER = User("bob@example.org", "bob", "example.org", "maildir")


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = MailStore(tmp_path / "mail")
    yield s
    s.close()


@pytest.fixture
def mb(store: MailStore):  # type: ignore[no-untyped-def]
    m = store.acquire(USER)
    yield m
    store.release(m)


def deliver(m: UserMailbox, data: bytes = MSG, folder: str = "") -> str:
    root = m.root / folder_dir_name(folder) if folder else m.root
    return deliver_maildir(root, b"", data)


# -- names ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [
    "", "..", "a..b", ".a", "a.", "a/b", "/etc", "../x", "cur", "new", "tmp", "a.cur", "x\x00y", "x\ny",
    "a*", "b%", " lead", "trail ", "a." * 20 + "b", "x" * 300,
])
def test_bad_names_refused(bad: str) -> None:
    with pytest.raises(StoreError):
        normalize_name(bad)


def test_names_normalize_and_encode() -> None:
    assert normalize_name("inbox") == "INBOX"
    assert normalize_name("Inbox.Sub") == "INBOX.Sub"
    assert folder_dir_name("Äpfel.Birnen") == ".&AMQ-pfel.Birnen"
    assert folder_dir_name("A&B") == ".A&-B"


def test_created_dirs_stay_inside_maildir(mb: UserMailbox) -> None:
    mb.create("Projects.2024")
    mb.create("Äpfel")
    for p in mb.root.iterdir():
        assert p.parent == mb.root
    assert (mb.root / ".Projects.2024" / "cur").is_dir()
    assert (mb.root / ".&AMQ-pfel" / "maildirfolder").exists()
    names = [f.name for f in mb.list_folders()]
    assert names[0] == "INBOX" and "Projects.2024" in names and "Äpfel" in names
    with pytest.raises(StoreError) as e:
        mb.create("projects.2024".replace("p", "P"))
    assert isinstance(e.value, MailboxExists)


def test_default_special_use(mb: UserMailbox) -> None:
    mb.ensure_defaults()
    uses = {f.name: f.special_use for f in mb.list_folders()}
    assert uses["Sent"] == "\\Sent" and uses["Trash"] == "\\Trash" and uses["Junk"] == "\\Junk"
    assert uses["Drafts"] == "\\Drafts" and uses["Archive"] == "\\Archive"
    assert set(mb.subscriptions()) >= {"Sent", "Trash"}


# -- sync and UIDs --------------------------------------------------------------------------------

def test_delivery_then_open_assigns_uids(mb: UserMailbox) -> None:
    for _ in range(3):
        deliver(mb)
    st = mb.open("INBOX")
    assert list(st.uids) == [1, 2, 3]
    assert st.uidnext == 4 and st.uidvalidity > 0
    assert mb.status("INBOX").unseen == 3


def test_file_dropped_by_other_program_appears(mb: UserMailbox) -> None:
    deliver(mb)
    st = mb.open("INBOX")
    v = st.version
    (mb.root / "new" / "12345.other.host").write_bytes(b"Subject: x\n\nlf only\n")
    st = mb.open("INBOX")
    assert list(st.uids) == [1, 2] and st.version > v
    row = mb.rows("INBOX", [2])[2]
    assert mb.read("INBOX", row) == b"Subject: x\r\n\r\nlf only\r\n"
    assert mb.rows("INBOX", [2])[2].size == len(b"Subject: x\r\n\r\nlf only\r\n")


def test_external_delete_and_rename_picked_up(mb: UserMailbox) -> None:
    a = deliver(mb)
    b = deliver(mb)
    st = mb.open("INBOX")
    m0 = st.highestmodseq
    os.unlink(mb.root / "new" / a)
    os.rename(mb.root / "new" / b, mb.root / "cur" / (b + ":2,FS"))
    st = mb.open("INBOX", force=True)
    assert list(st.uids) == [2]
    row = mb.rows("INBOX", [2])[2]
    assert row.flag_names == ["\\Seen", "\\Flagged"]
    assert row.modseq > m0
    assert mb.vanished_since("INBOX", m0) == [1]
    assert [r[0] for r in mb.changed_since("INBOX", m0)] == [2]


def test_reindex_keeps_uids(store: MailStore, tmp_path: Path) -> None:
    mb = store.acquire(USER)
    names = [deliver(mb) for _ in range(5)]
    st = mb.open("INBOX")
    uv, hms = st.uidvalidity, st.highestmodseq
    mb.store("INBOX", [2], "+FLAGS", ["\\Seen", "$Important"])
    mb.expunge("INBOX", None)
    os.unlink(mb.root / "new" / names[0])
    st = mb.open("INBOX", force=True)
    assert list(st.uids) == [2, 3, 4, 5]
    mb.create("Work")
    mb.append("Work", MSG)
    store.release(mb)
    journal = read_journal(mb.root)
    assert journal is not None and journal.uidvalidity == uv
    counts = store.reindex(USER)
    assert counts["INBOX"] == 4 and counts["Work"] == 1
    mb = store.acquire(USER)
    st = mb.open("INBOX")
    assert st.uidvalidity == uv and list(st.uids) == [2, 3, 4, 5] and st.uidnext == 6
    assert st.highestmodseq > hms
    row = mb.rows("INBOX", [2])[2]
    assert row.flag_names == ["\\Seen", "$Important"]
    deliver(mb)
    assert list(mb.open("INBOX").uids) == [2, 3, 4, 5, 6]
    store.release(mb)


def test_index_deleted_by_hand_rebuilds(store: MailStore) -> None:
    mb = store.acquire(USER)
    deliver(mb)
    deliver(mb)
    uv = mb.open("INBOX").uidvalidity
    store.release(mb)
    idx = USER.home(store.mail_root) / INDEX_NAME
    idx.unlink()
    mb = store.acquire(USER)
    st = mb.open("INBOX")
    assert st.uidvalidity == uv and list(st.uids) == [1, 2]
    store.release(mb)


def test_uidvalidity_changes_when_folder_recreated(mb: UserMailbox) -> None:
    mb.create("X")
    v1 = mb.open("X").uidvalidity
    mb.delete("X")
    mb.create("X")
    assert mb.open("X").uidvalidity > v1


def test_rename_keeps_uids_and_children(mb: UserMailbox) -> None:
    mb.create("A")
    mb.create("A.B")
    mb.append("A", MSG)
    mb.append("A.B", MSG)
    mb.subscribe("A.B")
    uv = mb.open("A").uidvalidity
    mb.rename("A", "Z")
    names = [f.name for f in mb.list_folders()]
    assert "Z" in names and "Z.B" in names and "A" not in names and "A.B" not in names
    st = mb.open("Z")
    assert st.uidvalidity == uv and list(st.uids) == [1]
    assert "Z.B" in mb.subscriptions()
    with pytest.raises(StoreError):
        mb.rename("Z", "Z.B.C")


def test_rename_inbox_moves_messages(mb: UserMailbox) -> None:
    deliver(mb)
    deliver(mb)
    mb.open("INBOX")
    mb.rename("INBOX", "Old")
    assert len(mb.open("INBOX").uids) == 0
    assert len(mb.open("Old").uids) == 2


def test_delete_inbox_refused_and_missing(mb: UserMailbox) -> None:
    with pytest.raises(StoreError):
        mb.delete("INBOX")
    with pytest.raises(StoreError) as e:
        mb.delete("Nope")
    assert isinstance(e.value, MailboxNotFound)


# -- flags, append, copy, move, expunge -----------------------------------------------------------

def test_store_flags_rename_file(mb: UserMailbox) -> None:
    name = deliver(mb)
    mb.open("INBOX")
    r = mb.store("INBOX", [1], "+FLAGS", ["\\Seen", "\\Answered", "Work"])
    assert set(r.changed[1].flag_names) == {"\\Seen", "\\Answered", "Work"}
    assert (mb.root / "cur" / (name + ":2,RSa")).exists()
    assert (mb.root / "dovecot-keywords").read_text() == "0 Work\n"
    r2 = mb.store("INBOX", [1], "-FLAGS", ["work"])
    assert r2.changed[1].flag_names == ["\\Seen", "\\Answered"]
    assert (mb.root / "cur" / (name + ":2,RS")).exists()
    r3 = mb.store("INBOX", [1], "+FLAGS", ["\\Seen"])
    assert list(r3.unchanged) == [1] and r3.unchanged[1].flags == r2.changed[1].flags and not r3.changed
    r4 = mb.store("INBOX", [1], "FLAGS", ["\\Flagged"], unchangedsince=r.modseq)
    assert r4.conflicts == [1]


def test_store_and_expunge_survive_their_index_commit_taken_back(store: MailStore) -> None:
    """STORE and EXPUNGE commit the index without an fsync of its own (the renamed and unlinked
    files are durable): with the index as it was before them (what a power cut may leave), the next
    sync reads the flags from the file names and drops the expunged message, under a MODSEQ above
    every one handed out."""
    mb = store.acquire(USER)
    deliver(mb)
    deliver(mb)
    mb.open("INBOX")
    store.release(mb)
    store.close()
    idx = USER.home(store.mail_root) / INDEX_NAME
    before = idx.read_bytes()
    s2 = MailStore(store.mail_root)
    mb = s2.acquire(USER)
    mb.open("INBOX")
    m1 = mb.store("INBOX", [1], "+FLAGS", ["\\Flagged", "\\Answered"]).modseq
    mb.store("INBOX", [2], "+FLAGS", ["\\Deleted"])
    assert mb.expunge("INBOX") == [2]
    m2 = mb.snapshot("INBOX").highestmodseq
    assert m2 > m1
    s2.release(mb)
    s2.close()
    for extra in ("-wal", "-shm"):
        Path(str(idx) + extra).unlink(missing_ok=True)
    idx.write_bytes(before)  # the two commits lost
    s3 = MailStore(store.mail_root)
    try:
        mb = s3.acquire(USER)
        st = mb.open("INBOX")
        assert list(st.uids) == [1]
        assert set(mb.rows("INBOX", [1])[1].flag_names) == {"\\Flagged", "\\Answered"}
        assert st.highestmodseq > m2
        s3.release(mb)
    finally:
        s3.close()


def test_append_durable_and_uid(mb: UserMailbox) -> None:
    t = 1_600_000_000
    uv, uid = mb.append("INBOX", b"Subject: a\nX: y\n\nbody\n", ["\\Seen"], t)
    assert uid == 1
    row = mb.rows("INBOX", [1])[1]
    assert row.sub == 1 and row.suffix == ":2,S"
    assert mb.read("INBOX", row) == b"Subject: a\r\nX: y\r\n\r\nbody\r\n"
    assert mb.internal_date("INBOX", row) == t
    assert list((mb.root / "tmp").iterdir()) == []
    with pytest.raises(StoreError) as e:
        mb.append("Missing", MSG)
    assert isinstance(e.value, MailboxNotFound)  # IMAP answers TRYCREATE


def test_copy_and_move(mb: UserMailbox) -> None:
    for _ in range(3):
        deliver(mb)
    mb.open("INBOX")
    mb.store("INBOX", [2], "+FLAGS", ["\\Flagged", "Kw"])
    mb.create("Dst")
    c = mb.copy("INBOX", [2, 3], "Dst")
    assert c.source_uids == [2, 3] and c.dest_uids == [1, 2]
    d = mb.rows("Dst", [1, 2])
    assert d[1].flag_names == ["\\Flagged", "Kw"]
    src = mb.rows("INBOX", [2])[2]
    assert os.stat(mb.root / src.relpath()).st_nlink == 2  # hard link
    m = mb.move("INBOX", [1, 2], "Dst")
    assert m.source_uids == [1, 2] and m.dest_uids == [3, 4]
    assert list(mb.state("INBOX").uids) == [3]
    assert list(mb.state("Dst").uids) == [1, 2, 3, 4]
    assert mb.vanished_since("INBOX", 0) == [1, 2]
    with pytest.raises(StoreError) as e:
        mb.copy("INBOX", [3], "Nope")
    assert isinstance(e.value, MailboxNotFound)  # IMAP answers TRYCREATE


def test_expunge(mb: UserMailbox) -> None:
    for _ in range(4):
        deliver(mb)
    mb.open("INBOX")
    mb.store("INBOX", [1, 2, 4], "+FLAGS", ["\\Deleted"])
    assert mb.expunge("INBOX", [2, 3]) == [2]
    assert mb.expunge("INBOX") == [1, 4]
    assert list(mb.state("INBOX").uids) == [3]
    assert len(list((mb.root / "cur").iterdir())) + len(list((mb.root / "new").iterdir())) == 1


def test_state_arrays_are_replaced_not_mutated(mb: UserMailbox) -> None:
    deliver(mb)
    st = mb.open("INBOX")
    old = st.uids
    mb.append("INBOX", MSG)
    assert list(old) == [1] and list(mb.state("INBOX").uids) == [1, 2]


def test_mtime_fast_path(mb: UserMailbox) -> None:
    deliver(mb)
    st = mb.open("INBOX")
    # make the directories look old so their mtimes are trusted
    past = time.time() - 10
    for sub in ("new", "cur"):
        os.utime(mb.root / sub, (past, past))
    mb.open("INBOX")
    assert not mb.needs_sync("INBOX")
    deliver(mb)
    assert mb.needs_sync("INBOX")
    assert len(mb.open("INBOX").uids) == 2
    assert st.version >= 1


def test_journal_compaction(mb: UserMailbox) -> None:
    mb.create("J")
    for _ in range(30):
        mb.append("J", MSG, ["\\Deleted"])
    mb.expunge("J")
    j = read_journal(mb.root / ".J")
    assert j is not None and j.uidnext == 31
    assert (mb.root / ".J" / UIDLIST_NAME).exists()


# -- POP3 API -------------------------------------------------------------------------------------

def test_pop3_api(store: MailStore) -> None:
    mb = store.acquire(USER)
    deliver(mb)
    deliver(mb, b"Subject: two\r\n\r\nxx\r\n")
    store.release(mb)
    msgs = store.open_inbox(USER)
    assert [m.uid for m in msgs] == [1, 2]
    assert msgs[1].size == len(b"Subject: two\r\n\r\nxx\r\n") and msgs[1].path.read_bytes().startswith(b"Subject")
    assert len({m.uidl for m in msgs}) == 2 and all(1 <= len(m.uidl) <= 70 for m in msgs)
    store.mark_seen(USER, [1])
    assert store.delete(USER, [2]) == [2]
    msgs = store.open_inbox(USER)
    assert [m.uid for m in msgs] == [1] and msgs[0].path.name.endswith(":2,S")
    assert store.message_bytes(USER, 1) == MSG


def test_view_cache_keeps_views_up_to_the_bound(mb: UserMailbox) -> None:
    from postier.store.index import CACHE_ITEM_LIMIT
    deliver(mb)
    mb.snapshot("INBOX")
    big, small = b"x" * (CACHE_ITEM_LIMIT + 1), b"x" * CACHE_ITEM_LIMIT
    mb.cache_put("INBOX", [(1, "big", big), (1, "small", small)])  # a larger view is recomputed, not kept
    assert mb.cache_get("INBOX", [1], "big") == {} and mb.cache_get("INBOX", [1], "small") == {1: small}
