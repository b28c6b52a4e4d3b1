"""The inbound decision log: every verdict on one line of plain words, kept for `postier why`.

Each inbound transaction's decisions (screening score and lists, greylist, SPF/DKIM/DMARC, Rspamd
symbols and score, the final action) are recorded with its queue id and Message-ID, so the admin can
answer "why did this message land in Junk / get refused?" with `postier why QUEUE-ID|MESSAGE-ID`.

SQLite (WAL, synchronous=NORMAL: the log is diagnostic; losing its last lines in a power cut loses
no mail), bounded by age (`keep_days`) and row count. Blocking; callers use a thread.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..durable import immediate, use_wal
from ..metrics import Metrics

log = logging.getLogger("postier.antispam")
_BATCH = 256  # lines written in one transaction at most
# After the first line of a batch, the writer waits this long for more before writing: the SMTP
# sessions' puts then wake no thread (one wake-up and one commit per LINGER, not per message).
LINGER = 0.05

_SCHEMA = """
CREATE TABLE IF NOT EXISTS verdicts (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    queue_id TEXT NOT NULL DEFAULT '',
    message_id TEXT NOT NULL DEFAULT '',
    client TEXT NOT NULL DEFAULT '',
    sender TEXT NOT NULL DEFAULT '',
    recipients TEXT NOT NULL DEFAULT '[]',
    action TEXT NOT NULL,
    reasons TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS verdicts_qid ON verdicts(queue_id);
CREATE INDEX IF NOT EXISTS verdicts_mid ON verdicts(message_id);
CREATE INDEX IF NOT EXISTS verdicts_time ON verdicts(time);
CREATE INDEX IF NOT EXISTS verdicts_client ON verdicts(client);
"""


@dataclass(frozen=True)
class Verdict:
    time: float
    queue_id: str
    message_id: str
    client: str
    sender: str
    recipients: tuple[str, ...]
    action: str  # "delivered", "junk", "refused", "deferred", ...
    reasons: tuple[str, ...]

    def render(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.time))
        head = (f"{when} UTC  queue id {self.queue_id or '-'}  message-id {self.message_id or '-'}\n"
                f"  from {self.sender or '<>'} via {self.client or '?'} to {', '.join(self.recipients) or '-'}\n"
                f"  {self.action}")
        return head + "".join(f"\n    - {r}" for r in self.reasons)


class VerdictLog:
    def __init__(self, path: Path, keep_days: float = 30.0, max_rows: int = 1_000_000,
                 clock: Callable[[], float] = time.time, metrics: Metrics | None = None):
        self.metrics = metrics  # every decision passes here: counted by action
        self.keep = keep_days * 86400
        self.max_rows = max_rows
        self.clock = clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
        use_wal(self._db)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._writes = 0
        self._pending: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._hurry = threading.Event()  # set by flush and close: write now, no lingering

    def close(self) -> None:
        if self._writer is not None:
            self._pending.put(None)
            self._hurry.set()
            self._writer.join(10)
            self._writer = None
        with self._lock:
            self._db.close()

    def record_later(self, queue_id: str, message_id: str, client: str, sender: str, recipients: Sequence[str],
                     action: str, reasons: Sequence[str]) -> None:
        """`record` in a background thread: the SMTP reply never waits for the log (it is diagnostic)."""
        if self.metrics is not None:
            self.metrics.verdict(action)
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="verdicts", daemon=True)
            self._writer.start()
        self._pending.put((queue_id, message_id, client, sender, tuple(recipients), action, tuple(reasons)))

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every `record_later` so far is written (for tests and `close`)."""
        done = threading.Event()
        self._pending.put(("__flush__", done))
        self._hurry.set()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="verdicts", daemon=True)
            self._writer.start()
        done.wait(timeout)

    def _write_loop(self) -> None:
        while True:
            batch = [self._pending.get()]
            if batch[-1] is not None and batch[-1][0] != "__flush__" and self._hurry.wait(LINGER):
                self._hurry.clear()  # a flush or close came during the wait: its marker is queued
            # What queued up meanwhile goes in the same transaction (one commit, not one per line).
            while len(batch) < _BATCH and batch[-1] is not None and batch[-1][0] != "__flush__":
                try:
                    batch.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            last = batch[-1]
            rows = [it for it in batch if it is not None and it[0] != "__flush__"]
            if rows:
                try:
                    self._insert(rows)
                except sqlite3.Error as exc:  # diagnostics must never take mail down
                    log.warning("verdict log: %s", exc)
            if last is None:
                return
            if last[0] == "__flush__":
                last[1].set()

    def record(self, queue_id: str, message_id: str, client: str, sender: str, recipients: Sequence[str],
               action: str, reasons: Sequence[str]) -> None:
        self._insert([(queue_id, message_id, client, sender, recipients, action, reasons)])

    def _insert(self, items: Sequence[tuple[Any, ...]]) -> None:
        now = self.clock()
        rows = [(now, qid, mid.strip().strip("<>"), client, sender, json.dumps(list(rcpts)), action,
                 json.dumps(list(reasons))) for qid, mid, client, sender, rcpts, action, reasons in items]
        with self._lock, immediate(self._db):
            self._db.executemany(
                "INSERT INTO verdicts(time, queue_id, message_id, client, sender, recipients, action, reasons) "
                "VALUES (?,?,?,?,?,?,?,?)", rows)
            before, self._writes = self._writes, self._writes + len(rows)
            if before // 1000 != self._writes // 1000:
                self._db.execute("DELETE FROM verdicts WHERE time < ?", (now - self.keep,))
                self._db.execute("DELETE FROM verdicts WHERE id <= (SELECT max(id) FROM verdicts) - ?",
                                 (self.max_rows,))

    def find(self, ident: str, limit: int = 20) -> list[Verdict]:
        """Verdicts for a queue id, a Message-ID (with or without angle brackets) or a client address,
        newest first."""
        key = ident.strip()
        mid = key.strip("<>")
        with self._lock:
            rows = self._db.execute(
                "SELECT time, queue_id, message_id, client, sender, recipients, action, reasons FROM verdicts "
                "WHERE queue_id=? OR message_id=? OR client=? ORDER BY id DESC LIMIT ?",
                (key, mid, key, limit)).fetchall()
        return [Verdict(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), r[6], tuple(json.loads(r[7])))
                for r in rows]

    def find_address(self, address: str, limit: int = 50) -> list[Verdict]:
        """Verdicts whose sender or one of whose recipients is `address` (case-insensitively), newest first."""
        key = address.strip().lower()
        if not key:
            return []
        pattern = "%" + json.dumps(key)[1:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with self._lock:
            rows = self._db.execute(
                "SELECT time, queue_id, message_id, client, sender, recipients, action, reasons FROM verdicts "
                "WHERE lower(sender)=? OR lower(recipients) LIKE ? ESCAPE '\\' ORDER BY id DESC LIMIT ?",
                (key, pattern, limit * 4)).fetchall()
        out = [Verdict(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), r[6], tuple(json.loads(r[7])))
               for r in rows]
        return [v for v in out if v.sender.lower() == key or key in (a.lower() for a in v.recipients)][:limit]
