"""web.sessions without a server: ids, CSRF tokens, expiry and bounds, log out everywhere."""

from __future__ import annotations

from postier.web.sessions import SessionTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_ids_are_random_and_only_their_hash_is_kept() -> None:
    t = SessionTable()
    sid1, s1 = t.create("a@x.test")
    sid2, s2 = t.create("a@x.test")
    assert sid1 != sid2 and s1.csrf != s2.csrf and len(sid1) >= 43
    assert t.get(sid1) is s1 and t.get(sid2) is s2
    assert sid1 not in repr(t.__dict__)
    assert t.get(None) is None and t.get("") is None and t.get("x" * 1000) is None and t.get(sid1 + "x") is None


def test_csrf_check() -> None:
    _sid, s = SessionTable().create("a@x.test")
    assert s.csrf_ok(s.csrf)
    assert not s.csrf_ok(None) and not s.csrf_ok("") and not s.csrf_ok(s.csrf[:-1])


def test_idle_and_absolute_expiry() -> None:
    clock = Clock()
    t = SessionTable(idle=60, absolute=300, clock=clock)
    sid, _s = t.create("a@x.test")
    for _ in range(5):
        clock.now += 59
        assert t.get(sid) is not None  # activity keeps it alive (5 * 59 = 295 s)...
    clock.now += 59
    assert t.get(sid) is None  # ...but not past the absolute limit
    sid, _s = t.create("a@x.test")
    clock.now += 61
    assert t.get(sid) is None  # idle too long
    assert len(t) == 0


def test_bounded_per_user_and_overall() -> None:
    t = SessionTable(per_user=3, total=5)
    a = [t.create("a@x.test")[0] for _ in range(5)]
    assert [t.get(s) is not None for s in a] == [False, False, True, True, True]
    b = [t.create(f"b{i}@x.test")[0] for i in range(4)]
    assert len(t) == 5
    assert t.get(b[-1]) is not None


def test_log_out_everywhere() -> None:
    t = SessionTable()
    mine = [t.create("a@x.test")[0] for _ in range(3)]
    other, _ = t.create("b@x.test")
    assert t.drop_user("a@x.test") == 3
    assert all(t.get(s) is None for s in mine)
    assert t.get(other) is not None
    t.drop(other)
    assert t.get(other) is None
