"""Cluster mode's report stores against a real PostgreSQL: two nodes' TLS recorders counting the same
domain at once give exact sums; the daily report job run on two nodes at once sends each DMARC and
TLS report once; reports received by one node are read (and deduplicated) on another, also by
`postier tls reports` and `postier dmarc reports` of a node that never saw them; PostgreSQL down
costs no delivery and counting resumes when it is back."""

from __future__ import annotations

import asyncio
import json
import threading
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from postier.mailauth import tlsrpt  # noqa: E402
from postier.mailauth.reportdb import claim_name  # noqa: E402
from postier.mailauth.reports import (  # noqa: E402
    DAY, AggregateReport, PolicyPublished, ReportRow, ReportStore, extract_reports,
)
from postier.mailauth.tlsrpt import (  # noqa: E402
    STS, FailureDetail, PolicyReport, SessionResult, TLSPolicy, TLSReport, TLSReportStore,
)
from postier.pipeline.jobs import ReportJob  # noqa: E402
from postier.queue.client import TLSResult  # noqa: E402
from postier.queue.delivery import Host, Route  # noqa: E402
from postier.queue.mtasts import Policy  # noqa: E402
from postier.queue.tlsrpt import TLSRecorder  # noqa: E402
from postier.resolver.fake import FakeResolver  # noqa: E402
from postier.store.cluster.reports import PGReportStorage  # noqa: E402
from postier.store.errors import StoreUnavailable  # noqa: E402
from tests.concurrency import together
from tests.deliverability.common import make_config  # noqa: E402
from tests.deliverability.test_reports import FakeQueue, evaluation  # noqa: E402
from tests.harness import Instance  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import make_nodes  # noqa: E402

DAY0 = 20_000 * DAY
ROUTE = Route(domain="b.test", sts=Policy("b.test", "i", "enforce", ("mail.b.test",), 86400, 0.0))
HOST = Host("mail.b.test", "198.51.100.3", 25, strict=True)
OK = TLSResult("TLSv1.3", "X", True)
MISMATCH = TLSResult("TLSv1.3", "X", False, "hostname mismatch")


def tls_store(dsn: str) -> TLSReportStore:
    return TLSReportStore(PGReportStorage(dsn, "tlsrpt", 5.0))


