"""`postier cluster import-accounts` copies a single-machine node's report files into the shared report
tables: the DMARC results and TLS outcomes it recorded (with the real recording code) and had not
reported yet, and the reports it received. The cluster's report job then sends them once; what the
node had sent already is not sent again, what has expired is not copied; a rerun copies nothing;
two imports at once copy each row once and sum the TLS counts exactly; a TLS row that grew since
the last import adds only its increase. The node's log of reports sent is copied too, each entry
once (a rerun, two imports at once), and listed among the cluster's own by time."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from postier.accounts import Accounts  # noqa: E402
from postier.mailauth import tlsrpt  # noqa: E402
from postier.mailauth.reports import DAY, ReportStore, build_reports, extract_reports  # noqa: E402
from postier.mailauth.tlsrpt import TLSReportStore  # noqa: E402
from postier.pipeline.jobs import ReportJob  # noqa: E402
from postier.pipeline.mailauth import InboundAuth  # noqa: E402
from postier.queue.tlsrpt import TLSRecorder  # noqa: E402
from postier.resolver.fake import FakeResolver  # noqa: E402
from postier.store.cluster.importer import Outcome, copy_reports  # noqa: E402
from postier.store.cluster.reports import PGReportStorage  # noqa: E402
from tests.concurrency import together
from tests.deliverability.common import make_config  # noqa: E402
from tests.deliverability.test_hook import TXT, message, run, signed  # noqa: E402
from tests.deliverability.test_reports import FakeQueue, evaluation  # noqa: E402
from tests.harness import Instance  # noqa: E402

from .conftest import PgServer  # noqa: E402
from .test_nodes import DOMAIN  # noqa: E402
from .test_reports import DMARC_IN, HOST, MISMATCH, OK, ROUTE, TLS_IN, tls_store  # noqa: E402

TODAY = int(time.time() // DAY)  # the import decides what has expired by the clock


def sender_dns() -> FakeResolver:
    """As in the hook tests: a.test (p=reject) and q.test (p=quarantine) sign, and ask for reports."""
    r = FakeResolver()
    for domain, policy in (("a.test", "reject"), ("q.test", "quarantine")):
        r.add(domain, "TXT", "v=spf1 ip4:192.0.2.1 -all")
        r.add(f"sel._domainkey.{domain}", "TXT", TXT)
        r.add(f"_dmarc.{domain}", "TXT", f"v=DMARC1; p={policy}; rua=mailto:dmarc@{domain}")
    r.add("mx.a.test", "A", "192.0.2.1")
    r.add("mx.a.test", "TXT", "v=spf1 a -all")
    return r


def record_mail(root: Path, store: ReportStore, resolver: FakeResolver, at: float, data: bytes,
                ip: str = "192.0.2.1", mail_from: str = "alice@a.test") -> None:
    """One message through the port-25 hook, which records its DMARC result in `store` at `at`."""
    h = InboundAuth(make_config(root), resolver, store, lambda: ["b.test"], clock=lambda: at, rng=random.Random(1))
    run(h, data, root, ip=ip, mail_from=mail_from)


def record_sessions(store: TLSReportStore, at: float, ok: int, mismatch: int) -> None:
    """`ok` and `mismatch` delivery attempts to b.test through the queue's TLS recorder, at `at`."""
    rec = TLSRecorder(store, "192.0.2.1", clock=lambda: at)

    async def sessions() -> None:
        for i in range(ok + mismatch):
            await rec.session(ROUTE, HOST, OK if i < ok else MISMATCH, None)
    asyncio.run(sessions())


