"""The sans-IO SMTP/LMTP client: reply parsing, capabilities, pipelining, and round trips with the server."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.proto.smtp import replies as R
from postier.proto.smtp.client import NEED_DATA, ClientConnection, ClientSettings, Closed, ServerReply
from postier.proto.smtp.errors import ProtocolError, UsageError
from postier.proto.smtp.server import MessageData, MessageEnd, ServerConnection, ServerSettings

from .test_smtp_server import answer, drain

EHLO = (
    b"250-mx.example.org greets you\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-STARTTLS\r\n"
    b"250-AUTH PLAIN login\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"
)


def replies(conn: ClientConnection, data: bytes) -> list[ServerReply]:
    conn.receive_data(data)
    out: list[ServerReply] = []
    for _ in range(1000):
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        assert isinstance(ev, ServerReply)
        out.append(ev)
    raise AssertionError("runaway")


def greeted(data: bytes = EHLO, **kw: object) -> ClientConnection:
    conn = ClientConnection(ClientSettings(**kw))  # type: ignore[arg-type]
    (greeting,) = replies(conn, b"220 mx.example.org ESMTP\r\n")
    assert greeting == ServerReply(220, "", ("mx.example.org ESMTP",), "GREETING")
    conn.ehlo("client.example")
    assert conn.data_to_send() == (b"LHLO" if kw.get("lmtp") else b"EHLO") + b" client.example\r\n"
    (ehlo,) = replies(conn, data)
    assert ehlo.for_command == "EHLO" and ehlo.code == 250
    return conn


def test_capabilities() -> None:
    conn = greeted()
    assert conn.extensions == {
        "PIPELINING": "",
        "SIZE": "1000",
        "STARTTLS": "",
        "AUTH": "PLAIN login",
        "ENHANCEDSTATUSCODES": "",
        "CHUNKING": "",
    }
    assert conn.pipelining and conn.size_limit == 1000 and conn.has("chunking") and not conn.has("SMTPUTF8")
    assert conn.auth_mechanisms == {"PLAIN", "LOGIN"}


def test_pipelined_transaction_maps_replies() -> None:
    conn = greeted()
    conn.mail("a@c.example", {"SIZE": "10", "SMTPUTF8": None})
    conn.rcpt("b@example.org")
    conn.rcpt("nobody@example.org", {"NOTIFY": "NEVER"})
    conn.data()
    assert conn.data_to_send() == (
        b"MAIL FROM:<a@c.example> SIZE=10 SMTPUTF8\r\nRCPT TO:<b@example.org>\r\n"
        b"RCPT TO:<nobody@example.org> NOTIFY=NEVER\r\nDATA\r\n"
    )
    with pytest.raises(UsageError):
        conn.rset()  # DATA ends the group: wait
    got = replies(
        conn,
        b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550-5.1.1 No such\r\n550 5.1.1 user\r\n354 Go ahead\r\n",
    )
    assert [(r.for_command, r.argument, r.code, r.enhanced) for r in got] == [
        ("MAIL", "a@c.example", 250, "2.1.0"),
        ("RCPT", "b@example.org", 250, "2.1.5"),
        ("RCPT", "nobody@example.org", 550, "5.1.1"),
        ("DATA", "", 354, ""),
    ]
    assert got[2].lines == ("No such", "user")
    assert conn.accepted_recipients == ("b@example.org",)
    conn.send_message_data(b"hi\n.\n")
    conn.end_data()
    assert conn.data_to_send() == b"hi\r\n..\r\n.\r\n"
    (end,) = replies(conn, b"250 2.0.0 queued as X\r\n")
    assert end.for_command == "DATA-END" and end.is_success


def test_no_pipelining_means_one_at_a_time() -> None:
    conn = greeted(b"250 mx.example.org\r\n")
    conn.mail("a@c.example")
    with pytest.raises(UsageError):
        conn.rcpt("b@example.org")
    with pytest.raises(UsageError):
        conn.mail("x@c.example\r\nRCPT TO:<evil@x>")


@pytest.mark.parametrize(
    "data",
    [
        b"2500 OK\r\n",
        b"abc\r\n",
        b"250_OK\r\n",
        b"199 info\r\n",
        b"250-one\r\n251 two\r\n",
        b"250 " + b"x" * 5000 + b"\r\n",
        b"250-x\r\n" * 101 + b"250 end\r\n",
    ],
)
def test_malformed_replies(data: bytes) -> None:
    conn = ClientConnection()
    with pytest.raises(ProtocolError):
        replies(conn, data)


def test_unsolicited_and_eof() -> None:
    conn = ClientConnection()
    replies(conn, b"220 hi\r\n")
    with pytest.raises(ProtocolError):
        replies(conn, b"250 what\r\n")
    conn = ClientConnection()
    (r1, r2) = replies(conn, b"220 hi\r\n421 4.3.2 bye\r\n")
    assert r2.for_command == "UNSOLICITED" and conn.closed
    conn = greeted()
    conn.quit()
    assert replies(conn, b"221 2.0.0 Bye\n")[0].for_command == "QUIT"  # a bare LF is tolerated in replies
    conn.receive_data(b"")
    assert conn.next_event() == Closed()
    conn = greeted()
    conn.noop()
    conn.receive_data(b"")
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_starttls_response_injection() -> None:
    conn = greeted()
    conn.starttls()
    with pytest.raises(ProtocolError):
        replies(conn, b"220 2.0.0 Ready\r\n250 2.1.0 forged\r\n")
    conn = greeted()
    conn.starttls()
    replies(conn, b"220 2.0.0 Ready\r\n")
    with pytest.raises(UsageError):
        conn.ehlo("again")
    conn.tls_started()
    assert conn.extensions == {}
    conn.ehlo("client.example")


def test_auth_commands() -> None:
    conn = greeted()
    conn.auth_plain("user", "pw")
    assert conn.data_to_send() == b"AUTH PLAIN AHVzZXIAcHc=\r\n"
    replies(conn, b"235 2.7.0 OK\r\n")
    conn.auth("LOGIN")
    (chal,) = replies(conn, b"334 VXNlcm5hbWU6\r\n")
    assert chal.code == 334 and chal.lines == ("VXNlcm5hbWU6",)
    conn.auth_response(b"user")
    assert conn.data_to_send() == b"AUTH LOGIN\r\ndXNlcg==\r\n"
    replies(conn, b"334 \r\n")
    conn.auth_cancel()
    assert conn.data_to_send() == b"*\r\n"


def pump(client: ClientConnection, server: ServerConnection, events: list[object]) -> list[ServerReply]:
    """Move bytes both ways until neither side has anything to say."""
    got: list[ServerReply] = []
    for _ in range(10_000):
        c2s = client.data_to_send()
        if c2s:
            server.receive_data(c2s)
            events += drain(server, answer)
        s2c = server.data_to_send()
        if s2c:
            got += replies(client, s2c)
        if not c2s and not s2c:
            return got
    raise AssertionError("no quiescence")


def session(lmtp: bool = False, **kw: object) -> tuple[ClientConnection, ServerConnection, list[object]]:
    server = ServerConnection(ServerSettings("mx.example.org", lmtp=lmtp, **kw))  # type: ignore[arg-type]
    server.greet()
    client = ClientConnection(ClientSettings(lmtp=lmtp))
    events: list[object] = []
    pump(client, server, events)
    client.ehlo("client.example")
    pump(client, server, events)
    return client, server, events


def send(
    client: ClientConnection, server: ServerConnection, chunks: list[bytes]
) -> tuple[bytes, list[object]]:
    events: list[object] = []
    client.mail("a@c.example")
    client.rcpt("b@example.org")
    client.data()
    pump(client, server, events)
    for c in chunks:
        client.send_message_data(c)
        pump(client, server, events)
    client.end_data()
    got = pump(client, server, events)
    assert got[-1].code == 250 and got[-1].for_command == "DATA-END"
    assert isinstance(events[-1], MessageEnd) and events[-1].problem is None
    return b"".join(e.data for e in events if isinstance(e, MessageData)), events


def normalised(content: bytes) -> bytes:
    out = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    return out if not out or out.endswith(b"\r\n") else out + b"\r\n"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from([b".", b"..", b"\r\n", b"\n", b"\r", b"a", b"\r\n.\r\n", b".\r\n", b" "]), max_size=40
    ),
    st.integers(min_value=0, max_value=2**32),
)
def test_dot_stuffing_round_trip(parts: list[bytes], seed: int) -> None:
    content = b"".join(parts)
    rng = random.Random(seed)
    cuts = sorted({rng.randint(0, len(content)) for _ in range(rng.randint(0, 5))})
    chunks = [content[i:j] for i, j in zip([0, *cuts], [*cuts, len(content)], strict=True)]
    client, server, _ = session()
    data, _ = send(client, server, chunks)
    assert data == normalised(content)


def test_bdat_round_trip_and_lmtp_replies() -> None:
    client, server, events = session(lmtp=True)
    client.mail("a@c.example")
    client.rcpt("b@example.org")
    client.rcpt("c@example.org")
    client.bdat(b"line one\nline")
    client.bdat(b" two\r", last=False)
    client.bdat(b"\n", last=True)
    got = pump(client, server, events)
    assert [(r.for_command, r.argument, r.code) for r in got] == [
        ("MAIL", "a@c.example", 250),
        ("RCPT", "b@example.org", 250),
        ("RCPT", "c@example.org", 250),
        ("BDAT", "", 250),
        ("BDAT", "", 250),
        ("BDAT-LAST", "b@example.org", 250),
        ("BDAT-LAST", "c@example.org", 250),
    ]
    assert b"".join(e.data for e in events if isinstance(e, MessageData)) == b"line one\r\nline two\r\n"
    # LMTP DATA: one reply per accepted recipient, mapped in RCPT order
    events.clear()
    client.mail("a@c.example")
    client.rcpt("b@example.org")
    client.rcpt("c@example.org")
    client.data()
    pump(client, server, events)
    client.send_message_data(b"x")
    client.end_data()
    server.receive_data(client.data_to_send())

    def per_rcpt(s: ServerConnection, e: object) -> None:
        s.reply_many([R.R250_QUEUED, R.R452_NO_SPACE]) if isinstance(e, MessageEnd) else answer(s, e)

    drain(server, per_rcpt)
    got = replies(client, server.data_to_send())
    assert [(r.argument, r.code) for r in got] == [("b@example.org", 250), ("c@example.org", 452)]


def test_client_with_server_rejections() -> None:
    client, server, events = session(max_recipients=1)
    client.mail("a@c.example")
    client.rcpt("b@example.org")
    client.rcpt("c@example.org")
    got = pump(client, server, events)
    assert [r.code for r in got] == [250, 250, 452]
    assert client.accepted_recipients == ("b@example.org",)
    client.rset()
    client.quit()
    got = pump(client, server, events)
    assert [r.for_command for r in got] == ["RSET", "QUIT"] and client.closed and server.is_closed
    with pytest.raises(UsageError):
        client.noop()
