"""Quota counting in the index (store/quota.py): exact usage through APPEND, COPY, MOVE, EXPUNGE,
deliveries, files added or removed by other programs and reindex; nothing stored over the quota."""

from __future__ import annotations

import os
import threading
from functools import partial
from pathlib import Path

import pytest

from postier.message.types import User
from postier.store.errors import OverQuota
from postier.store.maildir import deliver_to_user
from postier.store.mailbox import MailStore
from postier.store.quota import OVER_QUOTA, format_size, parse_size
from tests.concurrency import together

MSG = b"Subject: q\r\n\r\n" + b"x" * 986 + b"\r\n"  # 1,002 octets


def disk_bytes(maildir: Path) -> int:
    """Bytes of every message file of every folder (what GETQUOTA must report)."""
    total = 0
    for d in [maildir, *[p for p in maildir.iterdir() if p.name.startswith(".") and p.is_dir()]]:
        for sub in ("cur", "new"):
            total += sum(f.stat().st_size for f in (d / sub).iterdir())
    return total


@pytest.fixture
def store(tmp_path: Path) -> MailStore:
    s = MailStore(tmp_path / "mail", workers=2)
    yield s
    s.close()


def user(quota: int | None) -> User:
    return User("u@example.org", "u", "example.org", "maildir", quota)


def test_parse_and_format_sizes() -> None:
    assert parse_size("500M") == 500 << 20
    assert parse_size("1G") == 1 << 30
    assert parse_size("2048k") == 2 << 20
    assert parse_size("1234") == 1234
    assert parse_size("none") is None
    with pytest.raises(ValueError):
        parse_size("lots")
    assert format_size(500 << 20) == "500M"
    assert format_size(1536) == "1.5K"


def test_usage_follows_every_change(store: MailStore, tmp_path: Path) -> None:
    u = user(None)
    mb = store.acquire(u)
    try:
        mb.ensure_defaults()
        for _ in range(3):
            mb.append("INBOX", MSG)
        assert mb.quota_usage().bytes == 3 * len(MSG) == disk_bytes(mb.root)
        mb.copy("INBOX", [1, 2], "Archive")
        assert mb.quota_usage().messages == 5
        mb.move("Archive", [1], "Trash")
        mb.store("INBOX", [1], "+FLAGS", ["\\Deleted"])
        assert mb.status("INBOX").deleted_size == len(MSG)
        mb.expunge("INBOX")
        got = mb.quota_usage()
        assert (got.bytes, got.messages) == (4 * len(MSG), 4) == (disk_bytes(mb.root), 4)
        # another program: a delivery the index has not seen, a file removed from cur/
        ok, _name = deliver_to_user(store.mail_root, u, b"", MSG, "s@example.net")
        assert ok
        victim = next((mb.root / ".Trash" / "cur").iterdir(), None) or next((mb.root / ".Trash" / "new").iterdir())
        victim.unlink()
        assert mb.quota_usage().bytes == 4 * len(MSG) == disk_bytes(mb.root)
    finally:
        store.release(mb)
    # reindex rebuilds the rows and the usage with them
    store.reindex(u)
    mb = store.acquire(u)
    try:
        assert mb.quota_usage().bytes == disk_bytes(mb.root)
    finally:
        store.release(mb)


def test_append_and_copy_over_quota_store_nothing(store: MailStore) -> None:
    u = user(3 * len(MSG))
    mb = store.acquire(u)
    try:
        mb.ensure_defaults()
        mb.append("INBOX", MSG)
        mb.append("INBOX", MSG)
        with pytest.raises(OverQuota):
            mb.copy("INBOX", [1, 2], "Archive")
        mb.append("INBOX", MSG)
        before = disk_bytes(mb.root)
        with pytest.raises(OverQuota):
            mb.append("INBOX", b"Subject: x\r\n\r\ny\r\n")
        assert disk_bytes(mb.root) == before
        assert not list((mb.root / "tmp").iterdir())
        assert mb.status("Archive").messages == 0
        mb.move("INBOX", [1], "Archive")  # moving within the user's folders needs no room
        assert mb.quota_usage().bytes == 3 * len(MSG)
    finally:
        store.release(mb)


