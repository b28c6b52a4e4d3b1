"""The metrics as Prometheus itself sees them: a real Prometheus server scrapes a running postier (with the
bearer token) and its query API returns the counts the load made; promtool lints the exposition
(naming conventions) and parses every query of the Grafana dashboard."""

from __future__ import annotations

import http.client
import json
import smtplib
import subprocess
import time
import urllib.parse
from pathlib import Path

from prometheus_client import generate_latest

from postier.metrics import Metrics

from .harness import Instance, free_port
from .programs import require

REPO = Path(__file__).resolve().parent.parent
TOKEN = "prometheus-scrape-token-42"


def _busy_metrics(tmp_path: Path) -> Metrics:
    """A registry with a series in every labelled family."""
    m = Metrics()
    m.watch(lambda: (2, time.time() - 60), tmp_path)
    m.connection("smtp", True, "TLSv1.3 X")
    m.smtp_reply("smtp", "rcpt", 550, "5.1.1")
    m.smtp_reply("smtp", "rcpt", 450, "4.2.0")
    m.smtp_reply("smtp", "data", 250, "2.0.0")
    m.auth_failed("imap", "password")
    m.local_delivery(1, 0, 0.01)
    m.queue_outcome(False, "delivered", 1.0)
    m.queue_attempt(False, 0.5)
    m.dns_query("MX", 0.01, True)
    m.verdict("junk")
    return m


def test_promtool_lints_the_exposition(tmp_path: Path) -> None:
    promtool = require("promtool")
    text = generate_latest(_busy_metrics(tmp_path).registry)
    p = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert p.returncode == 0 and not p.stdout.strip() and not p.stderr.strip(), (p.stdout, p.stderr)


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    promtool = require("promtool")
    board = json.loads((REPO / "contrib" / "grafana" / "postier.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", ())]
    # Grafana replaces $job and $instance (multi-value: a regex) before sending the query.
    rules = [{"record": f"postier:dashboard_query_{i}", "expr": e.replace("$job", ".*").replace("$instance", ".*")}
             for i, e in enumerate(exprs)]
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))  # JSON is YAML
    p = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert f"SUCCESS: {len(rules)} rules found" in p.stdout, p.stdout


def _query(port: int, q: str) -> list[dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/api/v1/query?" + urllib.parse.urlencode({"query": q}))
        body = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    assert body["status"] == "success", body
    result: list[dict[str, object]] = body["data"]["result"]
    return result


def _value(port: int, q: str) -> float | None:
    try:
        result = _query(port, q)
    except OSError:
        return None
    return float(result[0]["value"][1]) if result else None  # type: ignore[index]


def test_prometheus_scrapes_postier(tmp_path: Path) -> None:
    prometheus = require("prometheus")
    metrics_port, prom_port = free_port(), free_port()
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    inst = Instance(tmp_path / "data", "prom.test", extra_config=(
        f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\ntoken_file = "{token}"\n'))
    inst.add_user("carol@prom.test")
    (tmp_path / "prometheus.yml").write_text(json.dumps({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "postier", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
                            "authorization": {"credentials_file": str(token)}}],
    }))
    with inst:
        inst.start()
        prom = subprocess.Popen(
            [prometheus, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))  # noqa: SIM115
        try:
            for i in range(5):
                with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
                    s.sendmail("dave@remote.test", ["carol@prom.test"], f"Subject: {i}\r\n\r\nhi\r\n".encode())
            deadline = time.monotonic() + 60
            received = up = None
            while time.monotonic() < deadline:
                up = _value(prom_port, 'up{job="postier"}')
                received = _value(prom_port, 'postier_messages_received_total{job="postier", role="smtp"}')
                if up == 1 and received == 5:
                    break
                time.sleep(0.25)
            log = (tmp_path / "prometheus.log").read_text()[-3000:]
            assert up == 1, log
            assert received == 5, log
            assert _value(prom_port, 'postier_local_deliveries_total{result="delivered"}') == 5
            assert (_value(prom_port, "postier_data_disk_free_bytes") or 0) > 0
        finally:
            prom.terminate()
            prom.wait(30)
