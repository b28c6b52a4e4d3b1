"""Learning from the user: messages moved into or out of Junk train Rspamd's classifier, later.

IMAP and the webmail record a training request (`enqueue`, then `LearnQueue.add`) when a user moves
a message into the Junk folder or flags it `$Junk` (spam), or moves it out of Junk or flags it
`$NotJunk` (ham); `verdict` says which moves count. The user's reply never waits for Rspamd. A background task (`LearnQueue.run`) sends each request to
Rspamd's controller (`/learnspam`, `/learnham`) and retries with backoff while Rspamd is down.

Requests are durable (SQLite, the message bytes copied: the user may expunge the message before
it is learnt), so the user's choices survive a restart, and bounded: past `max_pending` the oldest
requests are dropped with a log line, and messages over `max_size` are truncated (Rspamd's
classifier reads the first part of a message only). Only the owner of a mailbox can train from it:
requests come from that user's own IMAP or webmail session.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from ..durable import use_wal
from ..store.api import Mailboxes

log = logging.getLogger("postier.antispam")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    spam INTEGER NOT NULL,
    message BLOB NOT NULL,
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next REAL NOT NULL,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS requests_next ON requests(next);
"""

LEARN_BATCH = 100  # messages trained per user action at most
JUNK = "Junk"  # the folder whose moves in and out are a verdict (the special-use Junk folder)


def verdict(src: str, dest: str, junk: str | None) -> bool | None:
    """What moving a message from `src` to `dest` says: True spam (into Junk), False ham (out of Junk,
    except into Trash), None nothing (no learning, or a move that does not cross Junk)."""
    if junk is None or (dest == junk) == (src == junk) or dest == "Trash":
        return None
    return dest == junk


async def enqueue(learning: LearnQueue, call: Callable[..., Awaitable[Any]], mb: Mailboxes, user: str,
                  folder: str, uids: Sequence[int], spam: bool) -> None:
    """One training request per message (at most LEARN_BATCH) of `folder`, read through the user's
    own store (`call` runs a store function on its worker), then the worker woken: the one way IMAP
    and the webmail feed the queue."""
    rows = await call(mb.rows, folder, list(uids[:LEARN_BATCH]))
    for row in rows.values():
        data = await call(mb.read, folder, row)
        await asyncio.to_thread(learning.add, user, data, spam)
    learning.wake()


#: (message, spam) -> (done, reason): `RspamdClient.learn`.
Learner = Callable[[bytes, bool], Awaitable[tuple[bool, str]]]


class LearnQueue:
    def __init__(self, path: Path, max_pending: int = 10_000, max_size: int = 1024 * 1024,
                 backoff: tuple[float, ...] = (30.0, 120.0, 600.0, 3600.0), max_attempts: int = 48,
                 clock: Callable[[], float] = time.time):
        self.max_pending = max_pending
        self.max_size = max_size
        self.backoff = backoff
        self.max_attempts = max_attempts
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        use_wal(self._db)
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._wake = asyncio.Event()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, user: str, message: bytes, spam: bool) -> None:
        """Record one training request (blocking: SQLite)."""
        with self._lock:
            self._db.execute("INSERT INTO requests(user, spam, message, created, next) VALUES (?,?,?,?,?)",
                             (user, int(spam), message[: self.max_size], self.clock(), 0.0))
            (n,) = self._db.execute("SELECT count(*) FROM requests").fetchone()
            if n > self.max_pending:
                dropped = self._db.execute(
                    "DELETE FROM requests WHERE id IN (SELECT id FROM requests ORDER BY id LIMIT ?)",
                    (n - self.max_pending,)).rowcount
                log.warning("learning queue full: %d oldest request(s) dropped", dropped)

    def wake(self) -> None:
        """Called from the event loop after `add` (run in a thread) so the worker goes at once."""
        self._wake.set()

    def pending(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT count(*) FROM requests").fetchone()
            return int(n)

    def _due(self, limit: int = 20) -> list[tuple[int, str, bool, bytes, int]]:
        with self._lock:
            rows = self._db.execute("SELECT id, user, spam, message, attempts FROM requests WHERE next <= ? "
                                    "ORDER BY id LIMIT ?", (self.clock(), limit)).fetchall()
        return [(r[0], r[1], bool(r[2]), r[3], r[4]) for r in rows]

    def _done(self, rid: int) -> None:
        with self._lock:
            self._db.execute("DELETE FROM requests WHERE id=?", (rid,))

    def _retry(self, rid: int, attempts: int, error: str) -> None:
        with self._lock:
            if attempts + 1 >= self.max_attempts:
                self._db.execute("DELETE FROM requests WHERE id=?", (rid,))
                log.warning("learning request %d given up after %d attempts: %s", rid, attempts + 1, error)
                return
            delay = self.backoff[min(attempts, len(self.backoff) - 1)]
            self._db.execute("UPDATE requests SET attempts=attempts+1, next=?, last_error=? WHERE id=?",
                             (self.clock() + delay, error[:300], rid))

    async def run_once(self, learn: Learner) -> int:
        """Send every due request; the number learnt."""
        learnt = 0
        for rid, user, spam, message, attempts in await asyncio.to_thread(self._due):
            ok, why = await learn(message, spam)
            if ok:
                await asyncio.to_thread(self._done, rid)
                learnt += 1
                log.info("learnt a message of %s as %s (%s)", user, "spam" if spam else "ham", why)
            else:
                await asyncio.to_thread(self._retry, rid, attempts, why)
                log.info("learning deferred for %s: %s", user, why)
                break  # Rspamd is likely down: back off as a whole
        return learnt

    async def run(self, learn: Learner, idle: float = 30.0) -> None:
        """The background worker: forever, until cancelled."""
        while True:
            try:
                await self.run_once(learn)
            except Exception:  # the worker must survive anything one request does
                log.exception("learning worker")
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), idle)
            except TimeoutError:
                pass