def test_delivery_over_quota_stores_nothing(store: MailStore) -> None:
    u = user(2 * len(MSG) + 10)
    assert deliver_to_user(store.mail_root, u, b"", MSG, "s@x")[0]
    assert deliver_to_user(store.mail_root, u, b"", MSG, "s@x")[0]  # not indexed yet: reserved
    assert deliver_to_user(store.mail_root, u, b"", MSG, "s@x") == (False, OVER_QUOTA)
    md = u.maildir(store.mail_root)
    assert len(os.listdir(md / "new")) == 2 and not os.listdir(md / "tmp")
    mb = store.acquire(u)
    try:
        got = mb.quota_usage()  # the rescan indexes both: the reservations become rows
        assert (got.bytes, got.messages) == (2 * len(MSG), 2)
        assert mb.index.conn.execute("SELECT COUNT(*) FROM quota_pending").fetchone()[0] == 0
    finally:
        store.release(mb)


def test_concurrent_writers_never_exceed_the_quota(tmp_path: Path) -> None:
    """Two sessions' APPENDs (two threads on the server's store) and deliveries (their own index
    connections, as in the delivery agent), all at once near the limit."""
    limit = 10 * len(MSG)
    u = user(limit)
    one = MailStore(tmp_path / "mail", workers=2)
    stores = [one, one]
    results: list[bool] = []
    lock = threading.Lock()

    def appender(s: MailStore) -> None:
        mb = s.acquire(u)
        try:
            for _ in range(8):
                try:
                    mb.append("INBOX", MSG)
                    ok = True
                except OverQuota:
                    ok = False
                with lock:
                    results.append(ok)
        finally:
            s.release(mb)

    def deliverer() -> None:
        for _ in range(8):
            ok = deliver_to_user(tmp_path / "mail", u, b"", MSG, "s@x")[0]
            with lock:
                results.append(ok)

    together(*(partial(appender, s) for s in stores), deliverer, timeout=60)
    assert sum(results) == 10 and len(results) == 24
    mb = stores[0].acquire(u)
    try:
        assert mb.quota_usage().bytes == limit == disk_bytes(mb.root)
    finally:
        stores[0].release(mb)
    one.close()


def test_warning_levels_once_per_crossing(store: MailStore) -> None:
    from postier.store.quota import warning_due

    u = user(10 * len(MSG))
    mb = store.acquire(u)
    try:
        conn = mb.index.conn
        levels = []
        for _ in range(10):
            mb.append("INBOX", MSG)
            levels.append(warning_due(conn, 10 * len(MSG), mb.root))
        assert levels == [None] * 7 + [80, None, 95]
        mb.store("INBOX", list(range(1, 10)), "+FLAGS", ["\\Deleted"])
        mb.expunge("INBOX")  # down to 10 %: both levels re-armed
        assert warning_due(conn, 10 * len(MSG), mb.root) is None
        for _ in range(7):
            mb.append("INBOX", MSG)
        assert warning_due(conn, 10 * len(MSG), mb.root) == 80
    finally:
        store.release(mb)


def test_reindex_keeps_usage_and_warning_state(store: MailStore) -> None:
    from postier.store.quota import warning_due

    u = user(10 * len(MSG))
    mb = store.acquire(u)
    try:
        for _ in range(8):
            mb.append("INBOX", MSG)
        assert warning_due(mb.index.conn, 10 * len(MSG), mb.root) == 80
    finally:
        store.release(mb)
    store.reindex(u)
    mb = store.acquire(u)
    try:
        assert mb.quota_usage().bytes == 8 * len(MSG)
        assert warning_due(mb.index.conn, 10 * len(MSG), mb.root) is None  # not warned twice
    finally:
        store.release(mb)


