"""POP3 session transcripts, byte for byte (RFC 1939, RFC 2449, RFC 2595, RFC 5034), and fuzzing."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.proto.pop3 import (
    NEED_DATA,
    PAUSED,
    Authenticated,
    Close,
    ConnectionLost,
    Event,
    Login,
    POP3Connection,
    POP3Settings,
    Retrieve,
    ScramLookup,
    StartTLS,
    State,
    Update,
)
from postier.proto.sasl import ScramClient, scram_credentials_from_password

MSG1 = b"Subject: one\r\n\r\nHello\r\n.dot line\r\n"
MSG2 = b"Subject: two\n\nbody\nmore\nlast"
MAILDROP = [(len(MSG1), "uid-1"), (34, "uid-2")]  # MSG2 has 34 octets in its CRLF form
GREETING = b"+OK POP3 server ready\r\n"
TLS = POP3Settings(tls_active=True)
CAPA_TAIL = b"EXPIRE NEVER\r\nIMPLEMENTATION postier\r\n.\r\n"
CAPA_COMMON = b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n"
LOGGED_IN = b"+OK Maildrop has 2 messages (68 octets)\r\n"
CREDS = scram_credentials_from_password("secret")


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


@dataclass
class App:
    """Answers every event the way a server would, and records them."""

    conn: POP3Connection
    passwords: dict[str, str] = field(default_factory=lambda: {"tim": "secret"})
    locked: set[str] = field(default_factory=set)
    events: list[Event] = field(default_factory=list)
    update_ok: bool = True
    chunk: int = 0  # stream messages in chunks of this size (0: whole)

    def feed(self, data: bytes) -> bytes:
        self.conn.receive_data(data)
        for _ in range(1000):
            event = self.conn.next_event()
            if event is NEED_DATA or event is PAUSED:
                break
            assert not isinstance(event, type(NEED_DATA))
            self.events.append(event)
            if isinstance(event, Close | ConnectionLost):
                break
            self.answer(event)
        return self.conn.data_to_send()

    def login(self, user: str) -> None:
        if user in self.locked:
            self.conn.login_failed(in_use=True)
        else:
            self.conn.login_ok(MAILDROP)

    def answer(self, event: Event) -> None:
        match event:
            case StartTLS():
                self.conn.tls_started()
            case Login(user, password):
                if self.passwords.get(user) == password:
                    self.login(user)
                else:
                    self.conn.login_failed()
            case ScramLookup(username):
                self.conn.scram_credentials(CREDS if username in self.passwords else None)
            case Authenticated(user):
                self.login(user)
            case Retrieve(msgno):
                data = (MSG1, MSG2)[msgno - 1]
                if self.chunk:
                    self.conn.send_message(data[i : i + self.chunk] for i in range(0, len(data), self.chunk))
                else:
                    self.conn.send_message(data)
            case Update():
                self.conn.update_done(self.update_ok)


def session(settings_: POP3Settings = TLS) -> App:
    app = App(POP3Connection(settings_))
    assert app.conn.data_to_send() == GREETING
    return app


def logged_in() -> App:
    app = session()
    assert app.feed(b"USER tim\r\nPASS secret\r\n") == b"+OK Send PASS\r\n" + LOGGED_IN
    return app


def transcript(app: App, steps: list[tuple[bytes, bytes]]) -> None:
    for client, server in steps:
        assert app.feed(client) == server, client


# --- AUTHORIZATION state, no clear text -----------------------------------------------------------

PLAINTEXT = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"


def test_capa_before_tls_hides_user_and_sasl() -> None:
    app = session(POP3Settings())
    transcript(app, [(b"CAPA\r\n", CAPA_COMMON + b"STLS\r\n" + CAPA_TAIL)])


def test_no_cleartext_authentication() -> None:
    app = session(POP3Settings())
    transcript(
        app,
        [
            (b"USER tim\r\n", PLAINTEXT),
            (b"PASS secret\r\n", PLAINTEXT),
            (b"AUTH PLAIN " + b64(b"\0tim\0secret") + b"\r\n", PLAINTEXT),
            (b"APOP tim c4c9334bac560ecc979e58001b3e22fb\r\n", b"-ERR Unknown command\r\n"),
        ],
    )
    assert not [e for e in app.events if isinstance(e, Login)]


def test_plaintext_allowed_when_configured() -> None:
    app = session(POP3Settings(allow_plaintext_auth=True, offer_stls=False))
    transcript(
        app,
        [
            (b"CAPA\r\n", CAPA_COMMON + b"USER\r\nSASL SCRAM-SHA-256 PLAIN LOGIN\r\n" + CAPA_TAIL),
            (b"USER tim\r\nPASS secret\r\n", b"+OK Send PASS\r\n" + LOGGED_IN),
        ],
    )


def test_stls_then_login_and_injection_dropped() -> None:
    app = session(POP3Settings())
    out = app.feed(b"STLS\r\nUSER evil\r\nPASS evil\r\n")
    assert out == b"+OK Begin TLS negotiation\r\n"
    assert app.events == [StartTLS()]
    assert app.conn.tls_active
    transcript(
        app,
        [
            (b"PASS evil\r\n", b"-ERR Send USER first\r\n"),
            (b"CAPA\r\n", CAPA_COMMON + b"USER\r\nSASL SCRAM-SHA-256 PLAIN LOGIN\r\n" + CAPA_TAIL),
            (b"STLS\r\n", b"-ERR TLS already active\r\n"),
            (b"USER tim\r\nPASS secret\r\n", b"+OK Send PASS\r\n" + LOGGED_IN),
        ],
    )


def test_bytes_between_stls_and_handshake_are_dropped() -> None:
    conn = POP3Connection(POP3Settings())
    conn.data_to_send()
    conn.receive_data(b"STLS\r\n")
    assert conn.next_event() == StartTLS()
    assert conn.next_event() is PAUSED
    conn.receive_data(b"USER evil\r\n")  # plaintext injected before the handshake
    conn.tls_started()
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == b"+OK Begin TLS negotiation\r\n"


def test_stls_refused_when_not_offered() -> None:
    app = session(POP3Settings(offer_stls=False))
    transcript(app, [(b"STLS\r\n", b"-ERR STLS not available\r\n")])


def test_capa_extras_and_auth_listing() -> None:
    app = session(POP3Settings(tls_active=True, login_delay=900, expire="30", sasl_mechanisms=("PLAIN",)))
    transcript(
        app,
        [
            (
                b"capa\r\n",
                CAPA_COMMON
                + b"USER\r\nSASL PLAIN\r\nEXPIRE 30\r\nLOGIN-DELAY 900\r\nIMPLEMENTATION postier\r\n.\r\n",
            ),
            (b"AUTH\r\n", b"+OK Supported mechanisms follow\r\nPLAIN\r\n.\r\n"),
            (b"AUTH LOGIN\r\n", b"-ERR Unsupported authentication mechanism.\r\n"),
        ],
    )


def test_user_pass_failures() -> None:
    app = session()
    app.locked.add("tim")
    transcript(
        app,
        [
            (b"PASS secret\r\n", b"-ERR Send USER first\r\n"),
            (b"USER tim\r\n", b"+OK Send PASS\r\n"),
            (b"PASS wrong\r\n", b"-ERR [AUTH] Authentication failed.\r\n"),
            (b"PASS secret\r\n", b"-ERR Send USER first\r\n"),
            (
                b"USER tim\r\nPASS secret\r\n",
                b"+OK Send PASS\r\n-ERR [IN-USE] Maildrop is locked by another session.\r\n",
            ),
            (b"USER\r\n", b"-ERR Syntax error\r\n"),
        ],
    )
    assert app.conn.state is State.AUTHORIZATION


def test_password_with_spaces() -> None:
    app = session()
    app.passwords["tim"] = "with two  spaces "
    assert app.feed(b"USER tim\r\nPASS with two  spaces \r\n") == b"+OK Send PASS\r\n" + LOGGED_IN


def test_login_delay_reply() -> None:
    conn = POP3Connection(TLS)
    conn.receive_data(b"USER tim\r\nPASS secret\r\n")
    assert conn.next_event() == Login("tim", "secret", "", "USER")
    conn.login_failed(login_delay=True)
    assert conn.data_to_send().endswith(b"-ERR [LOGIN-DELAY] Logged in too recently.\r\n")


def test_commands_in_the_wrong_state() -> None:
    app = session()
    transcript(app, [(b"STAT\r\n", b"-ERR Command not valid in this state\r\n")])
    app = logged_in()
    transcript(app, [(b"USER tim\r\n", b"-ERR Command not valid in this state\r\n")])


def test_quit_in_authorization() -> None:
    app = session()
    transcript(app, [(b"QUIT\r\nNOOP\r\n", b"+OK Logging out\r\n")])
    assert app.events == [Close("quit")]
    assert not [e for e in app.events if isinstance(e, Update)]
    assert app.conn.next_event() == Close("quit")


# --- AUTH (RFC 5034) ------------------------------------------------------------------------------


def test_auth_plain_initial_response() -> None:
    app = session()
    transcript(app, [(b"AUTH PLAIN " + b64(b"\0tim\0secret") + b"\r\n", LOGGED_IN)])
    assert app.events == [Login("tim", "secret", "", "PLAIN")]


def test_auth_plain_challenge_and_failures() -> None:
    app = session()
    transcript(
        app,
        [
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (b64(b"\0tim\0wrong") + b"\r\n", b"-ERR [AUTH] Authentication failed.\r\n"),
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (b"*\r\n", b"-ERR Authentication cancelled.\r\n"),
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (b"not base64!\r\n", b"-ERR Invalid base64 data.\r\n"),
            (b"AUTH PLAIN ###\r\n", b"-ERR Invalid base64 data.\r\n"),
            (b"AUTH PLAIN =\r\n", b"-ERR [AUTH] Authentication failed.\r\n"),
            (b"AUTH PLAIN " + b64(b"boss\0tim\0secret") + b"\r\n", b"-ERR [AUTH] Authentication failed.\r\n"),
            (b"AUTH CRAM-MD5\r\n", b"-ERR Unsupported authentication mechanism.\r\n"),
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (b64(b"tim\0tim\0secret") + b"\r\n", LOGGED_IN),
        ],
    )


def test_auth_login() -> None:
    app = session()
    transcript(
        app,
        [
            (b"AUTH LOGIN\r\n", b"+ VXNlcm5hbWU6\r\n"),
            (b"dGlt\r\n", b"+ UGFzc3dvcmQ6\r\n"),
            (b"c2VjcmV0\r\n", LOGGED_IN),
        ],
    )


def scram(app: App, user: str, password: str) -> bytes:
    client = ScramClient(user, password)
    out = app.feed(b"AUTH SCRAM-SHA-256 " + b64(client.first_message()) + b"\r\n")
    assert out.startswith(b"+ ") and out.endswith(b"\r\n")
    out = app.feed(b64(client.final_message(base64.b64decode(out[2:-2]))) + b"\r\n")
    if out.startswith(b"+ "):
        assert client.verify_server_final(base64.b64decode(out[2:-2]))
        out = app.feed(b"\r\n")
    return out


def test_auth_scram_success() -> None:
    app = session()
    assert scram(app, "tim", "secret") == LOGGED_IN
    assert app.events == [ScramLookup("tim"), Authenticated("tim", "", "SCRAM-SHA-256")]
    assert app.conn.state is State.TRANSACTION


def test_auth_scram_failures() -> None:
    app = session()
    assert scram(app, "tim", "wrong") == b"-ERR [AUTH] Authentication failed.\r\n"
    assert scram(app, "nobody", "secret") == b"-ERR [AUTH] Authentication failed.\r\n"
    app.locked.add("tim")
    assert scram(app, "tim", "secret") == b"-ERR [IN-USE] Maildrop is locked by another session.\r\n"


def test_auth_scram_non_empty_answer_to_server_final() -> None:
    app = session()
    client = ScramClient("tim", "secret")
    out = app.feed(b"AUTH SCRAM-SHA-256\r\n")
    assert out == b"+ \r\n"
    out = app.feed(b64(client.first_message()) + b"\r\n")
    out = app.feed(b64(client.final_message(base64.b64decode(out[2:-2]))) + b"\r\n")
    assert out.startswith(b"+ ")
    assert app.feed(b"eA==\r\n") == b"-ERR [AUTH] Authentication failed.\r\n"
    assert app.conn.state is State.AUTHORIZATION


def test_auth_over_long_response_aborts_exchange() -> None:
    app = session()
    transcript(
        app,
        [
            (b"AUTH PLAIN\r\n", b"+ \r\n"),
            (b"A" * 9000 + b"\r\n", b"-ERR Line too long\r\n"),
            (b"NOOP\r\n", b"-ERR Command not valid in this state\r\n"),
        ],
    )


# --- TRANSACTION state ----------------------------------------------------------------------------


def test_transaction_commands() -> None:
    app = logged_in()
    transcript(
        app,
        [
            (b"STAT\r\n", b"+OK 2 68\r\n"),
            (b"LIST\r\n", b"+OK 2 messages (68 octets)\r\n1 34\r\n2 34\r\n.\r\n"),
            (b"LIST 2\r\n", b"+OK 2 34\r\n"),
            (b"LIST 3\r\n", b"-ERR No such message\r\n"),
            (b"LIST 0\r\n", b"-ERR No such message\r\n"),
            (b"LIST x\r\n", b"-ERR No such message\r\n"),
            (b"LIST 1 2\r\n", b"-ERR Syntax error\r\n"),
            (b"UIDL\r\n", b"+OK Unique-ID listing follows\r\n1 uid-1\r\n2 uid-2\r\n.\r\n"),
            (b"UIDL 1\r\n", b"+OK 1 uid-1\r\n"),
            (b"NOOP\r\n", b"+OK\r\n"),
            (b"DELE 1\r\n", b"+OK Message 1 deleted\r\n"),
            (b"DELE 1\r\n", b"-ERR Message 1 already deleted\r\n"),
            (b"DELE 9\r\n", b"-ERR No such message\r\n"),
            (b"STAT\r\n", b"+OK 1 34\r\n"),
            (b"LIST\r\n", b"+OK 1 messages (34 octets)\r\n2 34\r\n.\r\n"),
            (b"UIDL\r\n", b"+OK Unique-ID listing follows\r\n2 uid-2\r\n.\r\n"),
            (b"LIST 1\r\n", b"-ERR No such message\r\n"),
            (b"RETR 1\r\n", b"-ERR No such message\r\n"),
            (b"RSET\r\n", LOGGED_IN),
            (b"LIST 1\r\n", b"+OK 1 34\r\n"),
            (b"CAPA\r\n", CAPA_COMMON + CAPA_TAIL),
        ],
    )


def test_retr_and_top() -> None:
    app = logged_in()
    transcript(
        app,
        [
            (b"RETR 1\r\n", b"+OK 34 octets\r\nSubject: one\r\n\r\nHello\r\n..dot line\r\n.\r\n"),
            (b"RETR 2\r\n", b"+OK 34 octets\r\nSubject: two\r\n\r\nbody\r\nmore\r\nlast\r\n.\r\n"),
            (b"TOP 2 0\r\n", b"+OK Top of message follows\r\nSubject: two\r\n\r\n.\r\n"),
            (b"TOP 2 1\r\n", b"+OK Top of message follows\r\nSubject: two\r\n\r\nbody\r\n.\r\n"),
            (
                b"TOP 1 2\r\n",
                b"+OK Top of message follows\r\nSubject: one\r\n\r\nHello\r\n..dot line\r\n.\r\n",
            ),
            (b"TOP 1 -1\r\n", b"-ERR Syntax error\r\n"),
            (b"TOP 1\r\n", b"-ERR Syntax error\r\n"),
            (b"RETR\r\n", b"-ERR Syntax error\r\n"),
        ],
    )
    assert [e for e in app.events if isinstance(e, Retrieve)][2:4] == [
        Retrieve(2, "uid-2", 0),
        Retrieve(2, "uid-2", 1),
    ]


def test_retr_streamed_in_chunks_is_identical() -> None:
    whole = logged_in().feed(b"RETR 2\r\nTOP 2 1\r\n")
    for size in (1, 2, 3, 7):
        app = logged_in()
        app.chunk = size
        assert app.feed(b"RETR 2\r\nTOP 2 1\r\n") == whole


def test_retrieve_failed_and_manual_streaming() -> None:
    conn = POP3Connection(TLS)
    conn.receive_data(b"USER tim\r\nPASS secret\r\nRETR 1\r\nRETR 2\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), Login)
    conn.login_ok(MAILDROP)
    assert conn.next_event() == Retrieve(1, "uid-1", None)
    assert conn.next_event() is PAUSED
    conn.retrieve_failed()
    assert conn.next_event() == Retrieve(2, "uid-2", None)
    conn.send_message_chunk(b"a\r")
    with pytest.raises(RuntimeError):
        conn.retrieve_failed()
    conn.send_message_chunk(b".b")
    conn.end_message()
    assert conn.next_event() is NEED_DATA
    assert conn.data_to_send() == (
        GREETING
        + b"+OK Send PASS\r\n"
        + LOGGED_IN
        + b"-ERR [SYS/TEMP] Message is no longer available.\r\n"
        + b"+OK 34 octets\r\na\r\n..b\r\n.\r\n+OK\r\n"
    )


def test_quit_updates_with_deleted_uids_only_then() -> None:
    app = logged_in()
    transcript(app, [(b"DELE 2\r\n", b"+OK Message 2 deleted\r\n")])
    assert not [e for e in app.events if isinstance(e, Update)]
    transcript(app, [(b"QUIT\r\n", b"+OK Logging out\r\n")])
    assert app.events[-2:] == [Update(("uid-2",)), Close("quit")]


def test_quit_update_failure() -> None:
    app = logged_in()
    app.update_ok = False
    transcript(
        app,
        [
            (
                b"DELE 1\r\nQUIT\r\n",
                b"+OK Message 1 deleted\r\n-ERR [SYS/TEMP] Some deleted messages not removed.\r\n",
            )
        ],
    )
    assert app.conn.closed


def test_dropped_connection_deletes_nothing() -> None:
    app = logged_in()
    transcript(app, [(b"DELE 1\r\nDELE 2\r\n", b"+OK Message 1 deleted\r\n+OK Message 2 deleted\r\n")])
    assert app.feed(b"") == b""
    assert app.events[-1] == ConnectionLost(was_authenticated=True)
    assert not [e for e in app.events if isinstance(e, Update)]
    assert app.conn.next_event() == Close("connection lost")
    app.conn.receive_data(b"QUIT\r\n")
    assert app.conn.next_event() == Close("connection lost")


def test_pipelined_commands_before_eof_still_run() -> None:
    app = logged_in()
    app.feed(b"DELE 1\r\nQUIT\r\n")
    assert app.feed(b"") == b""
    assert Update(("uid-1",)) in app.events


def test_dropped_connection_in_authorization() -> None:
    app = session()
    app.feed(b"USER tim\r\n")
    app.feed(b"")
    assert app.events == [ConnectionLost(was_authenticated=False)]


# --- Framing, limits, errors ----------------------------------------------------------------------


def test_line_length_limit_is_255_with_crlf() -> None:
    app = session()
    transcript(
        app,
        [
            (b"USER " + b"a" * 248 + b"\r\n", b"+OK Send PASS\r\n"),
            (b"USER " + b"a" * 249 + b"\r\n", b"-ERR Line too long\r\n"),
            (b"USER " + b"a" * 300, b"-ERR Line too long\r\n"),
            (b"b" * 300 + b"\r", b""),
            (b"\nNOOP\r\n", b"-ERR Command not valid in this state\r\n"),
        ],
    )


def test_control_characters_and_bad_utf8() -> None:
    app = session()
    transcript(
        app,
        [
            (b"USER a\x00b\r\n", b"-ERR Syntax error\r\n"),
            (b"USER a\nb\r\n", b"-ERR Syntax error\r\n"),
            (b"USER \xff\r\n", b"-ERR Syntax error\r\n"),
            (b"\r\n", b"-ERR Unknown command\r\n"),
            (b"USER t\xc3\xa9\r\n", b"+OK Send PASS\r\n"),
        ],
    )


def test_too_many_errors_closes() -> None:
    app = session(POP3Settings(tls_active=True, max_errors=3))
    out = app.feed(b"X\r\nY\r\nZ\r\nNOOP\r\n")
    assert (
        out
        == b"-ERR Unknown command\r\n-ERR Unknown command\r\n-ERR Too many errors, closing connection.\r\n"
    )
    assert app.events == [Close("too many errors")]


def test_pipelined_input_overflow_closes() -> None:
    conn = POP3Connection(POP3Settings(max_pending_input=8192))
    conn.receive_data(b"NOOP\r\n" * 2000)
    assert conn.next_event() == Close("input overflow")
    assert conn.data_to_send().endswith(b"-ERR Too much pipelined input, closing connection.\r\n")


def test_answers_out_of_turn_are_programming_errors() -> None:
    conn = POP3Connection(TLS)
    for call in (
        conn.tls_started,
        lambda: conn.login_ok([]),
        conn.end_message,
        lambda: conn.update_done(True),
    ):
        with pytest.raises(RuntimeError):
            call()
    conn.receive_data(b"USER tim\r\nPASS secret\r\n")
    conn.next_event()
    with pytest.raises(ValueError):
        conn.login_ok([(1, "bad uid")])


def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        POP3Settings(expire="soon")
    with pytest.raises(ValueError):
        POP3Settings(max_command_line=10)


FULL_SESSION = (
    b"CAPA\r\nUSER tim\r\nPASS secret\r\nSTAT\r\nLIST\r\nUIDL 2\r\nTOP 1 1\r\nRETR 2\r\n"
    b"DELE 1\r\nRSET\r\nDELE 2\r\nQUIT\r\n"
)


def test_byte_by_byte_equals_whole() -> None:
    whole = session().feed(FULL_SESSION)
    app = session()
    out = b"".join(app.feed(FULL_SESSION[i : i + 1]) for i in range(len(FULL_SESSION)))
    assert out == whole
    assert app.events[-2:] == [Update(("uid-2",)), Close("quit")]


# --- Fuzzing: clean replies and known events, never an exception -----------------------------------

_COMMAND_TEXT = (
    "CAPA|USER tim|PASS secret|PASS x|AUTH PLAIN|AUTH LOGIN|AUTH SCRAM-SHA-256|AUTH PLAIN AHRpbQBzZWNyZXQ=|"
    "*|=|STLS|STAT|LIST|LIST 1|UIDL|UIDL 9|RETR 1|RETR 2|TOP 1 0|TOP 2 5|DELE 1|DELE 2|RSET|NOOP|QUIT|"
)
COMMANDS = [c.encode() for c in _COMMAND_TEXT.split("|")]


def check_output(out: bytes) -> None:
    assert out == b"" or out.endswith(b"\r\n")


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(COMMANDS).map(lambda c: c + b"\r\n") | st.binary(max_size=40), max_size=25),
    st.booleans(),
    st.booleans(),
)
def test_fuzz_sessions(chunks: list[bytes], tls: bool, byte_by_byte: bool) -> None:
    app = App(POP3Connection(POP3Settings(tls_active=tls, max_errors=50)))
    data = b"".join(chunks)
    pieces = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else chunks
    for piece in pieces:
        check_output(app.feed(piece))
    app.feed(b"")
    assert app.conn.closed
    assert isinstance(app.events[-1], Close | ConnectionLost)
    if not any(isinstance(e, Update) for e in app.events):
        assert app.conn.state is not State.UPDATE


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_raw_bytes_whole_and_byte_by_byte(data: bytes) -> None:
    whole = session()
    out_whole = whole.feed(data)
    split = session()
    out_split = b"".join(split.feed(data[i : i + 1]) for i in range(len(data)))
    assert out_whole == out_split
    assert out_whole == b"" or out_whole.endswith(b"\r\n")
