"""Queue ids (`message.received.queue_id`): unique across the processes the supervisor forks."""

from __future__ import annotations

import subprocess
import sys

IDS = 50

# Forks in a process of its own (the test runner has threads: a fork there is unsafe). The parent
# and the child each draw IDS ids in the same second, as two workers taking mail at once do.
SCRIPT = f"""
import os, sys
from postier.message.received import queue_id
queue_id()  # the generator in use before the fork, as in the supervisor
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, " ".join(queue_id() for _ in range({IDS})).encode())
    os._exit(0)
os.close(w)
mine = [queue_id() for _ in range({IDS})]
theirs = os.fdopen(r, "rb").read().decode().split()
os.waitpid(pid, 0)
print(" ".join(mine))
print(" ".join(theirs))
"""


def test_a_forked_process_draws_other_queue_ids() -> None:
    """Workers are forked from one supervisor: a child drawing ids in the same second as its parent
    must not draw the parent's (the generator is seeded again in the child)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=60).stdout
    mine, theirs = (set(line.split()) for line in out.splitlines())
    assert len(mine) == IDS and len(theirs) == IDS
    assert not mine & theirs
