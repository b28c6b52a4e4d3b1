"""Per-user Sieve script store: names, quotas, active script, durability and two sessions at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from postier.store.sieve import ScriptError, ScriptStore, TrackingStore, valid_script_name
from tests.concurrency import together


def test_put_get_list_activate(tmp_path: Path) -> None:
    s = ScriptStore(tmp_path / "sieve")
    assert s.list() == [] and s.active() is None
    s.put("main", b"keep;")
    s.put("other", b"discard;")
    s.set_active("main")
    assert s.list() == [("main", True), ("other", False)]
    assert s.get("main") == b"keep;"
    assert s.active_script() == ("main", b"keep;")
    s.put("main", b"stop;")  # replace
    assert s.get("main") == b"stop;"
    s.set_active("")
    assert s.active() is None
    assert not list((tmp_path / "sieve").glob(".tmp.*"))


def test_delete_active_refused_and_rename_keeps_active(tmp_path: Path) -> None:
    s = ScriptStore(tmp_path / "sieve")
    s.put("a", b"keep;")
    s.set_active("a")
    with pytest.raises(ScriptError) as e:
        s.delete("a")
    assert e.value.code == "ACTIVE"
    s.rename("a", "b")
    assert s.list() == [("b", True)]
    s.put("c", b"keep;")
    with pytest.raises(ScriptError) as e:
        s.rename("c", "b")
    assert e.value.code == "ALREADYEXISTS"
    with pytest.raises(ScriptError) as e:
        s.delete("zz")
    assert e.value.code == "NONEXISTENT"
    s.delete("c")
    assert s.list() == [("b", True)]


def test_quotas(tmp_path: Path) -> None:
    s = ScriptStore(tmp_path / "sieve", max_scripts=2, max_script_size=10)
    s.put("a", b"keep;")
    s.put("b", b"keep;")
    with pytest.raises(ScriptError) as e:
        s.put("c", b"keep;")
    assert e.value.code == "QUOTA/MAXSCRIPTS"
    with pytest.raises(ScriptError) as e:
        s.put("a", b"x" * 11)
    assert e.value.code == "QUOTA/MAXSIZE"
    s.put("a", b"discard;")  # replacing does not count as a new script


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "../x", "a\x00b", "a\nb", "x" * 129, "a\\b"])
def test_bad_names_refused(tmp_path: Path, name: str) -> None:
    assert not valid_script_name(name)
    with pytest.raises(ScriptError):
        ScriptStore(tmp_path / "sieve").put(name, b"keep;")


def test_check_refuses_before_writing(tmp_path: Path) -> None:
    s = ScriptStore(tmp_path / "sieve")

    def check(data: bytes) -> None:
        raise ScriptError("line 1: bad", "")

    with pytest.raises(ScriptError):
        s.put("a", b"frop;", check)
    assert s.list() == []


def test_two_sessions_concurrently(tmp_path: Path) -> None:
    """Two sessions renaming, activating and writing at once never leave a dangling active name."""
    root = tmp_path / "sieve"
    ScriptStore(root).put("s0", b"keep;")
    ScriptStore(root).set_active("s0")

    def worker(k: int) -> None:
        st = ScriptStore(root)
        for i in range(30):
            st.put(f"w{k}-{i}", b"keep;")
            st.set_active(f"w{k}-{i}")
            if i:
                try:
                    st.delete(f"w{k}-{i - 1}")
                except ScriptError as e:
                    assert e.code == "ACTIVE"

    together(lambda: worker(0), lambda: worker(1), timeout=60)
    st = ScriptStore(root)
    active = st.active()
    assert active is not None and st.get(active) == b"keep;"
    assert sum(a for _, a in st.list()) == 1


def test_tracking_store_vacation_and_duplicates(tmp_path: Path) -> None:
    import time

    from postier.sieve import Message
    from postier.sieve.vacation import decide, record

    t = TrackingStore(tmp_path / "sieve")
    params: dict[str, object] = {"reason": "away", "seconds": 3600, "handle": None}
    msg = Message(b"From: a@example.org\r\nTo: bob@example.com\r\n\r\nx\r\n")
    now = time.time()
    d = decide(params, msg, "a@example.org", "bob@example.com", [], t, now)
    assert d.reply
    record(params, d, t, now)
    assert not decide(params, msg, "a@example.org", "bob@example.com", [], t, now + 60).reply
    assert decide(params, msg, "a@example.org", "bob@example.com", [], t, now + 7200).reply
    t.close()
    again = TrackingStore(tmp_path / "sieve")  # durable across instances
    assert again.seen(d.key, now + 60)
    again.close()


def test_tracking_store_two_writers(tmp_path: Path) -> None:
    import time

    root = tmp_path / "sieve"
    TrackingStore(root).close()
    until = time.time() + 3600

    def worker(k: int) -> None:
        t = TrackingStore(root)
        try:
            for i in range(50):
                t.record(f"k{i % 10}", until + k)
                assert t.seen(f"k{i % 10}", time.time())
        finally:
            t.close()

    together(lambda: worker(0), lambda: worker(1), timeout=60)
    t = TrackingStore(root, max_rows=5)
    t.record("new", until)
    assert t.seen("new", time.time())
    assert t._db.execute("SELECT count(*) FROM seen").fetchone()[0] == 5
    t.close()