def test_a_large_first_sync_counts_usage_in_bulk(store: MailStore) -> None:
    """From quota.BULK_ROWS new files a sync inserts without the per-row trigger and adds the totals
    once: the usage, the reservations it settles and the trigger afterwards are as row by row."""
    from postier.store import quota

    u = user(10 << 20)
    mb = store.acquire(u)
    try:
        new = mb.root / "new"
        n = quota.BULK_ROWS + 88
        for i in range(n):
            body = MSG + b"y" * (i % 7)
            (new / f"1700000000.M{i}P1Q{i}.host,S={len(body)}").write_bytes(body)
        # a delivery in flight reserved its bytes under its base name; another is still on its way
        quota.reserve(mb.index.conn, u.quota, f"1700000000.M5P1Q5.host,S={len(MSG) + 5}", "", len(MSG) + 5)
        quota.reserve(mb.index.conn, u.quota, "elsewhere", "", 4000)
        snap, _, _ = mb.select("INBOX", True, True)
        assert len(snap.uids) == n
        conn = mb.index.conn
        assert conn.execute("SELECT bytes, messages FROM quota_usage").fetchone() == (disk_bytes(mb.root), n)
        assert [b for (b,) in conn.execute("SELECT base FROM quota_pending")] == ["elsewhere"]
        assert conn.execute("SELECT 1 FROM sqlite_master WHERE name='quota_msgs_insert'").fetchone()
        mb.append("INBOX", MSG)  # the trigger counts again
        assert conn.execute("SELECT bytes, messages FROM quota_usage").fetchone() == (disk_bytes(mb.root), n + 1)
        assert mb.quota_usage().bytes == disk_bytes(mb.root) + 4000  # with the reservation still pending
    finally:
        store.release(mb)


def test_two_processes_syncing_a_large_folder_at_once_count_it_once(tmp_path: Path) -> None:
    """Two workers' views of one user (each its own index connection, as two processes have) select
    a folder of 600 new files at the same moment: one sync indexes them in bulk, the other finds
    them indexed; usage is counted once and the trigger is there afterwards."""
    from postier.store import quota
    from postier.store.mailbox import UserMailbox

    u = user(None)
    root = tmp_path / "u" / "Maildir"
    root.parent.mkdir()
    views = [UserMailbox(u, root, tmp_path / "u" / quota.INDEX_NAME, shared=True) for _ in range(2)]
    n = quota.BULK_ROWS + 88
    for i in range(n):
        (root / "new" / f"1700000000.M{i}P2Q{i}.host,S={len(MSG)}").write_bytes(MSG)
    start = threading.Barrier(2)

    def select(mb: UserMailbox) -> int:
        start.wait()
        return len(mb.select("INBOX", False, True)[0].uids)

    assert together(*(partial(select, v) for v in views)) == [n, n]
    conn = views[0].index.conn
    assert conn.execute("SELECT bytes, messages FROM quota_usage").fetchone() == (n * len(MSG), n)
    assert conn.execute("SELECT COUNT(*) FROM msgs").fetchone() == (n,)
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name='quota_msgs_insert'").fetchone()
    for v in views:
        v.close()


def test_bulk_insert_rolled_back_keeps_its_trigger(tmp_path: Path) -> None:
    import sqlite3

    from postier.store import quota
    from postier.store.index import UserIndex

    idx = UserIndex(tmp_path / "i.sqlite")
    c = idx.conn
    rows = [(1, i, f"b{i}", 0, "", 0, "", 1, 10, None) for i in range(1, quota.BULK_ROWS + 2)]
    rows.append(rows[0])  # a duplicate: the statement fails half way
    sql = "INSERT INTO msgs(folder, uid, base, sub, suffix, flags, keywords, modseq, size, lf) VALUES (?,?,?,?,?,?,?,?,?,?)"
    c.execute("BEGIN IMMEDIATE")
    c.execute("SAVEPOINT s")
    with pytest.raises(sqlite3.IntegrityError):
        quota.bulk_insert(c, sql, rows, [10] * len(rows), [str(r[2]) for r in rows])
    c.execute("ROLLBACK TO s")
    c.execute("RELEASE s")
    c.execute("COMMIT")
    assert c.execute("SELECT COUNT(*) FROM msgs").fetchone() == (0,)
    assert c.execute("SELECT bytes, messages FROM quota_usage").fetchone() == (0, 0)
    assert c.execute("SELECT 1 FROM sqlite_master WHERE name='quota_msgs_insert'").fetchone()
    idx.close()
