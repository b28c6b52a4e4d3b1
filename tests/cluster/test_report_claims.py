"""The daily report job claims each report (kind, day, policy domain) on its own, against a real
PostgreSQL: two nodes running the job at once share the reports and send each once, with the
interleaving forced (one node stops while sending its first report and holds that claim while the
other runs to the end); a node killed while it sends a report leaves that report until the lease
runs out, then another node sends it."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from postier.mailauth.reportdb import claim_name  # noqa: E402
from postier.mailauth.reports import DAY, ReportStore, extract_reports  # noqa: E402
from postier.mailauth.tlsrpt import STS, SessionResult, TLSPolicy, TLSReportStore, extract_tls_reports  # noqa: E402
from postier.pipeline.jobs import CLAIM_LEASE, ReportJob  # noqa: E402
from postier.resolver.fake import FakeResolver  # noqa: E402
from postier.store.cluster.reports import PGReportStorage  # noqa: E402
from tests.deliverability.common import make_config  # noqa: E402
from tests.deliverability.test_reports import FakeQueue, evaluation  # noqa: E402

from .conftest import PgServer  # noqa: E402
from .test_reports import tls_store  # noqa: E402

DAY0 = 20_000 * DAY
NOW = DAY0 + DAY + 60  # a minute after the midnight that ends DAY0
DOMAINS = ("a.test", "c.test", "e.test")


class HeldQueue(FakeQueue):
    """A node's queue that stops at its first report until `go` is set (`held` says it got there)."""

    def __init__(self) -> None:
        super().__init__()
        self.held = asyncio.Event()
        self.go = asyncio.Event()

    async def enqueue(self, env: Any, recipients: list[str], prefix: bytes, body: Any) -> str:
        if not self.held.is_set():
            self.held.set()
            await self.go.wait()
        return await super().enqueue(env, recipients, prefix, body)


def resolver() -> FakeResolver:
    dns = FakeResolver()
    for d in DOMAINS:
        dns.add(f"_smtp._tls.{d}", "TXT", f"v=TLSRPTv1; rua=mailto:tls@{d}")
    return dns


def node(root: Path, dsn: str, kind: str, queue: FakeQueue, now: float = NOW
         ) -> tuple[ReportJob, ReportStore | TLSReportStore]:
    """A node's report job of one kind on its own connection to the shared tables."""
    root.mkdir(exist_ok=True)
    dmarc = ReportStore(PGReportStorage(dsn, "dmarc")) if kind == "dmarc" else None
    tls = tls_store(dsn) if kind == "tlsrpt" else None
    job = ReportJob(make_config(root, hostname="mail.b.test"), lambda: ["b.test"], queue, dmarc, resolver(),
                    clock=lambda: now, tls=tls)
    store = dmarc or tls
    assert store is not None
    return job, store


def record(store: ReportStore | TLSReportStore) -> None:
    """Two results or outcomes per domain, on DAY0."""
    for i, domain in enumerate(DOMAINS):
        for n in range(2):
            at = DAY0 + 100 * i + n
            if isinstance(store, ReportStore):
                store.record(evaluation(at, f"192.0.2.{n}", True, domain, (f"mailto:d@{domain}",)))
            else:
                store.record(SessionResult(TLSPolicy(STS, domain)), at)


def counted(kind: str, message: bytes) -> int:
    if kind == "dmarc":
        return sum(r.messages for r in extract_reports(message))
    return sum(r.successes for r in extract_tls_reports(message))


