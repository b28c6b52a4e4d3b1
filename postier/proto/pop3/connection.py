"""Sans-IO POP3 server session (RFC 1939) with CAPA and its extensions (RFC 2449), STLS (RFC 2595) and
AUTH (RFC 5034), in the shape of h11: ``receive_data()``, ``next_event()``, ``data_to_send()``.

The core answers CAPA, STAT, LIST, UIDL, NOOP, RSET, DELE and errors itself from the maildrop listing
the application gave with ``login_ok()``; it asks the application (events) for everything that needs
passwords, disk or TLS.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from postier.proto import sasl
from postier.proto.pop3 import replies as R
from postier.proto.pop3.events import (
    NEED_DATA,
    PAUSED,
    Authenticated,
    Close,
    ConnectionLost,
    Event,
    Login,
    Retrieve,
    ScramLookup,
    Sentinel,
    StartTLS,
    Update,
)
from postier.proto.pop3.framing import MessageEncoder, encode_lines
from postier.proto.pop3.replies import Pop3Error, Reply

__all__ = ["POP3Connection", "POP3Settings", "State"]

_MAX_NUMBER_DIGITS = 9  # message numbers and TOP line counts
_UID_RE = re.compile(r"[\x21-\x7e]{1,70}")  # RFC 1939 §7 UIDL: 1 to 70 characters 0x21-0x7E
_EXPIRE_RE = re.compile(r"NEVER|[0-9]{1,5}")  # RFC 2449 §6.7


class State(enum.Enum):
    AUTHORIZATION = "AUTHORIZATION"  # RFC 1939 §4
    TRANSACTION = "TRANSACTION"  # RFC 1939 §5
    UPDATE = "UPDATE"  # RFC 1939 §6


class _Awaiting(enum.Enum):
    """Which answer from the application the session waits for."""

    TLS = "tls_started"
    LOGIN = "login_ok/login_failed"
    SCRAM = "scram_credentials"
    MAILDROP = "login_ok/login_failed after Authenticated"
    MESSAGE = "send_message/retrieve_failed"
    UPDATE = "update_done"


@dataclass(frozen=True, slots=True)
class _Syntax:
    min_args: int
    max_args: int
    rest_of_line: bool = False  # the single argument is the rest of the line, spaces included


# RFC 1939 §4-§7, RFC 2449 §5, RFC 2595 §4, RFC 5034 §4: argument counts per command
_SYNTAX: Final[dict[str, _Syntax]] = {
    "CAPA": _Syntax(0, 0),
    "QUIT": _Syntax(0, 0),
    "STLS": _Syntax(0, 0),
    "USER": _Syntax(1, 1),
    "PASS": _Syntax(1, 1, rest_of_line=True),  # RFC 1939 §7: spaces may be part of the password
    "AUTH": _Syntax(0, 2),
    "STAT": _Syntax(0, 0),
    "LIST": _Syntax(0, 1),
    "UIDL": _Syntax(0, 1),
    "RETR": _Syntax(1, 1),
    "TOP": _Syntax(2, 2),
    "DELE": _Syntax(1, 1),
    "NOOP": _Syntax(0, 0),
    "RSET": _Syntax(0, 0),
}

# Legal commands per state. APOP is deliberately absent (MD5 over a stored clear-text password).
_LEGAL: Final[dict[State, frozenset[str]]] = {
    State.AUTHORIZATION: frozenset({"CAPA", "QUIT", "STLS", "USER", "PASS", "AUTH"}),  # RFC 1939 §4
    State.TRANSACTION: frozenset(  # RFC 1939 §5, §7
        {"CAPA", "QUIT", "STAT", "LIST", "UIDL", "RETR", "TOP", "DELE", "NOOP", "RSET"}
    ),
    State.UPDATE: frozenset(),  # RFC 1939 §6: no commands, the server answers QUIT and closes
}


@dataclass(frozen=True, slots=True)
class POP3Settings:
    tls_active: bool = False  # True on port 995 (implicit TLS, RFC 8314)
    offer_stls: bool = True
    allow_plaintext_auth: bool = False  # USER/PASS/AUTH without TLS
    sasl_mechanisms: tuple[str, ...] = sasl.MECHANISMS
    expire: str | None = "NEVER"  # RFC 2449 §6.7: "NEVER" or days
    login_delay: int | None = None  # RFC 2449 §6.5: seconds
    implementation: str | None = "postier"  # RFC 2449 §6.9
    greeting: str = "POP3 server ready"
    max_command_line: int = 255  # RFC 2449 §4: octets including CRLF
    max_auth_line: int = 8192  # one base64 SASL response line including CRLF
    max_errors: int = 10
    max_pending_input: int = 262144  # unprocessed pipelined input; drivers read <= 64 KiB at once

    def __post_init__(self) -> None:
        if self.expire is not None and not _EXPIRE_RE.fullmatch(self.expire):
            raise ValueError("expire must be 'NEVER' or a number of days")
        if self.login_delay is not None and not 0 <= self.login_delay < 10**9:
            raise ValueError("login_delay must be a non-negative number of seconds")
        if self.max_command_line < 64 or self.max_auth_line < self.max_command_line:
            raise ValueError("max_command_line must be >= 64 and <= max_auth_line")
        if self.max_errors < 1 or self.max_pending_input < self.max_auth_line:
            raise ValueError("max_errors must be >= 1 and max_pending_input >= max_auth_line")
        for text in (self.implementation or "", self.greeting, *self.sasl_mechanisms):
            if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
                raise ValueError("settings text must not contain control characters")


@dataclass(slots=True)
class _Message:
    size: int
    uid: str
    deleted: bool = False


class POP3Connection:
    """One POP3 session. Feed bytes with ``receive_data()`` (b"" at EOF), pull events with
    ``next_event()`` until NEED_DATA or PAUSED, answer events with the methods named in them, and
    write out ``data_to_send()``."""

    def __init__(self, settings: POP3Settings | None = None) -> None:
        self.settings = settings or POP3Settings()
        self.state = State.AUTHORIZATION
        self.tls_active = self.settings.tls_active
        self._in = bytearray()
        self._out = bytearray()
        self._eof = False
        self._discarding = False  # dropping the rest of an over-long line (RFC 2449 §4)
        self._errors = 0
        self._closed: Close | None = None
        self._lost_reported = False
        self._awaiting: _Awaiting | None = None
        self._queued: Event | None = None
        self._user: str | None = None  # from USER, waiting for PASS
        self._sasl: sasl.ServerExchange | None = None
        self._sasl_reading = False  # the next line is a SASL response, not a command
        self._granted: list[_Message] | None = None  # maildrop from login_ok, before that last ""
        self._messages: list[_Message] = []
        self._encoder: MessageEncoder | None = None
        self._message_header: Reply | None = None  # not yet sent: the reply line for RETR/TOP
        #: SASL exchanges the core itself failed (bad SCRAM proof, malformed input): for throttling
        self.sasl_failures = 0
        self._handlers: dict[str, Callable[[tuple[str, ...]], Event | None]] = {
            "CAPA": self._capa,
            "QUIT": self._quit,
            "STLS": self._stls,
            "USER": self._user_command,
            "PASS": self._pass,
            "AUTH": self._auth,
            "STAT": self._stat,
            "LIST": self._list,
            "UIDL": self._uidl,
            "RETR": self._retr,
            "TOP": self._top,
            "DELE": self._dele,
            "NOOP": self._noop,
            "RSET": self._rset,
        }
        self._send(R.OK_GREETING.fill(greeting=self.settings.greeting))  # RFC 1939 §4

    # --- I/O surface --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed is not None

    @property
    def partial_input(self) -> bool:
        """True while part of a line is buffered (or an over-long one is being skipped): the driver
        then bounds the time until the line is complete (slowloris)."""
        return bool(self._in) or self._discarding

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; b"" means the client closed its side."""
        if self._closed is not None:
            return
        if not data:
            self._eof = True
            return
        if self._awaiting is _Awaiting.TLS:
            return  # RFC 2595 §4: nothing sent before the handshake may be taken as a command
        self._in += data
        if len(self._in) > self.settings.max_pending_input:
            self._in.clear()
            self._send(R.ERR_INPUT_OVERFLOW)
            self._close("input overflow")

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | Sentinel:
        if self._queued is not None:
            event, self._queued = self._queued, None
            return event
        if self._closed is not None:
            return self._closed
        if self._awaiting is not None:
            return PAUSED
        # Bounded: each pass consumes one line or the whole buffer.
        while self._closed is None and self._awaiting is None:
            line = self._next_line()
            if line is None:
                if self._eof:
                    return self._lose_connection()
                return NEED_DATA
            event = self._dispatch(line)
            if event is not None:
                return event
        if self._closed is not None:
            return self._closed
        return PAUSED

    # --- Answers from the application ---------------------------------------------------------

    def tls_started(self) -> None:
        """The TLS handshake after STLS succeeded; the session starts over (RFC 2595 §4)."""
        self._expect(_Awaiting.TLS)
        self._awaiting = None
        self.tls_active = True
        self._in.clear()
        self._user = None

    def login_ok(self, maildrop: Sequence[tuple[int, str]]) -> None:
        """The user is in and holds the maildrop lock: ``maildrop`` lists (size in CRLF octets, UID)
        in message-number order."""
        expected = self._expect(_Awaiting.LOGIN, _Awaiting.MAILDROP)
        messages = [_Message(size, uid) for size, uid in maildrop]
        for message in messages:
            if not (isinstance(message.size, int) and message.size >= 0 and _UID_RE.fullmatch(message.uid)):
                raise ValueError(f"bad maildrop entry {message!r}")
        self._awaiting = None
        mechanism = self._sasl
        if expected is _Awaiting.LOGIN and mechanism is not None:
            self._granted = messages
            self._guarded(lambda: self._sasl_outcome(mechanism.password_result(True)))
        else:
            self._enter_transaction(messages)

    def login_failed(self, in_use: bool = False, login_delay: bool = False, unavailable: bool = False,
                     temporary: bool = False) -> None:
        """Wrong credentials, or (``in_use``) the maildrop is locked, or (``login_delay``) RFC 2449
        LOGIN-DELAY forbids logging in yet, or the maildrop cannot be served (``unavailable``: a
        permanent reason; ``temporary``: try again later)."""
        expected = self._expect(_Awaiting.LOGIN, _Awaiting.MAILDROP)
        self._awaiting = None
        if expected is _Awaiting.LOGIN and self._sasl is not None:
            self._sasl.password_result(False)
        self._end_sasl()
        if in_use:
            reply = R.ERR_IN_USE
        elif login_delay:
            reply = R.ERR_LOGIN_DELAY
        elif unavailable:
            reply = R.ERR_MAILDROP_UNAVAILABLE
        elif temporary:
            reply = R.ERR_TRY_LATER
        else:
            reply = R.ERR_AUTH_FAILED
        self._error(reply)

    def scram_credentials(self, credentials: sasl.ScramCredentials | None) -> None:
        """The stored SCRAM-SHA-256 credentials of the user in ScramLookup, or None if unknown."""
        self._expect(_Awaiting.SCRAM)
        self._awaiting = None
        mechanism = self._sasl
        assert mechanism is not None
        self._guarded(lambda: self._sasl_outcome(mechanism.scram_credentials(credentials)))

    def send_message(self, data: bytes | Iterable[bytes]) -> None:
        """The whole message for Retrieve, as bytes or an iterable of chunks."""
        chunks: Iterable[bytes] = (data,) if isinstance(data, bytes | bytearray | memoryview) else data
        for chunk in chunks:
            self.send_message_chunk(chunk)
            if not self.message_needs_more:
                break
        self.end_message()

    def send_message_chunk(self, chunk: bytes) -> None:
        """Part of the message for Retrieve; flush ``data_to_send()`` between chunks to stream."""
        self._expect(_Awaiting.MESSAGE)
        assert self._encoder is not None
        self._send_message_header()
        self._out += self._encoder.feed(bytes(chunk))

    @property
    def message_needs_more(self) -> bool:
        """False once a TOP has all its lines: the application may stop reading the message."""
        return self._encoder is not None and self._encoder.needs_more

    def end_message(self) -> None:
        self._expect(_Awaiting.MESSAGE)
        assert self._encoder is not None
        self._send_message_header()
        self._out += self._encoder.finish()
        self._encoder = None
        self._awaiting = None

    def retrieve_failed(self) -> None:
        """The message could not be read; only before any chunk was sent."""
        self._expect(_Awaiting.MESSAGE)
        if self._message_header is None:
            raise RuntimeError("message already partly sent: close the connection instead")
        self._encoder = None
        self._message_header = None
        self._awaiting = None
        self._error(R.ERR_MESSAGE_UNAVAILABLE)

    def update_done(self, ok: bool) -> None:
        """RFC 1939 §6: the deletions of Update are done (``ok``) or some failed."""
        self._expect(_Awaiting.UPDATE)
        self._awaiting = None
        self._send(R.OK_SIGNING_OFF if ok else R.ERR_UPDATE_FAILED)
        self._close("quit")

    # --- Input framing ------------------------------------------------------------------------

    def _next_line(self) -> bytes | None:
        """The next complete line without CRLF, or None. Over-long lines are answered and dropped."""
        # Bounded: every pass but the last removes at least one line's worth of bytes from _in.
        while True:
            if self._discarding:
                end = self._in.find(b"\r\n")
                if end < 0:
                    keep = self._in.endswith(b"\r")
                    self._in.clear()
                    if keep:
                        self._in += b"\r"
                    return None
                del self._in[: end + 2]
                self._discarding = False
            limit = self.settings.max_auth_line if self._sasl_reading else self.settings.max_command_line
            end = self._in.find(b"\r\n", 0, limit)
            if end >= 0:
                line = bytes(self._in[:end])
                del self._in[: end + 2]
                return line
            if len(self._in) < limit:
                return None
            self._discarding = True  # RFC 2449 §4: too long, answer -ERR and skip to the next CRLF
            if self._sasl_reading:
                self._end_sasl()
            self._error(R.ERR_LINE_TOO_LONG)
            if self._closed is not None:
                return None

    def _dispatch(self, line: bytes) -> Event | None:
        try:
            if self._sasl_reading:
                return self._sasl_response(line)
            return self._command(line)
        except Pop3Error as exc:
            self._error(exc.reply)
            return None

    def _command(self, line: bytes) -> Event | None:
        if any(b < 0x20 or b == 0x7F for b in line):
            raise Pop3Error(R.ERR_SYNTAX)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise Pop3Error(R.ERR_SYNTAX) from None
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()  # RFC 1939 §3: keywords are case-insensitive
        syntax = _SYNTAX.get(keyword)
        if syntax is None:
            raise Pop3Error(R.ERR_UNKNOWN_COMMAND)
        if keyword not in _LEGAL[self.state]:
            raise Pop3Error(R.ERR_WRONG_STATE)
        if syntax.rest_of_line:
            args: tuple[str, ...] = (rest,) if rest else ()
        else:
            args = tuple(rest.split())
        if not syntax.min_args <= len(args) <= syntax.max_args:
            raise Pop3Error(R.ERR_SYNTAX)
        return self._handlers[keyword](args)

    # --- AUTHORIZATION state ------------------------------------------------------------------

    def _auth_allowed(self) -> bool:
        return self.tls_active or self.settings.allow_plaintext_auth

    def _mechanisms(self) -> list[str]:
        return [m.upper() for m in self.settings.sasl_mechanisms if m.upper() in sasl.MECHANISMS]

    def _capa(self, args: tuple[str, ...]) -> None:
        # RFC 2449 §5, §6: capabilities; login-related ones only where they can be used
        lines = ["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.state is State.AUTHORIZATION:
            if self._auth_allowed():  # no USER/SASL in clear text unless allowed
                lines.append("USER")
                if mechanisms := self._mechanisms():
                    lines.append("SASL " + " ".join(mechanisms))  # RFC 5034 §3
            if self.settings.offer_stls and not self.tls_active:
                lines.append("STLS")  # RFC 2595 §4
        if self.settings.expire is not None:
            lines.append(f"EXPIRE {self.settings.expire}")  # RFC 2449 §6.7
        if self.settings.login_delay is not None:
            lines.append(f"LOGIN-DELAY {self.settings.login_delay}")  # RFC 2449 §6.5
        if self.settings.implementation:
            lines.append(f"IMPLEMENTATION {self.settings.implementation}")  # RFC 2449 §6.9
        self._send(R.OK_CAPA)
        self._out += encode_lines(lines)

    def _quit(self, args: tuple[str, ...]) -> Event | None:
        if self.state is State.TRANSACTION:
            self.state = State.UPDATE  # RFC 1939 §6: deletions happen only now
            self._awaiting = _Awaiting.UPDATE
            return Update(tuple(m.uid for m in self._messages if m.deleted))
        self._send(R.OK_SIGNING_OFF)  # RFC 1939 §4: QUIT in AUTHORIZATION, nothing to update
        self._close("quit")
        return None

    def _stls(self, args: tuple[str, ...]) -> Event:
        if self.tls_active:
            raise Pop3Error(R.ERR_TLS_ACTIVE)
        if not self.settings.offer_stls:
            raise Pop3Error(R.ERR_STLS_UNAVAILABLE)
        self._send(R.OK_STLS)
        self._in.clear()  # RFC 2595 §4: drop what was pipelined after STLS (command injection)
        self._awaiting = _Awaiting.TLS
        return StartTLS()

    def _user_command(self, args: tuple[str, ...]) -> None:
        if not self._auth_allowed():
            raise Pop3Error(R.ERR_PLAINTEXT)
        self._user = args[0]  # RFC 1939 §7 USER
        self._send(R.OK_USER)

    def _pass(self, args: tuple[str, ...]) -> Event:
        if not self._auth_allowed():
            raise Pop3Error(R.ERR_PLAINTEXT)
        if self._user is None:  # RFC 1939 §7: PASS only right after a successful USER
            raise Pop3Error(R.ERR_USER_FIRST)
        user, self._user = self._user, None
        self._awaiting = _Awaiting.LOGIN
        return Login(user, args[0])

    def _auth(self, args: tuple[str, ...]) -> Event | None:
        if not self._auth_allowed():
            raise Pop3Error(R.ERR_PLAINTEXT)
        self._user = None
        if not args:  # RFC 1734 style listing, still used by some clients
            self._send(R.OK_MECHANISMS)
            self._out += encode_lines(self._mechanisms())
            return None
        name = args[0].upper()
        mechanism = sasl.ServerExchange.for_name(name, tuple(self._mechanisms()))
        if mechanism is None:
            raise Pop3Error(R.ERR_UNSUPPORTED_MECHANISM)
        initial: bytes | None = None
        if len(args) == 2:
            initial = b"" if args[1] == "=" else _b64decode(args[1])  # RFC 5034 §4: "=" is empty
        self._sasl = mechanism
        return self._sasl_outcome(mechanism.start(initial))

    def _sasl_response(self, line: bytes) -> Event | None:
        mechanism = self._sasl
        assert mechanism is not None
        self._sasl_reading = False
        if line == b"*":  # RFC 5034 §4: the client cancels
            self._end_sasl()
            raise Pop3Error(R.ERR_AUTH_CANCELLED)
        try:
            data = _b64decode(line.decode("ascii")) if line else b""
        except (Pop3Error, UnicodeDecodeError):
            self._end_sasl()
            raise Pop3Error(R.ERR_BAD_BASE64) from None
        return self._sasl_outcome(mechanism.respond(data))

    def _sasl_outcome(self, outcome: sasl.Outcome) -> Event | None:
        mechanism = self._sasl
        assert mechanism is not None
        match outcome:
            case sasl.Challenge(data):
                self._challenge(data)
                return None
            case sasl.NeedPasswordCheck(authcid, password, authzid):
                self._awaiting = _Awaiting.LOGIN
                return Login(authcid, password, authzid, mechanism.name)
            case sasl.NeedScramCredentials(username):
                self._awaiting = _Awaiting.SCRAM
                return ScramLookup(username)
            case sasl.Success():
                return self._sasl_succeeded(outcome)
            case _:
                self.sasl_failures += 1
                self._end_sasl()
                raise Pop3Error(R.ERR_AUTH_FAILED)

    def _challenge(self, data: bytes) -> None:
        self._out += b"+ " + base64.b64encode(data) + b"\r\n"  # RFC 5034 §4
        self._sasl_reading = True

    def _sasl_succeeded(self, success: sasl.Success) -> Event | None:
        mechanism = self._sasl
        assert mechanism is not None
        granted = self._granted
        self._end_sasl()
        if granted is not None:  # the application already said yes (PLAIN, LOGIN)
            self._enter_transaction(granted)
            return None
        self._awaiting = _Awaiting.MAILDROP
        return Authenticated(success.authcid, success.authzid, mechanism.name)

    def _end_sasl(self) -> None:
        self._sasl = None
        self._sasl_reading = False
        self._granted = None

    def _enter_transaction(self, messages: list[_Message]) -> None:
        self.state = State.TRANSACTION  # RFC 1939 §4: maildrop locked, now TRANSACTION
        self._messages = messages
        self._send(R.OK_MAILDROP.fill(**self._totals()))

    # --- TRANSACTION state --------------------------------------------------------------------

    def _totals(self) -> dict[str, int]:
        live = [m for m in self._messages if not m.deleted]
        return {"count": len(live), "octets": sum(m.size for m in live)}

    def _message(self, arg: str) -> tuple[int, _Message]:
        """The live message numbered ``arg`` (RFC 1939 §5: deleted ones do not count as existing)."""
        msgno = _number(arg, R.ERR_NO_SUCH_MESSAGE)
        if not 1 <= msgno <= len(self._messages) or self._messages[msgno - 1].deleted:
            raise Pop3Error(R.ERR_NO_SUCH_MESSAGE)
        return msgno, self._messages[msgno - 1]

    def _stat(self, args: tuple[str, ...]) -> None:
        self._send(R.OK_STAT.fill(**self._totals()))  # RFC 1939 §5 STAT

    def _list(self, args: tuple[str, ...]) -> None:
        self._listing(args, R.OK_LIST_ALL.fill(**self._totals()), lambda m: str(m.size))  # RFC 1939 §5

    def _uidl(self, args: tuple[str, ...]) -> None:
        self._listing(args, R.OK_UIDL_ALL, lambda m: m.uid)  # RFC 1939 §7 UIDL

    def _listing(self, args: tuple[str, ...], header: Reply, value: Callable[[_Message], str]) -> None:
        if args:
            msgno, message = self._message(args[0])
            self._send(R.OK_SCAN_LISTING.fill(msgno=msgno, value=value(message)))
            return
        self._send(header)
        lines = [f"{n} {value(m)}" for n, m in enumerate(self._messages, 1) if not m.deleted]
        self._out += encode_lines(lines)

    def _retr(self, args: tuple[str, ...]) -> Event:
        msgno, message = self._message(args[0])
        return self._retrieve(msgno, message, None, R.OK_RETR.fill(size=message.size))

    def _top(self, args: tuple[str, ...]) -> Event:
        msgno, message = self._message(args[0])
        lines = _number(args[1], R.ERR_SYNTAX)  # RFC 1939 §7 TOP msg n: n non-negative
        return self._retrieve(msgno, message, lines, R.OK_TOP)

    def _retrieve(self, msgno: int, message: _Message, lines: int | None, header: Reply) -> Event:
        self._encoder = MessageEncoder(lines)
        self._message_header = header
        self._awaiting = _Awaiting.MESSAGE
        return Retrieve(msgno, message.uid, lines)

    def _send_message_header(self) -> None:
        if self._message_header is not None:
            self._send(self._message_header)
            self._message_header = None

    def _dele(self, args: tuple[str, ...]) -> None:
        msgno = _number(args[0], R.ERR_NO_SUCH_MESSAGE)
        if not 1 <= msgno <= len(self._messages):
            raise Pop3Error(R.ERR_NO_SUCH_MESSAGE)
        message = self._messages[msgno - 1]
        if message.deleted:
            raise Pop3Error(R.ERR_ALREADY_DELETED.fill(msgno=msgno))
        message.deleted = True  # RFC 1939 §5 DELE: only marked; removed in the UPDATE state
        self._send(R.OK_DELETED.fill(msgno=msgno))

    def _noop(self, args: tuple[str, ...]) -> None:
        self._send(R.OK_EMPTY)  # RFC 1939 §5 NOOP

    def _rset(self, args: tuple[str, ...]) -> None:
        for message in self._messages:  # RFC 1939 §5 RSET: unmark all
            message.deleted = False
        self._send(R.OK_MAILDROP.fill(**self._totals()))

    # --- Plumbing -----------------------------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._out += reply.to_bytes()

    def _error(self, reply: Reply) -> None:
        self._errors += 1
        if self._errors >= self.settings.max_errors:
            self._send(R.ERR_TOO_MANY_ERRORS)
            self._close("too many errors")
        else:
            self._send(reply)

    def _guarded(self, step: Callable[[], Event | None]) -> None:
        """Run a protocol step from an answer method; its event, if any, is the next one."""
        try:
            self._queued = step()
        except Pop3Error as exc:
            self._error(exc.reply)

    def _expect(self, *awaiting: _Awaiting) -> _Awaiting:
        if self._awaiting not in awaiting:
            waiting = self._awaiting.value if self._awaiting else "no answer"
            raise RuntimeError(f"POP3 session waits for {waiting}, not this call")
        assert self._awaiting is not None
        return self._awaiting

    def _close(self, reason: str) -> None:
        if self._closed is None:
            self._closed = Close(reason)
            self._awaiting = None
            self._in.clear()

    def _lose_connection(self) -> Event:
        authenticated = self.state is not State.AUTHORIZATION
        self._close("connection lost")
        return ConnectionLost(was_authenticated=authenticated)  # RFC 1939 §6: no UPDATE, no deletes


def _number(arg: str, error: Reply) -> int:
    if not (arg.isascii() and arg.isdigit()) or len(arg) > _MAX_NUMBER_DIGITS:
        raise Pop3Error(error)
    return int(arg)


def _b64decode(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise Pop3Error(R.ERR_BAD_BASE64) from None
