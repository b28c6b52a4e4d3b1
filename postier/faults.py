"""Fault injection for crash tests: named points where the process kills itself (SIGKILL).

Gated by the environment and inert otherwise: `POSTIER_FAULT=NAME` kills the process the first time
the point NAME is reached, `POSTIER_FAULT=NAME:N` on the N-th time. The count is the server's: with
`[server] workers` > 1 the supervisor names a file in POSTIER_FAULT_HITS that every worker (and
its delivery agent) appends one byte to per hit, so the N-th hit in any process fires, whichever
worker took the message; in a worker of several the supervisor is killed first, so that the whole
server crashes. One process alone counts in memory. A test starts `postier serve`
with the variable set, drives traffic, and checks the invariants after a restart (every
acknowledged message delivered, queued or bounced exactly once; nothing half-written visible).

Named points (grep for `fault_point(` to see where each sits):
- `maildir.before_rename`: a Maildir file is written and fsynced in tmp/, not yet in new/
- `maildir.after_rename`: the file is in new/, the directory not yet fsynced
- `smtp.before_reply`: the message is durable, the 250 not yet sent
- `queue.after_commit`: the queue row is committed, the 250 not yet sent
- `queue.after_remote_ok`: the remote MX said 250, the queue not yet updated
- `imap.append`, `imap.expunge`, `pop3.update`: in the middle of those operations

The crash tests are tests/smtp/test_faults.py (Maildir) and tests/hardening/test_faults.py (the
others); docs/security.md lists each point with its duplicate window.
"""

from __future__ import annotations

import os
import signal
import threading

from . import logsetup

_spec = os.environ.get("POSTIER_FAULT", "")
_name, _, _count = _spec.partition(":")
_target = int(_count) if _count.isdigit() else 1
_hits = 0
_lock = threading.Lock()


def fault_point(name: str) -> None:
    """Kill the process here if POSTIER_FAULT names this point (a no-op otherwise)."""
    if not _name or name != _name:
        return
    global _hits
    with _lock:
        _hits += 1
        hits = _hits
    shared = os.environ.get("POSTIER_FAULT_HITS", "")
    if shared:  # the server's count: an O_APPEND write is atomic, its end offset is this hit's rank
        fd = os.open(shared, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, b".")
            hits = os.lseek(fd, 0, os.SEEK_CUR)
        finally:
            os.close(fd)
    if hits < _target:
        return
    logsetup.flush()  # the lines logged before the crash, as a real crash after them would leave them
    supervisor = os.environ.get("POSTIER_SUPERVISOR", "")
    if supervisor.isdigit():  # a worker of several (server/supervisor.py): the whole server crashes
        os.kill(int(supervisor), signal.SIGKILL)  # its workers follow it (their parent-death signal)
    os.kill(os.getpid(), signal.SIGKILL)


def share_count(path: str) -> None:
    """Count the hits of every process started from here on in the file `path` (the supervisor,
    before forking its workers); inert without POSTIER_FAULT."""
    if _name:
        with open(path, "wb"):  # a new server: a new count
            pass
        os.environ["POSTIER_FAULT_HITS"] = path
