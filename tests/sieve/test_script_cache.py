"""The per-process memory of each user's Sieve script (pipeline/sieve.py): a script uploaded over
ManageSieve applies to the next delivery made by the same process, and one changed by another
process (another worker's ManageSieve, `postier sieve`) within accounts.CACHE_CHECK seconds; the
caches of both workers are warm ("no script") when the change is made.

Real servers, real sieve-connect over STARTTLS, mail over real SMTP.
"""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.accounts import CACHE_CHECK
from tests.harness import Instance
from tests.programs import require
from tests.test_workers import spread

WORK = 'require "fileinto";\nif address :is "from" "boss@x.test" { fileinto "Work"; }\n'
OTHER = 'require "fileinto";\nif address :is "from" "boss@x.test" { fileinto "Other"; }\n'


def sieve_connect(inst: Instance, user: str, *args: str) -> None:
    r, w = os.pipe()
    os.write(w, b"password123\n")
    os.close(w)
    try:
        done = subprocess.run(
            [require("sieve-connect"), "--server", "127.0.0.1", "--port", str(inst.port("managesieve")),
             "--user", user, "--passwordfd", str(r), "--tlscafile", str(inst.root / "tls" / "cert.pem"),
             "--tlshostname", inst.hostname, "--authmech", "PLAIN", *args],
            capture_output=True, text=True, timeout=60, pass_fds=(r,))
    finally:
        os.close(r)
    assert done.returncode == 0, done.stdout + done.stderr


def upload(inst: Instance, tmp_path: Path, user: str, name: str, text: str) -> None:
    script = tmp_path / f"{name}.sieve"
    script.write_text(text)
    sieve_connect(inst, user, "--upload", "--localsieve", str(script), "--remotesieve", name)
    sieve_connect(inst, user, "--activate", "--remotesieve", name)


def boss(s: smtplib.SMTP, user: str, subject: str) -> None:
    s.sendmail("boss@x.test", [user], f"From: <boss@x.test>\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())


def wait_messages(inst: Instance, user: str, n: int, folder: str = "") -> list[bytes]:
    deadline = time.monotonic() + 20
    while len(found := inst.messages(user, folder)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("sieve-cache"), "c.test", workers=2)
    i.add_user("ivy@c.test")
    i.start()
    deadline = time.monotonic() + 20
    while len(i.worker_pids()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield i
    finally:
        i.stop()


def test_a_script_uploaded_in_this_process_applies_to_the_next_delivery(tmp_path: Path) -> None:
    """Another session delivers to the user all along (bounded), so that "no script" is remembered
    and fresh when the upload ends; the boss's message right after it is filed all the same."""
    inst = Instance(tmp_path / "one", "o.test", workers=1)
    inst.add_user("jo@o.test")
    inst.start()
    stop = threading.Event()
    sent: list[int] = []

    def noise() -> None:
        with smtplib.SMTP(*inst.addr("smtp"), timeout=30) as n:
            deadline = time.monotonic() + 60
            while not stop.is_set() and len(sent) < 2000 and time.monotonic() < deadline:
                n.sendmail("noise@x.test", ["jo@o.test"], b"From: <noise@x.test>\r\nSubject: n\r\n\r\nx\r\n")
                sent.append(1)

    t = threading.Thread(target=noise)
    try:
        with smtplib.SMTP(*inst.addr("smtp"), timeout=30) as s:
            boss(s, "jo@o.test", "before")
            t.start()
            upload(inst, tmp_path, "jo@o.test", "work", WORK)
            boss(s, "jo@o.test", "after")  # at once: no sleep
        stop.set()
        t.join()
        assert len(wait_messages(inst, "jo@o.test", 1, "Work")) == 1
        assert len(inst.messages("jo@o.test")) == 1 + len(sent)  # the noise is kept in INBOX
    finally:
        stop.set()
        if t.is_alive():
            t.join()
        inst.stop()


def test_a_script_changed_by_another_worker_or_the_cli_applies_within_the_bound(two: Instance,
                                                                              tmp_path: Path) -> None:
    user = "ivy@c.test"

    def sock(s: smtplib.SMTP) -> socket.socket:
        assert s.sock is not None
        return s.sock

    s1, s2 = spread(two, lambda: smtplib.SMTP(*two.addr("smtp"), timeout=30), sock, smtplib.SMTP.close)
    try:
        for n, s in enumerate((s1, s2), 1):  # both workers remember "no script" for ivy
            boss(s, user, f"warm {n}")
        assert len(wait_messages(two, user, 2)) == 2
        upload(two, tmp_path, user, "work", WORK)  # ManageSieve: served by one of the two workers
        time.sleep(CACHE_CHECK + 0.05)  # the documented bound for the other worker
        for n, s in enumerate((s1, s2), 1):
            boss(s, user, f"work {n}")
        assert len(wait_messages(two, user, 2, "Work")) == 2
        two.cli("sieve", "put", user, "other", "-", stdin=OTHER)  # another process altogether
        two.cli("sieve", "activate", user, "other")
        time.sleep(CACHE_CHECK + 0.05)
        for n, s in enumerate((s1, s2), 1):
            boss(s, user, f"other {n}")
        assert len(wait_messages(two, user, 2, "Other")) == 2
        assert len(two.messages(user, "Work")) == 2 and len(two.messages(user)) == 2
    finally:
        s1.close()
        s2.close()
