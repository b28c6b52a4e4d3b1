"""TLS reporting (RFC 8460): the `_smtp._tls` record, the §4.4 JSON both ways, the §5.3 mail, the store's
aggregation and bounds, the outcome of a session in §4.3 terms, and the TLS half of the daily job."""

from __future__ import annotations

import asyncio
import email
import gzip
import json
from email import policy as email_policy
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.mailauth import tlsrpt
from postier.mailauth.reports import DAY, ReportError
from postier.mailauth.tlsrpt import (
    NO_POLICY, STS, TLSA, FailureDetail, PolicyReport, SessionResult, TLSPolicy, TLSReport, TLSReportStore,
    build_reports, extract_tls_reports, parse_record, parse_report_json, report_json, report_message,
)
from postier.pipeline.jobs import ReportJob
from postier.queue.client import TLSResult
from postier.queue.delivery import Failure, Fate, Host, Route
from postier.queue.mtasts import Policy
from postier.queue.tlsrpt import TLSRecorder, classify
from postier.resolver import TLSARecord
from postier.resolver.fake import FakeResolver
from tests.concurrency import together
from tests.deliverability.common import make_config
from tests.deliverability.test_reports import FakeQueue

STS_POLICY = TLSPolicy(STS, "b.test", ("version: STSv1", "mode: enforce", "mx: mail.b.test", "max_age: 86400"),
                       ("mail.b.test",))
REPORT = TLSReport("mail.a.test", "postmaster@a.test", "r1.2026-12-04.b.test@mail.a.test", 1_796_342_400,
                   1_796_428_800, (
                       PolicyReport(STS_POLICY, 5, (FailureDetail("certificate-host-mismatch", 2, "192.0.2.1",
                                                                  "mail.b.test", "198.51.100.3", "no SAN"),)),
                       PolicyReport(TLSPolicy(NO_POLICY, "c.b.test"), 3),
                   ))


def test_parse_record() -> None:
    # RFC 8460 §3: one record, rua a comma list of mailto: and https: URIs
    assert parse_record(["v=TLSRPTv1; rua=mailto:tls@b.test"]) == ("mailto:tls@b.test",)
    assert parse_record(["v=spf1 -all", "v=TLSRPTv1;rua=mailto:a@b.test, https://r.b.test/tls ;"]) == (
        "mailto:a@b.test", "https://r.b.test/tls")
    assert parse_record(["v=TLSRPTv1; rua=mailto:a@b.test", "v=TLSRPTv1; rua=mailto:c@b.test"]) is None  # several
    assert parse_record(["v=TLSRPTv1"]) is None and parse_record([]) is None  # no rua
    assert parse_record(["v=TLSRPTv1; rua=ftp://x"]) is None
    assert parse_record(["v=TLSRPTv10; rua=mailto:a@b.test"]) is None


def test_json_has_the_section_4_4_fields_and_round_trips() -> None:
    doc = json.loads(report_json(REPORT))
    assert set(doc) == {"organization-name", "date-range", "contact-info", "report-id", "policies"}
    assert doc["date-range"] == {"start-datetime": "2026-12-04T00:00:00Z", "end-datetime": "2026-12-05T00:00:00Z"}
    sts = doc["policies"][0]
    assert sts["policy"] == {"policy-type": "sts", "policy-domain": "b.test", "policy-string": list(STS_POLICY.strings),
                             "mx-host": ["mail.b.test"]}
    assert sts["summary"] == {"total-successful-session-count": 5, "total-failure-session-count": 2}
    assert sts["failure-details"] == [{"result-type": "certificate-host-mismatch", "sending-mta-ip": "192.0.2.1",
                                       "receiving-mx-hostname": "mail.b.test", "receiving-ip": "198.51.100.3",
                                       "failed-session-count": 2, "failure-reason-code": "no SAN"}]
    nop = doc["policies"][1]
    assert nop["policy"] == {"policy-type": "no-policy-found", "policy-domain": "c.b.test"}
    assert "failure-details" not in nop
    assert parse_report_json(report_json(REPORT)) == REPORT


