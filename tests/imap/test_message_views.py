"""Message views through a real server (the cases Dovecot's imaptest found): BINARY of
quoted-printable and of a binary part with NUL appended as literal8, SEARCH FROM an address with
comments inside, ENVELOPE of repeated To fields. The views themselves: tests/message."""

from __future__ import annotations

from .conftest import IMAPServer

NUL_MESSAGE = (b"From: user@domain.org\r\nMime-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"foo\"\r\n\r\n"
               b"--foo\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n\r\n"
               b"\x00hello\x00\r\n--foo--\r\n")
QP_MESSAGE = (b"From: user@domain.org\r\nMime-Version: 1.0\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
              b"hello  \r\nbar=  \r\nfoo=09bar\r\n")
COMMENTS = (b"From: <user-from (comment)@ (comment) domain.org>\r\nTo: a@x.org\r\nTo: b@x.org\r\n"
            b"Subject: folded\r\n\tsubject\r\n\r\nbody\r\n")


def test_views_through_the_server(server: IMAPServer) -> None:
    addr = server.user("mv")
    with server.client(addr) as c:
        for msg in (NUL_MESSAGE, QP_MESSAGE, COMMENTS):
            marker = b"~{%d+}" % len(msg) if b"\x00" in msg else b"{%d+}" % len(msg)
            c.ok(b"APPEND INBOX " + marker + b"\r\n" + msg)
        c.ok("SELECT INBOX")
        u = c.ok("FETCH 1 (BINARY.SIZE[1] BINARY.PEEK[1] BODY.PEEK[1])")
        assert b"BINARY.SIZE[1] 7" in u[0]
        assert b"BINARY[1] ~{7}\r\n\x00hello\x00" in u[0]
        assert b"BODY[1] {7}\r\n\x80hello\x80" in u[0]  # a literal never carries NUL
        u = c.ok("FETCH 2 (BINARY.SIZE[1] BINARY.PEEK[1])")
        assert b"BINARY.SIZE[1] 19" in u[0] and b"hello\r\nbarfoo\tbar\r\n" in u[0]
        assert b"\\Seen" not in u[0]  # neither BINARY.SIZE nor BINARY.PEEK sets \Seen
        assert c.ok("SEARCH FROM user-from@domain.org")[0] == b"* SEARCH 3\r\n"
        assert c.ok("SEARCH SUBJECT \"folded subject\"")[0] == b"* SEARCH 3\r\n"
        u = c.ok("FETCH 3 (ENVELOPE)")
        assert b'"folded subject"' in u[0]
        assert b'((NIL NIL "a" "x.org")(NIL NIL "b" "x.org"))' in u[0]
