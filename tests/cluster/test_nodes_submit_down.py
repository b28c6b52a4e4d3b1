"""Submission on a cluster node whose object store is stopped: the message is neither delivered nor
queued (both need the store), so the answer is 451 and nothing is acknowledged; the node logs one
line per refusal, not a traceback (found by an outside cluster stress run stopping moto for 8 s: 199
tracebacks in 8 s across three nodes). Once the store is back, the same submission is delivered."""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import ALICE, PASSWORD, fetch_all, imap, make_nodes  # noqa: E402


@pytest.fixture
def s3_own() -> Iterator[S3Server]:
    """An object store this test may stop (the module's `s3` is shared)."""
    server = S3Server()
    yield server
    server.stop()


def submit(inst: object, subject: str) -> tuple[int, bytes]:
    with smtplib.SMTP(*inst.addr("submission"), timeout=30) as s:  # type: ignore[attr-defined]
        s.starttls(context=inst.client_ssl_context())  # type: ignore[attr-defined]
        s.login(ALICE, PASSWORD)
        s.mail(ALICE)
        assert s.rcpt(ALICE)[0] == 250
        return s.data(f"From: {ALICE}\r\nTo: {ALICE}\r\nSubject: {subject}\r\n\r\nbody\r\n".encode())


def test_submission_with_the_object_store_down_is_451_and_no_traceback(
        tmp_path: Path, pg: PgServer, s3_own: S3Server) -> None:
    (n,) = make_nodes(tmp_path, pg.create_db(), s3_own, count=1)
    n.start()
    try:
        assert submit(n, "before")[0] == 250
        port = s3_own.port
        s3_own.stop()
        for _ in range(2):
            code, _ = submit(n, "while down")
            assert code == 451, code
        from moto.server import ThreadedMotoServer
        s3_own.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        s3_own.server.start()
        for _ in range(20):  # the bucket is in moto's process memory: back as it was
            code, _ = submit(n, "after")
            if code == 250:
                break
            time.sleep(0.5)
        assert code == 250
        c = imap(n)
        try:
            c.select("INBOX")
            subjects = sorted(m.split(b"Subject: ")[1].split(b"\r\n")[0] for m in fetch_all(c).values())
        finally:
            c.logout()
        assert subjects == [b"after", b"before"]  # nothing of the refused ones
    finally:
        n.stop()
    log = n.log.read_text()
    assert "submission failed: " in log and "Traceback" not in log


def test_dkim_key_out_of_reach_is_451_and_one_log_line(tmp_path: Path, pg_own: PgServer, s3: S3Server) -> None:
    """PostgreSQL lost between RCPT and the end of DATA: the DKIM key cannot be read, so the message
    is refused with 451 for the client to retry (as any signing failure is), logged as one line, no
    traceback."""
    from .test_nodes import DOMAIN
    (n,) = make_nodes(tmp_path, pg_own.create_db(), s3, count=1)
    n.cli("dkim", "generate", DOMAIN, "--selector", "s1", "--bits", "1024")
    n.start()
    try:
        with smtplib.SMTP(*n.addr("submission"), timeout=30) as s:
            s.starttls(context=n.client_ssl_context())
            s.login(ALICE, PASSWORD)
            s.mail(ALICE)
            assert s.rcpt("someone@elsewhere.test")[0] == 250
            pg_own.stop()
            code, _ = s.data(f"From: {ALICE}\r\nTo: someone@elsewhere.test\r\nSubject: x\r\n\r\nbody\r\n".encode())
        assert code == 451, code
    finally:
        n.stop()
    log = n.log.read_text()
    assert "DKIM signing failed, the client is told to retry" in log and "Traceback" not in log
