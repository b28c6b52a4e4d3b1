"""GET /metrics on a running server: a bounded load (SMTP, IMAP logins good and bad, a refused RCPT, a
refused client) moves the counters by exactly what it did, read back with prometheus-client's parser;
clients outside the allowlist and scrapes without the token are refused."""

from __future__ import annotations

import http.client
import imaplib
import poplib
import smtplib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from postier.server import stats

from .harness import Instance, free_port

TOKEN = "metrics-test-token-0123456789"
MESSAGES = 20
BATCHES = 4  # concurrent SMTP connections
GOOD_LOGINS = 2
BAD_LOGINS = 3

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int, token: str | None = TOKEN, source: str = "127.0.0.1") -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Instance, int]]:
    root = tmp_path_factory.mktemp("metrics")
    (root / "metrics.token").parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    inst = Instance(root / "data", "metrics.test", extra_config=(
        f'[metrics]\nlisten = "127.0.0.1:{port}"\nallow = ["127.0.0.1/32"]\n'
        f'token_file = "{root}/metrics.token"\n'
        "[auth]\nfailure_delay = 0.0\nmax_failures = 100\n"))
    (root / "metrics.token").write_text(TOKEN + "\n")
    inst.add_user("alice@metrics.test")
    with inst:
        inst.start()
        yield inst, port


def test_access_control(server: tuple[Instance, int]) -> None:
    inst, port = server
    with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:  # a connection counted (none may be yet)
        s.noop()
    assert scrape(port, token=None)[0] == 401
    assert scrape(port, token="wrong")[0] == 401
    assert scrape(port, source="127.0.0.2")[0] == 403  # not in metrics.allow, token or not
    status, text = scrape(port)
    assert status == 200 and "postier_connections_total" in text


def test_counters_follow_the_load(server: tuple[Instance, int]) -> None:
    inst, port = server
    status, text = scrape(port)
    assert status == 200
    before = parse(text)

    # SMTP on port 25: MESSAGES messages over four concurrent connections, and one unknown recipient refused.
    def send_batch(batch: int) -> None:
        with smtplib.SMTP(*inst.addr("smtp"), timeout=30) as s:
            for i in range(MESSAGES // BATCHES):
                s.sendmail("bob@remote.test", ["alice@metrics.test"],
                           f"From: bob@remote.test\r\nSubject: load {batch}.{i}\r\n\r\nhello\r\n".encode())

    with ThreadPoolExecutor(BATCHES) as pool:
        list(pool.map(send_batch, range(BATCHES)))
    connections = BATCHES + 1
    with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
        s.ehlo()
        s.mail("bob@remote.test")
        code, _ = s.rcpt("nobody@metrics.test")
        assert code == 550

    # IMAP: logins after STARTTLS, good and bad.
    ctx = inst.client_ssl_context()
    for _ in range(GOOD_LOGINS):
        with imaplib.IMAP4(*inst.addr("imap"), timeout=10) as m:
            m.starttls(ssl_context=ctx)
            m.login("alice@metrics.test", "password123")
            m.logout()
    for _ in range(BAD_LOGINS):
        with imaplib.IMAP4(*inst.addr("imap"), timeout=10) as m:
            m.starttls(ssl_context=ctx)
            with pytest.raises(imaplib.IMAP4.error):
                m.login("alice@metrics.test", "wrong-password")
            m.logout()

    # A wrong password on submission (AUTH PLAIN after STARTTLS) and on POP3 (USER/PASS after STLS).
    with smtplib.SMTP(*inst.addr("submission"), timeout=10) as s:
        s.starttls(context=ctx)
        s.ehlo()
        s.user, s.password = "alice@metrics.test", "wrong-password"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.auth("PLAIN", s.auth_plain)
    pop = poplib.POP3(*inst.addr("pop3"), timeout=10)
    try:
        pop.stls(context=ctx)
        pop.user("alice@metrics.test")
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong-password")
    finally:
        pop.close()

    # One request on each web listener (whatever the answer: the connections are what counts).
    for conn in (http.client.HTTPConnection(*inst.addr("http"), timeout=10),
                 http.client.HTTPSConnection(*inst.addr("https"), timeout=10, context=ctx)):
        try:
            conn.request("GET", "/", headers={"Host": inst.hostname})
            conn.getresponse().read()
        finally:
            conn.close()

    # Sessions end asynchronously after the client's close: wait (bounded) for the gauge to settle.
    deadline = time.monotonic() + 10
    while True:
        after = parse(scrape(port)[1])
        if get(after, "postier_sessions_active", role="imap") == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    def moved(name: str, **labels: str) -> float:
        return get(after, name, **labels) - get(before, name, **labels)

    assert moved("postier_messages_received_total", role="smtp") == MESSAGES
    assert moved("postier_messages_refused_total", role="smtp", stage="rcpt", reason="unknown_user") == 1
    assert moved("postier_local_deliveries_total", result="delivered") == MESSAGES
    assert moved("postier_local_deliveries_total", result="failed") == 0
    assert moved("postier_local_delivery_duration_seconds_count") == MESSAGES
    assert moved("postier_connections_total", role="smtp", result="accepted") == connections
    assert moved("postier_connections_total", role="imap", result="accepted") == GOOD_LOGINS + BAD_LOGINS
    assert moved("postier_auth_failures_total", role="imap", mechanism="password") == BAD_LOGINS
    assert moved("postier_auth_failures_total", role="submission", mechanism="PLAIN") == 1
    assert moved("postier_auth_failures_total", role="pop3", mechanism="password") == 1
    assert moved("postier_tls_sessions_total", role="submission", version="TLSv1.3") == 1
    tls = sum(v - before.get(k, 0.0) for k, v in after.items()
              if k[0] == "postier_tls_sessions_total" and ("role", "imap") in k[1])
    assert tls == GOOD_LOGINS + BAD_LOGINS
    assert get(after, "postier_sessions_active", role="imap") == 0
    assert moved("postier_connections_total", role="http", result="accepted") == 1
    assert moved("postier_connections_total", role="https", result="accepted") == 1
    assert moved("postier_tls_sessions_total", role="https", version="TLSv1.3") == 1
    assert get(after, "postier_queue_messages") == 0
    assert get(after, "postier_data_disk_free_bytes") > 0
    assert get(after, "process_resident_memory_bytes") > 0
    assert len(inst.messages("alice@metrics.test")) == MESSAGES
    # no address or IP address in any label value
    for (_name, labels) in after:
        for _k, v in labels:
            assert "@" not in v and "127.0.0.1" not in v, labels


def test_status_still_counts_the_last_hour(server: tuple[Instance, int]) -> None:
    """`postier status` reads the figures fed from the same events as the metrics."""
    inst, _port = server
    with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
        s.sendmail("bob@remote.test", ["alice@metrics.test"], b"Subject: one more\r\n\r\nhi\r\n")

    def accepted() -> int:  # stats.json, plus each other worker's file with [server] workers
        data = stats.read(Path(inst.root))
        counts = data.get("last_hour") if data is not None else None
        return int(counts.get("accepted", 0)) if isinstance(counts, dict) else 0

    deadline = time.monotonic() + 10  # the file is rewritten within a second of a change
    while accepted() < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert accepted() >= 1
