"""The DMARC results store counts identical results of a day in one row (RFC 7489 §7.2 aggregate
records): the reports built from it are those one row per message gave, two recorders at once give
exact sums, a day's distinct results are bounded, and a file written before counting is read on."""

from __future__ import annotations

import dataclasses
import logging
import random
import sqlite3
import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import pytest

from postier.mailauth import reports
from postier.mailauth.reports import (
    DAY, DKIMAuth, Evaluation, OutgoingReport, PolicyPublished, ReportStore, SPFAuth, build_reports, report_xml,
)
from tests.concurrency import together
from tests.deliverability.test_reports import evaluation

DAY0 = 20_000 * DAY


def varied_evaluations(n: int = 400, seed: int = 7) -> list[Evaluation]:
    """`n` results over two days, in time order: several policy domains (one without rua, one
    publishing two policies), source IPs, dispositions, override reasons, auth results and envelope
    senders, many of them repeated."""
    rnd = random.Random(seed)
    policies = [(PolicyPublished("a.test", "reject"), ("mailto:d@a.test",)),
                (PolicyPublished("a.test", "quarantine", "none", "s", "s", 50, "1"), ("mailto:d@a.test",)),
                (PolicyPublished("q.test", "none"), ("mailto:d@q.test", "mailto:r@ext.test")),
                (PolicyPublished("n.test", "reject"), ())]
    kinds = []
    for _ in range(40):
        policy, rua = rnd.choice(policies)
        ok = rnd.random() < 0.6
        dkim: tuple[DKIMAuth, ...] = (DKIMAuth(policy.domain, rnd.choice(["s1", "s2", ""]), "pass" if ok else "fail"),)
        if rnd.random() < 0.2:
            dkim += (DKIMAuth("relay.test", "r", "pass"),)
        spf = (SPFAuth(rnd.choice([policy.domain, "bounce.test"]), "mfrom", rnd.choice(["pass", "softfail"])),)
        kinds.append(Evaluation(0, f"192.0.2.{rnd.randrange(4)}", policy.domain,
                                rnd.choice([policy.domain, "bounce.test", ""]), policy, rua,
                                rnd.choice(["none", "quarantine", "reject"]), ok, rnd.random() < 0.5, dkim, spf,
                                rnd.choice([(), (), ("local_policy",), ("sampled_out",)])))
    return [dataclasses.replace(rnd.choice(kinds), at=DAY0 + 7 + i * (2 * DAY // n)) for i in range(n)]


def comparable(built: Sequence[OutgoingReport]) -> list[tuple[object, ...]]:
    """The reports as sent, but for their random ids: their document, messages and rows covered."""
    out: list[tuple[object, ...]] = []
    for o in built:
        report = dataclasses.replace(o.report, report_id="R")
        out.append((o.rua, report, report_xml(report), report.messages, sum(n for _, n in o.taken)))
    return out


def build(pending: Sequence[tuple[int, Evaluation]], end: int) -> list[OutgoingReport]:
    return build_reports(pending, org_name="mx.b.test", email="postmaster@b.test", submitter="mx.b.test", end=end)


def check_same_reports(store: ReportStore, evaluations: Sequence[Evaluation]) -> None:
    """What `store` holds after recording `evaluations` builds the reports one row per message gave."""
    for end in (DAY0 + DAY, DAY0 + 2 * DAY):
        one_per_message = [(i, ev) for i, ev in enumerate(evaluations, 1) if ev.at < end]
        expected = comparable(build(one_per_message, end))
        assert expected and comparable(build(store.pending(end), end)) == expected
    assert sum(ev.count for _, ev in store.pending(DAY0 + 2 * DAY)) == len(evaluations)


def test_counted_results_build_the_reports_one_row_per_message_gave(tmp_path: Path) -> None:
    evaluations = varied_evaluations()
    store = ReportStore(tmp_path / "dmarc.sqlite")
    assert all(store.record(ev) for ev in evaluations)
    rows = len(store.pending(DAY0 + 2 * DAY))
    assert rows < len(evaluations) // 2  # counted, not one row each
    check_same_reports(store, evaluations)
    # what a report covered is subtracted; what was counted since stays for the next one
    built = build(store.pending(DAY0 + DAY, "a.test"), DAY0 + DAY)
    assert len(built) == 2  # a.test published two policies that day
    rid, ev = store.pending(DAY0 + DAY, "a.test")[0]
    store.record(dataclasses.replace(ev, count=1))  # one more, late
    store.mark_reported([taken for out in built for taken in out.taken])
    assert [(r, e.count) for r, e in store.pending(DAY0 + DAY, "a.test")] == [(rid, 1)]
    store.close()


def record_at_once(stores: list[ReportStore], each: int) -> None:
    """Every store (a worker, or a node) records the same few results `each` times, all at once:
    new to the table at first for all of them; then the counts add up exactly."""
    start = threading.Barrier(len(stores))

    def work(store: ReportStore) -> None:
        start.wait(30)
        for i in range(each):
            assert store.record(evaluation(DAY0 + i, f"192.0.2.{i % 5}", i % 3 != 0))

    together(*(partial(work, s) for s in stores))
    pending = stores[-1].pending(DAY0 + DAY)
    assert sum(ev.count for _, ev in pending) == len(stores) * each and len(pending) <= 10


def test_two_recorders_at_once_give_exact_sums(tmp_path: Path) -> None:
    stores = [ReportStore(tmp_path / "dmarc.sqlite"), ReportStore(tmp_path / "dmarc.sqlite")]  # two workers
    record_at_once(stores, 200)
    for s in stores:
        s.close()


def test_the_day_bound_of_distinct_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(reports, "MAX_EVALUATION_ROWS", 3)
    store = ReportStore(tmp_path / "dmarc.sqlite")
    with caplog.at_level(logging.WARNING, "postier.dmarc"):
        got = [store.record(evaluation(DAY0 + i, f"192.0.2.{i}", True)) for i in range(5)]
        assert got == [True, True, True, False, False]  # new results past the bound are dropped
        assert store.record(evaluation(DAY0 + 9, "192.0.2.0", True))  # one already counted still is
        assert store.record(evaluation(DAY0 + DAY, "192.0.2.4", True))  # the next day has room again
    assert len([r for r in caplog.records if "not kept" in r.getMessage()]) == 1  # once that day
    assert sorted(ev.count for _, ev in store.pending(DAY0 + DAY)) == [1, 1, 2]
    [out] = build(store.pending(DAY0 + DAY), DAY0 + DAY)
    assert out.report.messages == 4 and out.report.begin == DAY0  # exact for what was kept
    store.close()


#: `evaluation` as it was made before results were counted (one row per message)
OLD_SCHEMA = """
CREATE TABLE evaluation (
    id INTEGER PRIMARY KEY, at REAL NOT NULL, source_ip TEXT NOT NULL, header_from TEXT NOT NULL,
    envelope_from TEXT NOT NULL, policy TEXT NOT NULL, policy_domain TEXT NOT NULL, rua TEXT NOT NULL,
    disposition TEXT NOT NULL, dkim TEXT NOT NULL, spf TEXT NOT NULL, auth TEXT NOT NULL,
    reported INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX evaluation_pending ON evaluation(reported, at);
"""


def old_rows(evaluations: Sequence[Evaluation]) -> list[tuple[object, ...]]:
    return [(ev.at, *reports._columns(ev)) for ev in evaluations]


OLD_INSERT = ("INSERT INTO evaluation (at, source_ip, header_from, envelope_from, policy, policy_domain, rua, "
              "disposition, dkim, spf, auth) VALUES (?,?,?,?,?,?,?,?,?,?,?)")


def test_a_file_written_before_counting_is_read_on(tmp_path: Path) -> None:
    evaluations = varied_evaluations()
    path = tmp_path / "dmarc.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    conn.executemany(OLD_INSERT, old_rows(evaluations[:150]))
    conn.execute("INSERT INTO evaluation (at, source_ip, header_from, envelope_from, policy, policy_domain, rua, "
                 "disposition, dkim, spf, auth, reported) SELECT at, source_ip, header_from, envelope_from, policy, "
                 "policy_domain, rua, disposition, dkim, spf, auth, 1 FROM evaluation")  # sent before
    conn.commit()
    conn.close()
    store = ReportStore(path)
    assert all(store.record(ev) for ev in evaluations[150:])  # counted from now on, beside the old rows
    check_same_reports(store, evaluations)
    store.close()
    store = ReportStore(path)  # opened again: nothing more to change
    check_same_reports(store, evaluations)
    [out] = [o for o in build(store.pending(DAY0 + 2 * DAY, "q.test"), DAY0 + 2 * DAY)]
    store.mark_reported(out.taken)
    assert store.pending(DAY0 + 2 * DAY, "q.test") == []
    store.close()
