"""The metrics registry (postier/metrics.py): bounded labels, the events, the scrape-time values, the
endpoint's access checks, the [metrics] configuration and the Grafana dashboard in contrib/."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from postier.antispam.verdicts import VerdictLog
from postier.config import ConfigError, MetricsSettings, load_config
from postier.http.metrics import MetricsEndpoint
from postier.metrics import (
    DELIVERY_OUTCOMES,
    DNS_TYPES,
    MECHANISMS,
    REASONS,
    ROLES,
    TLS_VERSIONS,
    Metrics,
    auth_mechanism,
    delivery_outcome,
    dns_rdtype,
    reply_reason,
    role_label,
    tls_version,
    verdict_action,
)
from postier.resolver import Resolver

from .dnsserver import DNSServer
from .harness import free_port

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "contrib" / "grafana" / "postier.json"


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed back by prometheus-client's own text parser."""
    text = generate_latest(m.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(m: Metrics, name: str, **labels: str) -> float:
    return samples(m).get((name, tuple(sorted(labels.items()))), 0.0)


# -- labels stay in their small sets -----------------------------------------------------------------

@pytest.mark.parametrize(("code", "enhanced", "reason"), [
    (550, "5.1.1", "unknown_user"),
    (550, "5.7.1", "policy"),
    (552, "5.2.2", "mailbox_full"),
    (552, "5.3.4", "message_too_big"),
    (451, "4.7.1", "policy"),
    (450, "4.2.0", "mailbox"),
    (421, "4.7.0", "too_many_connections"),
    (554, "5.4.0", "mail_loop"),
    (535, "5.7.8", "auth_failed"),
    (550, "5.7.23", "spf"),
    (451, "", "local_error"),
    (550, "5.9.99", "other"),
])
def test_reply_reasons(code: int, enhanced: str, reason: str) -> None:
    assert reply_reason(code, enhanced) == reason


@given(st.integers(400, 599), st.text(max_size=30))
def test_any_reply_gives_a_known_reason(code: int, enhanced: str) -> None:
    assert reply_reason(code, enhanced) in REASONS


@given(st.text(max_size=40))
def test_every_label_function_is_bounded(text: str) -> None:
    assert role_label(text) in ROLES | {"other"}
    assert tls_version(text) in TLS_VERSIONS | {"other"}
    assert auth_mechanism(text) in MECHANISMS | {"other"}
    assert dns_rdtype(text) in DNS_TYPES | {"other"}
    assert delivery_outcome(text) in DELIVERY_OUTCOMES | {"other"}
    assert verdict_action(text) in {"inbox", "junk", "defer", "reject", "other"}


def test_label_values() -> None:
    assert tls_version("TLSv1.3 TLS_AES_256_GCM_SHA384") == "TLSv1.3"
    assert tls_version(None) == "other"
    assert auth_mechanism("scram-sha-256") == "SCRAM-SHA-256"
    assert auth_mechanism("USER") == "password"
    assert role_label("bob@example.com") == "other"


def test_addresses_never_become_labels() -> None:
    """A flood of distinct clients, recipients and mechanisms makes no new series."""
    m = Metrics()
    before = len(samples(m))
    for i in range(200):
        m.smtp_reply("smtp", "rcpt", 550, f"5.{i % 9}.{i}")
        m.auth_failed(f"role{i}", f"MECH-{i}")
        m.tls_started("imap", f"TLSv9.{i} X")
    grown = len(samples(m)) - before
    assert grown < 40, grown


# -- events --------------------------------------------------------------------------------------------

def test_smtp_replies_count_and_feed_the_last_hour() -> None:
    m = Metrics()
    seen: list[str] = []
    m.outcome_listeners.append(seen.append)
    m.smtp_reply("smtp", "mail", 250, "2.1.0")  # MAIL accepted: not a message yet
    m.smtp_reply("smtp", "rcpt", 550, "5.1.1")
    m.smtp_reply("submission", "rcpt", 451, "4.3.0")
    m.smtp_reply("smtp", "data", 250, "2.0.0")
    assert seen == ["refused", "deferred", "accepted"]
    assert value(m, "postier_messages_received_total", role="smtp") == 1
    assert value(m, "postier_messages_refused_total", role="smtp", stage="rcpt", reason="unknown_user") == 1
    assert value(m, "postier_messages_deferred_total", role="submission", stage="rcpt", reason="system") == 1


def test_connections_sessions_tls() -> None:
    m = Metrics()
    m.connection("imaps", True, "TLSv1.3 TLS_AES_128_GCM_SHA256")
    m.connection("imap", True)
    m.connection("imap", False)
    m.tls_started("imap", "TLSv1.2 ECDHE-RSA-AES128-GCM-SHA256")
    m.session_closed("imap")
    assert value(m, "postier_connections_total", role="imap", result="accepted") == 1
    assert value(m, "postier_connections_total", role="imap", result="refused") == 1
    assert value(m, "postier_sessions_active", role="imap") == 0
    assert value(m, "postier_sessions_active", role="imaps") == 1
    assert value(m, "postier_tls_sessions_total", role="imaps", version="TLSv1.3") == 1
    assert value(m, "postier_tls_sessions_total", role="imap", version="TLSv1.2") == 1


def test_deliveries() -> None:
    m = Metrics()
    m.local_delivery(3, 1, 0.002)
    m.queue_outcome(False, "delivered", 12.0)
    m.queue_outcome(False, "deferred", 12.0)
    m.queue_outcome(True, "bounced", 1.0)
    m.queue_attempt(False, 0.2)
    assert value(m, "postier_local_deliveries_total", result="delivered") == 3
    assert value(m, "postier_local_deliveries_total", result="failed") == 1
    assert value(m, "postier_local_delivery_duration_seconds_count") == 1
    assert value(m, "postier_queue_deliveries_total", destination="remote", outcome="deferred") == 1
    assert value(m, "postier_queue_deliveries_total", destination="local", outcome="bounced") == 1
    assert value(m, "postier_queue_delivery_delay_seconds_count", destination="remote") == 1
    assert value(m, "postier_queue_delivery_delay_seconds_bucket", destination="remote", le="15.0") == 1
    assert value(m, "postier_queue_delivery_delay_seconds_bucket", destination="remote", le="5.0") == 0
    assert value(m, "postier_queue_attempt_duration_seconds_bucket", destination="remote", le="0.25") == 1


def test_scrape_time_queue_and_disk(tmp_path: Path) -> None:
    m = Metrics()
    assert value(m, "postier_queue_messages") == 0
    m.watch(lambda: (3, time.time() - 100.0), tmp_path)
    got = samples(m)
    assert got[("postier_queue_messages", ())] == 3
    assert 99.0 <= got[("postier_queue_oldest_message_age_seconds", ())] < 200.0
    assert got[("postier_data_disk_free_bytes", ())] > 0
    assert got[("postier_data_disk_size_bytes", ())] >= got[("postier_data_disk_free_bytes", ())]


def test_scrape_without_the_queue_still_serves_the_rest(tmp_path: Path) -> None:
    """Cluster mode with PostgreSQL out of reach: the queue gauges have no sample, the scrape works."""
    from postier.store.errors import StoreUnavailable

    def down() -> tuple[int, float | None]:
        raise StoreUnavailable("PostgreSQL unreachable")

    m = Metrics()
    m.watch(down, tmp_path)
    got = samples(m)
    assert ("postier_queue_messages", ()) not in got
    assert ("postier_queue_oldest_message_age_seconds", ()) not in got
    assert got[("postier_data_disk_free_bytes", ())] > 0


def test_verdicts_counted_where_they_are_logged(tmp_path: Path) -> None:
    m = Metrics()
    log = VerdictLog(tmp_path / "v.sqlite", metrics=m)
    try:
        log.record_later("Q1", "<a@b>", "127.0.0.1", "a@b", ["c@d"], "junk", ["rspamd: 9.0"])
        log.record_later("", "", "127.0.0.1", "", [], "refused", ["screening: zen"])
        log.record_later("Q2", "", "127.0.0.1", "", [], "inbox", [])
        log.flush()
    finally:
        log.close()
    assert value(m, "postier_spam_verdicts_total", action="junk") == 1
    assert value(m, "postier_spam_verdicts_total", action="reject") == 1
    assert value(m, "postier_spam_verdicts_total", action="inbox") == 1


def test_dns_queries_timed_by_type_cache_hits_not() -> None:
    m = Metrics()
    with DNSServer() as dns:
        dns.add("cached.test", "TXT", "v=spf1 -all", ttl=300)
        dns.add("mx.test", "MX", "10 mx.mx.test.")
        dns.servfail("broken.test")
        r = Resolver([dns.nameserver], timeout=2.0, metrics=m)
        assert r.query_sync("cached.test", "TXT").ok
        assert r.query_sync("cached.test", "TXT").ok  # from the cache: no query
        assert asyncio.run(r.query("mx.test", "MX")).ok
        asyncio.run(r.query("broken.test", "A"))
    assert value(m, "postier_dns_query_duration_seconds_count", rdtype="TXT") == 1
    assert value(m, "postier_dns_query_duration_seconds_count", rdtype="MX") == 1
    assert value(m, "postier_dns_query_failures_total", rdtype="A") == 1
    assert value(m, "postier_dns_query_failures_total", rdtype="MX") == 0


# -- the endpoint's checks and its configuration -------------------------------------------------------

def test_endpoint_access_checks(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    ep = MetricsEndpoint(MetricsSettings(listen=f"127.0.0.1:{free_port()}", allow=("127.0.0.1/32", "10.1.0.0/16"),
                                         token_file=token))
    ep.bind()
    try:
        assert ep.allowed("127.0.0.1") and ep.allowed("10.1.2.3") and ep.allowed("::ffff:10.1.2.3")
        assert not ep.allowed("127.0.0.2") and not ep.allowed("::1") and not ep.allowed("") and not ep.allowed(None)
        assert ep.authorized("Bearer s3cret-token") and ep.authorized("bearer s3cret-token")
        assert not ep.authorized(None) and not ep.authorized("Bearer wrong") and not ep.authorized("Basic czM=")
    finally:
        assert ep.sock is not None
        ep.sock.close()


def _config(tmp_path: Path, metrics: str) -> Path:
    p = tmp_path / "postier.toml"
    p.write_text(f'hostname = "mail.example.test"\ndata_dir = "{tmp_path}"\n'
                 '[listeners.smtp]\naddress = "127.0.0.1"\nport = 2525\n' + metrics)
    return p


def test_config_metrics(tmp_path: Path) -> None:
    assert load_config(_config(tmp_path, "")).metrics.listen == ""
    cfg = load_config(_config(tmp_path, '[metrics]\nlisten = "[::1]:9464"\n'))
    assert cfg.metrics.address() == ("::1", 9464)
    assert cfg.metrics.allow == ("127.0.0.0/8", "::1/128")
    for bad, key in (('listen = "localhost:9464"', "metrics.listen"), ('listen = "127.0.0.1"', "metrics.listen"),
                     ('listen = "127.0.0.1:2525"', "metrics.listen"),
                     ('listen = "0.0.0.0:9464"', "metrics.token_file"),
                     ('listen = "127.0.0.1:9464"\nallow = ["nonsense"]', "metrics.allow")):
        with pytest.raises(ConfigError, match=re.escape(key)):
            load_config(_config(tmp_path, f"[metrics]\n{bad}\n"))
    load_config(_config(tmp_path, f'[metrics]\nlisten = "0.0.0.0:9464"\ntoken_file = "{tmp_path}/t"\n'))


# -- the dashboard ----------------------------------------------------------------------------------

def test_dashboard_queries_only_metrics_that_exist(tmp_path: Path) -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["panels"] and board.get("uid")
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 10
    m = Metrics()
    m.watch(lambda: (0, None), tmp_path)
    # every labelled family gets one series so that its sample names appear
    m.connection("smtp", True, "TLSv1.3 X")
    m.smtp_reply("smtp", "rcpt", 550, "5.1.1")
    m.smtp_reply("smtp", "rcpt", 450, "4.2.0")
    m.auth_failed("imap", "password")
    m.local_delivery(1, 0, 0.01)
    m.queue_outcome(False, "delivered", 1.0)
    m.queue_attempt(False, 0.5)
    m.dns_query("MX", 0.01, True)
    m.verdict("junk")
    known = m.names()
    used = {n for e in exprs for n in re.findall(r"\b(postier_[a-z_]+|process_[a-z_]+)\b", e)}
    assert used, exprs
    assert used <= known, used - known
    documented = (REPO / "docs" / "operations.md").read_text()
    families = {f.name for f in m.registry.collect() if f.name.startswith("postier_")}
    missing = [f for f in families if f not in documented]
    assert not missing, f"not in docs/operations.md: {missing}"


def test_multiprocess_value_files_have_every_block_reserved(tmp_path: Path) -> None:
    """A worker's values file (prometheus-client multiprocess mode) is never sparse, made or grown:
    a page first written when the disk is full would kill the worker with SIGBUS."""
    import os

    from postier.metrics import _ReservedValues

    path = tmp_path / "counter_1.db"
    d = _ReservedValues(str(path))
    st = os.stat(path)
    assert st.st_size == 1 << 16 and st.st_blocks * 512 >= st.st_size
    for i in range(3000):  # about 200 KiB of entries: the file grows twice
        d.write_value(f"key-{i:05d}-" + "x" * 40, float(i), 0.0)
    st = os.stat(path)
    assert st.st_size >= 1 << 18 and st.st_blocks * 512 >= st.st_size
    assert d.read_value("key-02999-" + "x" * 40) == (2999.0, 0.0)
    d.close()
    values = {k: v for k, v, _, _ in _ReservedValues.read_all_values_from_file(str(path))}
    assert len(values) == 3000 and values["key-00007-" + "x" * 40] == 7.0


def test_multiprocess_values_without_room_stay_in_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """No block to be had (here: no directory): the values are kept in memory, the metric calls go on."""
    from postier.metrics import _ReservedValues

    d = _ReservedValues(str(tmp_path / "gone" / "histogram_1.db"))
    for i in range(3000):
        d.write_value(f"key-{i}", float(i), 0.0)
    assert d.read_value("key-2999") == (2999.0, 0.0)
    assert d.read_value("key-5") == (5.0, 0.0)
    d.close()
    assert "kept in memory only" in caplog.text
    assert not (tmp_path / "gone").exists()
