"""Transcript, framing, smuggling and fuzz tests of the sans-IO SMTP/LMTP server core."""

from __future__ import annotations

import base64
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postier.proto.smtp import replies as R
from postier.proto.smtp.errors import UsageError
from postier.proto.smtp.server import (
    NEED_DATA,
    AuthResponse,
    AuthStart,
    Close,
    ConnectionClosed,
    DataStart,
    Hello,
    MailFrom,
    MessageData,
    MessageEnd,
    Quit,
    RcptTo,
    Reset,
    ServerConnection,
    ServerSettings,
    StartTLS,
    State,
)

HOST = "mx.example.org"
ANSWERED = (Hello, AuthStart, AuthResponse, MailFrom, RcptTo, DataStart, MessageEnd)


def answer(conn: ServerConnection, ev: object) -> None:
    """A trivial app: accept everything; AUTH succeeds (after one challenge when no initial response)."""
    if isinstance(ev, AuthStart):
        if ev.initial_response is None:
            conn.auth_challenge(b"")
        else:
            conn.auth_success("user")
    elif isinstance(ev, AuthResponse):
        conn.auth_success("user")
    elif isinstance(ev, MessageEnd) and ev.problem is not None:
        conn.reply(ev.problem)
    elif isinstance(ev, ANSWERED):
        conn.accept()


def drain(conn: ServerConnection, app=answer) -> list[object]:
    events: list[object] = []
    for _ in range(100_000):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return events
        events.append(ev)
        if isinstance(ev, (Close, ConnectionClosed)):
            return events
        app(conn, ev)
    raise AssertionError("runaway event loop")


def feed(conn: ServerConnection, data: bytes, app=answer) -> list[object]:
    conn.receive_data(data)
    return drain(conn, app)


def new(**kw: object) -> ServerConnection:
    conn = ServerConnection(ServerSettings(HOST, **kw))  # type: ignore[arg-type]
    conn.greet()
    return conn


def transcript(script: str, **kw: object) -> ServerConnection:
    """Run `C:`/`S:` lines against the core; consecutive C lines go in one packet; exact bytes compared."""
    conn = ServerConnection(ServerSettings(HOST, **kw))  # type: ignore[arg-type]
    conn.greet()
    steps: list[tuple[str, list[str]]] = []
    for line in script.strip("\n").splitlines():
        who, text = line[:2], line[3:]
        if steps and steps[-1][0] == who:
            steps[-1][1].append(text)
        else:
            steps.append((who, [text]))
    for who, lines in steps:
        wire = "".join(f"{t}\r\n" for t in lines).encode()
        if who == "C:":
            feed(conn, wire)
        else:
            assert conn.data_to_send().decode() == wire.decode()
    assert conn.data_to_send() == b""
    return conn


EHLO_REPLY = f"""S: 250-{HOST}
S: 250-PIPELINING
S: 250-SIZE 52428800
S: 250-ENHANCEDSTATUSCODES
S: 250-8BITMIME
S: 250-SMTPUTF8
S: 250 CHUNKING"""


def test_transcript_esmtp_session() -> None:
    conn = transcript(f"""
S: 220 {HOST} ESMTP postier
C: EHLO client.example
{EHLO_REPLY}
C: MAIL FROM:<alice@client.example> SIZE=120 BODY=8BITMIME
C: RCPT TO:<bob@example.org>
C: RCPT TO:<Postmaster>
C: DATA
S: 250 2.1.0 Sender OK
S: 250 2.1.5 Recipient OK
S: 250 2.1.5 Recipient OK
S: 354 End data with <CR><LF>.<CR><LF>
C: Subject: hi
C:
C: ..leading dot
C: .
S: 250 2.0.0 Message accepted for delivery
C: NOOP
S: 250 2.0.0 OK
C: VRFY bob
S: 252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery
C: EXPN list
S: 502 5.5.1 Command not implemented
C: RSET
S: 250 2.0.0 OK
C: QUIT
S: 221 2.0.0 Bye
""")
    assert conn.is_closed


