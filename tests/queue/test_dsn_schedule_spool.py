"""DSN composition (RFC 3464/6522/6533), the backoff schedule, and the spool's durability rules."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import pytest

from postier.message.dsn import FULL_LIMIT, DSNRecipient, compose_dsn, header_block
from postier.queue import schedule
from postier.queue.runner import dsn_owed
from postier.queue.spool import MessageInfo, Outcome, RecipientSpec, Spool, SpoolError

ORIGINAL = b"From: alice@a.test\r\nTo: bob@b.test\r\nSubject: hi\r\n\r\nbody line\r\n"


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def test_dsn_structure() -> None:
    d = compose_dsn(reporting_mta="mail.a.test", sender="alice@a.test", original=ORIGINAL, complete=True,
                    queue_id="ABCDEF01", arrival=1_800_000_000, now=1_800_000_100, envid="env-1",
                    recipients=[DSNRecipient("bob@b.test", "failed", "5.1.1", "550 5.1.1 unknown", "mx.b.test",
                                             orcpt="rfc822;Bob@B.test")])
    assert b"\n" not in d.data.replace(b"\r\n", b"")  # CRLF only
    m = parse(d.data)
    assert m.get_content_type() == "multipart/report" and m.get_param("report-type") == "delivery-status"
    assert m["To"] == "<alice@a.test>" and m["Auto-Submitted"] == "auto-replied"
    text, status, headers = m.get_payload()
    assert text.get_content_type() == "text/plain" and "<bob@b.test>" in text.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    blocks = [b for b in status.get_payload()]  # compat32 parses the blocks as messages
    assert blocks[0]["Reporting-MTA"] == "dns; mail.a.test" and blocks[0]["Original-Envelope-Id"] == "env-1"
    r = blocks[1]
    assert (r["Final-Recipient"], r["Action"], r["Status"]) == ("rfc822; bob@b.test", "failed", "5.1.1")
    assert r["Original-Recipient"] == "rfc822;Bob@B.test" and r["Remote-MTA"] == "dns; mx.b.test"
    assert r["Diagnostic-Code"] == "smtp; 550 5.1.1 unknown"
    assert headers.get_content_type() == "text/rfc822-headers"
    assert headers.get_payload() == "From: alice@a.test\r\nTo: bob@b.test\r\nSubject: hi\r\n"
    assert not d.eightbit and not d.smtputf8


def test_dsn_ret_full_and_limit() -> None:
    kw = dict(reporting_mta="m.test", sender="a@a.test", queue_id="AB12CD", arrival=0.0, now=0.0, ret="FULL",
              recipients=[DSNRecipient("b@b.test", "failed", "5.0.0", reason="bad")])
    small = compose_dsn(original=ORIGINAL, complete=True, **kw)  # type: ignore[arg-type]
    assert parse(small.data).get_payload()[2].get_content_type() == "message/rfc822"
    assert b"body line" in small.data
    big = ORIGINAL + b"x" * FULL_LIMIT
    large = compose_dsn(original=big, complete=True, **kw)  # type: ignore[arg-type]
    assert b"text/rfc822-headers" in large.data and b"xxxx" not in large.data


def test_dsn_utf8_forms() -> None:
    orig = "From: j\u00f6rg@a.test\r\nSubject: caf\u00e9\r\n\r\nx\r\n".encode()
    d = compose_dsn(reporting_mta="m.test", sender="j\u00f6rg@a.test", original=orig, complete=True,
                    queue_id="AB12CD", arrival=0.0, now=0.0,
                    recipients=[DSNRecipient("\u00fc@b.test", "delayed", "4.4.1", will_retry_until=86400.0)])
    assert b"report-type=global-delivery-status" in d.data and b"message/global-headers" in d.data
    assert "Final-Recipient: utf-8; \u00fc@b.test".encode() in d.data
    assert b"Will-Retry-Until:" in d.data and b"Delayed Mail" in d.data
    assert d.eightbit and d.smtputf8


def test_dsn_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        compose_dsn(reporting_mta="m", sender="a@b", original=b"", complete=True, queue_id="AB12CD", arrival=0,
                    now=0, recipients=[])
    with pytest.raises(ValueError):
        compose_dsn(reporting_mta="m", sender="a@b", original=b"", complete=True, queue_id="AB12CD", arrival=0,
                    now=0, recipients=[DSNRecipient("x@y", "bounced", "5.0.0")])


def test_dsn_diagnostic_is_one_safe_line() -> None:
    d = compose_dsn(reporting_mta="m.test", sender="a@a.test", original=b"Subject: x\r\n\r\n", complete=True,
                    queue_id="AB12CD", arrival=0.0, now=0.0,
                    recipients=[DSNRecipient("b@b.test", "failed", "5.0.0", "550 evil\r\nInjected: yes " + "y" * 300,
                                             "mx")])
    assert b"\r\nInjected:" not in d.data
    assert all(len(line) < 1000 for line in d.data.split(b"\r\n"))


def test_header_block_bounded() -> None:
    assert header_block(b"A: 1\r\nB: 2\r\n\r\nbody") == b"A: 1\r\nB: 2\r\n"
    assert header_block(b"A: 1") == b"A: 1\r\n"
    assert len(header_block(b"X: " + b"y" * 100 + b"\r\n" * 1 + b"Z: z\r\n" * 20000)) <= 64 * 1024


def test_dsn_owed_rules() -> None:
    assert dsn_owed("failed", "a@b", "") and dsn_owed("delayed", "a@b", "")
    assert not dsn_owed("delivered", "a@b", "") and dsn_owed("relayed", "a@b", "SUCCESS")
    assert not dsn_owed("failed", "", "FAILURE")  # never to <>
    assert not dsn_owed("failed", "a@b", "NEVER") and not dsn_owed("delayed", "a@b", "FAILURE")


def test_schedule() -> None:
    assert [schedule.retry_delay(n, 300, 4000) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]
    assert schedule.retry_delay(0, 300, 4000) == 0
    assert schedule.retry_delay(10_000, 300, 4000) == 4000  # no overflow
    assert schedule.next_attempt(0, 1000, 5, 300, 4000, 2000) == 2000  # never past expiry
    assert schedule.expired(0, 432000, 432000) and not schedule.expired(0, 431999, 432000)
    assert schedule.warn_due(0, 100, 50, False) and not schedule.warn_due(0, 100, 50, True)
    assert not schedule.warn_due(0, 100, 0, False)
    c = schedule.ManualClock(5.0)
    c.advance(2.5)
    assert c.time() == 7.5


def test_spool_rules(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "q")
    with pytest.raises(SpoolError):
        sp.path("../../etc/passwd")  # an id never becomes a path outside the spool
    with pytest.raises(SpoolError):
        sp.delete("not-an-id")
    size = sp.write_file("AAAA0001", b"P: 1\r\n", b"body\r\n")
    assert size == 12 and sp.read_file("AAAA0001") == b"P: 1\r\nbody\r\n"
    with pytest.raises(FileExistsError):
        sp.write_file("AAAA0001", b"", b"x")
    info = MessageInfo("AAAA0001", "a@a.test", 100.0, size, user="a@a.test")
    sp.execute(Spool.op_insert(info, [RecipientSpec("b@b.test"), RecipientSpec("c@C.test")], 100.0))
    assert sp.due(99.0, 10) == [] and len(sp.due(100.0, 10)) == 2
    assert sp.sends_since("a@a.test", 50.0) == 1 and sp.sends_since("a@a.test", 100.0) == 0
    # a failing operation in a group commit spares the others
    results = sp.run([Spool.op_insert(info, [], 1.0), Spool.op_record("AAAA0001", [
        Outcome("b@b.test", "delivered", "250 ok", "2.0.0")], 101.0)])
    assert isinstance(results[0], Exception) and results[1] is None
    assert [r.status for r in sp.recipients("AAAA0001")] == ["delivered", "queued"]
    assert sp.execute(Spool.op_finish("AAAA0001")) is False
    assert sp.retry(None, 5.0) == 1
    (tmp_path / "q" / "msg" / "BBBB0002").write_bytes(b"debris")
    assert sp.recover() == (1, 0)
    assert sp.delete("AAAA0001") and sp.count() == 0 and not sp.path("AAAA0001").exists()
    sp.close()
