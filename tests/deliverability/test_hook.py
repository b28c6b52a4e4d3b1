"""The port-25 mail authentication hook: SPF at MAIL FROM, DKIM + DMARC at the end of DATA, the verdicts."""

from __future__ import annotations

import asyncio
import gzip
import io
import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postier.mailauth.dkim import generate_key, sign
from postier.mailauth.reports import (
    AggregateReport, OutgoingReport, PolicyPublished, ReportRow, ReportStore, report_message,
)
from postier.message.rewrite import RewrittenBody
from postier.pipeline.mailauth import InboundAuth
from postier.proto.smtp.address import parse_path
from postier.resolver.fake import FakeResolver
from tests.deliverability.common import body, envelope, make_config

PEM, TXT = generate_key("ed25519-sha256")


def message(frm: bytes = b"Alice <alice@a.test>", extra: bytes = b"") -> bytes:
    return (extra + b"From: " + frm + b"\r\nTo: bob@b.test\r\nSubject: hi\r\nDate: Thu, 26 Nov 2026 10:00:00 +0000\r\n"
            b"Message-ID: <m1@a.test>\r\n\r\nHello Bob.\r\n")


def signed(msg: bytes, domain: str = "a.test") -> bytes:
    return sign(msg, domain, "sel", PEM, "ed25519-sha256") + msg


@pytest.fixture
def dns() -> FakeResolver:
    r = FakeResolver()
    for domain, policy in (("a.test", "reject"), ("q.test", "quarantine"), ("n.test", "none")):
        r.add(domain, "TXT", "v=spf1 ip4:192.0.2.1 -all")
        r.add(f"sel._domainkey.{domain}", "TXT", TXT)
        r.add(f"_dmarc.{domain}", "TXT", f"v=DMARC1; p={policy}; rua=mailto:dmarc@{domain}")
    r.add("mx.a.test", "A", "192.0.2.1")
    r.add("mx.a.test", "TXT", "v=spf1 a -all")
    r.add("b.test", "MX", "10 mx.b.test")
    return r


def hook(tmp_path: Path, dns: FakeResolver, store: ReportStore | None = None, **settings: object) -> InboundAuth:
    cfg = make_config(tmp_path, **settings)
    return InboundAuth(cfg, dns, store, lambda: ["b.test"], clock=lambda: 1_790_000_000.0, rng=random.Random(1))


def run(h: InboundAuth, data: bytes, tmp_path: Path, ip: str = "192.0.2.1", mail_from: str = "alice@a.test",
        helo: str = "mx.a.test", to: str = "bob@b.test"):  # type: ignore[no-untyped-def]
    env = envelope(ip, helo, mail_from, to)

    async def main():  # type: ignore[no-untyped-def]
        reply = await h.check_mail(env, parse_path(f"<{mail_from}>", null_ok=True)[0])
        assert reply is None
        return await h.evaluate(env, body(tmp_path / "spool", data))

    return env, asyncio.run(main())


def test_all_pass(tmp_path: Path, dns: FakeResolver) -> None:
    env, v = run(hook(tmp_path, dns), signed(message()), tmp_path)
    assert env.auth["spf"].status == "pass" and env.auth["helo"].status == "pass"
    assert v.action == "accept" and v.body is None
    head = v.headers.decode()
    assert head.startswith("Authentication-Results: mx.b.test;")
    for clause in ("spf=pass smtp.mailfrom=alice@a.test", "spf=pass smtp.helo=mx.a.test",
                   "dkim=pass header.d=a.test", "dmarc=pass"):
        assert clause in head, head


