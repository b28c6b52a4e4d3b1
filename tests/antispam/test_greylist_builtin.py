"""Greylisting (injectable clock), the built-in checks and the verdict log."""

from __future__ import annotations

from pathlib import Path

import pytest

from postier.antispam.builtin import GTUBE, RateLimiter, contains_gtube, helo_problem
from postier.antispam.greylist import Decision, Greylist, client_network, normalize_sender
from postier.antispam.verdicts import VerdictLog
from tests.concurrency import together


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def grey(tmp_path: Path) -> tuple[Greylist, Clock]:
    clock = Clock()
    return Greylist(tmp_path / "greylist.sqlite", delay=300, retry_window=3600, auto_allow=2, clock=clock), clock


def test_first_sight_then_retry_after_delay(grey: tuple[Greylist, Clock]) -> None:
    g, clock = grey
    r = g.check("192.0.2.10", "a@x.test", "u@b.test")
    assert r.decision is Decision.GREYLISTED and r.wait == 300
    clock.t += 60
    assert g.check("192.0.2.11", "a@x.test", "u@b.test").decision is Decision.GREYLISTED  # same /24, too early
    clock.t += 300
    assert g.check("192.0.2.12", "A@X.test", "u@b.test").decision is Decision.PASSED
    clock.t += 10
    assert g.check("192.0.2.10", "a@x.test", "u@b.test").decision is Decision.PASSED  # known triplet


def test_retry_too_late_starts_over(grey: tuple[Greylist, Clock]) -> None:
    g, clock = grey
    g.check("198.51.100.1", "a@x.test", "u@b.test")
    clock.t += 7200
    assert g.check("198.51.100.1", "a@x.test", "u@b.test").decision is Decision.GREYLISTED


def test_auto_allowlist_after_n_passes(grey: tuple[Greylist, Clock]) -> None:
    g, clock = grey
    for rcpt in ("u1@b.test", "u2@b.test"):
        g.check("203.0.113.5", "a@x.test", rcpt)
        clock.t += 400
        assert g.check("203.0.113.5", "a@x.test", rcpt).ok
    # A new recipient from the allowlisted network passes at once.
    assert g.check("203.0.113.77", "other@y.test", "u3@b.test").decision is Decision.ALLOWED


def test_batv_and_ipv6_normalisation() -> None:
    assert normalize_sender("prvs=1234abcd=Bob@X.test") == "bob@x.test"
    assert client_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_network("::ffff:192.0.2.7") == "192.0.2.0/24"


def test_expiry_and_bound(tmp_path: Path) -> None:
    clock = Clock()
    g = Greylist(tmp_path / "g.sqlite", retry_window=100, max_entries=10, clock=clock)
    for i in range(30):
        g.check(f"192.0.{i}.1", f"s{i}@x.test", "u@b.test")
    assert g.expire() >= 20 and g.count() == 10
    clock.t += 1000
    g.expire()
    assert g.count() == 0


def test_two_threads_at_once(grey: tuple[Greylist, Clock]) -> None:
    g, clock = grey

    def worker(n: int) -> None:
        for i in range(100):
            g.check(f"10.{n}.{i}.1", "a@x.test", f"u{i}@b.test")

    together(lambda: worker(0), lambda: worker(1))
    assert g.count() == 200


def test_gtube_found_across_chunks() -> None:
    msg = b"Subject: x\r\n\r\nhello " + GTUBE + b" bye\r\n"
    assert contains_gtube([msg])
    assert contains_gtube([msg[:30], msg[30:50], msg[50:]])
    assert not contains_gtube([b"clean message"])


def test_helo_sanity() -> None:
    ours = ["mail.b.test"]
    addrs = ["192.0.2.1"]
    assert helo_problem("mail.example.org", ours, addrs) is None
    assert helo_problem("[198.51.100.1]", ours, addrs) is None
    assert "fully qualified" in (helo_problem("localhost", ours, addrs) or "")
    assert "our own name" in (helo_problem("MAIL.B.TEST", ours, addrs) or "")
    assert "our own address" in (helo_problem("[192.0.2.1]", ours, addrs) or "")
    assert "brackets" in (helo_problem("192.0.2.9", ours, addrs) or "")
    assert "malformed" in (helo_problem("[nope]", ours, addrs) or "")


def test_rate_limiter() -> None:
    clock = Clock()
    rl = RateLimiter(3, window=60, max_keys=2, clock=clock)
    assert [rl.hit("a") for _ in range(4)] == [True, True, True, False]
    clock.t += 61
    assert rl.hit("a")
    rl.hit("b")
    rl.hit("c")  # evicts the oldest key
    assert rl.count("a") == 0


def test_verdict_log_find(tmp_path: Path) -> None:
    log = VerdictLog(tmp_path / "v.sqlite")
    log.record("Q123", "<abc@x.test>", "192.0.2.1", "s@x.test", ["u@b.test"], "junk",
               ["spf=pass", "rspamd: junk (add header), score 7/15"])
    (v,) = log.find("<abc@x.test>")
    assert v.queue_id == "Q123" and log.find("Q123")[0].action == "junk"
    assert "rspamd: junk" in v.render() and "Q123" in v.render()
    assert log.find("nothing") == []


def test_verdict_log_batches_from_two_threads_and_stays_bounded(tmp_path: Path) -> None:
    """Lines queued by two sessions at once are all written (in batches), and the row bound holds."""
    log = VerdictLog(tmp_path / "v.sqlite", max_rows=1500)

    def burst(tag: str) -> None:
        for i in range(1200):
            log.record_later(f"{tag}{i}", "", "192.0.2.1", "s@x.test", ["u@b.test"], "delivered", [])

    together(lambda: burst("a"), lambda: burst("b"))
    log.flush()
    assert log.find("a1199") and log.find("b1199")
    (n,) = log._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()
    assert 1500 <= n < 1500 + 1000 + 256  # pruned to the newest max_rows each thousand lines
    log.close()


def test_helo_check_runs_when_spf_already_looked_at_helo() -> None:
    """The HELO sanity check is not skipped because mail authentication checked HELO's SPF first."""
    import asyncio

    from postier.antispam.check import SpamCheck
    from postier.config import Antispam
    from postier.message.types import Envelope
    from postier.proto.smtp.address import parse_path
    from postier.resolver.fake import FakeResolver

    check = SpamCheck(Antispam(helo_checks="reject"), "mail.b.test", ["192.0.2.1"], FakeResolver(),
                      resolve_helo=False)
    env = Envelope(role="smtp", peer_ip="198.51.100.9", helo="localhost")
    env.auth["helo"] = "spf result for the HELO identity"  # what InboundAuth leaves at MAIL FROM
    reply = asyncio.run(check.check_mail(env, parse_path("<s@remote.test>")[0]))
    assert reply is not None and reply.code == 550 and "fully qualified" in reply.text