@pytest.mark.parametrize("kind", ["dmarc", "tlsrpt"])
def test_two_runs_at_once_share_the_reports_and_send_each_once(tmp_path: Path, pg: PgServer, kind: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Node A reads what is due, claims the first domain's report and stops in the queue; node B
    runs meanwhile: it skips the report A holds and sends the others. A then finishes its report
    and takes the claims B let go, finds those rows reported (it read them before B sent them) and
    sends nothing more."""
    dsn = pg.create_db()
    qa, qb = HeldQueue(), FakeQueue()
    a, a_store = node(tmp_path / "a", dsn, kind, qa)
    b, b_store = node(tmp_path / "b", dsn, kind, qb)
    record(a_store)

    async def both() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        run_a = asyncio.create_task(a.run_once())
        await asyncio.wait_for(qa.held.wait(), 60)  # A holds a.test's claim, in the middle of sending
        sent_b = await asyncio.wait_for(b.run_once(), 60)
        qa.go.set()
        return await asyncio.wait_for(run_a, 60), sent_b

    with caplog.at_level(logging.INFO, "postier.dmarc"):
        sent_a, sent_b = asyncio.run(both())
    prefix = "d" if kind == "dmarc" else "tls"
    assert sent_a == [("a.test", f"{prefix}@a.test")]
    assert sent_b == [("c.test", f"{prefix}@c.test"), ("e.test", f"{prefix}@e.test")]
    day = DAY0 // DAY + (1 if kind == "dmarc" else 0)  # DMARC: the run's midnight; TLS: the outcomes' day
    assert f"{claim_name(kind, day, 'a.test')}: another process is sending this report now" in caplog.text
    sent = [(rcpts[0], counted(kind, message)) for q in (qa, qb) for _s, rcpts, _p, message in q.sent]
    assert sorted(sent) == [(f"{prefix}@{d}", 2) for d in DOMAINS]  # each once, each whole
    assert a_store.pending(NOW) == [] and b_store.pending(NOW) == []
    assert asyncio.run(b.run_once()) == []
    for d in DOMAINS:  # every claim let go
        assert b_store.claim(claim_name(kind, day, d), NOW + 10, NOW)
    a_store.close()
    b_store.close()


#: a node whose report job stops for good in its queue, at its first report (killed there by the test)
DYING_NODE = """
import asyncio, sys
from pathlib import Path
from tests.cluster.test_report_claims import node
from tests.deliverability.test_reports import FakeQueue

class Stuck(FakeQueue):
    async def enqueue(self, *args):
        Path(sys.argv[4]).write_text("sending")
        await asyncio.Event().wait()

job, _ = node(Path(sys.argv[3]), sys.argv[1], sys.argv[2], Stuck())
asyncio.run(job.run_once())
"""


@pytest.mark.parametrize("kind", ["dmarc", "tlsrpt"])
def test_a_dead_claimants_report_is_sent_once_its_lease_ran_out(tmp_path: Path, pg: PgServer, kind: str) -> None:
    """A node's job takes a.test's claim and is killed (SIGKILL) while it sends that report: another
    node's runs skip a.test until the lease has run out, then send it, once."""
    dsn = pg.create_db()
    queue = FakeQueue()
    job, store = node(tmp_path / "b", dsn, kind, queue)
    record(store)
    marker = tmp_path / "sending"
    dying = subprocess.Popen([sys.executable, "-c", DYING_NODE, dsn, kind, str(tmp_path / "dead"), str(marker)],
                             cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and dying.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), "the dying node never reached its first report"
    finally:
        dying.kill()
        dying.wait(30)
    assert [d for d, _ in asyncio.run(job.run_once())] == ["c.test", "e.test"]
    late, late_store = node(tmp_path / "b", dsn, kind, queue, now=NOW + CLAIM_LEASE - 1)
    assert asyncio.run(late.run_once()) == []  # still held
    later, later_store = node(tmp_path / "b", dsn, kind, queue, now=NOW + CLAIM_LEASE + 1)
    assert [d for d, _ in asyncio.run(later.run_once())] == ["a.test"]
    assert len(queue.sent) == 3 and store.pending(NOW) == []
    assert asyncio.run(later.run_once()) == []
    for s in (store, late_store, later_store):
        s.close()


class RefusingQueue(FakeQueue):
    """A node's queue that refuses every report for one address (as a full disk or a queue error)."""

    def __init__(self, refused: str) -> None:
        super().__init__()
        self.refused = refused

    async def enqueue(self, env: Any, recipients: list[str], prefix: bytes, body: Any) -> str:
        if self.refused in recipients:
            raise OSError("the queue refused it")
        return await super().enqueue(env, recipients, prefix, body)


def test_a_report_left_pending_keeps_its_claim_so_no_other_node_sends_it_again_that_night(
        tmp_path: Path, pg: PgServer) -> None:
    """a.test's report goes to two addresses; node A's queue takes one and refuses the other, so the
    report stays pending. Node B, running the job the same night, must not send it again to the
    address that has it: A keeps the claim until its lease runs out, and the next run after that
    (as on one machine: the next day's) sends it."""
    dsn = pg.create_db()
    qa, qb = RefusingQueue("x@a.test"), FakeQueue()
    a, a_store = node(tmp_path / "a", dsn, "dmarc", qa)
    b, b_store = node(tmp_path / "b", dsn, "dmarc", qb)
    assert isinstance(a_store, ReportStore)
    a_store.record(evaluation(DAY0 + 5, "192.0.2.1", True, "a.test", ("mailto:d@a.test", "mailto:x@a.test")))
    assert asyncio.run(a.run_once()) == [("a.test", "d@a.test")]
    assert len(a_store.pending(NOW)) == 1  # not done: x@a.test has not got it
    assert asyncio.run(b.run_once()) == [] and qb.sent == []  # d@a.test does not get it twice tonight
    later, later_store = node(tmp_path / "b", dsn, "dmarc", qb, now=NOW + CLAIM_LEASE + 1)
    assert sorted(asyncio.run(later.run_once())) == [("a.test", "d@a.test"), ("a.test", "x@a.test")]
    assert later_store.pending(NOW) == []
    for s in (a_store, b_store, later_store):
        s.close()