def single_node(root: Path, resolver: FakeResolver) -> Path:
    """A single machine's data directory: an accounts file, and report files holding results sent
    two days ago (by its own report job), results of yesterday not sent yet, results too old to
    report (expired) and a DMARC and a TLS report it received."""
    data = root / "single"
    data.mkdir()
    Accounts(data / "accounts.sqlite").close()
    dmarc, tls = ReportStore(data / "dmarc.sqlite"), TLSReportStore(data / "tlsrpt.sqlite")
    sent_day, open_day = (TODAY - 2) * DAY, (TODAY - 1) * DAY
    record_mail(root, dmarc, resolver, sent_day + 100, signed(message()))
    record_sessions(tls, sent_day + 100, 2, 0)
    tls_dns = FakeResolver()
    tls_dns.add("_smtp._tls.b.test", "TXT", "v=TLSRPTv1; rua=mailto:tls@b.test")
    queue = FakeQueue()
    job = ReportJob(make_config(data, hostname="mx.b.test"), lambda: ["b.test"], queue, dmarc, tls_dns,
                    clock=lambda: open_day + 60, tls=tls)
    assert sorted(asyncio.run(job.run_once())) == [("a.test", "dmarc@a.test"), ("b.test", "tls@b.test")]
    # yesterday's, not reported yet: two passing and one forged a.test message, one q.test message
    record_mail(root, dmarc, resolver, open_day + 100, signed(message()))
    record_mail(root, dmarc, resolver, open_day + 200, signed(message()), ip="198.51.100.9")
    record_mail(root, dmarc, resolver, open_day + 300, message(), ip="198.51.100.7")
    record_mail(root, dmarc, resolver, open_day + 400, message(b"<x@q.test>"), ip="198.51.100.7",
                mail_from="x@q.test")
    record_sessions(tls, open_day + 100, 3, 1)
    record_sessions(tls, open_day + 200, 1, 0)
    # older than the 14 days kept: not copied
    record_mail(root, dmarc, resolver, (TODAY - 16) * DAY, signed(message()))
    record_sessions(tls, (TODAY - 16) * DAY, 5, 0)
    assert dmarc.store_received(DMARC_IN, False, open_day + 500)
    assert tls.store_received(TLS_IN, True, open_day + 500)
    assert len(dmarc.pending(TODAY * DAY)) == 5 and sum(n for *_, n in tls.pending(TODAY * DAY)) == 10
    dmarc.close()
    tls.close()
    return data


def cluster_job(root: Path, dsn: str, queue: FakeQueue) -> tuple[ReportJob, ReportStore, TLSReportStore]:
    resolver = FakeResolver()
    resolver.add("_smtp._tls.b.test", "TXT", "v=TLSRPTv1; rua=mailto:tls@b.test")
    dmarc, tls = ReportStore(PGReportStorage(dsn, "dmarc")), tls_store(dsn)
    job = ReportJob(make_config(root, hostname="mail.cluster.test"), lambda: [DOMAIN], queue, dmarc, resolver,
                    clock=lambda: TODAY * DAY + 60, tls=tls)
    return job, dmarc, tls


def copied_by_one(outs: list[str], copied: list[str], unchanged: list[str]) -> None:
    """Of two imports' outputs, one has every line of `copied` and the other every line of `unchanged`."""
    has = [[all(line in o for line in lines) for o in outs] for lines in (copied, unchanged)]
    assert has in ([[True, False], [False, True]], [[False, True], [True, False]]), outs