def test_two_nodes_counting_the_same_domain_at_once_give_exact_sums(pg: PgServer) -> None:
    dsn = pg.create_db()
    stores = [tls_store(dsn), tls_store(dsn)]  # two nodes: two stores, two connections
    per_node = 150
    start = threading.Barrier(2)

    def node(store: TLSReportStore) -> None:
        rec = TLSRecorder(store, "192.0.2.1", clock=lambda: DAY0 + 100)

        async def run() -> None:
            start.wait(30)
            # every outcome is new to the table at first: both nodes insert the same rows at once
            await asyncio.gather(*(rec.session(ROUTE, HOST, OK if i % 3 else MISMATCH, None)
                                   for i in range(per_node)))
        asyncio.run(run())

    together(*(partial(node, s) for s in stores))
    counts = {r.result: n for _, _, r, n in stores[1].pending(DAY0 + DAY)}
    assert counts == {"": 2 * (per_node - per_node // 3), "certificate-host-mismatch": 2 * (per_node // 3)}
    for s in stores:
        s.close()


def test_the_day_bound_of_distinct_outcomes_holds_in_postgresql(pg: PgServer, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.setattr(tlsrpt, "MAX_SESSION_ROWS", 3)
    store = tls_store(pg.create_db())
    policy = TLSPolicy(STS, "b.test", ("version: STSv1", "x" * 5000), ("mail.b.test",))  # longer than an index entry
    got = [store.record(SessionResult(policy, "validation-failure", receiving_ip=f"198.51.100.{i}"), DAY0)
           for i in range(5)]
    assert got == [True, True, True, False, False]
    assert store.record(SessionResult(policy, "validation-failure", receiving_ip="198.51.100.0"), DAY0)  # counted
    assert sorted(n for *_, n in store.pending(DAY0 + DAY)) == [1, 1, 2]
    assert store.prune(DAY0 + 2 * DAY) == 3  # the same retention as on one machine
    store.close()


def test_the_report_job_on_two_nodes_at_once_sends_each_report_once(tmp_path: Path, pg: PgServer) -> None:
    dsn = pg.create_db()
    dns = FakeResolver()
    dns.add("_smtp._tls.b.test", "TXT", "v=TLSRPTv1; rua=mailto:tls-reports@b.test")
    nodes = []
    for i in range(2):
        root = tmp_path / f"node{i}"
        root.mkdir()
        dmarc, tls, queue = ReportStore(PGReportStorage(dsn, "dmarc")), tls_store(dsn), FakeQueue()
        job = ReportJob(make_config(root, hostname="mail.a.test"), lambda: ["a.test"], queue, dmarc, dns,
                        clock=lambda: DAY0 + DAY + 60, tls=tls)
        nodes.append((job, queue, dmarc, tls))
    for i, (_job, _queue, dmarc, tls) in enumerate(nodes):  # each node saw part of the day
        for n in range(3):
            dmarc.record(evaluation(DAY0 + 10 * n + i, f"192.0.2.{n}", n != 2))
            tls.record(SessionResult(TLSPolicy(STS, "b.test")), DAY0 + 10 * n + i)
    start = threading.Barrier(2)

    def run(job: ReportJob) -> list[tuple[str, str]]:
        start.wait(30)
        return asyncio.run(job.run_once())

    results = together(*(partial(run, job) for job, *_ in nodes))
    assert sorted(x for r in results for x in r) == [("a.test", "d@a.test"), ("b.test", "tls-reports@b.test")]
    sent = {rcpts[0]: message for _, queue, *_ in nodes for _sender, rcpts, _prefix, message in queue.sent}
    assert sorted(sent) == ["d@a.test", "tls-reports@b.test"]  # one of each, whichever node sent it
    [tls_report] = tlsrpt.extract_tls_reports(sent["tls-reports@b.test"])
    assert tls_report.successes == 6  # both nodes' sessions, in one report
    [dmarc_report] = extract_reports(sent["d@a.test"])
    assert dmarc_report.messages == 6
    # everything is marked reported: a later run on either node sends nothing, and nobody holds the claim
    job, queue, dmarc, tls = nodes[1]
    assert asyncio.run(job.run_once()) == []
    assert dmarc.pending(DAY0 + DAY) == [] and tls.pending(DAY0 + DAY) == []
    dmarc_claim, tls_claim = claim_name("dmarc", DAY0 // DAY + 1, "a.test"), claim_name("tlsrpt", DAY0 // DAY, "b.test")
    assert dmarc.claim(dmarc_claim, DAY0 + 2 * DAY, DAY0 + DAY) and tls.claim(tls_claim, DAY0 + 2 * DAY, DAY0 + DAY)
    assert not tls.claim(tls_claim, DAY0 + 3 * DAY, DAY0 + DAY + 1)  # held until its lease ends
    for _job, _queue, dmarc, tls in nodes:
        dmarc.close()
        tls.close()


TLS_IN = TLSReport("Other Org", "ops@other.test", "rep-1", DAY0, DAY0 + DAY, (
    PolicyReport(TLSPolicy(STS, "example.org", ("version: STSv1",), ("mx.example.org",)), 10,
                 (FailureDetail("certificate-expired", 2, "203.0.113.5", "mx.example.org", "192.0.2.25"),)),))
DMARC_IN = AggregateReport("Other Org", "dmarc@other.test", "agg-1", DAY0, DAY0 + DAY,
                           PolicyPublished("example.org", "reject"),
                           (ReportRow("203.0.113.5", 4, "none", "pass", "pass", "example.org"),
                            ReportRow("198.51.100.9", 1, "reject", "fail", "fail", "example.org")))


def test_reports_received_on_one_node_are_read_on_another(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    dsn = pg.create_db()
    a_tls, a_dmarc = tls_store(dsn), ReportStore(PGReportStorage(dsn, "dmarc"))
    b_tls, b_dmarc = tls_store(dsn), ReportStore(PGReportStorage(dsn, "dmarc"))
    assert a_tls.store_received(TLS_IN, True, DAY0 + DAY)
    assert not b_tls.store_received(TLS_IN, True, DAY0 + DAY + 5)  # the same report, arrived at B too
    assert a_dmarc.store_received(DMARC_IN, False, DAY0 + DAY)
    assert not b_dmarc.store_received(DMARC_IN, False, DAY0 + DAY)
    [got] = b_tls.received("example.org")
    assert got.report == TLS_IN and got.authenticated
    [agg] = b_dmarc.received()
    assert agg.report == DMARC_IN and not agg.authenticated  # the rows in their order
    for s in (a_tls, a_dmarc, b_tls, b_dmarc):
        s.close()
    # a node's command line reads the shared store (it never received either report)
    node = make_nodes(tmp_path, dsn, s3, count=1)[0]
    out = json.loads(node.cli("tls", "reports", "--json").stdout)
    assert [r["report"]["report-id"] for r in out] == ["rep-1"]
    text = node.cli("dmarc", "reports").stdout
    assert "report agg-1 from Other Org" in text and "5 message(s): 4 pass, 1 fail" in text


def test_postgresql_down_costs_no_delivery_and_counting_resumes(pg_own: PgServer) -> None:
    store = tls_store(pg_own.create_db())
    rec = TLSRecorder(store, "192.0.2.1", clock=lambda: DAY0)
    asyncio.run(rec.session(ROUTE, HOST, OK, None))
    pg_own.stop()
    with pytest.raises(StoreUnavailable):
        store.record(SessionResult(TLSPolicy(STS, "b.test")), DAY0)
    asyncio.run(rec.session(ROUTE, HOST, OK, None))  # logged, not raised: the delivery goes on
    pg_own.start()
    asyncio.run(rec.session(ROUTE, HOST, OK, None))  # a new connection
    assert [n for *_, n in store.pending(DAY0 + DAY)] == [2]
    store.close()


def test_sessions_of_two_real_nodes_are_one_report(tmp_path: Path, pg: PgServer, s3: S3Server) -> None:
    """End to end: a message submitted on each node is delivered to a remote MX; each node records its
    session into the shared store; `postier tls report-now` on node A sends one report counting both,
    and on node B then finds nothing left to send."""
    from tests.dnsserver import DNSServer

    from .test_queue_nodes import BOB, REMOTE, submit, wait_for
    with DNSServer() as dns:
        (tmp_path / "mx").mkdir()
        mx = Instance(tmp_path / "mx", REMOTE, address="127.0.0.4")
        mx.add_user(BOB, "password123")
        dns.add(REMOTE, "MX", f"10 {mx.hostname}")
        dns.add(mx.hostname, "A", "127.0.0.4")
        dns.add(f"_smtp._tls.{REMOTE}", "TXT", f"v=TLSRPTv1; rua=mailto:{BOB}")
        a, b = make_nodes(tmp_path, pg.create_db(), s3, 2, extra=(
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {mx.port("smtp")}\n'))
        try:
            mx.start()
            a.start()
            b.start()
            for node in (a, b):
                code, text, _ = submit(node, f"via {node.address}")
                assert code == 250, (code, text)
            wait_for(lambda: len(mx.messages(BOB)) == 2, 60, "both messages at the MX")
            out = a.cli("tls", "report-now").stdout
            assert f"{REMOTE}: report queued for {BOB}" in out, out
            [sent] = b.cli("tls", "reports", "--sent").stdout.splitlines()  # the log is shared too
            ok, _, failed = sent.split("\t")[3].partition(" ok, ")
            assert int(ok) + int(failed.split()[0]) == 2 and sent.split("\t")[4] == "queued", sent
            assert "no TLS report to send" in b.cli("tls", "report-now").stdout
        finally:
            a.stop()
            b.stop()
            mx.stop()