@pytest.mark.parametrize("bad", [
    b"", b"not json", b"[1, 2]", b'{"organization-name": "x"}',
    b'{"organization-name": "x", "report-id": "r", "date-range": {"start-datetime": "yesterday",'
    b' "end-datetime": "2026-12-05T00:00:00Z"}, "policies": []}',
    b'{"organization-name": "x", "report-id": "r", "date-range": {"start-datetime": "2026-12-04T00:00:00Z",'
    b' "end-datetime": "2026-12-05T00:00:00Z"}, "policies": [{"policy": {"policy-domain": "-bad-"}}]}',
    b"[" * 100_000,
])
def test_bad_documents_are_one_error(bad: bytes) -> None:
    with pytest.raises(ReportError):
        parse_report_json(bad)


def test_hostile_values_are_bounded() -> None:
    doc = json.loads(report_json(REPORT))
    doc["policies"][0]["summary"]["total-successful-session-count"] = -5
    doc["policies"][0]["failure-details"] = [{"result-type": "x\u0000\u2028" * 200, "failed-session-count": "7"}] * 5000
    rep = parse_report_json(json.dumps(doc).encode())
    assert rep.policies[0].successes == 0 and len(rep.policies[0].failures) == tlsrpt.MAX_DETAILS
    f = rep.policies[0].failures[0]
    assert f.count == 0 and len(f.result_type) == 64 and f.result_type.isprintable()


def test_report_mail_section_5_3_and_extraction() -> None:
    mail = report_message(REPORT, "mail.a.test", "postmaster@a.test", "tls-reports@b.test", now=1_796_430_000)
    msg = email.message_from_bytes(mail, policy=email_policy.default)
    assert msg["Subject"] == ("Report Domain: b.test Submitter: mail.a.test "
                              "Report-ID: <r1.2026-12-04.b.test@mail.a.test>")
    assert msg["TLS-Report-Domain"] == "b.test" and msg["TLS-Report-Submitter"] == "mail.a.test"
    assert msg.get_content_type() == "multipart/report" and msg.get_param("report-type") == "tlsrpt"
    [att] = [p for p in msg.iter_attachments()]
    assert att.get_content_type() == "application/tlsrpt+gzip"
    assert att.get_filename() == "mail.a.test!b.test!1796342400!1796428800!r1.json.gz"
    assert parse_report_json(gzip.decompress(att.get_content())) == REPORT
    assert extract_tls_reports(mail) == [REPORT]
    # a plain JSON attachment is read too; a broken one is one error; a bomb stops at the bound
    plain = mail.replace(b"application/tlsrpt+gzip", b"application/tlsrpt+json")
    assert extract_tls_reports(plain) == [REPORT]
    with pytest.raises(ReportError):
        extract_tls_reports(report_message_with(b"\x1f\x8b\x08\x00broken"))
    bomb = gzip.compress(b"{" + b" " * (tlsrpt.MAX_JSON_SIZE + 10) + b"}")
    with pytest.raises(ReportError, match="bigger than"):
        extract_tls_reports(report_message_with(bomb))
    assert extract_tls_reports(b"Subject: hi\r\n\r\nno report here\r\n") == []


def report_message_with(attachment: bytes) -> bytes:
    from postier.mailauth.reports import report_mail
    return report_mail("a@a.test", "b@b.test", "a.test", "s", "t", attachment, tlsrpt.MEDIA_TYPE, "x.json.gz")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2000))
def test_reader_fuzz_random_bytes(data: bytes) -> None:
    for candidate in (data, gzip.compress(data)):
        try:
            extract_tls_reports(report_message_with(candidate))
        except ReportError:
            pass


