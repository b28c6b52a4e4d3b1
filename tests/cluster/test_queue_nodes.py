"""The shared outbound queue end to end: postier nodes on 127.0.0.2-3 (one PostgreSQL, one bucket) and a
remote domain's MX on 127.0.0.4, found through the in-process DNS server. A node killed with SIGKILL
while it delivers loses nothing it acknowledged: another node delivers its message once the lease
runs out. With PostgreSQL stopped, submission answers 4xx and nothing is queued (the storage itself:
test_queue.py)."""

from __future__ import annotations

import smtplib
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from tests.dnsserver import DNSServer  # noqa: E402
from tests.harness import Instance  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import ALICE, PASSWORD, _can_bind, make_nodes  # noqa: E402

REMOTE = "remote.test"
BOB = f"bob@{REMOTE}"
LEASE = 6  # seconds: renewed every 2 s by a live node


def _cluster_nodes(root: Path, dsn: str, s3: S3Server, extra: str, count: int = 2) -> list[Instance]:
    return make_nodes(root, dsn, s3, count, cluster=f"queue_lease = {LEASE}\n", extra=extra)


def submit(inst: Instance, subject: str) -> tuple[int, bytes, str]:
    """Submission (587, STARTTLS, AUTH) of one message to BOB: the reply to DATA, or the first refusal
    (code, text, command)."""
    with smtplib.SMTP(*inst.addr("submission"), timeout=30) as s:
        s.starttls(context=inst.client_ssl_context())
        try:
            s.login(ALICE, PASSWORD)
        except smtplib.SMTPAuthenticationError as exc:  # the accounts are in PostgreSQL too
            return exc.smtp_code, exc.smtp_error, "AUTH"
        code, text = s.mail(ALICE)
        if code >= 400:
            return code, text, "MAIL"
        code, text = s.rcpt(BOB)
        if code >= 400:
            return code, text, "RCPT"
        code, text = s.data(f"From: {ALICE}\r\nTo: {BOB}\r\nSubject: {subject}\r\n\r\nhello\r\n".encode())
        return code, text, "DATA"


def wait_for(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_killed_node_queue_is_delivered_by_another(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    if not _can_bind("127.0.0.5"):
        pytest.skip("no 127.0.0.2-5 loopback addresses")
    with DNSServer() as dns:
        (tmp_path / "mx").mkdir()
        mx = Instance(tmp_path / "mx", REMOTE, address="127.0.0.4")
        mx.add_user(BOB, PASSWORD)
        mx_port = mx.port("smtp")
        dns.add(REMOTE, "MX", f"10 {mx.hostname}")
        # Until node A is killed, the MX's address is a host that accepts connections and never
        # answers: A holds its lease (renewing it) for as long as it waits for the greeting.
        dns.add(mx.hostname, "A", "127.0.0.5")
        hole = socket.socket()
        try:
            hole.bind(("127.0.0.5", mx_port))
        except OSError:
            pytest.skip(f"port {mx_port} is taken on 127.0.0.5")
        hole.listen(8)
        hole.settimeout(30)
        a, b = _cluster_nodes(tmp_path, pg.create_db(), s3,
                              f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {mx_port}\n')
        try:
            mx.start()
            a.start()
            b.start()
            code, text, _ = submit(a, "survives")
            assert code == 250, (code, text)
            qid = text.decode().rsplit(" ", 1)[-1]
            held, _ = hole.accept()  # A is delivering it
            time.sleep(LEASE + 1)  # longer than the lease: A's renewals keep it
            assert "status=" not in b.log.read_text()  # B has not touched it
            assert qid in b.cli("queue", "list").stdout  # every node sees the shared queue
            a.kill()  # SIGKILL: no goodbye, the lease stays until it runs out
            held.close()
            hole.close()
            dns.remove(mx.hostname, "A")
            dns.add(mx.hostname, "A", "127.0.0.4")  # the MX is back
            wait_for(lambda: mx.messages(BOB), 60, "delivery by node B")
            time.sleep(1)
            got = mx.messages(BOB)
            assert len(got) == 1 and b"Subject: survives" in got[0]
            log = b.log.read_text()
            assert f"{qid}: to=<{BOB}>" in log and "status=sent" in log, log[-3000:]
            wait_for(lambda: "-- 0 messages" in b.cli("queue", "list").stdout, 20, "the queue to empty")
        finally:
            hole.close()
            a.kill()
            b.stop()
            mx.stop()


def test_postgresql_down_means_submission_4xx(tmp_path: Path, pg_own: PgServer, s3: S3Server) -> None:
    """Node A checks the daily limit (MAIL needs the database), node B has none; with the database
    stopped neither acknowledges anything, whichever command (AUTH, MAIL, RCPT, DATA) finds out."""
    if not _can_bind("127.0.0.3"):
        pytest.skip("no 127.0.0.2-3 loopback addresses")
    with DNSServer() as dns:
        dns.add(REMOTE, "MX", "10 mx.remote.test")
        dns.add("mx.remote.test", "A", "127.0.0.9")  # nobody listens: mail stays queued
        a, b = _cluster_nodes(tmp_path, pg_own.create_db(), s3, f'[dns]\nnameservers = ["{dns.nameserver}"]\n')
        b.add_config("[submission]\nmax_messages_per_day = 0\n")
        a.start()
        b.start()
        try:
            for node in (a, b):
                code, text, _ = submit(node, "queued")
                assert code == 250, (code, text)
            pg_own.stop()
            for node in (a, b):
                code, text, at = submit(node, "lost?")
                assert 400 <= code < 500, (code, text, at)
            pg_own.start()
            listing = ""
            for _ in range(3):  # the pool drops its broken connections and reconnects
                p = a.cli("queue", "list", check=False)
                listing = p.stdout
                if p.returncode == 0:
                    break
            assert "-- 2 messages in the queue" in listing, listing  # only the acknowledged ones
        finally:
            a.stop()
            b.stop()
