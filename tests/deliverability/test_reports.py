"""DMARC aggregate reports: XML both ways, bounded decompression, rua and §7.1, the daily job."""

from __future__ import annotations

import asyncio
import gzip
import io
import zipfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.mailauth.reports import (
    DAY, AggregateReport, DKIMAuth, Evaluation, OutgoingReport, PolicyPublished, ReportError, ReportRow, ReportStore, SPFAuth, build_reports, decompress, external_destination_ok, extract_reports,
    parse_report_xml, parse_rua, report_message, report_xml,
)
from postier.pipeline.jobs import ReportJob
from postier.resolver.fake import FakeResolver
from tests.deliverability.common import make_config

REPORT = AggregateReport(
    "mx.b.test", "postmaster@b.test", "rid-1", 1_790_000_000, 1_790_086_400,
    PolicyPublished("a.test", "reject", "reject", "r", "s", 100, "0"),
    (ReportRow("192.0.2.1", 7, "none", "pass", "pass", "a.test", (),
               (DKIMAuth("a.test", "p2026a", "pass"),), (SPFAuth("a.test", "mfrom", "pass"),)),
     ReportRow("2001:db8::5", 2, "reject", "fail", "fail", "a.test", ("local_policy",),
               (), (SPFAuth("evil.test", "helo", "fail"),))))


def test_xml_round_trip() -> None:
    xml = report_xml(REPORT)
    assert xml.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    assert b"<policy_published>" in xml and b"<source_ip>2001:db8::5</source_ip>" in xml
    assert parse_report_xml(xml) == REPORT


def test_namespaced_report_parses() -> None:
    xml = report_xml(REPORT).replace(b"<feedback>", b'<feedback xmlns="urn:ietf:params:xml:ns:dmarc-2.0">')
    assert parse_report_xml(xml).rows == REPORT.rows


@pytest.mark.parametrize("bad", [
    b"", b"not xml", b"<other/>", b"<feedback><report_metadata/></feedback>",
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">]><feedback>&lol;</feedback>',
    b'<!DOCTYPE x SYSTEM "file:///etc/passwd"><feedback/>',
    "<feedback/>".encode("utf-16"),
    b"<feedback><policy_published><domain>../../x</domain></policy_published><report_metadata/></feedback>",
])
def test_bad_documents_are_one_error(bad: bytes) -> None:
    with pytest.raises(ReportError):
        parse_report_xml(bad)


def test_decompression_gzip_zip_plain() -> None:
    xml = report_xml(REPORT)
    assert decompress(gzip.compress(xml)) == xml
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("readme.txt", "hi")
        zf.writestr("mx.b.test!a.test!1!2.xml", xml)
    assert decompress(buf.getvalue()) == xml
    assert decompress(xml) == xml
    for junk in (b"\x1f\x8bgarbage", b"PK\x03\x04garbage", b"%PDF-1.4", gzip.compress(xml)[:-10]):
        with pytest.raises(ReportError):
            decompress(junk)


def test_bombs_stop_at_the_bound() -> None:
    big = b"<feedback>" + b" " * (40 * 1024 * 1024)
    gz = gzip.compress(big, compresslevel=9)
    assert len(gz) < 100_000
    with pytest.raises(ReportError, match="bigger than"):
        decompress(gz, limit=1024 * 1024)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("bomb.xml", big)
    with pytest.raises(ReportError, match="too large|bigger than"):
        decompress(buf.getvalue(), limit=1024 * 1024)
    # a zip whose directory lies about the size: the read itself is bounded
    data = bytearray(buf.getvalue())
    cd = data.rfind(b"PK\x01\x02")
    data[cd + 24:cd + 28] = (100).to_bytes(4, "little")  # central directory: uncompressed size 100
    with pytest.raises(ReportError):
        decompress(bytes(data), limit=1024 * 1024)