def test_store_aggregates_bounds_and_keeps_concurrent_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    store = TLSReportStore(tmp_path / "tlsrpt.sqlite")
    day0 = 20_000 * DAY
    ok = SessionResult(STS_POLICY)
    bad = SessionResult(STS_POLICY, "certificate-host-mismatch", "192.0.2.1", "mail.b.test", "198.51.100.3", "x")

    def many(r: SessionResult, n: int) -> None:
        for _ in range(n):
            store.record(r, day0 + 5)

    together(*(partial(many, r, 50) for r in (ok, ok, bad, bad)))  # two sessions at once each
    pending = store.pending(day0 + DAY)
    assert sorted((r.result, n) for _, _, r, n in pending) == [("", 100), ("certificate-host-mismatch", 100)]
    [rep] = build_reports([(d, r, n) for _, d, r, n in pending], org_name="o", contact="c", submitter="s",
                          end=day0 + DAY)
    assert (rep.successes, rep.failed, rep.start, rep.end) == (100, 100, day0, day0 + DAY)
    # outcomes counted after the report was built stay for the next one
    store.record(ok, day0 + 7)
    store.mark_reported((rid, n) for rid, _, _, n in pending)
    assert [(r.result, n) for _, _, r, n in store.pending(day0 + DAY)] == [("", 1)]
    # a day holds at most MAX_SESSION_ROWS distinct outcomes
    monkeypatch.setattr(tlsrpt, "MAX_SESSION_ROWS", 3)
    results = [store.record(SessionResult(STS_POLICY, "validation-failure", receiving_ip=f"192.0.2.{i}"), day0 + 9)
               for i in range(5)]
    assert results == [True, True, False, False, False] and store.record(ok, day0 + 9)
    assert store.prune(day0 + 30 * DAY) == 3 and store.pending(day0 + 30 * DAY) == []
    store.close()


def test_received_reports_stored_once_and_filtered(tmp_path: Path) -> None:
    store = TLSReportStore(tmp_path / "tlsrpt.sqlite")
    assert store.store_received(REPORT, True, 1.0) and not store.store_received(REPORT, True, 2.0)
    [rr] = store.received()
    assert rr.report == REPORT and rr.authenticated and rr.received == 1.0
    [only] = store.received("c.b.test")
    assert [p.policy.domain for p in only.report.policies] == ["c.b.test"]
    assert store.received("other.test") == []
    store.close()


# -- a session's outcome in RFC 8460 terms ---------------------------------------------------------------

def test_classify_certificate_reasons() -> None:
    assert classify("validation failed: leaf certificate has no matching subjectAltName (...)") == \
        "certificate-host-mismatch"
    assert classify("validation failed: cert is not valid at validation time") == "certificate-expired"
    assert classify("validation failed: candidates exhausted: all candidates exhausted") == \
        "certificate-not-trusted"
    assert classify("DANE: no TLSA record matches the certificate") == "tlsa-invalid"
    assert classify("something else") == "validation-failure"
    assert all(classify(x) in tlsrpt.RESULT_TYPES for x in ("", "no CA store", "self-signed"))


def test_recorder_outcomes(tmp_path: Path) -> None:
    store = TLSReportStore(tmp_path / "tlsrpt.sqlite")
    rec = TLSRecorder(store, "192.0.2.1", clock=lambda: 20_000 * DAY)
    sts = Policy("b.test", "id1", "enforce", ("mail.b.test",), 86400, 0.0)
    route = Route(domain="b.test", sts=sts)
    host = Host("mail.b.test", "198.51.100.3", 25, strict=True)
    verified = TLSResult("TLSv1.3", "X", True)
    assert rec.outcome(route, host, verified, None) == SessionResult(STS_POLICY)
    fail = Failure(Fate.DEFERRED, "certificate not verified: validation failed: leaf certificate has no matching "
                   "subjectAltName", "4.7.5")
    got = rec.outcome(route, host, None, fail)
    assert got is not None and (got.result, got.sending_ip, got.receiving_mx, got.receiving_ip) == (
        "certificate-host-mismatch", "192.0.2.1", "mail.b.test", "198.51.100.3")
    no_tls = Failure(Fate.DEFERRED, "TLS is required but the server does not offer STARTTLS", "4.7.0")
    assert rec.outcome(route, host, None, no_tls).result == "starttls-not-supported"  # type: ignore[union-attr]
    assert rec.outcome(route, host, None, Failure(Fate.DEFERRED, "connect to x: refused", "4.4.1")) is None
    # testing mode: delivered, but an unverified certificate is a failure to report
    testing = Route(domain="b.test", sts=Policy("b.test", "i", "testing", ("mail.b.test",), 60, 0.0))
    got = rec.outcome(testing, host, TLSResult("TLSv1.3", "X", False, "validation failed: candidates exhausted"),
                      None)
    assert got is not None and got.policy.type == STS and got.result == "certificate-not-trusted"
    # no policy: TLS (verified or not) is a success, plaintext a failure
    plain = Route(domain="c.test")
    assert rec.outcome(plain, host, TLSResult("TLSv1.2", "X", False, "x"), None) == SessionResult(
        TLSPolicy(NO_POLICY, "c.test"))
    assert rec.outcome(plain, host, TLSResult(), None).result == "starttls-not-supported"  # type: ignore[union-attr]
    # DANE takes precedence: a tlsa policy with the host's records
    dane = Host("mail.b.test", "198.51.100.3", 25, dane=True, tlsa=(TLSARecord(3, 1, 1, b"\xab\xcd"),))
    got = rec.outcome(route, dane, TLSResult("TLSv1.3", "X", False, "DANE: no TLSA record matches"), None)
    assert got is not None and got.policy == TLSPolicy(TLSA, "b.test", ("3 1 1 abcd",), ("mail.b.test",))
    assert got.result == "tlsa-invalid"
    asyncio.run(rec.session(route, host, None, fail))
    [(_, _, r, n)] = store.pending(20_001 * DAY)
    assert r.result == "certificate-host-mismatch" and n == 1
    store.close()


