"""RFC 5322 §3.4 address lists as IMAP address structures (RFC 9051 §7.5.2); cases checked against
Dovecot 2.3."""

from __future__ import annotations

import pytest

from postier.message.envelope import ImapAddress, envelope, envelope_bytes, parse_addresses
from postier.message.mime import parse_message

GROUP_END = ImapAddress(None, None, None, None)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"Fred Foobar <foobar@Blurdybloop.example>", [ImapAddress(b"Fred Foobar", None, b"foobar", b"Blurdybloop.example")]),
        (b'"Doe, John" <jd@x.org>, a@b.c (Ann B)',
         [ImapAddress(b"Doe, John", None, b"jd", b"x.org"), ImapAddress(b"Ann B", None, b"a", b"b.c")]),
        (b"undisclosed-recipients:;", [ImapAddress(None, None, b"undisclosed-recipients", None), GROUP_END]),
        (b"A Group:Ed Jones <c@a.test>,joe@where.test,John <jdoe@one.test>;, z@z",
         [ImapAddress(None, None, b"A Group", None), ImapAddress(b"Ed Jones", None, b"c", b"a.test"),
          ImapAddress(None, None, b"joe", b"where.test"), ImapAddress(b"John", None, b"jdoe", b"one.test"), GROUP_END,
          ImapAddress(None, None, b"z", b"z")]),
        (b"Unterminated: a@b", [ImapAddress(None, None, b"Unterminated", None), ImapAddress(None, None, b"a", b"b"), GROUP_END]),
        (b"<@route1,@route2:user@host>", [ImapAddress(None, b"@route1,@route2", b"user", b"host")]),
        (b"=?utf-8?q?J=C3=B6rg?= <j@x>", [ImapAddress(b"=?utf-8?q?J=C3=B6rg?=", None, b"j", b"x")]),  # kept raw
        (b"root", [ImapAddress(None, None, b"root", b"MISSING_DOMAIN")]),
        (b"<>", [ImapAddress(None, None, b"MISSING_MAILBOX", b"MISSING_DOMAIN")]),
        (b"John Q. Public <jqp@x>", [ImapAddress(b"John Q. Public", None, b"jqp", b"x")]),
        (b'"john doe"@example.com', [ImapAddress(None, None, b"john doe", b"example.com")]),
        (b"Pete(A nice \\) chap) <pete(his account)@silly.test(his host)>", [ImapAddress(b"Pete", None, b"pete", b"silly.test")]),
        (b"a@b,,c@d", [ImapAddress(None, None, b"a", b"b"), ImapAddress(None, None, b"c", b"d")]),
        (b"x@[192.0.2.1]", [ImapAddress(None, None, b"x", b"[192.0.2.1]")]),
        (b"", []),
        (b"<<<>>>,;;::@@\"", None),  # junk: anything but an exception
        (b"(unterminated comment a@b", None),
    ],
)
def test_parse_addresses(value: bytes, expected: list[ImapAddress] | None) -> None:
    got = parse_addresses(value)
    if expected is not None:
        assert list(got) == expected


def test_envelope_defaults_and_nil() -> None:
    raw = (b"From: root\r\nTo: \"john doe\"@example.com, <>\r\nCc: undisclosed-recipients:;\r\n"
           b"Bcc: a@b (Ann B)\r\nSender: \r\nSubject:\r\nMessage-ID:   <x@y>\r\n\r\n")
    env = envelope(parse_message(raw))
    assert env.subject == b""  # present but empty: "" (absent would be NIL)
    assert env.date is None and env.in_reply_to is None
    assert env.sender == env.from_ == env.reply_to  # empty Sender falls back to From
    assert envelope_bytes(parse_message(raw)) == (
        b'(NIL "" ((NIL NIL "root" "MISSING_DOMAIN")) ((NIL NIL "root" "MISSING_DOMAIN")) '
        b'((NIL NIL "root" "MISSING_DOMAIN")) ((NIL NIL "john doe" "example.com")'
        b'(NIL NIL "MISSING_MAILBOX" "MISSING_DOMAIN")) ((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
        b'(("Ann B" NIL "a" "b")) NIL "<x@y>")')


def test_eight_bit_header_values() -> None:
    raw = "Subject: Grüße\r\nFrom: Jörg <j@x>\r\n\r\nx\r\n".encode()
    part = parse_message(raw)
    # rev1: 8-bit goes as a literal (checked against Dovecot); rev2/UTF8=ACCEPT: quoted UTF-8
    assert envelope_bytes(part) == (
        b'(NIL {7}\r\nGr\xc3\xbc\xc3\x9fe (({5}\r\nJ\xc3\xb6rg NIL "j" "x")) (({5}\r\nJ\xc3\xb6rg NIL "j" "x")) '
        b'(({5}\r\nJ\xc3\xb6rg NIL "j" "x")) NIL NIL NIL NIL NIL)')
    assert envelope_bytes(part, utf8=True).startswith('(NIL "Grüße" (("Jörg" NIL "j" "x"))'.encode())
