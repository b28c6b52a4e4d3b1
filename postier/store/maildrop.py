"""The POP3 maildrop lock of single-machine mode (RFC 1939 §8): an exclusive `flock()` in the user's home.

`flock()` conflicts between separate opens of the file, so one lock serves two sessions in one
process and two postier processes alike, and the kernel drops it if the process dies. Cluster mode
takes a PostgreSQL advisory lock instead (`store.cluster.store.ClusterStore.lock_maildrop`); both are
reached through `MailStoreAPI.lock_maildrop`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path

from ..durable import ensure_dirs

__all__ = ["LOCK_NAME", "lock_maildrop"]

LOCK_NAME = "postier-pop3.lock"


def lock_maildrop(home: Path) -> Callable[[], None] | None:
    """Take the exclusive maildrop lock in `home` (blocking): the function that releases it, or None
    when another session holds it (RFC 2449 §8.1 IN-USE)."""
    ensure_dirs(home)
    fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise

    def release() -> None:  # closing the descriptor drops the flock
        with contextlib.suppress(OSError):
            os.close(fd)
    return release
