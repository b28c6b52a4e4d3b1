"""Crash safety: SIGKILL during a load; every message that got 250 is in the Maildir exactly once,
and no partial file is visible in new/ or cur/."""

from __future__ import annotations

import smtplib
import threading
import time
from pathlib import Path

import pytest

from tests.harness import Instance

pytestmark = pytest.mark.slow

N_THREADS = 8
PER_THREAD = 60
TAIL = b"\r\n-- end of message --\r\n"


def test_sigkill_loses_no_acknowledged_message(tmp_path: Path) -> None:
    inst = Instance(tmp_path / "crash", "c.test")
    inst.add_user("u@c.test")
    inst.start()
    acked: set[str] = set()
    lock = threading.Lock()
    stop = threading.Event()
    body = b"x" * 20000

    def worker(t: int) -> None:
        for i in range(PER_THREAD):
            if stop.is_set():
                return
            marker = f"m-{t}-{i}"
            msg = f"Subject: {marker}\r\nMessage-ID: <{marker}@t>\r\n\r\n".encode() + body + TAIL
            try:
                with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
                    s.sendmail("load@remote.test", ["u@c.test"], msg)
            except (smtplib.SMTPException, OSError):
                continue  # not acknowledged: may or may not be there
            with lock:
                acked.add(marker)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + 30
    while len(acked) < 60 and time.monotonic() < deadline:
        time.sleep(0.01)
    inst.kill()  # SIGKILL in the middle of the load
    stop.set()
    for th in threads:
        th.join(30)
    assert len(acked) >= 60, "the load did not get going"
    inst.start()  # restarts and serves with no manual repair
    try:
        md = inst.maildir("u@c.test")
        seen: dict[str, int] = {}
        for sub in ("new", "cur"):
            for f in (md / sub).iterdir():
                data = f.read_bytes()
                assert data.endswith(TAIL), f"partial file visible: {f.name}"
                subject = data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
                seen[subject] = seen.get(subject, 0) + 1
        missing = acked - set(seen)
        assert not missing, f"{len(missing)} acknowledged messages lost"
        dups = {k: v for k, v in seen.items() if v > 1}
        assert not dups, f"duplicates: {dups}"
        with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
            assert s.sendmail("after@remote.test", ["u@c.test"], b"Subject: after\r\n\r\nok\r\n") == {}
    finally:
        inst.stop()
