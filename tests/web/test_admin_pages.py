"""The admin console's status pages on a real `postier serve` over TLS (httpx), with the in-process DNS
server: DNS records and their live check, certificate, outbound queue (list, show, retry, delete,
each logged with the admin's name), DMARC reports, the decision log (`postier why`), health; only
for admins, every change with the CSRF token.
"""

from __future__ import annotations

import html
import re
import smtplib
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from postier.accounts import Accounts
from postier.antispam.verdicts import VerdictLog
from postier.config import load_config
from postier.mailauth.reports import AggregateReport, PolicyPublished, ReportRow, ReportStore
from postier.mailauth.tlsrpt import FailureDetail, PolicyReport, TLSPolicy, TLSReport, TLSReportStore
from tests.dnsserver import DNSServer
from tests.harness import Instance

DOMAIN = "adminpages.test"
HOST = f"mail.{DOMAIN}"
ROOT, USER = f"root@{DOMAIN}", f"user@{DOMAIN}"
PW = "password123"
PAGES = ("/admin/dns", "/admin/queue", "/admin/dmarc", "/admin/log?q=x", "/admin/health")


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as d:
        d.add(DOMAIN, "MX", f"10 {HOST}.")
        d.add(HOST, "A", "127.0.0.1")
        d.servfail("down.test")
        yield d


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory, dns: DNSServer) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("adminpages"), DOMAIN, extra_config=(
        f'[auth]\nfailure_delay = 0.0\n[dns]\nnameservers = ["{dns.nameserver}"]\n'
        "[mailauth]\nspf = false\ndkim_verify = false\ndmarc = false\n"))
    i.cli("user", "add", ROOT, "--password-stdin", "--admin", stdin=PW + "\n")
    i.add_user(USER, PW)
    i.start()
    yield i
    i.stop()


def client(inst: Instance) -> httpx.Client:
    return inst.web(HOST, timeout=30)


def admin(c: httpx.Client) -> str:
    assert c.post("/admin/login", data={"address": ROOT, "password": PW}).status_code == 303
    r = c.get("/admin/queue")
    assert r.status_code == 200, r.text
    m = re.search(r'name="csrf" value="([^"]+)"', r.text)
    assert m
    return m.group(1)


def test_only_admins_see_the_pages_and_changes_need_csrf(inst: Instance) -> None:
    with client(inst) as c:
        for page in PAGES:  # nobody logged in
            r = c.get(page)
            assert r.status_code == 303 and r.headers["location"] == "/admin/login", page
        assert c.post("/admin/queue", data={"op": "retry_all"}).status_code == 403
        # a user logged into the webmail has no admin session, and cannot get one
        assert c.post("/mail/login", data={"address": USER, "password": PW}).status_code == 303
        assert c.post("/admin/login", data={"address": USER, "password": PW}).status_code == 401
        for page in PAGES:
            assert c.get(page).status_code == 303, page
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/mail/settings").text)
        assert token
        r = c.post("/admin/queue", data={"op": "retry_all", "csrf": token.group(1)})
        assert r.status_code == 403  # the webmail's token is no admin token
    with client(inst) as c:
        admin(c)
        for page in PAGES:
            r = c.get(page)
            assert r.status_code == 200, page
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert "<script>" not in r.text
        assert c.post("/admin/queue", data={"op": "retry_all"}).status_code == 403  # no CSRF token
        assert c.post("/admin/queue", data={"op": "retry_all", "csrf": "nope"}).status_code == 403


def test_dns_page_lists_every_record_with_its_status(inst: Instance) -> None:
    zone = inst.cli("dns", "records", DOMAIN).stdout
    with client(inst) as c:
        admin(c)
        r = c.get("/admin/dns", params={"d": DOMAIN})
        assert r.status_code == 200
        page = html.unescape(r.text)
        # every value `postier dns records` prints is on the page, exactly
        values = [v for v in re.findall(r'\t(?:IN\t)?[A-Z]+\t(.*)$', zone, re.M)]
        assert values, zone
        for line in zone.splitlines():
            if line.startswith(";") or not line.strip():
                continue
            value = line.split("\t")[-1].strip()
            if value.startswith('"'):
                value = "".join(re.findall(r'"([^"]*)"', value))
            assert value in page, (value, line)
        findings = re.findall(r'<tr class="st-(\w+)"><td>.*?</td><td>(\w+)</td>', r.text)
        assert ("ok", "MX") in findings, findings
        assert ("missing", "SPF") in findings, findings
        assert c.get("/admin/dns", params={"d": "elsewhere.test"}).status_code == 404
        assert "Certificate" in page and "days left" in page