# -- the daily job ----------------------------------------------------------------------------------------

def tls_job(tmp_path: Path, queue: FakeQueue, store: TLSReportStore, dns: FakeResolver, **kw: Any) -> ReportJob:
    return ReportJob(make_config(tmp_path, hostname="mail.a.test"), lambda: ["a.test"], queue, None, dns, tls=store,
                     **kw)


def test_daily_job_sends_to_the_rua_of_each_policy_domain(tmp_path: Path) -> None:
    store = TLSReportStore(tmp_path / "tlsrpt.sqlite")
    day0 = 20_000 * DAY
    bad = SessionResult(STS_POLICY, "certificate-host-mismatch", "192.0.2.1", "mail.b.test", "198.51.100.3", "x")
    store.record(bad, day0 + 10)
    store.record(SessionResult(STS_POLICY), day0 + 20)
    store.record(SessionResult(TLSPolicy(NO_POLICY, "quiet.test")), day0 + 30)  # no record: no report
    store.record(SessionResult(TLSPolicy(NO_POLICY, "flaky.test")), day0 + 40)  # DNS trouble: next run
    store.record(SessionResult(STS_POLICY), day0 + DAY + 5)  # today: tomorrow's report
    dns = FakeResolver()
    dns.add("_smtp._tls.b.test", "TXT", "v=TLSRPTv1; rua=https://r.b.test/x,mailto:tls-reports@b.test")
    dns.tempfail("_smtp._tls.flaky.test")

    async def sign(message: bytes) -> bytes:
        return b"DKIM-Signature: fake\r\n"

    queue = FakeQueue()
    job = tls_job(tmp_path, queue, store, dns, clock=lambda: day0 + DAY + 60, sign=sign)
    assert asyncio.run(job.run_once()) == [("b.test", "tls-reports@b.test")]
    [(sender, rcpts, prefix, message)] = queue.sent
    assert (sender, rcpts, prefix) == ("postmaster@a.test", ["tls-reports@b.test"], b"DKIM-Signature: fake\r\n")
    [rep] = extract_tls_reports(message)
    assert (rep.domains, rep.successes, rep.failed, rep.start, rep.end) == (("b.test",), 1, 1, day0, day0 + DAY)
    assert rep.org_name == "mail.a.test" and rep.contact == "postmaster@a.test"
    assert [s.status for s in store.sent()] == ["post-failed", "queued"]  # r.b.test has no address
    left = {r.policy.domain: n for _, _, r, n in store.pending(day0 + 2 * DAY)}
    assert left == {"flaky.test": 1, "b.test": 1}  # quiet.test is done (it wants no reports)
    # the queue fails: nothing is lost
    job = tls_job(tmp_path, FakeQueue(broken=True), store, dns, clock=lambda: day0 + 2 * DAY + 60)
    assert asyncio.run(job.run_once()) == []
    assert {r.policy.domain for _, _, r, _ in store.pending(day0 + 2 * DAY)} == {"flaky.test", "b.test"}
    store.close()


