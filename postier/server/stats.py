"""Counts of the last hour (messages accepted, replies refusing, replies deferring) for `postier status`.

The SMTP-family listeners count as they answer; one bucket per minute, 60 kept, in this process. A
task writes them to DATA_DIR/run/stats.json (write, rename) within a second of a change, at least every
`INTERVAL` seconds (the file's age tells `postier status` the server is alive) and at shutdown, so
`postier status`, a separate process, reads them without talking to the server.

With `[server] workers` > 1 each worker counts its own and writes its own file (worker 0's is
stats.json, worker N's stats-N.json); `read` adds the others' counts to worker 0's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import deque
from pathlib import Path

KINDS = ("accepted", "refused", "deferred")
WINDOW = 60  # minutes
INTERVAL = 15.0  # seconds between two writes of the file

_buckets: deque[tuple[int, dict[str, int]]] = deque(maxlen=WINDOW)
_changes = 0  # bumped by every count: the writer writes when it moved


def count(kind: str, n: int = 1) -> None:
    """Add `n` to `kind` in the current minute (called on the event loop thread)."""
    global _changes
    _changes += 1
    minute = int(time.time() // 60)
    if not _buckets or _buckets[-1][0] != minute:
        _buckets.append((minute, dict.fromkeys(KINDS, 0)))
    _buckets[-1][1][kind] += n


def count_reply(code: int) -> None:
    """Count one SMTP reply to MAIL, RCPT or the end of a message: 5xx refused, 4xx deferred."""
    if code >= 500:
        count("refused")
    elif code >= 400:
        count("deferred")


def last_hour(now: float | None = None) -> dict[str, int]:
    first = int((now if now is not None else time.time()) // 60) - WINDOW + 1
    out = dict.fromkeys(KINDS, 0)
    for minute, counts in _buckets:
        if minute >= first:
            for k in KINDS:
                out[k] += counts[k]
    return out


def path(data_dir: Path, index: int = 0) -> Path:
    """Worker `index`'s file (0: the one process's, or the primary worker's)."""
    return data_dir / "run" / ("stats.json" if index == 0 else f"stats-{index}.json")


def clear_workers(data_dir: Path) -> None:
    """Forget the other workers' files of an earlier run (at start: their number may have changed)."""
    for p in (data_dir / "run").glob("stats-*.json"):
        with contextlib.suppress(OSError):
            p.unlink()


def write(data_dir: Path, index: int = 0) -> None:
    p = path(data_dir, index)
    p.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"written": time.time(), "pid": os.getpid(), "last_hour": last_hour()}))
    tmp.replace(p)  # a reader sees the old file or the new one, never half of one


async def writer(data_dir: Path, index: int = 0) -> None:
    """Write the counts after a change (checked every second) or every INTERVAL seconds until
    cancelled, and once more then."""
    seen, last = -1, 0.0
    try:
        while True:
            if _changes != seen or time.monotonic() - last >= INTERVAL:
                seen, last = _changes, time.monotonic()
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(write, data_dir, index)
            await asyncio.sleep(1.0)
    finally:
        with contextlib.suppress(OSError):
            write(data_dir, index)


def read(data_dir: Path) -> dict[str, object] | None:
    """The one process's (or worker 0's) file, with the other workers' counts added."""
    try:
        data = json.loads(path(data_dir).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    counts = data.get("last_hour")
    for p in sorted((data_dir / "run").glob("stats-*.json")):
        try:
            other = json.loads(p.read_text()).get("last_hour")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(counts, dict) and isinstance(other, dict):
            for k in KINDS:
                n = other.get(k, 0)
                if isinstance(n, int):
                    counts[k] = int(counts.get(k, 0)) + n
    return data