def test_import_then_the_cluster_sends_each_report_once(tmp_path: Path, node: tuple[Instance, str]) -> None:
    data = single_node(tmp_path, sender_dns())
    n, dsn = node

    def import_() -> str:
        return n.cli("cluster", "import-accounts", "--from", str(data)).stdout
    outs = together(import_, import_)  # two admins at once
    # Each report file is copied under its own lock: one import copies all of it, the other finds
    # all of it copied (the DMARC file by one, the TLS file by the same or by the other).
    copied_by_one(outs, ["DMARC results not reported yet: 4 copied, 0 unchanged, 1 left out",
                         "DMARC reports received: 1 copied",
                         "DMARC reports sent (log): 1 copied, 0 unchanged"],  # its job's a.test report
                  ["DMARC results not reported yet: 0 copied, 4 unchanged", "DMARC reports received: 0 copied, 1 unchanged",
                   "DMARC reports sent (log): 0 copied, 1 unchanged"])
    copied_by_one(outs, ["TLS sessions not reported yet: 5 copied, 0 unchanged, 5 left out",
                         "TLS reports received: 1 copied", "TLS reports sent (log): 1 copied, 0 unchanged"],
                  ["TLS sessions not reported yet: 0 copied, 5 unchanged", "TLS reports received: 0 copied, 1 unchanged",
                   "TLS reports sent (log): 0 copied, 1 unchanged"])
    again = n.cli("cluster", "import-accounts", "--from", str(data)).stdout  # a rerun: nothing
    assert "TLS sessions not reported yet: 0 copied, 5 unchanged" in again and " 4 copied" not in again, again
    assert "DMARC reports sent (log): 0 copied, 1 unchanged" in again, again

    queue = FakeQueue()
    job, dmarc, tls = cluster_job(tmp_path, dsn, queue)
    try:
        assert sorted(asyncio.run(job.run_once())) == [
            ("a.test", "dmarc@a.test"), ("b.test", "tls@b.test"), ("q.test", "dmarc@q.test")]
        sent = {rcpts[0]: body for _sender, rcpts, _prefix, body in queue.sent}
        [agg] = extract_reports(sent["dmarc@a.test"])
        assert agg.messages == 3 and agg.begin == (TODAY - 1) * DAY + 100  # not the one sent before
        assert sorted((r.source_ip, r.count, r.disposition) for r in agg.rows) == [
            ("192.0.2.1", 1, "none"), ("198.51.100.7", 1, "reject"), ("198.51.100.9", 1, "none")]
        [tls_report] = tlsrpt.extract_tls_reports(sent["tls@b.test"])
        assert (tls_report.successes, tls_report.failed) == (4, 1)
        assert tls_report.start == (TODAY - 1) * DAY
        assert asyncio.run(job.run_once()) == [] and len(queue.sent) == 3  # sent once
        # what the node received is read from the shared tables
        assert [r.report for r in dmarc.received()] == [DMARC_IN]
        assert [r.report for r in tls.received()] == [TLS_IN]
    finally:
        dmarc.close()
        tls.close()
    # `postier dmarc sent` on the cluster: the node's report (sent the day before), then the cluster's
    listed = [line.split("\t")[1:5] for line in n.cli("dmarc", "sent").stdout.splitlines()]
    assert listed == [["a.test", "dmarc@a.test", "1 message(s)", "queued"],
                      ["a.test", "dmarc@a.test", "3 message(s)", "queued"],
                      ["q.test", "dmarc@q.test", "1 message(s)", "queued"]], listed
    tls_sent = [line.split("\t")[1:5] for line in n.cli("tls", "reports", "--sent").stdout.splitlines()]
    assert tls_sent == [["b.test", "tls@b.test", "2 ok, 0 failed", "queued"],
                        ["b.test", "tls@b.test", "4 ok, 1 failed", "queued"]], tls_sent
    # an import after the cluster sent them: nothing again (the notes outlive the rows)
    again = n.cli("cluster", "import-accounts", "--from", str(data)).stdout
    assert "DMARC results not reported yet: 0 copied, 4 unchanged" in again, again
    assert "DMARC reports sent (log): 0 copied, 1 unchanged" in again, again
    job, dmarc, tls = cluster_job(tmp_path, dsn, queue)
    try:
        assert asyncio.run(job.run_once()) == [] and len(queue.sent) == 3
    finally:
        dmarc.close()
        tls.close()


def test_missing_report_files_count_nothing(tmp_path: Path, pg: PgServer) -> None:
    dsn = pg.create_db()
    out = Outcome()
    dmarc, tls = ReportStore(PGReportStorage(dsn, "dmarc")), tls_store(dsn)
    try:
        copy_reports(tmp_path, dmarc, tls, time.time(), out)
    finally:
        dmarc.close()
        tls.close()
    assert not +out.copied and not +out.unchanged
    assert "DMARC results not reported yet: 0 copied, 0 unchanged" in out.lines()
    assert not (tmp_path / "dmarc.sqlite").exists() and not (tmp_path / "tlsrpt.sqlite").exists()


def pg_sessions(dsn: str) -> list[tuple[int, str, int]]:
    with psycopg.connect(dsn) as conn:
        return [(int(d), str(r), int(c)) for d, r, c in conn.execute(
            "SELECT day, result, count FROM tlsrpt.session ORDER BY day, result")]


def imports_at_once(data: Path, dsn: str) -> list[Outcome]:
    """Two imports of the node's report files started together (a barrier), each in its own
    thread with its own connections to the cluster's tables; their outcomes."""
    start = threading.Barrier(2)

    def import_() -> Outcome:
        out = Outcome()
        dmarc, tls = ReportStore(PGReportStorage(dsn, "dmarc")), tls_store(dsn)
        try:
            start.wait(30)
            copy_reports(data, dmarc, tls, time.time(), out)
            return out
        finally:
            dmarc.close()
            tls.close()
    return together(import_, import_)