def test_forged_reject_quarantine_none(tmp_path: Path, dns: FakeResolver) -> None:
    h = hook(tmp_path, dns)
    _, v = run(h, message(), tmp_path, ip="198.51.100.7", helo="evil.test")
    assert v.action == "reject" and v.reply is not None
    assert (v.reply.code, v.reply.enhanced) == (550, "5.7.1") and "a.test" in v.reply.text
    _, v = run(h, message(b"<x@q.test>"), tmp_path, ip="198.51.100.7", mail_from="x@q.test")
    assert v.action == "junk" and b"dmarc=fail" in v.headers
    _, v = run(h, message(b"<x@n.test>"), tmp_path, ip="198.51.100.7", mail_from="x@n.test")
    assert v.action == "accept" and b"dmarc=fail" in v.headers
    # a valid aligned signature from anywhere passes (forwarding)
    _, v = run(h, signed(message()), tmp_path, ip="198.51.100.7", helo="fwd.test")
    assert v.action == "accept" and b"dmarc=pass" in v.headers and b"spf=fail" in v.headers
    # a signature by another domain does not align
    dns.add("sel._domainkey.evil.test", "TXT", TXT)
    _, v = run(h, signed(message(), "evil.test"), tmp_path, ip="198.51.100.7", helo="evil.test")
    assert v.action == "reject"


@pytest.mark.parametrize("frm", [
    None,
    b"a@a.test, b@a.test",
])
def test_from_problems_are_refused(tmp_path: Path, dns: FakeResolver, frm: bytes | None) -> None:
    if frm is None:
        data = b"To: bob@b.test\r\nSubject: no from\r\n\r\nx\r\n"
    else:
        data = message(frm)
    _, v = run(hook(tmp_path, dns), signed(data), tmp_path)
    assert v.action == "reject" and v.reply is not None and (v.reply.code, v.reply.enhanced) == (550, "5.7.1")


def test_two_from_fields_are_refused_even_when_signed(tmp_path: Path, dns: FakeResolver) -> None:
    data = signed(message()).replace(b"To: bob", b"From: ceo@n.test\r\nTo: bob", 1)
    _, v = run(hook(tmp_path, dns), data, tmp_path)
    assert v.action == "reject" and v.reply is not None and "more than one From" in v.reply.text


