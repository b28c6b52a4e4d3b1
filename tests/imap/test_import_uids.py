"""Moving a user into the Maildir store keeps UIDs: `postier export --maildir` writes a dovecot-uidlist,
and importing it into a folder that never held mail keeps UIDVALIDITY, UIDs (gaps included), UIDNEXT,
flags, keywords, internal dates and bytes (`UserMailbox.import_with_uids`). The UIDs survive losing
the index (the journal is rewritten with them); a delivery, an APPEND of another session and an
APPEND of another process during the import get UIDs above the imported ones; into a folder that
held mail the importer appends as before."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from postier.message.types import User
from postier.store import index as index_mod
from postier.store.index import INDEX_NAME, read_journal
from postier.store.mailbox import MailStore, UserMailbox, folder_dir_name
from postier.store.maildir import deliver_maildir
from postier.store.transfer import ImportState, export_maildir, import_maildir, read_uidlist

ALICE = User("alice@example.org", "alice", "example.org", "maildir")
BOB = User("bob@example.org", "bob", "example.org", "maildir")


def msg(n: object) -> bytes:
    return f"From: a@example.org\r\nSubject: message {n}\r\n\r\nbody {n}\r\n".encode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MailStore]:
    s = MailStore(tmp_path / "mail")
    yield s
    s.close()


def fill(mb: UserMailbox) -> None:
    """INBOX with a gap (UIDs 1, 3, 5, 6), keywords and dates; Work with two copies."""
    for n in range(5):
        mb.append("INBOX", msg(n), ["\\Seen", "$Work"] if n == 1 else ["\\Flagged"] if n == 3 else [],
                  1_600_000_000 + n)
    mb.append("INBOX", msg(1), ["NonJunk"])  # the same bytes again (UID 6)
    mb.store("INBOX", [2, 4], "+FLAGS", ["\\Deleted"])
    mb.expunge("INBOX")
    mb.create("Work")
    mb.copy("INBOX", [1, 3], "Work")


def state_of(mb: UserMailbox, name: str) -> tuple[Any, ...]:
    snap = mb.snapshot(name)
    rows = mb.rows(name, list(snap.uids))
    return (snap.uidvalidity, snap.uidnext, [(u, sorted(rows[u].flag_names), mb.internal_date(name, rows[u]), rows[u].size,
                                                mb.read(name, rows[u])) for u in snap.uids])


def do_import(mb: UserMailbox, src: Path, state_path: Path) -> int:
    state = ImportState(state_path)
    try:
        return import_maildir(mb, src, state).copied
    finally:
        state.close()


def test_export_then_import_is_uid_exact_and_survives_losing_the_index(store: MailStore, tmp_path: Path) -> None:
    a = store.acquire(ALICE)
    fill(a)
    want = {name: state_of(a, name) for name in ("INBOX", "Work")}
    assert [x[0] for x in want["INBOX"][2]] == [1, 3, 5, 6]
    export_maildir(a, tmp_path / "out")
    store.release(a)
    b = store.acquire(BOB)
    b.ensure_defaults()
    assert do_import(b, tmp_path / "out", tmp_path / "state.sqlite") == 6
    for name in ("INBOX", "Work"):
        assert state_of(b, name) == want[name], name
    # the journal holds what the index holds (UIDVALIDITY, UIDNEXT, every UID)
    journal = read_journal(b.path_of("INBOX"))
    assert journal is not None and (journal.uidvalidity, journal.uidnext) == want["INBOX"][:2]
    assert sorted(journal.uids.values()) == [1, 3, 5, 6]
    assert do_import(b, tmp_path / "out", tmp_path / "state.sqlite") == 0  # a second run copies nothing
    store.release(b)
    store.close()
    (BOB.home(tmp_path / "mail") / INDEX_NAME).unlink()  # the index lost: rebuilt from the journals
    again = MailStore(tmp_path / "mail")
    try:
        b = again.acquire(BOB)
        for name in ("INBOX", "Work"):
            assert state_of(b, name) == want[name], name
        assert b.append("INBOX", msg("new"))[1] == 7
        again.release(b)
    finally:
        again.close()


def test_into_a_folder_that_held_mail_appends_with_new_uids(store: MailStore, tmp_path: Path) -> None:
    a = store.acquire(ALICE)
    fill(a)
    uv = a.snapshot("INBOX").uidvalidity
    export_maildir(a, tmp_path / "out")
    store.release(a)
    b = store.acquire(BOB)
    b.ensure_defaults()
    b.append("INBOX", msg("x"))
    b.delete_uids("INBOX", [1])  # empty again, but it held a message: UIDNEXT 2
    deliver_maildir(b.path_of("Work"), b"", msg("y"))  # Work: a file not indexed yet
    assert do_import(b, tmp_path / "out", tmp_path / "state.sqlite") == 6
    snap = b.snapshot("INBOX")
    assert list(snap.uids) == [2, 3, 4, 5] and snap.uidvalidity != uv
    assert len(b.snapshot("Work").uids) == 3
    store.release(b)


def test_concurrent_delivery_and_appends_get_uids_above_the_imported(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The import holds the user lock from its check that the folder is unused to the index commit:
    a delivery that lands meanwhile (deliveries take no lock), an APPEND of another session of this
    process (the same `UserMailbox`) and one of another worker process (its own `UserMailbox` over
    the same index: the lock file between them) are indexed after it, above the imported UIDs."""
    store = MailStore(tmp_path / "mail", shared=True)  # as with `[server] workers` > 1
    a = store.acquire(ALICE)
    fill(a)
    want = state_of(a, "INBOX")
    export_maildir(a, tmp_path / "out")
    store.release(a)
    b = store.acquire(BOB)
    b.ensure_defaults()
    other = UserMailbox(BOB, b.root, b.index_path, shared=True)  # another worker process's view
    results: dict[str, Any] = {}
    waiting: list[threading.Thread] = []
    real = index_mod.UserIndex.import_messages

    def during(self: Any, row: Any, path: Path, *args: Any) -> int:
        if row.name == "INBOX" and not waiting:
            deliver_maildir(path, b"", msg("delivered"))  # lands in new/ while the import runs
            for key, fn in (("session", lambda: b.append("INBOX", msg("session"))),
                            ("process", lambda: other.append("INBOX", msg("process")))):
                t = threading.Thread(target=lambda k=key, f=fn: results.__setitem__(k, f()))
                t.start()
                waiting.append(t)
            for t in waiting:
                t.join(0.5)
                assert t.is_alive()  # waiting for the import's lock (never done before it is released)
        return int(real(self, row, path, *args))

    monkeypatch.setattr(index_mod.UserIndex, "import_messages", during)
    try:
        assert do_import(b, tmp_path / "out", tmp_path / "state.sqlite") == 6
        for t in waiting:
            t.join(30)
        assert len(waiting) == 2 and not any(t.is_alive() for t in waiting)
        snap = b.snapshot("INBOX")
        assert snap.uidvalidity == want[0]
        assert list(snap.uids) == [1, 3, 5, 6, 7, 8, 9]
        assert {results["session"][1], results["process"][1]} <= {7, 8, 9}
        assert results["session"][0] == results["process"][0] == want[0]
        rows = b.rows("INBOX", list(snap.uids))
        assert {b.read("INBOX", rows[u]) for u in (7, 8, 9)} == {msg("delivered"), msg("session"), msg("process")}
        assert state_of(b, "INBOX")[2][:4] == want[2]
    finally:
        other.close()
        store.release(b)
        store.close()


def test_uidlist_of_an_export_is_read_back(store: MailStore, tmp_path: Path) -> None:
    a = store.acquire(ALICE)
    fill(a)
    export_maildir(a, tmp_path / "out")
    snap = a.snapshot("Work")
    store.release(a)
    listed = read_uidlist(tmp_path / "out" / folder_dir_name("Work"))
    assert listed is not None and listed[:2] == (snap.uidvalidity, snap.uidnext)
    assert sorted(listed[2].values()) == list(snap.uids)
