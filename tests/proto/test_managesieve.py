"""ManageSieve core (RFC 5804): byte-exact transcripts, literals signalled, SASL after TLS, and fuzzing.

The application side of each transcript is a tiny in-memory script table driven by the events, so the
core is tested without sockets; the real store is ``store/sieve.py`` (tests/sieve/test_storage.py).
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.proto import sasl
from postier.proto.managesieve import (
    NEED_DATA, Authenticated, AuthResponse, AuthStart, Logout, ManageSieveConnection, ManageSieveSettings,
    NeedLiteral, ScriptCommand, StartTLS,
)
from postier.sieve import CompileError, compile_script

SETTINGS = ManageSieveSettings(sieve_extensions=("fileinto", "vacation"), max_literal=1000)
CAPS_PLAIN = (b'"IMPLEMENTATION" "postier"\r\n"SASL" ""\r\n"SIEVE" "fileinto vacation"\r\n"STARTTLS"\r\n'
              b'"MAXREDIRECTS" "4"\r\n"VERSION" "1.0"\r\n')
CAPS_TLS = (b'"IMPLEMENTATION" "postier"\r\n"SASL" "PLAIN SCRAM-SHA-256"\r\n"SIEVE" "fileinto vacation"\r\n'
            b'"MAXREDIRECTS" "4"\r\n"VERSION" "1.0"\r\n')


class App:
    """Answers the events the way the server will: scripts in a dict, one password."""

    def __init__(self, conn: ManageSieveConnection) -> None:
        self.conn = conn
        self.scripts: dict[str, bytes] = {}
        self.active: str | None = None
        self.events: list[object] = []
        self.exchange: sasl.ServerExchange | None = None
        self.down = False  # the account database is out of reach

    def feed(self, data: bytes) -> bytes:
        self.conn.receive_data(data)
        while (ev := self.conn.next_event()) is not NEED_DATA:
            self.events.append(ev)
            self.handle(ev)
        return self.conn.data_to_send()

    def handle(self, ev: object) -> None:
        c = self.conn
        match ev:
            case StartTLS():
                c.tls_started()
            case NeedLiteral(size=size):
                c.accept_literal() if size <= 100 else c.reject_literal()
            case AuthStart(mechanism=mech, initial=initial):
                self.exchange = sasl.ServerExchange.for_name(mech, success_data=True)
                assert self.exchange is not None
                self.auth(self.exchange.start(initial))
            case AuthResponse(data=data):
                assert self.exchange is not None
                self.auth(self.exchange.respond(data))
            case ScriptCommand(name="PUTSCRIPT" | "CHECKSCRIPT" as name, args=args):
                data = args[-1]
                assert isinstance(data, bytes)
                try:
                    compile_script(data)
                except CompileError as e:
                    c.no("\r\n".join(str(err) for err in e.errors))
                    return
                if name == "PUTSCRIPT":
                    self.scripts[bytes(args[0]).decode()] = data
                c.ok()
            case ScriptCommand(name="LISTSCRIPTS"):
                c.listing((n, n == self.active) for n in sorted(self.scripts))
            case ScriptCommand(name="GETSCRIPT", args=(name,)):
                assert isinstance(name, bytes)
                if name.decode() in self.scripts:
                    c.script(self.scripts[name.decode()])
                else:
                    c.no("no such script", "NONEXISTENT")
            case ScriptCommand(name="SETACTIVE", args=(name,)):
                assert isinstance(name, bytes)
                self.active = name.decode() or None
                c.ok()
            case ScriptCommand(name="HAVESPACE", args=(_, size)):
                assert isinstance(size, int)
                c.ok() if size <= 100 else c.no("too big", "QUOTA/MAXSIZE")
            case ScriptCommand(name="DELETESCRIPT", args=(name,)):
                assert isinstance(name, bytes)
                if name.decode() == self.active:
                    c.no("active", "ACTIVE")
                else:
                    self.scripts.pop(name.decode(), None)
                    c.ok()
            case ScriptCommand(name="RENAMESCRIPT", args=(old, new)):
                assert isinstance(old, bytes) and isinstance(new, bytes)
                self.scripts[new.decode()] = self.scripts.pop(old.decode())
                c.ok()
            case Authenticated() | Logout():
                pass
            case _:  # pragma: no cover
                raise AssertionError(ev)


    def auth(self, outcome: sasl.Outcome) -> None:
        """What server/auth.settle does, with one password and no SCRAM keys."""
        assert self.exchange is not None
        while True:
            match outcome:
                case sasl.NeedPasswordCheck() if self.down:
                    return self.conn.auth_unavailable()
                case sasl.NeedPasswordCheck(authcid=user, password=pw):
                    outcome = self.exchange.password_result(user == "bob@example.com" and pw == "secret")
                case sasl.NeedScramCredentials():
                    outcome = self.exchange.scram_credentials(None)
                case sasl.Challenge(data=data):
                    return self.conn.auth_challenge(data)
                case sasl.Success(authcid=user, additional=extra):
                    return self.conn.auth_success(user, extra)
                case _:
                    return self.conn.auth_failure()


def _plain(user: str, pw: str) -> bytes:
    return base64.b64encode(f"\0{user}\0{pw}".encode())


def _session(tls: bool = True) -> tuple[App, bytes]:
    conn = ManageSieveConnection(SETTINGS, tls_active=tls)
    app = App(conn)
    return app, conn.data_to_send()


def _login(app: App) -> None:
    assert app.feed(b'AUTHENTICATE "PLAIN" "' + _plain("bob@example.com", "secret") + b'"\r\n') == \
        b'OK "Authenticated"\r\n'


def test_greeting_before_and_after_starttls() -> None:
    app, greeting = _session(tls=False)
    assert greeting == CAPS_PLAIN + b'OK "postier ready"\r\n'
    assert app.feed(b"STARTTLS\r\n") == b'OK "Begin TLS negotiation"\r\n' + CAPS_TLS + b'OK "TLS active"\r\n'


def test_no_authentication_before_tls() -> None:
    app, _ = _session(tls=False)
    assert app.feed(b'AUTHENTICATE "PLAIN" "' + _plain("bob@example.com", "secret") + b'"\r\n') == \
        b'NO (ENCRYPT-NEEDED) "authentication needs TLS"\r\n'
    assert app.feed(b"LISTSCRIPTS\r\n") == b'NO "LISTSCRIPTS not allowed now"\r\n'


def test_authenticate_plain_with_challenge_and_failure() -> None:
    app, _ = _session()
    assert app.feed(b'AUTHENTICATE "PLAIN"\r\n') == b'""\r\n'
    assert app.feed(b'"' + _plain("bob@example.com", "wrong") + b'"\r\n') == b'NO "Authentication failed"\r\n'
    assert app.feed(b'AUTHENTICATE "PLAIN"\r\n') == b'""\r\n'
    assert app.feed(b'"*"\r\n') == b'NO "Authentication failed"\r\n'
    assert app.feed(b'AUTHENTICATE "PLAIN" {%d+}\r\n' % len(_plain("bob@example.com", "secret")) +
                    _plain("bob@example.com", "secret") + b"\r\n") == b'OK "Authenticated"\r\n'
    assert app.conn.user == "bob@example.com"
    assert app.feed(b"CAPABILITY\r\n").endswith(b'"OWNER" "bob@example.com"\r\n"VERSION" "1.0"\r\nOK\r\n')


def test_authenticate_while_the_accounts_are_out_of_reach_is_trylater() -> None:
    """RFC 5804 §1.3 TRYLATER, not "Authentication failed"; the session stays unauthenticated and
    the same AUTHENTICATE succeeds once the database is back."""
    app, _ = _session()
    app.down = True
    assert app.feed(b'AUTHENTICATE "PLAIN" "' + _plain("bob@example.com", "secret") + b'"\r\n') == \
        b'NO (TRYLATER) "Authentication is impossible right now; try again later"\r\n'
    assert app.conn.user is None
    assert app.feed(b"LISTSCRIPTS\r\n") == b'NO "LISTSCRIPTS not allowed now"\r\n'
    assert app.feed(b'AUTHENTICATE "PLAIN"\r\n') == b'""\r\n'  # the same after a challenge
    assert app.feed(b'"' + _plain("bob@example.com", "secret") + b'"\r\n').startswith(b"NO (TRYLATER) ")
    app.down = False
    assert app.feed(b'AUTHENTICATE "PLAIN" "' + _plain("bob@example.com", "secret") + b'"\r\n') == \
        b'OK "Authenticated"\r\n'


def test_script_lifecycle_transcript() -> None:
    app, _ = _session()
    _login(app)
    script = b'require "fileinto";\r\nfileinto "Lists";\r\n'
    assert app.feed(b'PUTSCRIPT "main" {%d+}\r\n' % len(script) + script + b"\r\n") == b"OK\r\n"
    assert app.feed(b'SETACTIVE "main"\r\n') == b"OK\r\n"
    assert app.feed(b"LISTSCRIPTS\r\n") == b'"main" ACTIVE\r\nOK\r\n'
    assert app.feed(b'GETSCRIPT "main"\r\n') == b"{%d}\r\n" % len(script) + script + b"\r\nOK\r\n"
    assert app.feed(b'DELETESCRIPT "main"\r\n') == b'NO (ACTIVE) "active"\r\n'
    assert app.feed(b'RENAMESCRIPT "main" "other"\r\n') == b"OK\r\n"
    assert app.feed(b'GETSCRIPT "main"\r\n') == b'NO (NONEXISTENT) "no such script"\r\n'
    assert app.feed(b'HAVESPACE "x" 50\r\n') == b"OK\r\n"
    assert app.feed(b'HAVESPACE "x" 500\r\n') == b'NO (QUOTA/MAXSIZE) "too big"\r\n'
    assert app.feed(b'NOOP "tag1"\r\n') == b'OK (TAG "tag1") "Done"\r\n'
    assert app.feed(b"UNAUTHENTICATE\r\n") == b"OK\r\n"
    assert app.feed(b"LISTSCRIPTS\r\n") == b'NO "LISTSCRIPTS not allowed now"\r\n'
    assert app.feed(b"LOGOUT\r\n") == b'OK "Logout completed"\r\n'
    assert isinstance(app.events[-1], Logout)


def test_putscript_parse_error_carries_line() -> None:
    app, _ = _session()
    _login(app)
    bad = b'require "fileinto";\r\nfrop;\r\nfileinto "x"\r\nkeep;\r\n'
    out = app.feed(b'CHECKSCRIPT {%d+}\r\n' % len(bad) + bad + b"\r\n")
    text = b"line 2: unknown command 'frop'\r\nline 3: the fileinto command accepts no tests"
    assert out == b"NO {%d}\r\n" % len(text) + text + b"\r\n"  # several errors: a literal
    unterminated = b'keep;\r\nif true {\r\n'
    out = app.feed(b'CHECKSCRIPT {%d+}\r\n' % len(unterminated) + unterminated + b"\r\n")
    assert out == b'NO "line 3: expected \'}\', found end of script"\r\n'


def test_literal_is_signalled_and_a_refused_one_is_skipped() -> None:
    app, _ = _session()
    _login(app)
    big = b"#" * 200 + b"\r\nkeep;\r\n"
    out = app.feed(b'PUTSCRIPT "big" {%d+}\r\n' % len(big) + big + b"\r\nNOOP\r\n")
    assert out == b'NO (QUOTA/MAXSIZE) "literal too large"\r\nOK "Done"\r\n'
    assert NeedLiteral("PUTSCRIPT", len(big)) in app.events
    huge = app.feed(b'PUTSCRIPT "huge" {5000+}\r\n' + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert huge == b'NO (QUOTA/MAXSIZE) "literal too large"\r\nOK "Done"\r\n'
    assert not any(isinstance(e, NeedLiteral) and e.size == 5000 for e in app.events)  # over max_literal


def test_partial_input_while_a_command_is_unfinished() -> None:
    """What the driver's command deadline (slowloris) keys on: part of a line, or a literal underway."""
    app, _ = _session()
    assert not app.conn.partial_input
    app.feed(b"NOO")
    assert app.conn.partial_input
    app.feed(b"P\r\n")
    assert not app.conn.partial_input
    _login(app)
    app.feed(b'PUTSCRIPT "s" {7+}\r\nkee')  # accepted literal, three octets in
    assert app.conn.partial_input
    assert app.feed(b"p;\r\n\r\n") == b"OK\r\n"
    assert not app.conn.partial_input
    app.feed(b'PUTSCRIPT "big" {500+}\r\n' + b"x" * 10)  # refused literal, being skipped
    assert app.conn.partial_input