def test_transcript_helo_and_sequence_errors() -> None:
    transcript(f"""
S: 220 {HOST} ESMTP postier
C: MAIL FROM:<a@b.example>
S: 503 5.5.1 Send HELO/EHLO first
C: HELO client.example
S: 250 {HOST}
C: RCPT TO:<a@b.example>
S: 503 5.5.1 Need MAIL command first
C: DATA
S: 503 5.5.1 Need MAIL command first
C: MAIL FROM:<>
S: 250 2.1.0 Sender OK
C: MAIL FROM:<>
S: 503 5.5.1 Nested MAIL command
C: DATA
S: 554 5.5.1 No valid recipients
C: FOO bar
S: 500 5.5.1 Command unrecognized
C: MAIL FROM:<no-at-sign>
S: 503 5.5.1 Nested MAIL command
C: RSET extra
S: 501 5.5.4 Syntax error in parameters or arguments
C: EHLO
S: 501 5.5.4 Syntax: EHLO hostname
C: HELP
S: 214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP
""")


@pytest.mark.parametrize(("kw", "listed"), [
    ({"offer_starttls": True}, "EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY STARTTLS HELP"),  # port 25
    ({"offer_starttls": True, "auth_mechanisms": ("PLAIN",)},
     "EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY STARTTLS AUTH HELP"),  # submission
    ({"lmtp": True, "chunking": False}, "LHLO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP"),  # RFC 2033 §4.1
])
def test_help_lists_what_this_role_accepts(kw: dict[str, object], listed: str) -> None:
    greeting = "220 mx.example.org LMTP postier" if kw.get("lmtp") else "220 mx.example.org ESMTP postier"
    transcript(f"S: {greeting}\nC: HELP\nS: 214 2.0.0 Commands: {listed}\n", **kw)


def test_transcript_address_and_param_errors() -> None:
    transcript(
        f"""
S: 220 {HOST} ESMTP postier
C: EHLO c.example
{EHLO_REPLY}
C: MAIL FROM:alice@c.example
S: 501 5.1.7 Bad sender address syntax
C: MAIL TO:<alice@c.example>
S: 501 5.5.4 Syntax: MAIL FROM:<address>
C: MAIL FROM:<alice@c.example> SIZE=99999999999
S: 552 5.3.4 Message size exceeds fixed maximum message size
C: MAIL FROM:<alice@c.example> FROB=1
S: 555 5.5.4 MAIL FROM/RCPT TO parameters not recognized or not implemented
C: MAIL FROM:<alice@c.example> BODY=BINARYMIME
S: 555 5.5.4 MAIL FROM/RCPT TO parameters not recognized or not implemented
C: MAIL FROM:<jöran@c.example>
S: 553 5.6.7 Non-ASCII address requires the SMTPUTF8 parameter
C: MAIL FROM:<jöran@c.example> SMTPUTF8 RET=HDRS ENVID=a+2Bb
S: 250 2.1.0 Sender OK
C: RCPT TO:<bob@[192.0.2.1]> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;bob@example.org
S: 250 2.1.5 Recipient OK
C: RCPT TO:<bob@example.org> NOTIFY=SOMETIMES
S: 501 5.5.4 Syntax error in parameters or arguments
C: RCPT TO:<bob@bad_domain>
S: 501 5.1.3 Bad recipient address syntax
S: 421 4.7.0 {HOST} Too many errors, closing connection
""",
        max_errors=8,
    )


def test_events_carry_parsed_envelope() -> None:
    conn = new()
    feed(conn, b"EHLO c.example\r\n")
    evs = feed(conn, b"MAIL FROM:<@relay.example,@r2.example:u%x@c.example> SMTPUTF8\r\n")
    (mail,) = evs
    assert isinstance(mail, MailFrom)
    assert mail.address == "u%x@c.example"
    assert mail.path.source_route == ("relay.example", "r2.example") and mail.path.percent_hack
    assert mail.params == {"SMTPUTF8": None}
    feed(conn, 'RCPT TO:<"a b"@例え.jp>\r\n'.encode())
    assert [r.address for r in conn.recipients] == ['"a b"@例え.jp']
    assert conn.mail_from is mail and conn.helo == "c.example" and conn.state is State.MAIL


def message(body: bytes) -> bytes:
    return b"MAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n" + body


def open_data(conn: ServerConnection, body: bytes = b"", app=answer) -> list[object]:
    """EHLO (alone: nothing may follow it), then MAIL, RCPT and DATA pipelined."""
    evs = feed(conn, b"EHLO c.example\r\n", app)
    return evs + feed(conn, message(body), app)


def run_pieces(pieces: list[bytes], **kw: object) -> tuple[bytes, list[object], ServerConnection]:
    conn = new(**kw)
    events: list[object] = []
    for p in pieces:
        events += feed(conn, p)
    data = b"".join(e.data for e in events if isinstance(e, MessageData))
    return data, events, conn