def test_dns_trouble_defers_never_5xx(tmp_path: Path, dns: FakeResolver) -> None:
    dns.tempfail("_dmarc.a.test")
    _, v = run(hook(tmp_path, dns), signed(message()), tmp_path)
    assert v.action == "defer" and v.reply is not None and v.reply.code == 451 and v.reply.enhanced.startswith("4.7.")
    # SPF fails for real, the DKIM key lookup times out: could have passed, so defer
    dns2 = FakeResolver()
    dns2.add("a.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    dns2.add("_dmarc.a.test", "TXT", "v=DMARC1; p=reject")
    dns2.tempfail("sel._domainkey.a.test")
    _, v = run(hook(tmp_path, dns2), signed(message()), tmp_path, ip="198.51.100.7")
    assert v.action == "defer" and v.reply is not None and v.reply.code == 451


def test_forged_authentication_results_removed(tmp_path: Path, dns: FakeResolver) -> None:
    forged = (b"Authentication-Results: MX.B.TEST; dkim=pass\r\n"
              b"Authentication-Results: other.example;\r\n spf=pass\r\n"
              b"Authentication-Results: mx.b.test (comment);\r\n\tdmarc=pass\r\n")
    data = signed(message(extra=forged))
    env, v = run(hook(tmp_path, dns), data, tmp_path)
    assert v.body is not None and v.action == "accept"
    out = v.body.getvalue()
    assert out.count(b"Authentication-Results") == 1 and b"other.example" in out
    assert out.endswith(b"Hello Bob.\r\n") and v.body.size == len(out)
    assert b"dkim=pass" in v.headers  # the signature did not cover the removed fields


def test_rewritten_body_reads_through_a_spilled_body(tmp_path: Path) -> None:
    data = b"A: 1\r\nB: 2\r\n\r\n" + bytes(range(256)) * 400
    orig = body(tmp_path / "spool", data, memory_limit=1024)
    assert not orig.in_memory
    rb = RewrittenBody(orig, b"B: 2\r\n\r\n", len(b"A: 1\r\nB: 2\r\n\r\n"))
    want = b"B: 2\r\n\r\n" + bytes(range(256)) * 400
    assert rb.getvalue() == want and rb.size == len(want) and rb.head(5) == want[:5]
    assert b"".join(rb.iter_chunks(777)) == want
    out = io.BytesIO()
    rb.copy_to(out)
    assert out.getvalue() == want
    rb.close()
    orig.close()


def test_spf_fail_reject_is_optional(tmp_path: Path, dns: FakeResolver) -> None:
    env = envelope("198.51.100.7", "evil.test")
    h = hook(tmp_path, dns, spf_fail_reject=True)
    reply = asyncio.run(h.check_mail(env, parse_path("<alice@a.test>")[0]))
    assert reply is not None and (reply.code, reply.enhanced) == (550, "5.7.23")
    assert asyncio.run(hook(tmp_path, dns).check_mail(env, parse_path("<alice@a.test>")[0])) is None


def test_large_message_is_not_verified_and_not_rejected(tmp_path: Path, dns: FakeResolver) -> None:
    data = signed(message()) + b"x" * 5000 + b"\r\n"
    _, v = run(hook(tmp_path, dns, max_verify_size=2048), data, tmp_path, ip="198.51.100.7")
    assert v.action == "junk" and b"dkim=neutral" in v.headers


def test_null_sender_uses_helo(tmp_path: Path, dns: FakeResolver) -> None:
    env, v = run(hook(tmp_path, dns), signed(message()), tmp_path, mail_from="")
    assert env.auth["spf"].scope == "helo" and env.auth["spf"].status == "pass"
    assert b"smtp.helo=mx.a.test" in v.headers and v.action == "accept"


def test_results_recorded_for_reports(tmp_path: Path, dns: FakeResolver) -> None:
    store = ReportStore(tmp_path / "dmarc.sqlite")
    h = hook(tmp_path, dns, store)
    run(h, signed(message()), tmp_path)
    run(h, message(), tmp_path, ip="198.51.100.7", helo="evil.test")
    pending = store.pending(2_000_000_000)
    assert len(pending) == 2
    ok, bad = (ev for _, ev in pending)
    assert (ok.policy.domain, ok.policy.p, ok.disposition, ok.dkim_aligned, ok.spf_aligned) == (
        "a.test", "reject", "none", True, True)
    assert ok.rua == ("mailto:dmarc@a.test",) and ok.dkim_auth[0].result == "pass"
    assert (bad.source_ip, bad.disposition, bad.dkim_aligned, bad.spf_aligned) == ("198.51.100.7", "reject",
                                                                                   False, False)
    store.close()


def test_incoming_report_to_our_rua_is_stored(tmp_path: Path, dns: FakeResolver) -> None:
    store = ReportStore(tmp_path / "dmarc.sqlite")
    h = hook(tmp_path, dns, store)
    report = AggregateReport("a.test", "postmaster@a.test", "r-1", 1_789_900_000, 1_789_986_400,
                             PolicyPublished("b.test", "quarantine"),
                             (ReportRow("192.0.2.9", 3, "none", "pass", "pass", "b.test"),
                              ReportRow("203.0.113.5", 2, "quarantine", "fail", "fail", "b.test")))
    mail = report_message(OutgoingReport(report, (), (), "mx.a.test"), "postmaster@a.test",
                          "dmarc-reports@b.test").replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")
    mail = mail.replace(b"From: postmaster@a.test", b"From: Alice <alice@a.test>")
    _, v = run(h, signed(mail), tmp_path, to="dmarc-reports@b.test")
    assert v.action == "accept"
    [got] = store.received("b.test")
    assert got.authenticated and got.report.report_id == "r-1" and got.report.messages == 5
    # to another mailbox: not taken as a report
    run(h, signed(mail.replace(b"r-1", b"r-2")), tmp_path, to="bob@b.test")
    assert len(store.received()) == 1
    assert gzip  # imported for the reader's benefit: reports travel gzip'd
    store.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=600), st.sampled_from([b"", b"From: a@a.test\r\n", b"Authentication-Results: mx.b.test;\r\n",
                                                 b"DKIM-Signature: v=1; d=a.test; s=sel; b=; bh=;\r\n"]))
def test_any_message_gets_a_verdict(tmp_path: Path, dns: FakeResolver, data: bytes, prefix: bytes) -> None:
    _, v = run(hook(tmp_path, dns), prefix + data, tmp_path)
    assert v.action in ("accept", "junk", "reject", "defer")
    if v.action in ("reject", "defer"):
        assert v.reply is not None and v.reply.code in (550, 451)
    if v.body is not None:
        v.body.getvalue()