def test_byte_by_byte_equals_whole() -> None:
    script = b"keep;\r\n"
    data = (b'AUTHENTICATE "PLAIN" "' + _plain("bob@example.com", "secret") + b'"\r\n' +
            b'PUTSCRIPT "a" {%d+}\r\n' % len(script) + script + b'\r\nLISTSCRIPTS\r\nLOGOUT\r\n')
    whole, _ = _session()
    expected = whole.feed(data)
    split, _ = _session()
    got = b"".join(split.feed(data[i : i + 1]) for i in range(len(data)))
    assert got == expected and expected.endswith(b'"a"\r\nOK\r\nOK "Logout completed"\r\n')


@pytest.mark.parametrize(("line", "reply"), [
    (b"FROB\r\n", b'NO "unknown command FROB"\r\n'),
    (b'PUTSCRIPT "a"\r\n', b'NO "PUTSCRIPT not allowed now"\r\n'),
    (b'CAPABILITY "x"\r\n', b'NO "wrong number of arguments for CAPABILITY"\r\n'),
    (b'NOOP "unterminated\r\n', b'NO "unterminated string"\r\n'),
    (b"\r\n", b'NO "empty command"\r\n'),
    (b"@@@\r\n", b'NO "unexpected \'@@@\'"\r\n'),
])
def test_bad_commands_get_no(line: bytes, reply: bytes) -> None:
    app, _ = _session()
    assert app.feed(line) == reply


def test_overlong_line_refused() -> None:
    app, _ = _session()
    assert app.feed(b"NOOP " + b"x" * 10000) == b'NO "line too long"\r\n'


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_never_raises_and_output_is_bounded(data: bytes) -> None:
    app, _ = _session()
    out = app.feed(data)
    assert len(out) < 20 * (len(data) + 100)