def commands_then(body: bytes) -> list[bytes]:
    # commands one per packet (the client waits for each reply), then the content
    cmds = [
        b"EHLO c.example\r\n",
        b"MAIL FROM:<a@c.example>\r\n",
        b"RCPT TO:<b@example.org>\r\n",
        b"DATA\r\n",
    ]
    return [*cmds, body] if body else cmds


FRAMING_BODIES = [
    b".\r\n",
    b"\r\n.\r\n",
    b"..\r\n.\r\n",
    b"...\r\n.\r\n",
    b"a\r\n.\r\n",
    b"line\r\n..dot\r\n.\r\n",
    b"x\r\n\r\n.\r\n",
    b".x\r\n..\r\n.\r\n",
    b"no-final-stuff\r\n.x\r\n.\r\n",
    b"a" * 300 + b"\r\n" + b".b" * 50 + b"\r\n.\r\n",
]
FRAMING_EXPECTED = [
    b"",
    b"\r\n",
    b".\r\n",
    b"..\r\n",
    b"a\r\n",
    b"line\r\n.dot\r\n",
    b"x\r\n\r\n",
    b"x\r\n.\r\n",
    b"no-final-stuff\r\nx\r\n",
    b"a" * 300 + b"\r\n" + b"b" + b".b" * 49 + b"\r\n",
]


@pytest.mark.parametrize(("body", "expected"), list(zip(FRAMING_BODIES, FRAMING_EXPECTED, strict=True)))
def test_data_framing_whole_bytewise_and_random_splits(body: bytes, expected: bytes) -> None:
    tail = b"QUIT\r\n"
    whole, events, conn = run_pieces([*commands_then(body), tail])
    assert whole == expected
    assert sum(isinstance(e, MessageEnd) for e in events) == 1
    assert isinstance(events[-1], Close)
    bytewise, _, _ = run_pieces([*commands_then(b""), *[bytes([b]) for b in body], tail])
    assert bytewise == expected
    rng = random.Random(len(body))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, rng.randint(1, 6))))
        parts = [body[i:j] for i, j in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        split, _, _ = run_pieces([*commands_then(b""), *parts, tail])
        assert split == expected


def test_large_message_streams_without_accumulating() -> None:
    line = b"0123456789" * 7 + b"\r\n"
    body = line * 20000
    conn = new()
    open_data(conn)
    sizes = []
    for i in range(0, len(body), 65536):
        evs = feed(conn, body[i : i + 65536])
        sizes += [len(e.data) for e in evs if isinstance(e, MessageData)]
    evs = feed(conn, b".\r\n")
    sizes += [len(e.data) for e in evs if isinstance(e, MessageData)]
    assert sum(sizes) == len(body) and max(sizes) <= 65536 + 4
    assert evs[-1] == MessageEnd(None)


SMUGGLES = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
    b"\n.\r",
    b"\r\n.\r",
    b"\rx",
    b"\nx",
]


@pytest.mark.parametrize("sep", SMUGGLES)
@pytest.mark.parametrize("bytewise", [False, True])
def test_smuggling_is_one_rejected_message(sep: bytes, bytewise: bool) -> None:
    evil = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\nForged\r\n"
    body = b"Subject: x\r\n\r\nhello" + sep + evil + b".\r\n"
    pieces = [bytes([b]) for b in body] if bytewise else [body]
    _, events, conn = run_pieces([*commands_then(b""), *pieces])
    ends = [e for e in events if isinstance(e, MessageEnd)]
    assert ends == [MessageEnd(R.R554_BARE_NEWLINE)]
    assert not any(isinstance(e, MailFrom) and "evil" in e.address for e in events)
    assert conn.data_to_send().endswith(b"554 5.6.0 Message contains bare CR or LF, not allowed\r\n")
    assert conn.state is State.READY


def test_problem_message_cannot_be_accepted() -> None:
    conn = new()
    open_data(conn)
    conn.receive_data(b"a\nb\r\n.\r\n")
    assert conn.next_event() == MessageEnd(R.R554_BARE_NEWLINE)  # no content after a fault
    with pytest.raises(UsageError):
        conn.accept()


