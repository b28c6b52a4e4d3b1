"""ENVELOPE, BODYSTRUCTURE and BODY against known-good outputs (RFC 9051 §7.5.2).

The expected strings were checked against Dovecot 2.3 serving the same messages from a Maildir; where
we differ on purpose it is said next to the case (RFC 9051 over Dovecot habit).
"""

from __future__ import annotations

import pytest

from postier.message.bodystructure import body_structure
from postier.message.envelope import envelope_bytes
from postier.message.mime import parse_message

from . import corpus

EXPECTED = {
    "simple": (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7bit" 55 1 NIL NIL NIL NIL)',
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7bit" 55 1)',
        b'("Mon, 7 Feb 1994 21:52:25 -0800 (PST)" "afternoon meeting" (("Fred Foobar" NIL "foobar" "Blurdybloop.example")) (("Fred Foobar" NIL "foobar" "Blurdybloop.example")) (("Fred Foobar" NIL "foobar" "Blurdybloop.example")) ((NIL NIL "mooch" "owatagu.siam.edu.example")) NIL NIL NIL "<B27397-0100000@Blurdybloop.example>")',
    ),
    "alternative": (
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 49 1 NIL NIL NIL NIL)("text" "html" ("charset" "utf-8") NIL NIL "base64" 32 0 NIL NIL NIL NIL) "alternative" ("boundary" "=_alt") NIL NIL NIL)',
        b'(("text" "plain" ("charset" "utf-8") NIL NIL "quoted-printable" 49 1)("text" "html" ("charset" "utf-8") NIL NIL "base64" 32 0) "alternative")',
        b'("Tue, 2 Jan 2024 10:00:00 +0100" "=?UTF-8?B?R3LDvMOfZQ==?= and folded" (("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.org")) (("=?UTF-8?Q?J=C3=B6rg_M=C3=BCller?=" NIL "joerg" "example.org")) ((NIL NIL "replies" "example.org")) ((NIL NIL "Team" NIL)(NIL NIL "alice" "example.org")("Bob B." NIL "bob" "example.org")(NIL NIL NIL NIL)(NIL NIL "carol" "example.net")) NIL NIL "<prev@example.org>" "<alt@example.org>")',
    ),
    "nested": (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 12 0 NIL NIL NIL NIL)("message" "rfc822" NIL NIL "forwarded message" "7bit" 286 ("Wed, 3 Jan 2024 23:30:00 -0800" "the forwarded one" ((NIL NIL "inner" "example.com")) ((NIL NIL "inner" "example.com")) ((NIL NIL "inner" "example.com")) NIL NIL NIL NIL NIL) (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 26 1 NIL NIL NIL NIL)("application" "octet-stream" NIL NIL NIL "base64" 8 NIL NIL NIL NIL) "mixed" ("boundary" "inner") NIL NIL NIL) 15 NIL NIL NIL NIL) "mixed" ("boundary" "outer") NIL NIL NIL)',
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 12 0)("message" "rfc822" NIL NIL "forwarded message" "7bit" 286 ("Wed, 3 Jan 2024 23:30:00 -0800" "the forwarded one" ((NIL NIL "inner" "example.com")) ((NIL NIL "inner" "example.com")) ((NIL NIL "inner" "example.com")) NIL NIL NIL NIL NIL) (("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 26 1)("application" "octet-stream" NIL NIL NIL "base64" 8) "mixed") 15) "mixed")',
        b'(NIL "Fwd: the forwarded one" ((NIL NIL "outer" "example.com")) ((NIL NIL "outer" "example.com")) ((NIL NIL "outer" "example.com")) ((NIL NIL "someone" "example.com")) NIL NIL NIL NIL)',
    ),
    "attachment": (
        b'(("text" "plain" ("charset" "us-ascii" "format" "flowed") NIL NIL "7bit" 4 0 NIL NIL ("en" "de") NIL)("application" "pdf" ("name" "report q1.pdf") "<part2@example.com>" "The report" "BASE64" 8 "Q2hlY2sgSW50ZWdyaXR5IQ==" ("attachment" ("filename" "report q1.pdf" "size" "6" "creation-date" "Mon, 1 Jan 2024 00:00:00 +0000")) NIL "http://example.com/r.pdf") "mixed" ("boundary" "b1") NIL ("en") NIL)',
        b'(("text" "plain" ("charset" "us-ascii" "format" "flowed") NIL NIL "7bit" 4 0)("application" "pdf" ("name" "report q1.pdf") "<part2@example.com>" "The report" "BASE64" 8) "mixed")',
        b'(NIL NIL ((NIL NIL "a" "example.com")) ((NIL NIL "a" "example.com")) ((NIL NIL "a" "example.com")) NIL NIL NIL NIL NIL)',
    ),
    "no_boundary": (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) "mixed" NIL NIL NIL NIL)',
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) "mixed")',
        b'(NIL NIL ((NIL NIL "x" "example.com")) ((NIL NIL "x" "example.com")) ((NIL NIL "x" "example.com")) NIL NIL NIL NIL NIL)',
    ),
    "missing_parts": (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL) "mixed" ("boundary" "never") NIL NIL NIL)',
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0) "mixed")',
        b'(NIL NIL ((NIL NIL "x" "example.com")) ((NIL NIL "x" "example.com")) ((NIL NIL "x" "example.com")) NIL NIL NIL NIL NIL)',
    ),
    "unterminated": (
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 0 NIL NIL NIL NIL)("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 26 1 NIL NIL NIL NIL) "mixed" ("boundary" "zz") NIL NIL NIL)',
        b'(("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 5 0)("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 26 1) "mixed")',
        b'(NIL "unterminated" NIL NIL NIL NIL NIL NIL NIL NIL)',
    ),
    "garbage": (  # Dovecot sends ("" "" ...); RFC 2045 §5.2 says an invalid type is text/plain
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "x-uuencode" 6 1 NIL NIL NIL NIL)',
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "x-uuencode" 6 1)',
        b'(NIL "garbage content type" NIL NIL NIL NIL NIL NIL NIL NIL)',
    ),
    "header_only": (
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0 NIL NIL NIL NIL)',
        b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0)',
        b'(NIL "no body" ((NIL NIL "a" "b.example")) ((NIL NIL "a" "b.example")) ((NIL NIL "a" "b.example")) NIL NIL NIL NIL NIL)',
    ),
    "digest": (
        b'(("message" "rfc822" NIL NIL NIL "7bit" 57 (NIL "first digest entry" ((NIL NIL "one" "example.com")) ((NIL NIL "one" "example.com")) ((NIL NIL "one" "example.com")) NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 0 NIL NIL NIL NIL) 3 NIL NIL NIL NIL) "digest" ("boundary" "d") NIL NIL NIL)',
        b'(("message" "rfc822" NIL NIL NIL "7bit" 57 (NIL "first digest entry" ((NIL NIL "one" "example.com")) ((NIL NIL "one" "example.com")) ((NIL NIL "one" "example.com")) NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 3 0) 3) "digest")',
        b'(NIL NIL ((NIL NIL "list" "example.com")) ((NIL NIL "list" "example.com")) ((NIL NIL "list" "example.com")) NIL NIL NIL NIL NIL)',
    ),
    "toplevel_rfc822": (
        b'("message" "rfc822" NIL NIL NIL "7bit" 61 (NIL "wrapped" ((NIL NIL "wrapped" "example.com")) ((NIL NIL "wrapped" "example.com")) ((NIL NIL "wrapped" "example.com")) NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 1 NIL NIL NIL NIL) 4 NIL NIL NIL NIL)',
        b'("message" "rfc822" NIL NIL NIL "7bit" 61 (NIL "wrapped" ((NIL NIL "wrapped" "example.com")) ((NIL NIL "wrapped" "example.com")) ((NIL NIL "wrapped" "example.com")) NIL NIL NIL NIL NIL) ("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 14 1) 4)',
        b'(NIL NIL ((NIL NIL "wrapper" "example.com")) ((NIL NIL "wrapper" "example.com")) ((NIL NIL "wrapper" "example.com")) NIL NIL NIL NIL NIL)',
    ),
}



@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_known_good(name: str) -> None:
    part = parse_message(corpus.ALL[name])
    bs, body, env = EXPECTED[name]
    assert body_structure(part) == bs
    assert body_structure(part, extensible=False) == body
    assert envelope_bytes(part) == env