# -- reports arriving at the MX ---------------------------------------------------------------------------

def test_reports_to_our_tls_rua_are_stored_and_bad_ones_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                                ) -> None:
    import random

    from postier.mailauth.reports import report_mail
    from postier.pipeline.mailauth import InboundAuth
    from tests.deliverability.common import body, envelope

    caplog.set_level("INFO", logger="postier.mailauth")
    store = TLSReportStore(tmp_path / "tlsrpt.sqlite")
    cfg = make_config(tmp_path, spf=False, dkim_verify=False, dmarc=False)
    h = InboundAuth(cfg, FakeResolver(), None, lambda: ["b.test"], clock=lambda: 5.0, rng=random.Random(1),
                    tls_reports=store)

    def deliver(mail: bytes, to: str = "tls-reports@b.test") -> str:
        env = envelope(to=to)
        env.qid = "Q1"
        return asyncio.run(h.evaluate(env, body(tmp_path / "spool", mail))).action

    good = report_message(REPORT, "mail.a.test", "postmaster@a.test", "tls-reports@b.test")
    assert deliver(good) == "accept" and deliver(good) == "accept"  # the second copy is a duplicate
    [rr] = store.received("b.test")
    assert rr.report.report_id == REPORT.report_id and not rr.authenticated
    assert "TLS report r1.2026-12-04.b.test@mail.a.test from mail.a.test for b.test,c.b.test" in caplog.text
    assert "(duplicate)" in caplog.text
    # malformed: logged, the mail still accepted; about another domain: ignored; to another mailbox: not read
    bad = report_mail("a@a.test", "tls-reports@b.test", "a.test", "s", "t", gzip.compress(b"{nope"),
                      tlsrpt.MEDIA_TYPE, "x.json.gz")
    assert deliver(bad) == "accept" and "unreadable TLS report: invalid JSON" in caplog.text
    other = TLSReport("o", "c", "r2", 0, 1, (PolicyReport(TLSPolicy(NO_POLICY, "elsewhere.test"), 1),))
    assert deliver(report_message(other, "m.test", "a@a.test", "tls-reports@b.test")) == "accept"
    assert "TLS report about elsewhere.test, not one of our domains: ignored" in caplog.text
    mine = TLSReport("o", "c", "r3", 0, 1, (PolicyReport(TLSPolicy(NO_POLICY, "b.test"), 1),))
    assert deliver(report_message(mine, "m.test", "a@a.test", "bob@b.test"), to="bob@b.test") == "accept"
    assert [r.report.report_id for r in store.received()] == [REPORT.report_id]
    store.close()


def test_spool_marks_tls_reports_and_upgrades_an_older_spool(tmp_path: Path) -> None:
    import sqlite3

    from postier.message.types import Envelope
    from postier.queue.spool import TLS_REPORT_ROLE, Spool, SpoolEnqueuer

    root = tmp_path / "queue"
    (root / "msg").mkdir(parents=True)
    old = sqlite3.connect(root / "queue.sqlite")  # a spool from before TLS reports: no tls_optional column
    old.execute("CREATE TABLE messages (id TEXT PRIMARY KEY, sender TEXT NOT NULL, created REAL NOT NULL, size "
                "INTEGER NOT NULL, user TEXT NOT NULL DEFAULT '', envid TEXT NOT NULL DEFAULT '', ret TEXT NOT NULL "
                "DEFAULT '', smtputf8 INTEGER NOT NULL DEFAULT 0, eightbit INTEGER NOT NULL DEFAULT 0, warned "
                "INTEGER NOT NULL DEFAULT 0)")
    old.execute("INSERT INTO messages (id, sender, created, size) VALUES ('AAAA0001', 'a@a.test', 1.0, 3)")
    old.commit()
    old.close()
    spool = Spool(root)
    before = spool.message("AAAA0001")
    assert before is not None and not before.tls_optional
    q = SpoolEnqueuer(spool)

    async def put(role: str) -> str:
        return await q.enqueue(Envelope(role=role, peer_ip="127.0.0.1", helo="h", mail_from="postmaster@a.test"),
                               ["tls-reports@b.test"], b"", b"Subject: r\r\n\r\nx\r\n")  # type: ignore[arg-type]

    report, other = asyncio.run(put(TLS_REPORT_ROLE)), asyncio.run(put("dmarc-report"))
    got, plain = spool.message(report), spool.message(other)
    assert got is not None and got.tls_optional and plain is not None and not plain.tls_optional
    assert [(i.id, s.address) for i, s in spool.due_full(1e12, 10) if i.tls_optional] == [
        (report, "tls-reports@b.test")]
    assert spool.read_file(report) == b"Subject: r\r\n\r\nx\r\n"
    spool.close()