def test_oversize_message_and_long_line() -> None:
    conn = new(max_message_size=1000)
    open_data(conn)
    evs = feed(conn, b"x" * 900 + b"\r\n" + b"y" * 900 + b"\r\n.\r\n")
    assert evs[-1] == MessageEnd(R.R552_TOO_BIG)
    assert sum(len(e.data) for e in evs if isinstance(e, MessageData)) < 1000
    conn = new(max_data_line=100)
    open_data(conn)
    evs = feed(conn, b"ok\r\n" + b"z" * 99 + b"\r\n.\r\n")
    assert evs[-1] == MessageEnd(R.R554_LINE_TOO_LONG)
    conn = new(max_data_line=100)
    open_data(conn)
    evs = feed(conn, b"z" * 98 + b"\r\n.\r\n")
    assert evs[-1] == MessageEnd(None)


def test_starttls_injection_is_discarded() -> None:
    conn = new(offer_starttls=True)
    feed(conn, b"EHLO c.example\r\n")
    assert b"250-STARTTLS\r\n" in conn.data_to_send()
    evs = feed(conn, b"STARTTLS\r\nMAIL FROM:<x@attacker.example>\r\n")
    assert evs == [StartTLS()]
    assert conn.data_to_send() == b"220 2.0.0 Ready to start TLS\r\n"
    assert feed(conn, b"RCPT TO:<y@example.org>\r\n") == []  # still before the handshake: dropped
    conn.tls_started()
    assert conn.tls and conn.helo is None and conn.state is State.FRESH
    assert feed(conn, b"MAIL FROM:<a@c.example>\r\n") == []
    assert conn.data_to_send() == b"503 5.5.1 Send HELO/EHLO first\r\n"
    feed(conn, b"EHLO c.example\r\n")
    assert b"STARTTLS" not in conn.data_to_send()
    feed(conn, b"STARTTLS\r\n")
    assert conn.data_to_send() == b"503 5.5.1 TLS already active\r\n"


def test_auth_flows() -> None:
    conn = new(auth_mechanisms=("PLAIN", "LOGIN"))
    feed(conn, b"EHLO c.example\r\n")
    assert b"AUTH" not in conn.data_to_send()  # never offered in clear
    feed(conn, b"AUTH PLAIN AGEAYg==\r\n")
    assert conn.data_to_send() == b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"

    conn = new(auth_mechanisms=("PLAIN", "LOGIN"), tls_active=True, require_auth=True)
    feed(conn, b"EHLO c.example\r\n")
    assert b"250-AUTH PLAIN LOGIN\r\n" in conn.data_to_send()
    feed(conn, b"MAIL FROM:<a@c.example>\r\n")
    assert conn.data_to_send() == b"530 5.7.0 Authentication required\r\n"
    seen: list[object] = []

    def app(c: ServerConnection, ev: object) -> None:
        seen.append(ev)
        answer(c, ev)

    feed(conn, b"AUTH LOGIN\r\n", app)
    assert conn.data_to_send() == b"334 \r\n"
    feed(conn, b"*\r\n", app)
    assert conn.data_to_send() == b"501 5.0.0 Authentication cancelled\r\n"
    feed(conn, b"AUTH CRAM-MD5\r\n", app)
    assert conn.data_to_send() == b"504 5.5.4 Unrecognized authentication type\r\n"
    feed(conn, b"AUTH PLAIN !!!\r\n", app)
    assert conn.data_to_send() == b"501 5.5.2 Invalid base64 data\r\n"
    feed(conn, b"AUTH LOGIN\r\n", app)
    conn.data_to_send()
    feed(conn, base64.b64encode(b"user") + b"\r\nMAIL FROM:<injected@x.example>\r\n", app)
    assert conn.data_to_send() == b"235 2.7.0 Authentication successful\r\n"
    assert seen[-1] == AuthResponse(b"user") and conn.authenticated == "user"
    assert not any(isinstance(e, MailFrom) for e in seen)
    feed(conn, b"AUTH PLAIN =\r\n")
    assert conn.data_to_send() == b"503 5.5.1 Already authenticated\r\n"
    feed(conn, b"MAIL FROM:<a@c.example>\r\n")
    assert conn.data_to_send() == b"250 2.1.0 Sender OK\r\n"


