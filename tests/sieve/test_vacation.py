"""Vacation (RFC 5230, RFC 6131): who gets a reply, how often, and what the reply carries."""

from __future__ import annotations

import pytest

from postier.sieve import Message
from postier.sieve.vacation import MemoryVacationStore, compose, decide, record

BASE = (b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: Lunch?\r\n"
        b"Message-ID: <m1@example.org>\r\nReferences: <m0@example.org>\r\n")
PARAMS: dict[str, object] = {"reason": "I am away.", "seconds": 7 * 86400, "subject": None, "from": None,
                             "mime": False, "addresses": [], "handle": None}


def _decide(extra: bytes = b"", sender: str = "alice@example.org", recipient: str = "bob@example.com",
            store: MemoryVacationStore | None = None, now: float = 1000.0) -> str:
    msg = Message(BASE + extra + b"\r\nhello\r\n")
    d = decide(PARAMS, msg, sender, recipient, [], store or MemoryVacationStore(), now=now)
    return d.reason


def test_replies_to_a_normal_message() -> None:
    assert _decide() == "reply"


@pytest.mark.parametrize(("extra", "sender", "why"), [
    (b"", "", "null sender"),
    (b"", "MAILER-DAEMON@example.org", "robot"),
    (b"", "dev-request@lists.example.org", "robot"),
    (b"", "owner-dev@lists.example.org", "robot"),
    (b"Auto-Submitted: auto-replied\r\n", "alice@example.org", "auto-submitted"),
    (b"List-Id: <dev.example.org>\r\n", "alice@example.org", "mailing list"),
    (b"List-Unsubscribe: <mailto:x@example.org>\r\n", "alice@example.org", "mailing list"),
    (b"Precedence: bulk\r\n", "alice@example.org", "bulk"),
    (b"Precedence: junk\r\n", "alice@example.org", "bulk"),
    (b"", "bob@example.com", "ourselves"),
])
def test_never_replies_to(extra: bytes, sender: str, why: str) -> None:
    assert why in _decide(extra, sender=sender)


def test_auto_submitted_no_gets_a_reply() -> None:
    assert _decide(b"Auto-Submitted: no\r\n") == "reply"


def test_not_addressed_to_us() -> None:
    assert _decide(recipient="carol@example.com") == "not addressed to us"


def test_once_per_sender_per_period() -> None:
    store = MemoryVacationStore()
    msg = Message(BASE + b"\r\nhello\r\n")
    d = decide(PARAMS, msg, "alice@example.org", "bob@example.com", [], store, now=1000.0)
    assert d.reply
    record(PARAMS, d, store, now=1000.0)
    again = decide(PARAMS, msg, "Alice@EXAMPLE.org", "bob@example.com", [], store, now=1000.0 + 86400)
    assert not again.reply
    later = decide(PARAMS, msg, "alice@example.org", "bob@example.com", [], store, now=1000.0 + 8 * 86400)
    assert later.reply
    other = decide({**PARAMS, "handle": "other"}, msg, "alice@example.org", "bob@example.com", [], store,
                   now=1001.0)
    assert other.reply  # a different handle is a different vacation (RFC 5230 §4.2)


def test_reply_headers() -> None:
    msg = Message(BASE + b"\r\nhello\r\n")
    reply = Message(compose(PARAMS, msg, "alice@example.org", "bob@example.com", now=0))
    assert reply.values("auto-submitted")[0].startswith(b"auto-replied")
    assert reply.values("in-reply-to") == [b"<m1@example.org>"]
    assert reply.values("references") == [b"<m0@example.org> <m1@example.org>"]
    assert reply.values("subject") == [b"Auto: Lunch?"]
    assert reply.values("to") == [b'"Alice" <alice@example.org>']
    assert reply.values("from") == [b"bob@example.com"]
    assert reply.raw.endswith(b"\r\n\r\nI am away.\r\n")


def test_reply_subject_from_and_utf8() -> None:
    msg = Message(BASE + b"\r\nhello\r\n")
    params = {**PARAMS, "subject": "Congé", "from": "Bob <bob@example.com>", "reason": "Absent é"}
    reply = Message(compose(params, msg, "alice@example.org", "bob@example.com", now=0))
    assert reply.values("subject")[0].startswith(b"=?utf-8?")
    assert reply.values("from") == [b"Bob <bob@example.com>"]
    assert "Absent é".encode() in reply.raw
