"""Crash safety of the queue: kill -9 while it delivers a batch to Postfix's smtp-sink; after a restart
every accepted message reaches the sink, none is lost, and duplicates are bounded and counted."""

from __future__ import annotations

import os
import re
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.programs import require

from tests.dnsserver import DNSServer
from tests.harness import Instance, free_port

pytestmark = pytest.mark.slow

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
N = 120
CONCURRENCY = 10


class Sink:
    """smtp-sink on loopback, one dump file per transaction (-d), 1 s pause before answering the final dot (-W .:1)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.dir = Path(tempfile.mkdtemp(prefix="postier-sink-"))
        self.dir.chmod(0o777)  # smtp-sink drops to `nobody` before writing
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [SMTP_SINK, "-W", ".:1", "-d", f"{self.dir}/%H%M%S.", f"127.0.0.1:{self.port}", "256"]
        if os.geteuid() == 0:
            args[1:1] = ["-u", "nobody"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def markers(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for f in self.dir.iterdir():
            m = re.search(rb"crash-test-(\d+)", f.read_bytes())
            if m:
                out[m.group(1).decode()] += 1
        return out

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def sink() -> Iterator[Sink]:
    if not os.path.exists(SMTP_SINK):
        require("smtp-sink")
    s = Sink(free_port())
    yield s
    s.stop()


def wait(pred, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_kill_9_during_delivery_loses_nothing(tmp_path: Path, sink: Sink) -> None:
    with DNSServer() as dns:
        dns.add("sink.test", "A", "127.0.0.1")  # no MX: the implicit MX (RFC 5321 §5.1)
        inst = Instance(tmp_path / "a", "a.test", extra_config=(
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {sink.port}\n'
            f"[queue]\nretry_initial = 1.0\nretry_max = 1.0\nconcurrency_per_domain = {CONCURRENCY}\n"
            "[submission]\nmax_messages_per_day = 100000\n"))
        inst.add_user("alice@a.test", "password123")
        inst.start(wait_role="submission")
        try:
            # 1. The sink is down: every message is accepted (250 = durable) and deferred.
            accepted = []
            with smtplib.SMTP(*inst.addr("submission"), timeout=30) as s:
                s.starttls(context=inst.client_ssl_context())
                s.login("alice@a.test", "password123")
                for i in range(N):
                    body = f"From: alice@a.test\r\nTo: u{i}@sink.test\r\nSubject: crash-test-{i}\r\n\r\nx\r\n"
                    s.sendmail("alice@a.test", [f"u{i}@sink.test"], body)
                    accepted.append(str(i))
            # 2. The sink comes up; delivery starts; kill -9 in the middle of the batch.
            sink.start()
            wait(lambda: sum(sink.markers().values()) >= N // 4, 60, "the first deliveries")
            inst.kill()
            at_kill = sum(sink.markers().values())
            assert at_kill < N, "the whole batch went through before the kill; make the sink slower"
            # 3. Restart: the queue resumes and delivers the rest.
            inst.start(wait_role="submission")
            wait(lambda: set(sink.markers()) >= set(accepted), 120, "every accepted message at the sink")
            wait(lambda: "-- 0 messages" in inst.cli("queue", "list").stdout, 30, "an empty queue")
        finally:
            inst.stop()
    got = sink.markers()
    duplicates = sum(n - 1 for n in got.values())
    print(f"\ncrash test: {N} accepted, {at_kill} at the sink when killed, {duplicates} duplicates after restart")
    assert set(got) == set(accepted)  # none lost
    assert max(got.values()) <= 2  # at most one duplicate per message per crash
    assert duplicates <= CONCURRENCY  # only messages in flight at the kill can come twice
