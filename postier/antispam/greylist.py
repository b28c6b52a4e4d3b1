"""Greylisting: a temporary refusal on first sight of a (client network, sender, recipient) triplet.

Real MTAs retry (RFC 5321 §4.5.4.1); much bulk spam does not. The first attempt of a triplet gets
`451 4.7.1`; a retry after `delay` and within `retry_window` passes, and the triplet then passes
at once until it has been unused for `pass_lifetime`. A client network that has passed `auto_allow`
times is allowlisted as a whole (as postgrey's auto-whitelisting does), so a regular correspondent
is delayed once, not per new recipient.

The client is its /24 (IPv4) or /64 (IPv6): large senders retry from another address of the same
pool. Senders are compared without BATV tags (`prvs=TAG=user@domain`) and case-insensitively, so a
per-attempt tag does not make every retry a new triplet.

State is one SQLite database (WAL, synchronous=NORMAL: losing the last greylist entries in a power
cut only delays mail again, it never loses any). The table is bounded: past `max_entries`, the
oldest unpassed triplets go first. Every method blocks on the disk; callers run it in a thread.
Time comes from an injectable clock so tests need not wait five minutes.
"""

from __future__ import annotations

from ..durable import use_wal

import ipaddress
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS triplets (
    net TEXT NOT NULL, sender TEXT NOT NULL, rcpt TEXT NOT NULL,
    first REAL NOT NULL, last REAL NOT NULL, passed INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (net, sender, rcpt)
);
CREATE INDEX IF NOT EXISTS triplets_last ON triplets(passed, last);
CREATE TABLE IF NOT EXISTS clients (
    net TEXT PRIMARY KEY, passes INTEGER NOT NULL, last REAL NOT NULL
);
"""
_BATV = re.compile(r"^prvs=[0-9a-z]+=", re.IGNORECASE)


class Decision(StrEnum):
    GREYLISTED = "greylisted"  # first sight, or retried too early: 451
    PASSED = "passed"          # retried within the window, or a known triplet
    ALLOWED = "allowed"        # the client network is auto-allowlisted


@dataclass(frozen=True)
class Result:
    decision: Decision
    #: Seconds until a retry can pass (GREYLISTED only).
    wait: float = 0.0

    @property
    def ok(self) -> bool:
        return self.decision is not Decision.GREYLISTED

    def explain(self) -> str:
        if self.decision is Decision.GREYLISTED:
            return f"greylisted: first attempt, retry after {self.wait:.0f} s"
        if self.decision is Decision.ALLOWED:
            return "greylist: client network auto-allowlisted"
        return "greylist: retried, passed"


def client_network(ip: str) -> str:
    """The /24 of an IPv4 address, the /64 of an IPv6 address."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    prefix = 24 if isinstance(addr, ipaddress.IPv4Address) else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def normalize_sender(sender: str) -> str:
    """Lower case, without a BATV tag; the null sender stays empty."""
    return _BATV.sub("", sender.strip().lower())


class Greylist:
    def __init__(self, path: Path, delay: float = 300.0, retry_window: float = 2 * 86400.0,
                 pass_lifetime: float = 36 * 86400.0, auto_allow: int = 5, max_entries: int = 200_000,
                 clock: Callable[[], float] = time.time):
        self.path = path
        self.delay = delay
        self.retry_window = retry_window
        self.pass_lifetime = pass_lifetime
        self.auto_allow = auto_allow
        self.max_entries = max_entries
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        use_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._checks = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def check(self, ip: str, sender: str, rcpt: str) -> Result:
        """Record this attempt and decide; blocking."""
        net = client_network(ip)
        snd = normalize_sender(sender)
        rc = rcpt.strip().lower()
        now = self.clock()
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT passes, last FROM clients WHERE net=?", (net,)).fetchone()
                if row is not None and row[0] >= self.auto_allow and now - row[1] < self.pass_lifetime:
                    db.execute("UPDATE clients SET last=? WHERE net=?", (now, net))
                    res = Result(Decision.ALLOWED)
                else:
                    res = self._triplet(db, net, snd, rc, now)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            self._checks += 1
            if self._checks % 1000 == 0:
                self._expire(now)
        return res

    def _triplet(self, db: sqlite3.Connection, net: str, snd: str, rc: str, now: float) -> Result:
        row = db.execute("SELECT first, last, passed FROM triplets WHERE net=? AND sender=? AND rcpt=?",
                         (net, snd, rc)).fetchone()
        if row is not None:
            first, last, passed = row
            if passed and now - last < self.pass_lifetime:
                db.execute("UPDATE triplets SET last=? WHERE net=? AND sender=? AND rcpt=?", (now, net, snd, rc))
                return Result(Decision.PASSED)
            if not passed and self.delay <= now - first <= self.retry_window:
                db.execute("UPDATE triplets SET last=?, passed=1 WHERE net=? AND sender=? AND rcpt=?",
                           (now, net, snd, rc))
                db.execute("INSERT INTO clients(net, passes, last) VALUES (?, 1, ?) "
                           "ON CONFLICT(net) DO UPDATE SET passes=passes+1, last=excluded.last", (net, now))
                return Result(Decision.PASSED)
            if not passed and now - first < self.delay:
                db.execute("UPDATE triplets SET last=? WHERE net=? AND sender=? AND rcpt=?", (now, net, snd, rc))
                return Result(Decision.GREYLISTED, self.delay - (now - first))
        # New, expired, or retried too late: start over.
        db.execute("INSERT OR REPLACE INTO triplets(net, sender, rcpt, first, last, passed) VALUES (?,?,?,?,?,0)",
                   (net, snd, rc, now, now))
        return Result(Decision.GREYLISTED, self.delay)

    def expire(self) -> int:
        """Drop stale entries and enforce the size bound; the number of rows removed."""
        with self._lock:
            return self._expire(self.clock())

    def _expire(self, now: float) -> int:
        db = self._db
        n = db.execute("DELETE FROM triplets WHERE (passed=0 AND last < ?) OR (passed=1 AND last < ?)",
                       (now - self.retry_window, now - self.pass_lifetime)).rowcount
        n += db.execute("DELETE FROM clients WHERE last < ?", (now - self.pass_lifetime,)).rowcount
        (count,) = db.execute("SELECT count(*) FROM triplets").fetchone()
        if count > self.max_entries:
            n += db.execute(
                "DELETE FROM triplets WHERE rowid IN (SELECT rowid FROM triplets ORDER BY passed, last LIMIT ?)",
                (count - self.max_entries,)).rowcount
        return n

    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM triplets").fetchone()
            return int(n)