def queued_id(inst: Instance) -> str:
    m = EmailMessage()
    m["From"] = USER
    m["To"] = "someone@down.test"
    m["Subject"] = "stuck"
    m.set_content("will wait")
    with smtplib.SMTP(*inst.addr("submission"), timeout=20) as s:
        s.starttls(context=inst.client_ssl_context())
        s.login(USER, PW)
        s.send_message(m)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        out = inst.cli("queue", "list").stdout
        found = re.findall(r"^(\S+)\s+\d+\s.*<" + re.escape(USER) + ">", out, re.M)
        if found:
            return found[-1]
        time.sleep(0.3)
    raise AssertionError("the message never reached the queue")


def test_queue_list_show_retry_delete_are_logged(inst: Instance) -> None:
    qid = queued_id(inst)
    with client(inst) as c:
        token = admin(c)
        assert qid in c.get("/admin/queue").text
        r = c.get("/admin/queue", params={"id": qid})
        assert r.status_code == 200 and "someone@down.test" in r.text and "Retry now" in r.text
        assert c.get("/admin/queue", params={"id": "NOSUCH"}).status_code == 404
        assert c.get("/admin/queue", params={"id": "../../x"}).status_code == 404
        r = c.post("/admin/queue", data={"op": "retry", "id": qid, "csrf": token})
        assert r.status_code == 303
        r = c.post("/admin/queue", data={"op": "delete", "id": "../../etc", "csrf": token})
        assert r.status_code == 400
        r = c.post("/admin/queue", data={"op": "delete", "id": qid, "csrf": token})
        assert r.status_code == 303
        assert qid not in c.get("/admin/queue").text
        r = c.post("/admin/queue", data={"op": "delete", "id": qid, "csrf": token})
        assert r.status_code == 404
    log = inst.log.read_text()
    assert f"queue retry {qid}" in log and f"queue delete {qid}" in log
    assert f"by {ROOT} (admin console)" in log
    assert qid not in inst.cli("queue", "list").stdout


def test_dmarc_reports_table_and_chart(inst: Instance) -> None:
    cfg = load_config(inst.config)
    store = ReportStore(cfg.data_dir / "dmarc.sqlite")
    try:
        day = 86400 * 20600  # 2026-05-27
        for i, (ok, bad) in enumerate(((40, 2), (35, 0), (50, 7))):
            rows = (ReportRow("192.0.2.1", ok, "none", "pass", "pass", DOMAIN),
                    ReportRow("198.51.100.9", bad, "reject", "fail", "fail", DOMAIN))
            rep = AggregateReport("Example Org", "dmarc@example.org", f"r{i}", day + i * 86400,
                                  day + (i + 1) * 86400 - 1, PolicyPublished(DOMAIN, "reject"), rows)
            assert store.store_received(rep, True, time.time())
    finally:
        store.close()
    with client(inst) as c:
        admin(c)
        r = c.get("/admin/dmarc")
        assert r.status_code == 200
        assert "3 report(s)" in r.text
        assert len(re.findall(r"<g><title>", r.text)) == 3  # one bar per day, in an inline SVG
        assert "2026-05-29: 50 pass, 7 fail" in r.text
        assert re.search(r"<td>2026-05-29</td><td>" + re.escape(DOMAIN) + r"</td><td>198.51.100.9</td>"
                         r"<td>Example Org</td><td>0</td><td>7</td>", r.text)
        assert 'id="tls-rpt"' in r.text


def test_tls_reports_table(inst: Instance) -> None:
    """Received TLS reports (RFC 8460) are listed under the DMARC ones, failures with their result types."""
    cfg = load_config(inst.config)
    store = TLSReportStore(cfg.data_dir / "tlsrpt.sqlite")
    try:
        day = 86400 * 20600  # 2026-05-27
        policy = PolicyReport(TLSPolicy("sts", DOMAIN, ("version: STSv1", "mode: enforce"), ("mx." + DOMAIN,)),
                              12, (FailureDetail("certificate-host-mismatch", 3, "192.0.2.7", "mx." + DOMAIN),))
        rep = TLSReport("Sender Org", "mailto:tls@sender.example", "tls-r1", day, day + 86399, (policy,))
        assert store.store_received(rep, True, time.time())
    finally:
        store.close()
    with client(inst) as c:
        admin(c)
        r = c.get("/admin/dmarc")
        assert r.status_code == 200
        assert re.search(r"<td>2026-05-27</td><td>" + re.escape(DOMAIN) + r"</td><td>sts</td><td>Sender Org</td>"
                         r"<td>12</td><td>3</td><td>certificate-host-mismatch \(3\)</td>", r.text), r.text