def test_two_imports_at_once_sum_each_count_once(tmp_path: Path, pg: PgServer) -> None:
    """Two imports of the same files at once, into tables where a node already counted the same
    outcomes: every count is added once. The node then counted more (it was not stopped) and a
    third import adds only that."""
    dsn = pg.create_db()
    data = tmp_path / "d"
    data.mkdir()
    src = TLSReportStore(data / "tlsrpt.sqlite")
    day = (TODAY - 1) * DAY
    record_sessions(src, day + 10, 40, 7)
    live = tls_store(dsn)
    record_sessions(live, day + 20, 3, 1)  # a cluster node's own, on the same rows
    outcomes = imports_at_once(data, dsn)
    assert sorted(o.copied["tls_sessions"] for o in outcomes) == [0, 47]
    assert sorted(o.unchanged["tls_sessions"] for o in outcomes) == [0, 47]
    assert pg_sessions(dsn) == [(TODAY - 1, "", 43), (TODAY - 1, "certificate-host-mismatch", 8)]
    record_sessions(src, day + 30, 2, 0)  # the node went on counting
    out = Outcome()
    dmarc = ReportStore(PGReportStorage(dsn, "dmarc"))
    try:
        copy_reports(data, dmarc, live, time.time(), out)
    finally:
        dmarc.close()
    assert (out.copied["tls_sessions"], out.unchanged["tls_sessions"]) == (2, 47)
    assert pg_sessions(dsn) == [(TODAY - 1, "", 45), (TODAY - 1, "certificate-host-mismatch", 8)]
    src.close()
    live.close()


