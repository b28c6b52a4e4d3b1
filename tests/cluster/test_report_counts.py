"""Cluster mode's DMARC results counted in PostgreSQL (RFC 7489 §7.2): two nodes recording at once
give exact sums, the reports built are those one row per message gave, a day's distinct results
are bounded, tables made before counting are upgraded and read on, and the import of a single
machine's file counts each message once, also across a file written before counting."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

import psycopg  # noqa: E402

from postier.mailauth import reports  # noqa: E402
from postier.mailauth.reports import DAY, ReportStore  # noqa: E402
from postier.store.cluster.reports import PGReportStorage  # noqa: E402
from tests.deliverability.test_report_counts import (  # noqa: E402
    DAY0, OLD_INSERT, OLD_SCHEMA, check_same_reports, old_rows, record_at_once, varied_evaluations,
)
from tests.deliverability.test_reports import evaluation  # noqa: E402

from .conftest import PgServer  # noqa: E402


def dmarc_store(dsn: str) -> ReportStore:
    return ReportStore(PGReportStorage(dsn, "dmarc", 5.0))


def test_two_nodes_recording_at_once_give_exact_sums_and_the_same_reports(pg: PgServer) -> None:
    dsn = pg.create_db()
    stores = [dmarc_store(dsn), dmarc_store(dsn)]  # two nodes: two stores, two connections
    record_at_once(stores, 150)
    pending = stores[1].pending(DAY0 + DAY)
    stores[1].mark_reported([(rid, ev.count) for rid, ev in pending])
    assert stores[0].pending(DAY0 + DAY) == []
    evaluations = varied_evaluations()
    for i, ev in enumerate(evaluations):  # the nodes take turns
        assert stores[i % 2].record(ev)
    check_same_reports(stores[0], evaluations)
    for s in stores:
        s.close()


def test_the_day_bound_of_distinct_results_holds_in_postgresql(pg: PgServer, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setattr(reports, "MAX_EVALUATION_ROWS", 3)
    store = dmarc_store(pg.create_db())
    assert [store.record(evaluation(DAY0 + i, f"192.0.2.{i}", True)) for i in range(5)] == [True] * 3 + [False] * 2
    assert store.record(evaluation(DAY0 + 9, "192.0.2.0", True))  # one already counted still is
    assert sorted(ev.count for _, ev in store.pending(DAY0 + DAY)) == [1, 1, 2]
    assert store.prune(DAY0 + 2 * DAY) == 3
    store.close()


def test_a_table_made_before_counting_is_upgraded_and_read_on(pg: PgServer) -> None:
    dsn = pg.create_db()
    evaluations = varied_evaluations()
    with psycopg.connect(dsn, autocommit=True) as conn:  # the table as an earlier version made it
        conn.execute("CREATE SCHEMA dmarc")
        conn.execute("SET search_path TO dmarc")
        for stmt in OLD_SCHEMA.replace("INTEGER PRIMARY KEY", "bigserial PRIMARY KEY").replace("REAL", "double precision").split(";"):
            if stmt.strip():
                conn.execute(stmt.encode())
        with conn.cursor() as cur:
            cur.executemany(OLD_INSERT.replace("?", "%s").encode(), old_rows(evaluations[:150]))
    store = dmarc_store(dsn)
    assert all(store.record(ev) for ev in evaluations[150:])
    check_same_reports(store, evaluations)
    store.close()


def test_import_counts_each_message_once_across_a_file_written_before_counting(tmp_path: Path, pg: PgServer
                                                                              ) -> None:
    evaluations = [dataclasses.replace(ev, at=ev.at - DAY0 + 1_700_000_000) for ev in varied_evaluations()]
    path = tmp_path / "dmarc.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    conn.executemany(OLD_INSERT, old_rows(evaluations[:150]))
    conn.commit()
    conn.close()
    now = evaluations[-1].at + DAY
    target = dmarc_store(pg.create_db())
    src = ReportStore(path)
    for ev in evaluations[150:300]:
        assert src.record(ev)
    results, _ = target.import_from(src, now)
    assert (results.copied, results.unchanged, results.skipped) == (300, 0, 0)
    for ev in evaluations[300:]:
        assert src.record(ev)  # counted on after the import: a second one adds only that
    results, _ = target.import_from(src, now)
    assert (results.copied, results.unchanged) == (100, 300)
    assert target.import_from(src, now)[0].copied == 0
    src.close()
    total = sum(ev.count for _, ev in target.pending(float("inf")))
    assert total == len(evaluations)
    target.close()
