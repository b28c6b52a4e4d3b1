"""Test messages for the IMAP message views (LF line ends on purpose where noted: Maildir files)."""

from __future__ import annotations

SIMPLE = (  # RFC 3501 §6.3.11 example message, LF line ends
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\n"
    b"From: Fred Foobar <foobar@Blurdybloop.example>\n"
    b"Subject: afternoon meeting\n"
    b"To: mooch@owatagu.siam.edu.example\n"
    b"Message-Id: <B27397-0100000@Blurdybloop.example>\n"
    b"MIME-Version: 1.0\n"
    b"Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\n"
    b"\n"
    b"Hello Joe, do you think we can meet at 3:30 tomorrow?\n"
)

ALTERNATIVE = (
    b"From: =?UTF-8?Q?J=C3=B6rg_M=C3=BCller?= <joerg@example.org>\r\n"
    b"To: Team: alice@example.org, \"Bob B.\" <bob@example.org>;, carol@example.net\r\n"
    b"Cc: \r\n"
    b"Reply-To: replies@example.org\r\n"
    b"Subject: =?UTF-8?B?R3LDvMOfZQ==?= and\r\n"
    b" folded\r\n"
    b"Date: Tue, 2 Jan 2024 10:00:00 +0100\r\n"
    b"In-Reply-To: <prev@example.org>\r\n"
    b"Message-ID: <alt@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/alternative;\r\n"
    b"\tboundary=\"=_alt\"\r\n"
    b"\r\n"
    b"This is a MIME message.\r\n"
    b"--=_alt\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=C3=BC=C3=9Fe aus K=C3=B6ln, caf=\r\n"
    b"=C3=A9 time.\r\n"
    b"--=_alt\r\n"
    b"Content-Type: text/html; charset=\"utf-8\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"PHA+R3LDvMOfZSBhdXMgS8O2bG48L3A+\r\n"
    b"--=_alt--\r\n"
    b"epilogue\r\n"
)

INNER = (
    b"From: inner@example.com\r\n"
    b"Subject: the forwarded one\r\n"
    b"Date: Wed, 3 Jan 2024 23:30:00 -0800\r\n"
    b"Content-Type: multipart/mixed; boundary=inner\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"\r\n"
    b"inner text part\r\n"
    b"two lines\r\n"
    b"--inner\r\n"
    b"Content-Type: application/octet-stream\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"\r\n"
    b"AAECAwQF\r\n"
    b"--inner--\r\n"
)

NESTED = (
    b"From: outer@example.com\r\n"
    b"To: someone@example.com\r\n"
    b"Subject: Fwd: the forwarded one\r\n"
    b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n"
    b"\r\n"
    b"--outer\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"see attached\r\n"
    b"--outer\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"Content-Description: forwarded message\r\n"
    b"\r\n"
    + INNER
    + b"\r\n--outer--\r\n"
)

ATTACHMENT = (
    b"From: a@example.com\r\n"
    b"Content-Type: multipart/mixed; boundary=b1\r\n"
    b"Content-Language: en\r\n"
    b"\r\n"
    b"--b1\r\n"
    b"Content-Type: text/plain; charset=us-ascii; format=flowed\r\n"
    b"Content-Language: en, de\r\n"
    b"\r\n"
    b"body\r\n"
    b"--b1\r\n"
    b"Content-Type: application/pdf; name=\"report q1.pdf\"\r\n"
    b"Content-Disposition: attachment; filename=\"report q1.pdf\";\r\n"
    b" size=6; creation-date=\"Mon, 1 Jan 2024 00:00:00 +0000\"\r\n"
    b"Content-ID: <part2@example.com>\r\n"
    b"Content-Description: The report\r\n"
    b"Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\r\n"
    b"Content-Location: http://example.com/r.pdf\r\n"
    b"Content-Transfer-Encoding: BASE64\r\n"
    b"\r\n"
    b"JVBERi0x\r\n"
    b"--b1--\r\n"
)

MALFORMED_NO_BOUNDARY = (
    b"From: x@example.com\r\n"
    b"Content-Type: multipart/mixed\r\n"
    b"\r\n"
    b"--foo\r\n"
    b"text\r\n"
)

MALFORMED_MISSING_PARTS = (
    b"From: x@example.com\r\n"
    b"Content-Type: multipart/mixed; boundary=never\r\n"
    b"\r\n"
    b"no parts here\r\n"
)

MALFORMED_UNTERMINATED = (
    b"Subject: unterminated\r\n"
    b"Content-Type: multipart/mixed; boundary=zz\r\n"
    b"\r\n"
    b"--zz\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"first\r\n"
    b"--zz\r\n"
    b"Content-Type: text/plain\r\n"
    b"\r\n"
    b"last, no close delimiter\r\n"
)

MALFORMED_GARBAGE = (
    b"Subject: garbage content type\r\n"
    b"Content-Type: ;;; nonsense\r\n"
    b"Content-Transfer-Encoding: x-uuencode\r\n"
    b"this line has no colon\r\n"
    b"\r\n"
    b"body\r\n"
)

HEADER_ONLY = b"Subject: no body\r\nFrom: a@b.example\r\n"

DIGEST = (
    b"From: list@example.com\r\n"
    b"Content-Type: multipart/digest; boundary=d\r\n"
    b"\r\n"
    b"--d\r\n"
    b"\r\n"
    b"From: one@example.com\r\n"
    b"Subject: first digest entry\r\n"
    b"\r\n"
    b"one\r\n"
    b"--d--\r\n"
)

TOPLEVEL_RFC822 = (
    b"From: wrapper@example.com\r\n"
    b"Content-Type: message/rfc822\r\n"
    b"\r\n"
    b"From: wrapped@example.com\r\n"
    b"Subject: wrapped\r\n"
    b"\r\n"
    b"wrapped body\r\n"
)

ALL = {
    "simple": SIMPLE, "alternative": ALTERNATIVE, "nested": NESTED, "attachment": ATTACHMENT,
    "no_boundary": MALFORMED_NO_BOUNDARY, "missing_parts": MALFORMED_MISSING_PARTS,
    "unterminated": MALFORMED_UNTERMINATED, "garbage": MALFORMED_GARBAGE, "header_only": HEADER_ONLY,
    "digest": DIGEST, "toplevel_rfc822": TOPLEVEL_RFC822,
}