def test_the_day_bound_holds_for_imported_outcomes(tmp_path: Path, pg: PgServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A day holding MAX_SESSION_ROWS distinct outcomes takes no new one from an import either."""
    dsn = pg.create_db()
    data = tmp_path / "d"
    data.mkdir()
    src = TLSReportStore(data / "tlsrpt.sqlite")
    record_sessions(src, (TODAY - 1) * DAY, 2, 3)  # two distinct outcomes
    src.close()
    monkeypatch.setattr(tlsrpt, "MAX_SESSION_ROWS", 1)
    live = tls_store(dsn)
    record_sessions(live, (TODAY - 1) * DAY, 1, 0)  # the day's one row: the successes
    out = Outcome()
    dmarc = ReportStore(PGReportStorage(dsn, "dmarc"))
    try:
        copy_reports(data, dmarc, live, time.time(), out)
    finally:
        dmarc.close()
        live.close()
    assert (out.copied["tls_sessions"], out.skipped["tls_sessions"]) == (2, 3)
    assert pg_sessions(dsn) == [(TODAY - 1, "", 3)]


def node_job(data: Path, dmarc: ReportStore, tls: TLSReportStore, now: float) -> ReportJob:
    """The single machine's own report job, over its files (as `single_node` runs it)."""
    tls_dns = FakeResolver()
    tls_dns.add("_smtp._tls.b.test", "TXT", "v=TLSRPTv1; rua=mailto:tls@b.test")
    return ReportJob(make_config(data, hostname="mx.b.test"), lambda: ["b.test"], FakeQueue(), dmarc, tls_dns,
                     clock=lambda: now, tls=tls)


def test_the_log_of_reports_sent_is_copied_once_and_listed_by_time(tmp_path: Path, pg: PgServer) -> None:
    """The node's log of reports sent (by its own report job) is copied, each entry with its time,
    and listed among the cluster's own by time; a rerun copies nothing; entries the node logged
    since (it was not stopped) are copied alone at the next import."""
    dsn = pg.create_db()
    resolver = sender_dns()
    data = single_node(tmp_path, resolver)
    node_dmarc, node_tls = ReportStore(data / "dmarc.sqlite"), TLSReportStore(data / "tlsrpt.sqlite")
    queue = FakeQueue()
    job, dmarc, tls = cluster_job(tmp_path, dsn, queue)
    try:
        # the cluster sent reports of its own, today, before the import
        record_mail(tmp_path, dmarc, resolver, (TODAY - 1) * DAY + 700, signed(message()))
        record_sessions(tls, (TODAY - 1) * DAY + 700, 1, 0)
        assert sorted(asyncio.run(job.run_once())) == [("a.test", "dmarc@a.test"), ("b.test", "tls@b.test")]
        cluster_dmarc, cluster_tls = dmarc.sent(), tls.sent()
        before_dmarc, before_tls = node_dmarc.sent(), node_tls.sent()
        assert [(d, rua, n, status) for _, d, _, rua, n, status in before_dmarc] == [
            ("a.test", "dmarc@a.test", 1, "queued")]
        assert [(s.domain, s.rua, s.status) for s in before_tls] == [("b.test", "tls@b.test", "queued")]

        out = Outcome()
        copy_reports(data, dmarc, tls, time.time(), out)
        assert (out.copied["dmarc_sent"], out.unchanged["dmarc_sent"]) == (1, 0)
        assert (out.copied["tls_sent"], out.unchanged["tls_sent"]) == (1, 0)
        assert "DMARC reports sent (log): 1 copied, 0 unchanged" in out.lines()
        # the node's entries are the same (report id, time and all), before the cluster's later ones
        assert dmarc.sent() == before_dmarc + cluster_dmarc and tls.sent() == before_tls + cluster_tls

        out = Outcome()  # a rerun: nothing
        copy_reports(data, dmarc, tls, time.time(), out)
        assert (out.copied["dmarc_sent"], out.unchanged["dmarc_sent"]) == (0, 1)
        assert (out.copied["tls_sent"], out.unchanged["tls_sent"]) == (0, 1)
        assert dmarc.sent() == before_dmarc + cluster_dmarc and tls.sent() == before_tls + cluster_tls

        # the node was not stopped: its job ran again at midnight and logged yesterday's reports (and
        # the TLS report of the day too old to import, which it had not sent either)
        assert sorted(asyncio.run(node_job(data, node_dmarc, node_tls, TODAY * DAY + 30).run_once())) == [
            ("a.test", "dmarc@a.test"), ("b.test", "tls@b.test"), ("b.test", "tls@b.test"), ("q.test", "dmarc@q.test")]
        later_dmarc, later_tls = node_dmarc.sent()[1:], node_tls.sent()[1:]
        out = Outcome()
        copy_reports(data, dmarc, tls, time.time(), out)
        assert (out.copied["dmarc_sent"], out.unchanged["dmarc_sent"]) == (2, 1)
        assert (out.copied["tls_sent"], out.unchanged["tls_sent"]) == (2, 1)
        assert dmarc.sent() == before_dmarc + later_dmarc + cluster_dmarc  # by time: 00:00:30, then 00:01
        assert tls.sent() == before_tls + later_tls + cluster_tls
    finally:
        node_dmarc.close()
        node_tls.close()
        dmarc.close()
        tls.close()


def pg_count(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(f"SELECT COUNT(*) FROM {table}".encode()).fetchone()
        assert row is not None
        return int(row[0])


def test_two_imports_at_once_copy_each_entry_of_the_log_once(tmp_path: Path, pg: PgServer) -> None:
    """Two imports of the same files at once: they take turns, and each entry of the node's log of
    reports sent is copied once, as it was."""
    dsn = pg.create_db()
    data = tmp_path / "d"
    data.mkdir()
    src_dmarc, src_tls = ReportStore(data / "dmarc.sqlite"), TLSReportStore(data / "tlsrpt.sqlite")
    n = 150
    for i in range(n):  # a node that sent reports for a while: entries of every status
        at = (TODAY - 1) * DAY - i * 600
        [out] = build_reports([(1, evaluation(at - 100, f"192.0.2.{i % 200}", i % 3 > 0))], org_name="mx.b.test",
                              email="postmaster@b.test", submitter="mx.b.test", end=int(at))
        src_dmarc.log_sent(out, f"d{i}@a.test", ("queued", "too-big", "not-authorized")[i % 3], at)
        outcome = tlsrpt.SessionResult(tlsrpt.TLSPolicy(tlsrpt.STS, "b.test", ("version: STSv1",)), "", "192.0.2.1")
        [rep] = tlsrpt.build_reports([(int(at // DAY), outcome, i + 1)], org_name="mx.b.test",
                                     contact="postmaster@b.test", submitter="mx.b.test", end=int(at))
        src_tls.log_sent(rep, f"https://r{i}.b.test/" if i % 2 else f"tls{i}@b.test",
                         "post-failed" if i % 2 else "queued", at)
    expected_dmarc, expected_tls = src_dmarc.sent(), src_tls.sent()
    assert len(expected_dmarc) == len(expected_tls) == n
    src_dmarc.close()
    src_tls.close()
    outcomes = imports_at_once(data, dsn)
    for kind in ("dmarc_sent", "tls_sent"):
        assert sorted((o.copied[kind], o.unchanged[kind]) for o in outcomes) == [(0, n), (n, 0)], kind
    assert pg_count(dsn, "dmarc.report_out") == pg_count(dsn, "tlsrpt.report_out") == n
    dmarc, tls = ReportStore(PGReportStorage(dsn, "dmarc")), tls_store(dsn)
    try:
        assert dmarc.sent() == expected_dmarc and tls.sent() == expected_tls
    finally:
        dmarc.close()
        tls.close()