def test_report_message_and_extraction() -> None:
    out = OutgoingReport(REPORT, ("mailto:dmarc@a.test",), ((1, 1), (2, 1)), "mx.b.test")
    mail = report_message(out, "postmaster@b.test", "dmarc@a.test", now=1_790_090_000)
    head = mail.split(b"\r\n\r\n", 1)[0]
    assert b"Subject: Report Domain: a.test Submitter: mx.b.test Report-ID: <rid-1>" in head
    assert b'filename="mx.b.test!a.test!1790000000!1790086400.xml.gz"' in mail
    assert b"Content-Type: application/gzip" in mail
    assert extract_reports(mail) == [REPORT]
    assert extract_reports(b"From: x@y.test\r\n\r\nno report here\r\n") == []
    with pytest.raises(ReportError):
        extract_reports(mail.replace(b"H4sI", b"H4sA"))  # damaged gzip in the only candidate


def test_parse_rua() -> None:
    assert parse_rua(["mailto:a b@c.test", "mailto:x@", "mailto:x@-bad-.test"]) == []
    assert parse_rua([f"mailto:r{i}@a.test" for i in range(20)])[-1] == ("r4@a.test", None)  # bounded
    got = parse_rua(["mailto:dmarc@a.test", "mailto:reports@Ext.Test!10m", "https://x.test/r", "mailto:bad"])
    assert got == [("dmarc@a.test", None), ("reports@ext.test", 10 << 20)]


def test_external_destination_verification() -> None:
    dns = FakeResolver()
    dns.add("a.test._report._dmarc.ext.test", "TXT", "v=DMARC1")
    dns.tempfail("a.test._report._dmarc.down.test")

    async def main() -> list[bool | None]:
        return [await external_destination_ok("a.test", "mail.a.test", dns),  # same org: no query
                await external_destination_ok("a.test", "ext.test", dns),
                await external_destination_ok("a.test", "other.test", dns),
                await external_destination_ok("a.test", "down.test", dns)]

    assert asyncio.run(main()) == [True, True, False, None]


def evaluation(at: float, ip: str, ok: bool, domain: str = "a.test", rua: tuple[str, ...] = ("mailto:d@a.test",)
               ) -> Evaluation:
    return Evaluation(at, ip, domain, domain, PolicyPublished(domain, "reject"), rua, "none" if ok else "reject",
                      ok, ok, (DKIMAuth(domain, "s", "pass" if ok else "fail"),), (SPFAuth(domain, "mfrom", "pass"),))


def test_build_reports_groups_and_counts() -> None:
    pending = [(1, evaluation(100, "192.0.2.1", True)), (2, evaluation(200, "192.0.2.1", True)),
               (3, evaluation(300, "198.51.100.7", False)), (4, evaluation(300, "192.0.2.9", True, "n.test", ())),
               (5, evaluation(400, "192.0.2.1", True, "q.test", ("mailto:d@q.test",)))]
    reports = build_reports(pending, org_name="mx.b.test", email="postmaster@b.test", submitter="mx.b.test",
                            end=DAY)
    assert [r.report.policy.domain for r in reports] == ["a.test", "q.test"]  # no rua: no report
    a = reports[0]
    assert a.taken == ((1, 1), (2, 1), (3, 1)) and a.report.begin == 100 and a.report.end == DAY
    assert sorted((r.source_ip, r.count) for r in a.report.rows) == [("192.0.2.1", 2), ("198.51.100.7", 1)]


class FakeQueue:
    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.sent: list[tuple[str, list[str], bytes, bytes]] = []

    async def enqueue(self, env: Any, recipients: list[str], prefix: bytes, body: Any) -> str:
        if self.broken:
            raise OSError("disk full")
        self.sent.append((env.mail_from, recipients, prefix, body.getvalue()))
        return "Q1"

    async def sends_today(self, user: str) -> int:
        return 0


def report_job(tmp_path: Path, queue: FakeQueue, store: ReportStore, dns: FakeResolver, **kw: Any) -> ReportJob:
    return ReportJob(make_config(tmp_path), lambda: ["b.test"], queue, store, dns, **kw)


