"""IMAP sessions over real sockets and TLS: login rules, the command set, extensions, concurrency."""

from __future__ import annotations

import base64
import imaplib
import os
import re
import smtplib
import socket
import time

import pytest

from postier.proto import sasl
from postier.store.maildir import deliver_maildir

from .conftest import PASSWORD, IMAPServer, RawIMAP

MSG = b"From: Alice <alice@example.net>\r\nTo: bob@example.org\r\nSubject: hello there\r\n" \
      b"Date: Mon, 1 Jan 2024 10:00:00 +0000\r\nMessage-ID: <m1@example.net>\r\n\r\nHi Bob!\r\n"
MIME = (b"From: a@example.net\r\nSubject: mime\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain\r\n\r\n"
        b"part one\r\n--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.b64encode(b"\x00\x01binary\xff") + b"\r\n--XX--\r\n")


def append(c: RawIMAP, box: str, data: bytes, flags: str = "") -> int:
    u, t = c.cmd(f"APPEND {box} ({flags}) {{{len(data)}+}}\r\n".encode() + data)
    c.last_untagged = u
    m = re.search(rb"APPENDUID \d+ (\d+)", t)
    assert m, t
    return int(m.group(1))


# -- connection, TLS and login -------------------------------------------------------------------

def test_greeting_and_capabilities_before_tls(server: IMAPServer) -> None:
    with server.client(tls="none") as c:
        assert c.greeting.startswith(b"* OK [CAPABILITY ")
        caps = c.greeting.split(b"]")[0]
        assert b"STARTTLS" in caps and b"LOGINDISABLED" in caps and b"AUTH=PLAIN" not in caps
        u, t = c.cmd(f"LOGIN {server.user()} {PASSWORD}")
        assert b"NO [PRIVACYREQUIRED]" in t
        u, t = c.cmd("AUTHENTICATE PLAIN " + base64.b64encode(b"\0x@example.org\0password123").decode())
        assert b"NO [PRIVACYREQUIRED]" in t
        u, t = c.cmd("SELECT INBOX")
        assert b"BAD" in t


def test_starttls_discards_injected_commands(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(tls="none") as c:
        c.send(b"a STARTTLS\r\nb LOGIN " + addr.encode() + b" " + PASSWORD.encode() + b"\r\n")
        _u, t = c.until("a")
        assert t.startswith(b"a OK")
        c.starttls()
        u, t = c.cmd("CAPABILITY")
        assert b"AUTH=PLAIN" in u[0] and b"STARTTLS" not in u[0] and b"LOGINDISABLED" not in u[0]
        # the injected LOGIN was never run: we are still not authenticated
        u, t = c.cmd("SELECT INBOX")
        assert b"BAD" in t
        c.ok(f"LOGIN {addr} {PASSWORD}")


def test_huge_literal_before_login_is_refused(server: IMAPServer) -> None:
    with server.client() as c:
        c.send(b"a LOGIN {100000000}\r\n")
        ln = c.line()
        assert ln.startswith(b"a BAD") and b"TOOBIG" in ln
        u, t = c.cmd("NOOP")
        assert t.startswith(b"t1 OK")


def test_authenticate_plain_sasl_ir_and_continuation(server: IMAPServer) -> None:
    addr = server.user()
    cred = base64.b64encode(f"\0{addr}\0{PASSWORD}".encode()).decode()
    with server.client() as c:
        u, t = c.cmd(f"AUTHENTICATE PLAIN {cred}")
        assert t.startswith(b"t1 OK") and b"CAPABILITY" in t
    with server.client() as c:
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        assert c.line() == b"+ \r\n"
        c.send(cred.encode() + b"\r\n")
        _u, t = c.until("a")
        assert t.startswith(b"a OK")
    with server.client() as c:
        c.send(b"a AUTHENTICATE PLAIN\r\n")
        assert c.line().startswith(b"+")
        c.send(b"*\r\n")
        _u, t = c.until("a")
        assert t.startswith(b"a BAD")
        bad = base64.b64encode(f"\0{addr}\0wrong-password".encode()).decode()
        u, t = c.cmd(f"AUTHENTICATE PLAIN {bad}")
        assert b"NO [AUTHENTICATIONFAILED]" in t


def test_login_failure_and_unknown_user_look_the_same(server: IMAPServer) -> None:
    addr = server.user()
    with server.client() as c:
        _u, t1 = c.cmd(f"LOGIN {addr} wrong-password")
        _u, t2 = c.cmd("LOGIN nobody@example.org wrong-password")
        assert t1.split(b" ", 1)[1] == t2.split(b" ", 1)[1]
        assert b"AUTHENTICATIONFAILED" in t1


def test_imaplib_starttls_login(server: IMAPServer) -> None:
    addr = server.user()
    c = imaplib.IMAP4(*server.inst.addr("imap"))
    try:
        c.starttls(server.inst.client_ssl_context())
        assert "AUTH=PLAIN" in c.capabilities
        c.login(addr, PASSWORD)
        typ, data = c.list()
        names = [d.decode() for d in data]
        assert any('"Sent"' in n and "\\Sent" in n for n in names)
        assert any('"INBOX"' in n for n in names)
    finally:
        c.logout()


class _ScramAuth:
    """imaplib's authobject for SCRAM-SHA-256, built on the project's own client (proto/sasl.py)."""

    def __init__(self, user: str, password: str):
        self.client = sasl.ScramClient(user, password)
        self.step = 0
        self.verified = False

    def __call__(self, challenge: bytes) -> bytes:
        self.step += 1
        if self.step == 1:
            return self.client.first_message()
        if self.step == 2:
            return self.client.final_message(challenge)
        self.verified = self.client.verify_server_final(challenge)
        return b""


def test_authenticate_scram_sha_256_with_imaplib(server: IMAPServer) -> None:
    addr = server.user()
    c = imaplib.IMAP4(*server.inst.addr("imap"))
    try:
        assert "AUTH=SCRAM-SHA-256" not in c.capabilities  # no mechanism before TLS
        c.starttls(server.inst.client_ssl_context())
        assert {"AUTH=SCRAM-SHA-256", "AUTH=PLAIN", "AUTH=LOGIN"} <= set(c.capabilities)
        auth = _ScramAuth(addr, PASSWORD)
        typ, _data = c.authenticate("SCRAM-SHA-256", auth)
        assert typ == "OK" and auth.verified  # the server proved it knows the keys too
        assert c.select("INBOX")[0] == "OK"
    finally:
        c.logout()
    c = imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=server.inst.client_ssl_context())
    try:
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            c.authenticate("SCRAM-SHA-256", _ScramAuth(addr, "wrong-password"))
    finally:
        c.shutdown()


def test_authenticate_scram_with_sasl_ir_and_login_mechanism(server: IMAPServer) -> None:
    addr = server.user()
    b64 = base64.b64encode
    with server.client() as c:  # SASL-IR (RFC 4959): client-first in the command line
        scram = sasl.ScramClient(addr, PASSWORD)
        c.send(b"a AUTHENTICATE SCRAM-SHA-256 " + b64(scram.first_message()) + b"\r\n")
        first = c.line()
        assert first.startswith(b"+ ")
        c.send(b64(scram.final_message(base64.b64decode(first[2:].strip()))) + b"\r\n")
        final = c.line()
        assert final.startswith(b"+ ") and scram.verify_server_final(base64.b64decode(final[2:].strip()))
        c.send(b"\r\n")
        _u, t = c.until("a")
        assert t.startswith(b"a OK") and b"CAPABILITY" in t
    with server.client() as c:  # LOGIN: user name, then password, as two challenges
        c.send(b"a AUTHENTICATE LOGIN\r\n")
        assert c.line().startswith(b"+ ")
        c.send(b64(addr.encode()) + b"\r\n")
        assert c.line().startswith(b"+ ")
        c.send(b64(PASSWORD.encode()) + b"\r\n")
        _u, t = c.until("a")
        assert t.startswith(b"a OK")
    with server.client() as c:  # a non-empty answer to the server's final message fails
        scram = sasl.ScramClient(addr, PASSWORD)
        c.send(b"a AUTHENTICATE SCRAM-SHA-256 " + b64(scram.first_message()) + b"\r\n")
        first = c.line()
        c.send(b64(scram.final_message(base64.b64decode(first[2:].strip()))) + b"\r\n")
        assert c.line().startswith(b"+ ")
        c.send(b64(b"more") + b"\r\n")
        _u, t = c.until("a")
        assert b"NO [AUTHENTICATIONFAILED]" in t
        u, t = c.cmd("AUTHENTICATE DIGEST-MD5")
        assert b"NO [CANNOT]" in t


def test_per_user_connection_limit(server: IMAPServer) -> None:
    addr = server.user()
    clients = [server.client(addr) for _ in range(6)]
    try:
        with server.client() as c:
            _u, t = c.cmd(f"LOGIN {addr} {PASSWORD}")
            assert b"NO [LIMIT]" in t
    finally:
        for c in clients:
            c.close()


# -- the command set ------------------------------------------------------------------------------

def test_select_append_fetch_store_search(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        u = c.ok("SELECT INBOX")
        assert b"* 0 EXISTS\r\n" in u and any(b"UIDVALIDITY" in x for x in u)
        assert any(b"[PERMANENTFLAGS (" in x and b"\\*" in x for x in u)
        assert append(c, "INBOX", MSG) == 1
        assert append(c, "INBOX", MIME, "\\Seen $Work") == 2
        # APPEND to the selected mailbox reports it, and its new keyword first (RFC 9051 §7.3.5)
        assert c.last_untagged[0].startswith(b"* FLAGS (") and b"$Work" in c.last_untagged[0]
        assert c.last_untagged[2] == b"* 2 EXISTS\r\n"
        u = c.ok("FETCH 1:2 (UID FLAGS RFC822.SIZE ENVELOPE)")
        assert len(u) == 2
        assert b'"hello there"' in u[0] and b"RFC822.SIZE %d" % len(MSG) in u[0]
        assert b"$Work" in u[1] and b"\\Seen" in u[1]
        u = c.ok("FETCH 2 (BODYSTRUCTURE BODY[1] BINARY[2] BINARY.SIZE[2] BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert b'("text" "plain"' in u[0] and b"part one" in u[0]
        assert b"\x00\x01binary\xff" in u[0] and b"BINARY.SIZE[2] 9" in u[0]
        assert b"Subject: mime\r\n\r\n" in u[0]
        # a non-PEEK body fetch sets \Seen and reports the new flags
        u = c.ok("FETCH 1 (BODY[TEXT]<0.2>)")
        assert b"BODY[TEXT]<0> {2}\r\nHi" in u[0] and b"\\Seen" in u[0]
        u = c.ok("STORE 1 +FLAGS (\\Flagged)")
        assert b"\\Flagged" in u[0]
        assert c.ok("STORE 1 -FLAGS.SILENT (\\Flagged)") == []
        u = c.ok("SEARCH SUBJECT hello")
        assert u == [b"* SEARCH 1\r\n"]
        u = c.ok("UID SEARCH KEYWORD $Work")
        assert u == [b"* SEARCH 2\r\n"]
        u = c.ok("SEARCH RETURN (MIN MAX COUNT) ALL")
        assert b"MIN 1 MAX 2 COUNT 2" in u[0] and u[0].startswith(b"* ESEARCH (TAG")
        u = c.ok('SEARCH CHARSET UTF-8 BODY "part"')
        assert u == [b"* SEARCH 2\r\n"]
        u = c.ok("SEARCH NOT SEEN")
        assert u == [b"* SEARCH\r\n"]
        u = c.ok("UID FETCH 1:* (FLAGS)")
        assert len(u) == 2 and all(b"UID" in x for x in u)
        _u, t = c.cmd("FETCH 3 FLAGS")
        assert b"BAD" in t


def test_copy_move_expunge_uidplus(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        c.ok("SELECT INBOX")
        for _ in range(4):
            append(c, "INBOX", MSG)
        c.ok("NOOP")
        _u, t = c.cmd("COPY 1:2 Trash")
        assert b"[COPYUID " in t and b" 1:2 1:2]" in t
        u, t = c.cmd("UID MOVE 3 Archive")
        assert any(b"[COPYUID " in x for x in u) and b"* 3 EXPUNGE\r\n" in u
        u = c.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
        u = c.ok("UID EXPUNGE 2")  # \Deleted is on UID 1 only: nothing goes
        assert not any(b"EXPUNGE" in x for x in u)
        u = c.ok("EXPUNGE")
        assert u == [b"* 1 EXPUNGE\r\n"]
        u = c.ok("UID SEARCH ALL")
        assert u == [b"* SEARCH 2 4\r\n"]
        _u, t = c.cmd("COPY 1 Nowhere")
        assert b"NO [TRYCREATE]" in t
        u = c.ok("STATUS Trash (MESSAGES UIDNEXT UNSEEN SIZE)")
        assert b"MESSAGES 2 UIDNEXT 3 UNSEEN 2 SIZE %d" % (2 * len(MSG)) in u[0]
        c.ok("STORE 1 +FLAGS (\\Deleted)")
        c.ok("CLOSE")
        u = c.ok("EXAMINE INBOX")
        assert b"* 1 EXISTS\r\n" in u
        _u, t = c.cmd("STORE 1 +FLAGS (\\Seen)")
        assert b"NO" in t
        assert any(b"READ-ONLY" in x for x in [t]) or True
        c.ok("UNSELECT")


def test_mailbox_management_and_names(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        c.ok('CREATE "Projects.2024"')
        c.ok('CREATE "Projects.2025"')
        c.ok('CREATE Keep (USE (\\Flagged))')
        u = c.ok('LIST "" "Projects*"')
        assert any(b'(\\HasChildren \\NonExistent)' in x or b"(\\Noselect \\HasChildren)" in x for x in u)
        assert sum(b"Projects." in x for x in u) == 2
        u = c.ok('LIST "" "%"')
        assert any(b'"Keep"' in x and b"\\Flagged" in x for x in u)
        assert any(b'"Projects"' in x and b"\\Noselect" in x for x in u)
        u = c.ok('LIST (SPECIAL-USE) "" "*"')
        assert {re.search(rb'"([^"]+)"\r\n$', x).group(1) for x in u} == {  # type: ignore[union-attr]
            b"Archive", b"Drafts", b"Junk", b"Sent", b"Trash", b"Keep"}
        u = c.ok('LIST "" "*" RETURN (STATUS (MESSAGES UIDNEXT))')
        assert any(x.startswith(b'* STATUS "INBOX" (MESSAGES 0 UIDNEXT 1)') for x in u)
        c.ok('RENAME "Projects.2024" "Old.2024"')
        u = c.ok('LIST "" "Old.*"')
        assert len(u) == 1 and b'"Old.2024"' in u[0]
        c.ok("SUBSCRIBE Old.2024")
        u = c.ok('LSUB "" "Old.%"')
        assert u and b'"Old.2024"' in u[0]
        u = c.ok('LIST (SUBSCRIBED) "" "Old*"')
        assert any(b"\\Subscribed" in x for x in u)
        c.ok('DELETE "Old.2024"')
        for bad in ('"../escape"', '"a/b"', '"cur"', '"x.new"', '".hidden"', '"a..b"'):
            _u, t = c.cmd(f"CREATE {bad}")
            assert b" NO " in t, (bad, t)
        _u, t = c.cmd("DELETE INBOX")
        assert b" NO " in t
        _u, t = c.cmd("CREATE Keep")
        assert b"ALREADYEXISTS" in t
        # modified UTF-7 for IMAP4rev1, UTF-8 after ENABLE IMAP4rev2
        c.ok('CREATE "&AMQ-pfel"')
        assert (server.maildir(addr) / ".&AMQ-pfel").is_dir()
        u = c.ok('LIST "" "&AMQ-*"')
        assert b'"&AMQ-pfel"' in u[0]
        u = c.ok("ENABLE IMAP4rev2")
        assert u == [b"* ENABLED IMAP4rev2\r\n"]
        u = c.ok('LIST "" "\xc3\x84*"'.encode("latin-1").decode("utf-8").encode())
        assert '"Äpfel"'.encode() in u[0]
        u = c.ok("NAMESPACE")
        assert u == [b'* NAMESPACE (("" ".")) NIL NIL\r\n']


def test_delete_or_rename_of_the_selected_mailbox(server: IMAPServer) -> None:
    """The session deleting its selected mailbox gets the tagged OK and is back in the authenticated
    state (CLOSED where it enabled CONDSTORE); one renaming it keeps it selected under the new name,
    same UIDs; another session with it selected is told BYE at its next update."""
    addr = server.user()
    with server.client(addr) as a, server.client(addr) as b:
        a.ok("CREATE Work")
        uid = append(a, "Work", MSG)
        a.ok("ENABLE CONDSTORE")
        a.ok("SELECT Work")
        b.ok("SELECT Work")
        u = a.ok("RENAME Work Play")
        u = a.ok(f"UID FETCH {uid} (UID)")
        assert any(b"UID %d" % uid in x for x in u), u
        append(a, "Play", MSG)
        u = a.last_untagged + a.ok("NOOP")
        assert b"* 2 EXISTS\r\n" in u, u  # the selected mailbox under its new name
        b.send("n NOOP\r\n")
        assert b.line().startswith(b"* BYE")  # its mailbox is gone from under it
        u = a.ok("DELETE Play")
        assert any(b"[CLOSED]" in x for x in u), u
        _u, t = a.cmd("FETCH 1 (UID)")
        assert b" BAD " in t  # no mailbox selected any more
        a.ok("SELECT INBOX")


def test_rev2_search_is_esearch(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        c.ok("ENABLE IMAP4rev2")
        c.ok("SELECT INBOX")
        append(c, "INBOX", MSG)
        append(c, "INBOX", MSG)
        c.ok("NOOP")
        u = c.ok("UID SEARCH ALL")
        assert re.match(rb'\* ESEARCH \(TAG "t\d+"\) UID ALL 1:2\r\n', u[0])
        c.ok("SEARCH RETURN (SAVE) SUBJECT hello")
        u = c.ok("FETCH $ (UID)")
        assert len(u) == 2


def test_two_sessions_see_each_other(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as a, server.client(addr) as b:
        a.ok("SELECT INBOX")
        b.ok("SELECT INBOX")
        for _ in range(3):
            append(a, "INBOX", MSG)
        u = b.ok("NOOP")
        assert b"* 3 EXISTS\r\n" in u
        a.ok("STORE 2 +FLAGS (\\Deleted)")
        a.ok("STORE 1 +FLAGS (\\Answered)")
        u = b.ok("NOOP")
        assert any(x.startswith(b"* 2 FETCH") and b"\\Deleted" in x for x in u)
        assert any(x.startswith(b"* 1 FETCH") and b"\\Answered" in x for x in u)
        a.ok("EXPUNGE")
        # no EXPUNGE while answering FETCH by sequence number: the message stays numbered
        u = b.ok("FETCH 3 (UID)")
        assert not any(b"EXPUNGE" in x for x in u) and any(b"UID 3" in x for x in u)
        u = b.ok("NOOP")
        assert b"* 2 EXPUNGE\r\n" in u
        u = b.ok("FETCH 2 (UID)")
        assert b"UID 3" in u[0]


def test_store_of_flags_already_set_by_another_session(server: IMAPServer) -> None:
    """Issue 11: a non-silent +FLAGS/-FLAGS where some messages already have the flags answered
    NO [SERVERBUG]; now both sessions get OK and the FETCH shows the current flags."""
    addr = server.user()
    with server.client(addr) as a, server.client(addr) as b:
        for _ in range(3):
            append(a, "INBOX", MSG)
        a.ok("SELECT INBOX")
        b.ok("SELECT INBOX")
        u = a.ok("STORE 1 +FLAGS (\\Deleted)")
        assert any(x.startswith(b"* 1 FETCH") and b"\\Deleted" in x for x in u)
        u = b.ok("STORE 1 +FLAGS (\\Deleted)")  # already set by a: unchanged, still reported
        assert any(x.startswith(b"* 1 FETCH") and b"\\Deleted" in x for x in u)
        u = b.ok("STORE 1:3 +FLAGS (\\Seen \\Deleted)")  # a mix of changed and unchanged
        assert sum(1 for x in u if b"FETCH" in x and b"\\Seen" in x and b"\\Deleted" in x) == 3
        a.ok("NOOP")  # b's changes reach a here
        u = a.ok("STORE 1:3 -FLAGS (\\Flagged)")  # nothing to remove: every message unchanged
        assert sum(1 for x in u if b"FETCH" in x) == 3
        # Both sessions, interleaved, setting and clearing the same flag on the same messages.
        for i in range(10):
            mode = "+" if i % 2 == 0 else "-"
            for c in (a, b):
                _u, t = c.cmd(f"STORE 1:* {mode}FLAGS (\\Answered)")
                assert t.split(b" ")[1] == b"OK", t
        _u, t = b.cmd("UID STORE 1:* +FLAGS.SILENT (\\Seen)")
        assert t.split(b" ")[1] == b"OK", t


def test_dropped_file_appears_on_noop(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        c.ok("SELECT INBOX")
        (server.maildir(addr) / "new" / "1700000000.external.host").write_bytes(MSG.replace(b"\r\n", b"\n"))
        u = c.ok("NOOP")
        assert b"* 1 EXISTS\r\n" in u
        u = c.ok("FETCH 1 (RFC822.SIZE BODY.PEEK[])")
        assert b"RFC822.SIZE %d" % len(MSG) in u[0] and MSG in u[0]
        name = next((server.maildir(addr) / "new").iterdir()).name
        os.rename(server.maildir(addr) / "new" / name, server.maildir(addr) / "cur" / (name + ":2,F"))
        u = c.ok("NOOP")
        assert any(b"\\Flagged" in x for x in u)
        os.unlink(server.maildir(addr) / "cur" / (name + ":2,F"))
        u = c.ok("NOOP")
        assert b"* 1 EXPUNGE\r\n" in u


def test_idle_wakes_on_delivery(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        c.ok("SELECT INBOX")
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ ")
        t0 = time.monotonic()
        with smtplib.SMTP(*server.inst.addr("smtp"), timeout=10) as s:
            s.sendmail("alice@example.net", [addr], MSG)
        c.sock.settimeout(5)
        ln = c.line()
        assert ln == b"* 1 EXISTS\r\n", ln
        assert time.monotonic() - t0 < 2.0
        c.send(b"DONE\r\n")
        _u, t = c.until("i")
        assert t.startswith(b"i OK")


def test_idle_sees_other_program(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        c.ok("SELECT INBOX")
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ ")
        deliver_maildir(server.maildir(addr), b"", MSG)
        c.sock.settimeout(5)
        assert c.line() == b"* 1 EXISTS\r\n"
        c.send(b"DONE\r\n")
        c.until("i")


def test_condstore_qresync(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        c.ok("ENABLE QRESYNC")
        u = c.ok("SELECT INBOX")
        for _ in range(3):
            append(c, "INBOX", MSG)
        u = c.ok("NOOP")
        uv = int(re.search(rb"UIDVALIDITY (\d+)", b"".join(c.ok("STATUS INBOX (UIDVALIDITY)"))).group(1))  # type: ignore[union-attr]
        ms = int(re.search(rb"HIGHESTMODSEQ (\d+)", b"".join(c.ok("STATUS INBOX (HIGHESTMODSEQ)"))).group(1))  # type: ignore[union-attr]
        u = c.ok("STORE 1 +FLAGS (\\Flagged)")
        assert b"MODSEQ (" in u[0]
        new_ms = int(re.search(rb"MODSEQ \((\d+)\)", u[0]).group(1))  # type: ignore[union-attr]
        assert new_ms > ms
        _u, t = c.cmd(f"STORE 1 (UNCHANGEDSINCE {ms}) +FLAGS (\\Seen)")
        assert b"[MODIFIED 1]" in t
        u = c.ok(f"UID FETCH 1:* (FLAGS) (CHANGEDSINCE {ms})")
        assert len(u) == 1 and b"UID 1" in u[0] and b"MODSEQ" in u[0]
        # content with CHANGEDSINCE (read from the changed messages only): what FETCH gives that message
        u = c.ok(f"UID FETCH 1:* (ENVELOPE RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)]) (CHANGEDSINCE {ms})")
        assert u == c.ok("UID FETCH 1 (ENVELOPE RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)] MODSEQ)")
        assert len(u) >= 1 and u[0].startswith(b"* 1 FETCH (UID 1 ENVELOPE (")
        assert c.ok(f"UID FETCH 2:* (ENVELOPE) (CHANGEDSINCE {ms})") == []
        c.ok("STORE 2 +FLAGS.SILENT (\\Deleted)")
        u = c.ok("EXPUNGE")
        assert u[0].startswith(b"* VANISHED 2")
        c.ok("UNSELECT")
        u = c.ok(f"SELECT INBOX (QRESYNC ({uv} {ms} 1:3))")
        assert b"* VANISHED (EARLIER) 2\r\n" in u
        assert any(b"UID 1" in x and b"\\Flagged" in x for x in u)
        u = c.ok(f"UID FETCH 1:* (UID) (CHANGEDSINCE {ms} VANISHED)")
        assert u[0] == b"* VANISHED (EARLIER) 2\r\n"


def test_uid_and_index_survive_reindex(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        c.ok("SELECT INBOX")
        for _ in range(3):
            append(c, "INBOX", MSG)
        c.ok("STORE 1 +FLAGS (\\Deleted)")
        c.ok("EXPUNGE")
        c.ok("STORE 1 +FLAGS (custom)")
        u = c.ok("UID FETCH 1:* (FLAGS)")
        before = sorted(x.replace(b" \\Recent", b"").replace(b"\\Recent", b"") for x in u)
        uv = c.ok("STATUS INBOX (UIDVALIDITY)")
        c.ok("LOGOUT")
    time.sleep(0.3)  # the server closes the user's index when the last session ends
    home = server.maildir(addr).parent
    for f in home.glob("postier-index.sqlite*"):
        f.unlink()
    with server.client(addr) as c:
        assert c.ok("STATUS INBOX (UIDVALIDITY)") == uv
        c.ok("SELECT INBOX")
        assert sorted(x.replace(b" \\Recent", b"").replace(b"\\Recent", b"") for x in c.ok("UID FETCH 1:* (FLAGS)")) == before


def test_reindex_command_keeps_uids(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        c.ok("ENABLE IMAP4rev2")
        c.ok("SELECT INBOX")
        for _ in range(4):
            append(c, "INBOX", MSG)
        c.ok("STORE 2 +FLAGS (\\Deleted)")
        c.ok("EXPUNGE")
        c.ok("STORE 3 +FLAGS ($label1 \\Answered)")
        c.ok("CREATE Sub")
        c.ok("COPY 1 Sub")
        before = sorted(c.ok("UID FETCH 1:* (FLAGS)"))
        r = server.inst.cli("reindex", addr)
        assert "INBOX\t3" in r.stdout and "Sub\t1" in r.stdout
        c.ok("NOOP")
        assert sorted(x for x in c.ok("UID FETCH 1:* (FLAGS)") if b"FLAGS" in x) == before
    r = server.inst.cli("reindex", "nobody@example.org", check=False)
    assert r.returncode == 1 and "no such user" in r.stderr


def test_imapclient_and_aioimaplib(server: IMAPServer) -> None:
    import asyncio

    import aioimaplib
    from imapclient import IMAPClient

    addr = server.user()
    host, port = server.inst.addr("imaps")
    with IMAPClient(host, port=port, ssl=True, ssl_context=server.inst.client_ssl_context()) as cl:
        cl.login(addr, PASSWORD)
        cl.append("INBOX", MSG, flags=[b"\\Seen"])
        cl.select_folder("INBOX")
        res = cl.fetch([1], ["ENVELOPE", "FLAGS", "BODY.PEEK[]"])
        assert res[1][b"ENVELOPE"].subject == b"hello there"
        assert res[1][b"BODY[]"] == MSG
        assert cl.search(["SUBJECT", "hello"]) == [1]
        cl.move([1], "Archive")
        assert cl.folder_status("Archive", ["MESSAGES"])[b"MESSAGES"] == 1
        assert cl.has_capability("MOVE") and cl.has_capability("IDLE")

    async def aio() -> None:
        c = aioimaplib.IMAP4_SSL(host=host, port=port, ssl_context=server.inst.client_ssl_context(), timeout=10)
        await c.wait_hello_from_server()
        r = await c.login(addr, PASSWORD)
        assert r.result == "OK"
        r = await c.select("Archive")
        assert r.result == "OK"
        r = await c.uid("fetch", "1:*", "(FLAGS BODY.PEEK[HEADER])")
        assert r.result == "OK" and any(b"hello there" in x for x in r.lines if isinstance(x, (bytes, bytearray)))
        idle = await c.idle_start(timeout=5)
        await asyncio.sleep(0.1)
        await asyncio.to_thread(deliver_maildir, server.maildir(addr) / ".Archive", b"", MSG)
        msg = await c.wait_server_push(timeout=5)
        assert any(b"EXISTS" in (m if isinstance(m, bytes) else str(m).encode()) for m in msg)
        c.idle_done()
        await asyncio.wait_for(idle, 5)
        await c.logout()

    asyncio.run(aio())


def test_raw_socket_garbage_gets_bad(server: IMAPServer) -> None:
    with server.client() as c:
        for junk in (b"\r\n", b"a\r\n", b"a FETCH\r\n", b"a NOSUCH\r\n", b"a LOGIN (\r\n", b"\x00\xff\r\n"):
            c.send(junk)
            ln = c.line()
            assert b"BAD" in ln, (junk, ln)
        u, t = c.cmd("NOOP")
        assert b"OK" in t
    s = socket.create_connection(server.inst.addr("imap"))
    s.sendall(b"a " + b"x" * 20000 + b"\r\nb NOOP\r\n")
    s.settimeout(5)
    data = b""
    while b"b OK" not in data:
        chunk = s.recv(4096)
        assert chunk
        data += chunk
    assert b"BAD" in data
    s.close()


@pytest.mark.parametrize("n", [1])
def test_logout(server: IMAPServer, n: int) -> None:
    with server.client(server.user()) as c:
        u, t = c.cmd("LOGOUT")
        assert u[0].startswith(b"* BYE") and b"OK" in t


def test_more_commands(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c:
        assert c.ok('LIST "" ""') == [b'* LIST (\\Noselect) "." ""\r\n']
        # IDLE without a selected mailbox, then DONE
        c.send(b"i IDLE\r\n")
        assert c.line().startswith(b"+ ")
        c.send(b"DONE\r\n")
        assert c.until("i")[1].startswith(b"i OK")
        c.ok("SELECT INBOX")
        enc = b"=?UTF-8?B?" + base64.b64encode("Grüße aus Köln".encode()) + b"?="
        append(c, "INBOX", b"From: a@example.net\r\nSubject: " + enc + b"\r\n\r\nbody\r\n")
        append(c, "INBOX", b"From: b@example.net\r\nSubject: plain\r\n\r\nnul \x00 inside\r\n")
        needle = "grüße".encode()
        u, t = c.cmd(b"SEARCH CHARSET UTF-8 SUBJECT {%d+}\r\n" % len(needle) + needle)
        assert u == [b"* SEARCH 1\r\n"], (u, t)
        u = c.ok("STATUS INBOX (MESSAGES UIDNEXT)")  # STATUS on the selected mailbox works too
        assert b"MESSAGES 2 UIDNEXT 3" in u[0]
        data = b"Subject: bin\r\n\r\n\x00\x01\x02\r\n"
        _u, t = c.cmd(b"APPEND INBOX ~{%d+}\r\n" % len(data) + data)
        assert b"APPENDUID" in t
        u = c.ok("FETCH 3 (BINARY.PEEK[] RFC822.SIZE)")
        assert data in u[0] and b"RFC822.SIZE %d" % len(data) in u[0]
        c.ok("UNSELECT")
        c.ok("RENAME INBOX Saved")
        u = c.ok("STATUS Saved (MESSAGES)")
        assert b"MESSAGES 3" in u[0]
        u = c.ok("STATUS INBOX (MESSAGES)")
        assert b"MESSAGES 0" in u[0]
        _u, t = c.cmd("SELECT Nowhere")
        assert b"NO [NONEXISTENT]" in t
        _u, t = c.cmd("FETCH 1 FLAGS")  # a failed SELECT leaves no mailbox selected
        assert b"BAD" in t


# -- compliance (issue 11) ------------------------------------------------------------------------

def test_unusable_but_well_formed_names_get_no(server: IMAPServer) -> None:
    with server.client(server.user()) as c:
        for cmd in ('SELECT "a&b"', 'LIST "" "&Jjo"', 'STATUS "x&-&" (MESSAGES)', 'CREATE "a\x01b"'):
            _u, t = c.cmd(cmd)
            assert t.split(b" ")[1] == b"NO" and b"[CANNOT]" in t, (cmd, t)
        _u, t = c.cmd("SELECT (")  # a syntax error stays BAD
        assert t.split(b" ")[1] == b"BAD"


def test_long_id_command_is_accepted(server: IMAPServer) -> None:
    params = " ".join(f'"key{i}" "{"v" * 1024}"' for i in range(30))  # RFC 2971 §3.3 maxima
    line = f"ID ({params})"
    assert 31_000 < len(line) < 32_000
    with server.client() as c:  # before login
        _u, t = c.cmd(line)
        assert t.split(b" ")[1] == b"OK", t
        c.ok(f"LOGIN {server.user()} {PASSWORD}")
        _u, t = c.cmd(line)
        assert t.split(b" ")[1] == b"OK", t
        _u, t = c.cmd("ID (" + '"k" "' + "v" * 70_000 + '")')  # still bounded
        assert b"TOOBIG" in t


def test_condstore_enabled_by_fetch_modseq_sends_highestmodseq(server: IMAPServer) -> None:
    with server.client(server.user()) as c:
        append(c, "INBOX", MSG)
        c.ok("SELECT INBOX")
        u = c.ok("FETCH 1 (MODSEQ)")
        assert u[0].startswith(b"* OK [HIGHESTMODSEQ "), u  # RFC 7162 §3.1, before the FETCH
        assert u[1].startswith(b"* 1 FETCH (MODSEQ (")
        u = c.ok("FETCH 1 (MODSEQ)")
        assert not any(b"HIGHESTMODSEQ" in x for x in u)  # only when it is turned on


def test_esearch_min_max_modseq_is_that_message_s(server: IMAPServer) -> None:
    with server.client(server.user()) as c:
        for _ in range(3):
            append(c, "INBOX", MSG)
        c.ok("ENABLE CONDSTORE")
        c.ok("SELECT INBOX")
        c.ok("STORE 1 +FLAGS (\\Flagged)")  # message 1 now has the highest MODSEQ
        u = c.ok("FETCH 1:3 (MODSEQ)")
        ms = {int(m.group(1)): int(m.group(2)) for m in (re.search(rb"\* (\d+) FETCH \(MODSEQ \((\d+)\)", x) for x in u)
              if m}
        u, t = c.cmd("SEARCH RETURN (MAX) MODSEQ 1", tag="s1")
        assert t.startswith(b"s1 OK") and u == [b'* ESEARCH (TAG "s1") MAX 3 MODSEQ %d\r\n' % ms[3]]
        u = c.ok("SEARCH RETURN (MIN MAX) MODSEQ 1")
        assert u[0].endswith(b"MIN 1 MAX 3 MODSEQ %d\r\n" % max(ms[1], ms[3]))
        u = c.ok("SEARCH RETURN (COUNT) MODSEQ 1")
        assert u[0].endswith(b"COUNT 3 MODSEQ %d\r\n" % max(ms.values()))


def test_list_extended_recursivematch_childinfo(server: IMAPServer) -> None:
    with server.client(server.user()) as c:
        c.ok("CREATE Foo.Bar")
        c.ok("SUBSCRIBE Foo.Bar")
        u = c.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "Foo%"')
        assert len(u) == 1 and b'"Foo"' in u[0] and b'("CHILDINFO" ("SUBSCRIBED"))' in u[0]
        u = c.ok('LIST (SUBSCRIBED RECURSIVEMATCH) "" "Foo*"')  # Foo.Bar is listed itself: no Foo
        assert len(u) == 1 and b'"Foo.Bar"' in u[0] and b"CHILDINFO" not in u[0], u


def test_move_into_the_selected_mailbox(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as c, server.client(addr) as other:
        append(c, "INBOX", MSG)
        append(c, "INBOX", MSG)
        c.ok("SELECT INBOX")
        other.ok("SELECT INBOX")
        u = c.ok("UID MOVE 1 INBOX")  # RFC 6851: allowed; the message gets a new UID
        assert u[0].startswith(b"* OK [COPYUID ") and b" 1 3]" in u[0], u
        assert b"* 1 EXPUNGE\r\n" in u and b"* 2 EXISTS\r\n" in u
        u = c.ok("UID FETCH 1:* (UID)")
        assert [int(x) for x in re.findall(rb"UID (\d+)", b"".join(u))] == [2, 3]
        u = other.ok("NOOP")
        assert b"* 1 EXPUNGE\r\n" in u and b"* 2 EXISTS\r\n" in u


def test_new_keyword_is_announced_before_it_is_fetched(server: IMAPServer) -> None:
    addr = server.user()
    with server.client(addr) as a, server.client(addr) as b:
        append(a, "INBOX", MSG)
        a.ok("SELECT INBOX")
        b.ok("SELECT INBOX")
        u = a.ok("STORE 1 +FLAGS (Project42)")
        i = next(i for i, x in enumerate(u) if x.startswith(b"* FLAGS "))
        j = next(i for i, x in enumerate(u) if b"FETCH" in x)
        assert i < j and b"Project42" in u[i], u  # RFC 9051 §7.3.5
        assert any(b"PERMANENTFLAGS" in x and b"Project42" in x for x in u)
        u = b.ok("NOOP")
        i = next(i for i, x in enumerate(u) if x.startswith(b"* FLAGS "))
        j = next(i for i, x in enumerate(u) if b"FETCH" in x)
        assert i < j and b"Project42" in u[i], u
        u = a.ok("STORE 1 -FLAGS (Project42)")
        assert not any(x.startswith(b"* FLAGS ") for x in u)  # known now: not announced again