def test_decision_log_search_by_address_and_queue_id(inst: Instance) -> None:
    m = EmailMessage()
    m["From"] = "someone@elsewhere.invalid"
    m["To"] = USER
    m["Subject"] = "logged"
    m["Message-ID"] = "<logged-1@elsewhere.invalid>"
    m.set_content("hello")
    with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
        s.send_message(m, from_addr="someone@elsewhere.invalid", to_addrs=[USER])
    with client(inst) as c:
        admin(c)
        deadline = time.monotonic() + 20
        while True:
            r = c.get("/admin/log", params={"q": USER.upper()})
            if "logged-1@elsewhere.invalid" in r.text or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert "logged-1@elsewhere.invalid" in r.text, r.text
        qid = re.search(r"queue id (\S+) ", r.text)
        assert qid
        r2 = c.get("/admin/log", params={"q": qid.group(1)})
        assert "logged-1@elsewhere.invalid" in r2.text
        r3 = c.get("/admin/log", params={"q": "<logged-1@elsewhere.invalid>"})
        assert qid.group(1) in r3.text
        assert "No inbound decision" in c.get("/admin/log", params={"q": "nobody@nowhere.test"}).text


def test_health_page(inst: Instance) -> None:
    with client(inst) as c:
        admin(c)
        r = c.get("/admin/health")
        assert r.status_code == 200
        assert re.search(r"listener smtp on [^<]*: answering", r.text)
        assert "disk:" in r.text and "queue:" in r.text and "connections:" in r.text


def test_verdict_search_by_address_is_exact(tmp_path: Path) -> None:
    vlog = VerdictLog(tmp_path / "v.sqlite")
    try:
        vlog.record("Q1", "m1@x", "192.0.2.1", "a@x.test", ["axb@y.test", "c@y.test"], "delivered", ["ok"])
        vlog.record("Q2", "m2@x", "192.0.2.1", "A_B@y.test", ["d@y.test"], "junk", ["spam"])
        vlog.record("Q3", "m3@x", "192.0.2.1", "e@x.test", ["a%b@y.test"], "refused", ["no"])
        assert [v.queue_id for v in vlog.find_address("a_b@y.test")] == ["Q2"]  # "_" is no wildcard
        assert [v.queue_id for v in vlog.find_address("C@Y.TEST")] == ["Q1"]
        assert [v.queue_id for v in vlog.find_address("a%b@y.test")] == ["Q3"]
        assert vlog.find_address("y.test") == [] and vlog.find_address("") == []
    finally:
        vlog.close()


def test_an_admin_no_longer_admin_gets_403_on_every_page(inst: Instance) -> None:
    other = f"second@{DOMAIN}"
    inst.cli("user", "add", other, "--password-stdin", "--admin", stdin=PW + "\n")
    with client(inst) as c:
        assert c.post("/admin/login", data={"address": other, "password": PW}).status_code == 303
        r = c.get("/admin/queue")
        assert r.status_code == 200
        m = re.search(r'name="csrf" value="([^"]+)"', r.text)
        assert m
        token = m.group(1)
        acc = Accounts(load_config(inst.config).accounts_db)
        try:
            acc.set_console_admin(other, False)
        finally:
            acc.close()
        assert c.post("/admin/queue", data={"op": "retry_all", "csrf": token}).status_code == 403
        for page in ("/admin/home", *PAGES):
            assert c.get(page).status_code in (403, 303), page  # 403, then logged out: back to the login
        assert c.post("/admin/do", data={"op": "domain_add", "domain": "x.test", "csrf": token}).status_code == 403
    with client(inst) as c:  # the next request of a session that is still open: 403 on each page
        for page in ("/admin/home", *PAGES):
            assert c.post("/admin/login", data={"address": ROOT, "password": PW}).status_code == 303
            acc = Accounts(load_config(inst.config).accounts_db)
            try:
                acc.set_console_admin(ROOT, False)
                assert c.get(page).status_code == 403, page
            finally:
                acc.set_console_admin(ROOT, True)
                acc.close()