def test_daily_job(tmp_path: Path) -> None:
    store = ReportStore(tmp_path / "dmarc.sqlite")
    day0 = 20_000 * DAY
    store.record(evaluation(day0 + 10, "192.0.2.1", True))
    store.record(evaluation(day0 + 20, "198.51.100.7", False))
    store.record(evaluation(day0 + 30, "192.0.2.1", True, "x.test", ("mailto:r@ext.test",)))  # not authorized
    store.record(evaluation(day0 + DAY + 5, "192.0.2.1", True))  # today: next run
    dns = FakeResolver()

    async def sign(message: bytes) -> bytes:
        return b"DKIM-Signature: fake\r\n"

    # the queue fails: nothing is lost, the reports wait
    job = report_job(tmp_path, FakeQueue(broken=True), store, dns, clock=lambda: day0 + DAY + 60)
    assert asyncio.run(job.run_once()) == []
    assert len(store.pending(day0 + DAY)) == 2  # x.test is done: ext.test did not agree (§7.1)

    queue = FakeQueue()
    job = report_job(tmp_path, queue, store, dns, clock=lambda: day0 + DAY + 60, sign=sign)
    assert asyncio.run(job.run_once()) == [("a.test", "d@a.test")]
    [(sender, rcpts, prefix, message)] = queue.sent
    assert (sender, rcpts, prefix) == ("postmaster@b.test", ["d@a.test"], b"DKIM-Signature: fake\r\n")
    [report] = extract_reports(message)
    assert (report.policy.domain, report.messages, report.begin, report.end) == ("a.test", 2, day0 + 10, day0 + DAY)
    assert store.pending(day0 + DAY) == []  # sent, and the unauthorized one dropped
    assert [s[5] for s in store.sent()] == ["not-authorized", "queued"]
    # the next day sends the rest; results older than two weeks are forgotten
    asyncio.run(job.run_once(day0 + 2 * DAY + 60))
    assert len(queue.sent) == 2 and store.pending(day0 + 30 * DAY) == []
    store.close()


def test_job_loop_sleeps_until_after_midnight(tmp_path: Path) -> None:
    store = ReportStore(tmp_path / "dmarc.sqlite")
    naps: list[float] = []

    async def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) >= 2:
            raise asyncio.CancelledError

    job = report_job(tmp_path, FakeQueue(), store, FakeResolver(), clock=lambda: 5 * DAY + 3600, sleep=sleep)

    async def main() -> None:
        job.start()
        await asyncio.sleep(0.05)
        await job.stop()

    asyncio.run(main())
    assert naps == [DAY - 3600 + 60, DAY - 3600 + 60]
    store.close()


def test_received_reports_stored_once(tmp_path: Path) -> None:
    store = ReportStore(tmp_path / "dmarc.sqlite")
    assert store.store_received(REPORT, True, 1.0)
    assert not store.store_received(REPORT, True, 2.0)
    [got] = store.received("a.test")
    assert got.report == REPORT and got.authenticated
    assert store.received("other.test") == []
    store.close()


_XML = report_xml(REPORT)
_GZ = gzip.compress(_XML)
_ZIP = io.BytesIO()
with zipfile.ZipFile(_ZIP, "w", zipfile.ZIP_DEFLATED) as _zf:
    _zf.writestr("r.xml", _XML)
_SEEDS = [_XML, _GZ, _ZIP.getvalue(), report_message(OutgoingReport(REPORT, (), (), "mx.b.test"), "a@b.test",
                                                     "c@d.test", now=0)]


def _only_report_errors(data: bytes) -> None:
    for fn in (decompress, parse_report_xml, extract_reports):
        try:
            fn(data)
        except ReportError:
            pass


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_reader_fuzz_random_bytes(data: bytes) -> None:
    _only_report_errors(data)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_SEEDS), st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8),
       st.integers(0, 1 << 20))
def test_reader_fuzz_damaged_reports(seed: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(seed)
    for pos, value in flips:
        data[pos % len(data)] = value
    _only_report_errors(bytes(data[: max(1, cut % (len(data) + 1))]))
