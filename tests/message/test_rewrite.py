"""Header-field removal on a received message's header section (message/rewrite.py)."""

from __future__ import annotations

from postier.antispam.rspamd import parse_check_reply
from postier.message.mime import header_section
from postier.message.rewrite import RewrittenBody, remove_fields
from postier.message.types import MessageBody

HEAD = (b"Received: one\r\nX-Spam: a\r\n folded a\r\nSubject: hi\r\nx-spam: b\r\nX-SPAM: c\r\n\r\n")


def test_order_zero_removes_every_instance_with_folded_lines() -> None:
    assert remove_fields(HEAD, {"X-Spam": 0}) == b"Received: one\r\nSubject: hi\r\n\r\n"


def test_positive_and_negative_orders() -> None:
    assert remove_fields(HEAD, {"x-spam": 2}) == HEAD.replace(b"x-spam: b\r\n", b"")
    assert remove_fields(HEAD, {"X-Spam": -1}) == HEAD.replace(b"X-SPAM: c\r\n", b"")
    assert remove_fields(HEAD, {"X-Spam": 1}) == HEAD.replace(b"X-Spam: a\r\n folded a\r\n", b"")
    assert remove_fields(HEAD, {"X-Spam": 4}) == HEAD  # no fourth instance
    assert remove_fields(HEAD, {"Absent": 0}) == HEAD
    assert remove_fields(HEAD, {}) == HEAD


def test_the_body_is_never_touched() -> None:
    msg = HEAD + b"X-Spam: in the body\r\n"
    assert remove_fields(msg, {"X-Spam": 0}).endswith(b"\r\n\r\nX-Spam: in the body\r\n")


def test_rewritten_body_reads_through(tmp_path) -> None:  # type: ignore[no-untyped-def]
    body = MessageBody(tmp_path, memory_limit=16)  # spills to a spool file
    body.write(HEAD + b"text\r\n" * 10)
    header = header_section(body.head(4096))
    assert header == HEAD
    rb = RewrittenBody(body, remove_fields(header, {"X-Spam": 0}), len(header))
    assert rb.getvalue() == b"Received: one\r\nSubject: hi\r\n\r\n" + b"text\r\n" * 10
    assert rb.size == len(rb.getvalue())
    body.close()


def test_rspamd_remove_headers_orders_parsed() -> None:
    r = parse_check_reply({"action": "no action", "milter": {
        "remove_headers": {"X-Spam": 0, "X-Other": 2, "Bad": "x"},
        "add_headers": {"X-Spamd-Bar": {"value": "+", "order": 0}}}})
    assert r.remove_headers == (("X-Spam", 0), ("X-Other", 2), ("Bad", 0))
    assert r.add_headers == (("X-Spamd-Bar", "+"),)
