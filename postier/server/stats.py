"""Counts of the last hour (messages accepted, replies refusing, replies deferring) for `postier status`.

The SMTP-family listeners count as they answer; one bucket per minute, 60 kept, in this process. A
task writes them to DATA_DIR/run/stats.json (write, rename) within a second of a change, at least every
`INTERVAL` seconds (the file's age tells `postier status` the server is alive) and at shutdown, so
`postier status`, a separate process, reads them without talking to the server.
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


def path(data_dir: Path) -> Path:
    return data_dir / "run" / "stats.json"


def write(data_dir: Path) -> None:
    p = path(data_dir)
    p.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps({"written": time.time(), "pid": os.getpid(), "last_hour": last_hour()}))
    tmp.replace(p)  # a reader sees the old file or the new one, never half of one


async def writer(data_dir: Path) -> None:
    """Write the counts after a change (checked every second) or every INTERVAL seconds until
    cancelled, and once more then."""
    seen, last = -1, 0.0
    try:
        while True:
            if _changes != seen or time.monotonic() - last >= INTERVAL:
                seen, last = _changes, time.monotonic()
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(write, data_dir)
            await asyncio.sleep(1.0)
    finally:
        with contextlib.suppress(OSError):
            write(data_dir)


def read(data_dir: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path(data_dir).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