def test_policy_fetch_failures_are_reported_as_sts_failures(tmp_path: Path) -> None:
    import ssl

    from postier.queue.mtasts import PolicyCache

    dns = FakeResolver()
    dns.add("_mta-sts.b.test", "TXT", "v=STSv1; id=one")
    answers: list[object] = [OSError("connection refused"), "garbage", ssl.SSLCertVerificationError("bad cert"),
                             "version: STSv1\r\nmode: enforce\r\nmx: mail.b.test\r\nmax_age: 86400\r\n"]

    async def fetch(domain: str) -> str:
        a = answers.pop(0)
        if isinstance(a, BaseException):
            raise a
        assert isinstance(a, str)
        return a

    store = TLSReportStore(tmp_path / "tlsrpt.sqlite")
    cache = PolicyCache(dns, None, fetch=fetch)
    rec = TLSRecorder(store, "192.0.2.1", sts_failures=cache.failures)
    host = Host("mail.b.test", "198.51.100.3", 25)
    route = Route(domain="b.test")
    seen = []
    for _ in range(3):
        assert asyncio.run(cache.get("b.test")) is None
        got = rec.outcome(route, host, TLSResult("TLSv1.3", "X", True), None)
        assert got is not None and got.policy == TLSPolicy(STS, "b.test")
        seen.append(got.result)
        # a connection that never reached TLS is still not a TLS outcome
        assert rec.outcome(route, host, None, Failure(Fate.DEFERRED, "connect to x: refused", "4.4.1")) is None
    assert seen == ["sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"]
    assert asyncio.run(cache.get("b.test")) is not None and cache.failures == {}  # fetched: forgotten
    assert rec.outcome(Route(domain="c.test"), host, TLSResult("TLSv1.3", "X", True), None) == SessionResult(
        TLSPolicy(NO_POLICY, "c.test"))
    store.close()


def test_https_rua_gets_a_post(tmp_path: Path) -> None:
    """RFC 8460 §3: an https rua receives the gzip'd JSON in a POST over verified TLS."""
    import ssl

    import trustme
    from aiohttp import web

    from postier.queue.tlsrpt import post_report

    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("r.b.test").configure_cert(server_ctx)
    got: list[tuple[str, bytes]] = []

    async def take(request: web.Request) -> web.Response:
        got.append((request.content_type, await request.read()))
        return web.Response(status=201 if request.path == "/ok" else 500)

    async def main() -> tuple[str, str, str]:
        app = web.Application()
        app.router.add_post("/{name}", take)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        dns = FakeResolver()
        dns.add("r.b.test", "A", "127.0.0.1")
        data = gzip.compress(report_json(REPORT))
        try:
            return (await post_report(f"https://r.b.test:{port}/ok", data, tlsrpt.MEDIA_TYPE, dns, ca_file),
                    await post_report(f"https://r.b.test:{port}/no", data, tlsrpt.MEDIA_TYPE, dns, ca_file),
                    await post_report(f"https://r.b.test:{port}/ok", data, tlsrpt.MEDIA_TYPE, dns, None))
        finally:
            await runner.cleanup()

    ok, refused, untrusted = asyncio.run(main())
    assert ok == "" and refused == "HTTP 500" and "certificate" in untrusted.lower()
    assert got[0][0] == "application/tlsrpt+gzip" and parse_report_json(gzip.decompress(got[0][1])) == REPORT
    assert len(got) == 2  # the untrusted server never saw the report