def test_auth_initial_response_and_long_line() -> None:
    conn = new(auth_mechanisms=("PLAIN",), tls_active=True)
    feed(conn, b"EHLO c.example\r\n")
    conn.data_to_send()
    seen: list[object] = []
    blob = b"\0user\0" + b"p" * 3000
    feed(conn, b"AUTH PLAIN " + base64.b64encode(blob) + b"\r\n", lambda c, e: (seen.append(e), answer(c, e)))
    assert seen == [AuthStart("PLAIN", blob)]
    assert conn.data_to_send() == b"235 2.7.0 Authentication successful\r\n"
    feed(conn, b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n")
    assert conn.data_to_send() == b"500 5.5.2 Line too long\r\n250 2.0.0 OK\r\n"


def test_early_talker() -> None:
    conn = ServerConnection(ServerSettings(HOST))
    conn.receive_data(b"EHLO spam.example\r\n")
    conn.greet()
    assert conn.data_to_send() == b"554 5.5.0 Protocol error: talked before the greeting\r\n"
    assert conn.next_event() == Close("early talker") and conn.is_closed


def test_greeting_refusal_waits_for_quit() -> None:
    conn = ServerConnection(ServerSettings(HOST))
    conn.greet(R.R554_NO_SERVICE)
    feed(conn, b"EHLO c.example\r\n")
    feed(conn, b"QUIT\r\n")
    assert conn.data_to_send() == (
        b"554 5.7.0 No SMTP service here\r\n503 5.5.1 Bad sequence of commands\r\n221 2.0.0 Bye\r\n"
    )


def test_pipelining_rules() -> None:
    # PIPELINING not offered: a second command in the same packet breaks synchronisation
    conn = new(pipelining=False)
    feed(conn, b"EHLO c.example\r\n")
    assert b"PIPELINING" not in conn.data_to_send()
    evs = feed(conn, b"MAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.org>\r\n")
    assert evs == [Close("protocol error")]
    assert conn.data_to_send() == b"554 5.5.0 Protocol synchronization error: improper pipelining\r\n"
    # offered: MAIL/RCPT/DATA may be grouped, but nothing may follow EHLO or DATA
    conn = new()
    evs = feed(conn, b"EHLO c.example\r\nMAIL FROM:<a@c.example>\r\n")
    assert evs == [Close("protocol error")]
    conn = new()
    evs = open_data(conn)
    assert [type(e) for e in evs] == [Hello, MailFrom, RcptTo, DataStart]
    conn = new()
    feed(conn, b"EHLO c.example\r\n")
    evs = feed(conn, b"MAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nSubject: x\r\n.\r\n")
    assert isinstance(evs[-1], Close) and not any(isinstance(e, MessageEnd) for e in evs)
    conn = new()
    open_data(conn)
    evs = feed(conn, b"x\r\n.\r\nMAIL FROM:<a@c.example>\r\nRCPT TO:<c@example.org>\r\nQUIT\r\n")
    assert [type(e) for e in evs][-5:] == [MessageEnd, MailFrom, RcptTo, Quit, Close]


def test_limits_recipients_and_errors() -> None:
    conn = new(max_recipients=2)
    feed(conn, b"EHLO c.example\r\n")
    feed(
        conn,
        b"MAIL FROM:<a@c.example>\r\n" + b"".join(b"RCPT TO:<r%d@example.org>\r\n" % i for i in range(3)),
    )
    out = conn.data_to_send()
    assert out.endswith(
        b"250 2.1.5 Recipient OK\r\n250 2.1.5 Recipient OK\r\n452 4.5.3 Too many recipients\r\n"
    )
    conn = new(max_errors=3)
    evs = feed(conn, b"X\r\n") + feed(conn, b"Y\r\n") + feed(conn, b"Z\r\n")
    assert evs == [Close("too many errors")]
    assert conn.data_to_send().endswith(b"421 4.7.0 mx.example.org Too many errors, closing connection\r\n")


def test_bare_lf_command_and_forbidden_http() -> None:
    conn = new()
    feed(conn, b"EHLO c.example\n")
    assert conn.data_to_send().endswith(b"500 5.5.2 Bare CR or LF in command line\r\n")
    evs = feed(conn, b"GET / HTTP/1.1\r\n")
    assert evs == [Close("protocol error")]


def test_lmtp_per_recipient_replies() -> None:
    conn = new(lmtp=True)
    assert conn.data_to_send() == f"220 {HOST} LMTP postier\r\n".encode()
    feed(conn, b"EHLO c.example\r\n")
    assert conn.data_to_send() == b"500 5.5.1 Command unrecognized\r\n"
    feed(conn, b"LHLO c.example\r\n")
    assert conn.data_to_send().startswith(f"250-{HOST}\r\n".encode())
    feed(conn, b"MAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\nDATA\r\n")
    conn.data_to_send()
    conn.receive_data(b"hi\r\n.\r\n")
    assert isinstance(conn.next_event(), MessageData)
    assert conn.next_event() == MessageEnd(None)
    with pytest.raises(UsageError):
        conn.reply_many([R.R250_QUEUED])
    conn.reply_many([R.R250_QUEUED, R.R552_MAILBOX_FULL])
    assert conn.data_to_send() == b"250 2.0.0 Message accepted for delivery\r\n552 5.2.2 Mailbox full\r\n"
    feed(conn, b"MAIL FROM:<a@c.example>\r\nDATA\r\n")
    assert conn.data_to_send().endswith(b"503 5.5.1 No valid recipients\r\n")
    smtp = new()
    feed(smtp, b"LHLO c.example\r\n")
    assert smtp.data_to_send().endswith(b"500 5.5.1 Command unrecognized\r\n")


def bdat_session(*chunks: bytes, **kw: object) -> tuple[bytes, list[object], bytes]:
    conn = new(**kw)
    feed(conn, b"EHLO c.example\r\n")
    events = feed(conn, b"MAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.org>\r\n")
    conn.data_to_send()
    for c in chunks:
        events += feed(conn, c)
    data = b"".join(e.data for e in events if isinstance(e, MessageData))
    return data, events, conn.data_to_send()


def test_bdat_chunks() -> None:
    data, evs, out = bdat_session(b"BDAT 5\r\nab\r\nc", b"BDAT 4 LAST\r\n\r\n\r\n")
    assert data == b"ab\r\nc\r\n\r\n"
    assert out == b"250 2.0.0 5 octets received\r\n250 2.0.0 Message accepted for delivery\r\n"
    assert [type(e) for e in evs].count(DataStart) == 1 and evs[-1] == MessageEnd(None)
    # pipelined chunks, CRLF split across chunks, .-lines are not unstuffed
    data, evs, out = bdat_session(b"BDAT 3\r\n..\rBDAT 3\r\n\n.\r" + b"BDAT 1 LAST\r\n\n")
    assert data == b"..\r\n.\r\n" and evs[-1] == MessageEnd(None)
    data, evs, out = bdat_session(b"BDAT 0 LAST\r\n")
    assert data == b"" and evs[-1] == MessageEnd(None)
    data, evs, out = bdat_session(b"BDAT 3 LAST\r\na\nb")
    assert evs[-1] == MessageEnd(R.R554_BARE_NEWLINE) and out.startswith(b"554 5.6.0")
    data, evs, out = bdat_session(b"BDAT 2\r\na\r", b"BDAT 1 LAST\r\nb")
    assert evs[-1] == MessageEnd(R.R554_BARE_NEWLINE)
    _, evs, out = bdat_session(b"BDAT 2000 LAST\r\n" + b"x" * 2000, max_message_size=1000)
    assert evs[-1] == MessageEnd(R.R552_TOO_BIG)


def test_bdat_refusals_still_consume_the_chunk() -> None:
    data, evs, out = bdat_session(b"BDAT 4\r\nab\r\n", b"DATA\r\n", b"RSET\r\n")
    assert (
        out == b"250 2.0.0 4 octets received\r\n503 5.5.1 DATA and BDAT cannot be mixed\r\n250 2.0.0 OK\r\n"
    )
    conn = new()
    feed(conn, b"EHLO c.example\r\n")
    conn.data_to_send()
    evs = feed(conn, b"BDAT 12 LAST\r\nQUIT\r\nQUIT\r\nNOOP\r\n")
    assert conn.data_to_send() == b"503 5.5.1 Need MAIL command first\r\n250 2.0.0 OK\r\n"
    evs = feed(conn, b"BDAT x\r\nQUIT\r\n")
    assert evs == [Close("protocol error")]
    conn = new()
    feed(conn, b"EHLO c.example\r\n")
    conn.data_to_send()

    def reject(c: ServerConnection, ev: object) -> None:
        c.reply(R.R451_LOCAL_ERROR) if isinstance(ev, DataStart) else answer(c, ev)

    feed(conn, b"MAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.org>\r\nBDAT 2\r\nabBDAT 2 LAST\r\ncd", reject)
    assert conn.data_to_send().endswith(b"451 4.3.0 Local error in processing, try again later\r\n" * 2)
    assert conn.state is State.READY


def test_data_start_rejected_and_eof_mid_message() -> None:
    conn = new()

    def reject(c: ServerConnection, ev: object) -> None:
        c.reply(R.R451_LOCAL_ERROR) if isinstance(ev, DataStart) else answer(c, ev)

    open_data(conn, app=reject)
    assert conn.data_to_send().endswith(b"451 4.3.0 Local error in processing, try again later\r\n")
    conn = new()
    open_data(conn)
    evs = feed(conn, b"partial")
    assert evs == [MessageData(b"partial")]
    assert feed(conn, b"") == [ConnectionClosed()]


def test_usage_errors() -> None:
    conn = new()
    with pytest.raises(UsageError):
        conn.accept()
    conn.receive_data(b"EHLO c.example\r\n")
    assert isinstance(conn.next_event(), Hello)
    with pytest.raises(UsageError):
        conn.next_event()
    conn.accept()
    with pytest.raises(UsageError):
        conn.greet()
    with pytest.raises(ValueError):
        R.Reply(250, "2.0.0", "forged\r\n250 OK")
    conn.shutdown()
    assert conn.data_to_send().endswith(
        b"421 4.3.2 mx.example.org Service shutting down, closing connection\r\n"
    )


def test_reset_and_ehlo_clear_the_envelope() -> None:
    conn = new()
    feed(conn, b"EHLO c.example\r\n")
    evs = feed(conn, b"MAIL FROM:<a@c.example>\r\nRCPT TO:<b@example.org>\r\nRSET\r\n")
    assert isinstance(evs[-1], Reset) and conn.mail_from is None and conn.recipients == ()
    feed(conn, b"MAIL FROM:<a@c.example>\r\n")
    feed(conn, b"EHLO again.example\r\n")
    assert conn.mail_from is None and conn.state is State.READY


PREFIXES = [[], [b"EHLO c.example\r\n"], [b"EHLO c.example\r\n", message(b"")]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prefix=st.sampled_from(PREFIXES),
    junk=st.binary(max_size=600)
    | st.lists(
        st.sampled_from(
            [
                b"\r\n",
                b"\n",
                b"\r",
                b".",
                b"..",
                b"BDAT 3",
                b" LAST",
                b"MAIL FROM:<a@b>",
                b"RCPT TO:<c@d>",
                b"DATA",
                b"EHLO x",
                b"AUTH PLAIN",
                b"*",
                b"=",
                b"STARTTLS",
                b"RSET",
                b"QUIT",
                b"\xff",
                b"x" * 700,
            ]
        ),
        max_size=30,
    ).map(b"".join),
    bytewise=st.booleans(),
    opts=st.sampled_from(
        [
            {},
            {"lmtp": True},
            {"pipelining": False},
            {"auth_mechanisms": ("PLAIN",), "tls_active": True, "offer_starttls": True, "max_data_line": 40},
        ]
    ),
)
def test_fuzz_never_raises(prefix: bytes, junk: bytes, bytewise: bool, opts: dict[str, object]) -> None:
    if opts.get("lmtp"):
        prefix = [p.replace(b"EHLO", b"LHLO") for p in prefix]
    conn = new(**opts)
    pieces = [junk[i : i + 1] for i in range(len(junk))] if bytewise else [junk]
    for p in [*prefix, *pieces, b""]:
        evs = feed(conn, p)
        if conn.is_closed:
            assert isinstance(evs[-1], (Close, ConnectionClosed))
            break
    if isinstance(conn.next_event(), StartTLS):  # pragma: no cover - drain is enough
        conn.tls_started()
    out = conn.data_to_send()
    for line in out.split(b"\r\n")[:-1]:
        assert line[:3].isdigit() and line[3:4] in (b" ", b"-", b"")


def test_app_421_closes_and_bad_answers_keep_the_event() -> None:
    conn = new()
    feed(conn, b"EHLO c.example\r\n")
    conn.receive_data(b"MAIL FROM:<a@c.example>\r\n")
    assert isinstance(conn.next_event(), MailFrom)
    with pytest.raises(UsageError):
        conn.reply(R.R354_START_DATA)
    conn.reply(R.Reply(421, "4.7.0", "Go away"))  # the event still waited for an answer
    assert conn.is_closed and conn.next_event() == Close("421 reply")
    conn.shutdown()  # no second 421
    assert conn.data_to_send().endswith(b"250 CHUNKING\r\n421 4.7.0 Go away\r\n")
