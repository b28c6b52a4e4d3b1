"""Sans-IO SMTP server session (RFC 5321) and its LMTP variant (RFC 2033): bytes in, events out.

The driver feeds bytes with `receive_data`, drains `next_event` until NEED_DATA, answers the events that
need an answer (`accept`, `reply`, `reply_many`, `auth_*`) and writes `data_to_send`. The core sends the
replies it can decide alone (syntax, sequence, limits) and never processes another command while an event
waits for its answer. Extensions: SIZE (RFC 1870), 8BITMIME (RFC 6152), PIPELINING (RFC 2920),
ENHANCEDSTATUSCODES (RFC 2034), STARTTLS (RFC 3207), AUTH (RFC 4954), CHUNKING/BINARYMIME (RFC 3030),
SMTPUTF8 (RFC 6531), DSN parameters (RFC 3461).
"""

from __future__ import annotations

import base64
import binascii
import collections
import enum
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from . import replies as R
from .address import Address, parse_params, parse_path, xtext_decode
from .data import ChunkReader, DotReader, Fault
from .errors import AddressError, UsageError
from .replies import Reply, ReplyError

MAX_AUTH_LINE: Final = 12288  # RFC 4954 §4: AUTH lines may be this long
MIB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class ServerSettings:
    hostname: str
    lmtp: bool = False
    max_command_line: int = 512  # RFC 5321 §4.5.3.1.4, CRLF included
    max_data_line: int = 65536  # RFC 5321 §4.5.3.1.6 allows 1000; raised, still bounded
    max_recipients: int = 1000  # RFC 5321 §4.5.3.1.8 asks for at least 100
    max_message_size: int = 50 * MIB  # advertised with SIZE (RFC 1870)
    max_errors: int = 10
    max_buffer: int = 1 * MIB  # unanswered input held while the app decides
    offer_starttls: bool = False
    tls_active: bool = False
    auth_mechanisms: tuple[str, ...] = ()
    allow_auth_plaintext: bool = False
    require_auth: bool = False
    pipelining: bool = True
    chunking: bool = True
    binarymime: bool = False
    smtputf8: bool = True
    eightbitmime: bool = True
    dsn: bool = False


# Events ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello:
    """EHLO/HELO/LHLO; answer with accept() (the core writes the capability list) or reply()."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class StartTLS:
    """220 is queued; upgrade the transport, then call tls_started(). No answer."""


@dataclass(frozen=True, slots=True)
class AuthStart:
    """Answer with auth_challenge(), auth_success() or auth_fail()."""

    mechanism: str
    initial_response: bytes | None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """The client's answer to a challenge; answer like AuthStart."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MailFrom:
    """`address` is "" for the null reverse-path; `path` holds the details."""

    address: str
    params: dict[str, str | None]
    path: Address


@dataclass(frozen=True, slots=True)
class RcptTo:
    address: str
    params: dict[str, str | None]
    path: Address


@dataclass(frozen=True, slots=True)
class DataStart:
    """DATA or the first BDAT of a transaction; accept() or reply() a rejection."""

    bdat: bool


@dataclass(frozen=True, slots=True)
class MessageData:
    """Message content, dot-unstuffed, CRLF line endings; no answer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """End of content. With `problem`, do not deliver: answer with that reply. Otherwise one reply
    (SMTP) or one per accepted recipient in RCPT order (LMTP, RFC 2033 §4.2)."""

    problem: Reply | None


@dataclass(frozen=True, slots=True)
class Reset:
    """RSET (RFC 5321 §4.1.1.5): the envelope is cleared and 250 sent. No answer."""


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT: 221 is queued; a Close event follows."""


@dataclass(frozen=True, slots=True)
class Close:
    """The core ended the session: write data_to_send(), then close the transport."""

    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side; any message in progress is incomplete."""


class NeedData:
    """Sentinel: feed more bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()

type Event = (
    Hello
    | StartTLS
    | AuthStart
    | AuthResponse
    | MailFrom
    | RcptTo
    | DataStart
    | MessageData
    | MessageEnd
    | Reset
    | Quit
    | Close
    | ConnectionClosed
)
_ANSWERED: Final = (Hello, AuthStart, AuthResponse, MailFrom, RcptTo, DataStart, MessageEnd)


# States and the command table ------------------------------------------------------------------------------
class State(enum.Enum):
    GREETING = "greeting"  # the driver has not greeted yet
    REFUSED = "refused"  # greeted with 554: only QUIT (RFC 5321 §3.1)
    FRESH = "fresh"  # no HELO/EHLO yet
    READY = "ready"  # greeted, no transaction
    MAIL = "mail"  # MAIL accepted (RCPT, DATA, BDAT)
    BDAT = "bdat"  # between two BDAT chunks (RFC 3030 §2)
    CLOSED = "closed"


class _Mode(enum.Enum):
    """What the next input bytes are."""

    COMMAND = "command"
    AUTH = "auth"  # a SASL response line (RFC 4954 §4)
    DATA = "data"  # DATA content up to CRLF.CRLF
    CHUNK = "chunk"  # BDAT chunk octets
    TLS_WAIT = "tls-wait"  # STARTTLS accepted, handshake pending: input discarded (RFC 3207 §4)


_HELLO: Final = frozenset({"EHLO", "HELO", "LHLO"})
_ANYTIME: Final = frozenset({"NOOP", "QUIT", "RSET", "HELP", "VRFY", "EXPN"})
# Legal commands per state (RFC 5321 §4.1.4, RFC 3207 §4, RFC 4954 §4, RFC 3030 §2)
_LEGAL: Final[dict[State, frozenset[str]]] = {
    State.REFUSED: frozenset({"QUIT"}),
    State.FRESH: _ANYTIME | _HELLO,
    State.READY: _ANYTIME | _HELLO | {"MAIL", "STARTTLS", "AUTH"},
    State.MAIL: _ANYTIME | _HELLO | {"RCPT", "DATA", "BDAT"},
    State.BDAT: frozenset({"BDAT", "RSET", "NOOP", "QUIT"}),
}
# Why a command is refused, when the plain 503 says too little
_REFUSAL: Final[dict[tuple[State, str], Reply]] = {
    **{(State.FRESH, v): R.R503_HELO_FIRST for v in ("MAIL", "RCPT", "DATA", "BDAT", "STARTTLS", "AUTH")},
    **{(State.READY, v): R.R503_NEED_MAIL for v in ("RCPT", "DATA", "BDAT")},
    (State.MAIL, "MAIL"): R.R503_NESTED_MAIL,
    (State.MAIL, "STARTTLS"): R.R503_IN_TRANSACTION,
    (State.MAIL, "AUTH"): R.R503_IN_TRANSACTION,
    (State.BDAT, "DATA"): R.R503_MIXED_BDAT,
}
_STATE_REFUSAL: Final = {State.BDAT: R.R503_BDAT_EXPECTED}
_VERBS_SMTP: Final = frozenset(
    {
        "EHLO",
        "HELO",
        "MAIL",
        "RCPT",
        "DATA",
        "BDAT",
        "RSET",
        "NOOP",
        "QUIT",
        "VRFY",
        "EXPN",
        "HELP",
        "STARTTLS",
        "AUTH",
    }
)
_VERBS_LMTP: Final = (_VERBS_SMTP - {"EHLO", "HELO"}) | {"LHLO"}  # RFC 2033 §4.1
# RFC 2920 §3.1 (+ RFC 3207 §4, RFC 4954 §4): these end a pipelined group; bytes after them are refused
_GROUP_END: Final = frozenset(
    {"EHLO", "HELO", "LHLO", "DATA", "VRFY", "EXPN", "NOOP", "QUIT", "STARTTLS", "AUTH"}
)
_FORBIDDEN: Final = frozenset({"GET", "POST", "HEAD", "PUT", "CONNECT"})  # HTTP sent to an SMTP port
_BDAT_ARG: Final = re.compile(r"(\d{1,20})(?: +(LAST))?", re.IGNORECASE)  # RFC 3030 §2 bdat-cmd
_SASL_MECH: Final = re.compile(r"[A-Z0-9_-]{1,20}")  # RFC 4422 §3.1 sasl-mech
_DSN_NOTIFY: Final = frozenset({"SUCCESS", "FAILURE", "DELAY"})
#: (settings, extended, tls) -> the EHLO/HELO reply: the same for every session of a listener.
_HELLO_REPLIES: dict[tuple[ServerSettings, bool, bool], Reply] = {}


def _b64(text: str) -> bytes:
    """RFC 4954 §4: strict base64; "=" is the empty response."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ReplyError(R.R501_BAD_BASE64) from None


class ServerConnection:
    """One SMTP or LMTP server session."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._state = State.GREETING
        self._mode = _Mode.COMMAND
        self._buf = b""
        self._pos = 0
        self._eof = False
        self._skip_line = False  # discarding the rest of an overlong line
        self._out: list[bytes] = []
        self._events: collections.deque[Event] = collections.deque()
        self._waiting: type | None = None
        self._final: Close | ConnectionClosed | None = None
        self._errors = 0
        self._tls = settings.tls_active
        self._helo: str | None = None
        self._extended = False
        self._identity: str | None = None
        self._pending_hello = ""
        self._verb_extended = False
        self._pending: MailFrom | RcptTo | None = None
        self._data_is_bdat = False
        self._reader: DotReader | ChunkReader | None = None
        self._chunk_left = 0
        self._chunk_size = 0
        self._chunk_last = False
        self._chunk_skip: Reply | None = None  # reply for a chunk read only to be discarded
        self._bdat_failed: Reply | None = None
        self._clear_envelope()

    # Envelope, read-only -----------------------------------------------------------------------------------
    def _clear_envelope(self) -> None:
        self._mail: MailFrom | None = None
        self._rcpts: list[RcptTo] = []
        self._bdat_failed = None
        self._reader = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def is_closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def partial_input(self) -> bool:
        """A command line or a message transfer has started and is not complete yet (the driver's
        slowloris deadline runs meanwhile)."""
        return self._mode is _Mode.DATA or self._mode is _Mode.CHUNK or self._pos < len(self._buf) or self._skip_line

    @property
    def helo(self) -> str | None:
        return self._helo

    @property
    def extended(self) -> bool:
        return self._extended

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def authenticated(self) -> str | None:
        return self._identity

    @property
    def mail_from(self) -> MailFrom | None:
        return self._mail

    @property
    def recipients(self) -> tuple[RcptTo, ...]:
        return tuple(self._rcpts)

    # Driver side -------------------------------------------------------------------------------------------
    def greet(self, reply: Reply | None = None, early_talker_scored: bool = False) -> None:
        """Queue the opening reply; input received before this call marks an early talker.

        An early talker is refused (554), unless the driver has already scored it
        (`early_talker_scored`, postscreen-style screening): then what it sent early is dropped.
        """
        if self._state is not State.GREETING:
            raise UsageError("greet() called twice")
        if self._pos < len(self._buf):
            if not early_talker_scored:
                # RFC 5321 §4.3.1: the client waits for the greeting; early talkers are spam engines
                self._shutdown(R.R554_EARLY_TALKER, "early talker")
                return
            self._buf, self._pos = b"", 0  # RFC 5321 §4.3.1: nothing said before the greeting counts
        reply = reply or R.greeting(self.settings.hostname, self.settings.lmtp)
        self._queue(reply)
        if reply.code == 220:
            self._state = State.FRESH
        elif reply.code == 554:
            self._state = State.REFUSED  # RFC 5321 §3.1: wait for QUIT, 503 to the rest
        else:
            self._close("refused at greeting")

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from the peer; b"" means the peer closed its side."""
        if self._state is State.CLOSED or self._eof:
            return
        if not data:
            self._eof = True
            return
        if self._mode is _Mode.TLS_WAIT:
            return  # RFC 3207 §4, CVE-2011-0411: nothing sent before the handshake may be used
        if self._state is State.GREETING:
            self._buf = (self._buf + data)[: self.settings.max_command_line]  # only "did it talk" matters
            return
        rest = len(self._buf) - self._pos
        self._buf = self._buf[self._pos :] + data if rest else data
        self._pos = 0
        if len(self._buf) > self.settings.max_buffer:  # the driver should not read while we wait
            self._buf, self._skip_line = b"", False
            self._shutdown(R.R421_BUFFER_FULL, "input buffer full")

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def shutdown(self, reply: Reply = R.R421_SHUTDOWN) -> None:
        """Send a 421 (timeout, server shutdown) and close, whatever the session was doing."""
        if self._state is not State.CLOSED:
            self._shutdown(reply, "shutdown")

    def tls_started(self) -> None:
        """The transport is now TLS: back to the pre-EHLO state (RFC 3207 §4.2)."""
        if self._mode is not _Mode.TLS_WAIT:
            raise UsageError("tls_started() without STARTTLS")
        self._mode = _Mode.COMMAND
        self._tls = True
        self._buf, self._pos = b"", 0
        # RFC 3207 §4.2: forget everything learnt before TLS: EHLO argument, AUTH, envelope
        self._helo, self._extended, self._identity = None, False, None
        self._clear_envelope()
        self._state = State.FRESH

    def next_event(self) -> Event | NeedData:
        if self._events:
            return self._deliver(self._events.popleft())
        if self._waiting is not None:
            raise UsageError(f"{self._waiting.__name__} still waits for an answer")
        for _ in range(1_000_000):  # every step consumes input or changes state
            if self._final is not None:
                return self._final
            ev = self._step()
            if isinstance(ev, NeedData):
                return ev
            if ev is not None:
                return self._deliver(ev)
            if self._events:
                return self._deliver(self._events.popleft())
        raise AssertionError("SMTP core made no progress")  # pragma: no cover

    # App side: answers -------------------------------------------------------------------------------------
    def accept(self) -> None:
        """The default positive answer to the event waiting."""
        kind = self._waiting
        if self._state is State.CLOSED:
            return
        if kind is Hello:
            self.reply(R.R250_OK)
        elif kind is MailFrom:
            self.reply(R.R250_SENDER_OK)
        elif kind is RcptTo:
            self.reply(R.R250_RCPT_OK)
        elif kind is DataStart:
            self.reply(R.R354_START_DATA)
        elif kind is MessageEnd:
            self.reply(R.R250_QUEUED)
        else:
            raise UsageError(f"accept() does not answer {kind}")

    def reply(self, reply: Reply) -> None:
        """Answer the waiting event with one reply (in LMTP, MessageEnd repeats it per recipient)."""
        n = len(self._rcpts) if self.settings.lmtp and self._waiting is MessageEnd else 1
        self._check_answer([reply] * n)
        kind = self._take(Hello, MailFrom, RcptTo, DataStart, MessageEnd, AuthStart, AuthResponse)
        ok = reply.code < 400
        if kind is None:
            return
        if kind is Hello:
            if ok:
                self._helo = self._pending_hello
                self._state = State.READY
                reply = self._hello_reply(reply)
            self._send(reply)
        elif kind is MailFrom:
            if ok:
                assert isinstance(self._pending, MailFrom)
                self._mail, self._state = self._pending, State.MAIL
            self._send(reply)
        elif kind is RcptTo:
            if ok:
                assert isinstance(self._pending, RcptTo)
                self._rcpts.append(self._pending)
            self._send(reply)
        elif kind is DataStart:
            self._data_started(reply)
        elif kind is MessageEnd:
            self._message_answered([reply] * n)
        else:  # AuthStart / AuthResponse
            self._auth_done(reply)

    def reply_many(self, replies: list[Reply]) -> None:
        """LMTP (RFC 2033 §4.2): one reply per accepted recipient, in RCPT order."""
        if not self.settings.lmtp:
            raise UsageError("reply_many() is for LMTP")
        if self._waiting is MessageEnd and len(replies) != len(self._rcpts):
            raise UsageError(f"{len(self._rcpts)} replies expected, got {len(replies)}")
        self._check_answer(replies)
        if self._take(MessageEnd) is None:
            return
        self._message_answered(replies)

    def auth_challenge(self, challenge: bytes) -> None:
        """RFC 4954 §4: send `334 base64` and wait for the client's response line."""
        if self._take(AuthStart, AuthResponse) is None:
            return
        self._queue(Reply(334, "", base64.b64encode(challenge).decode("ascii")))
        self._mode = _Mode.AUTH

    def auth_success(self, identity: str) -> None:
        if self._take(AuthStart, AuthResponse) is None:
            return
        self._identity = identity
        self._auth_done(R.R235_AUTH_OK)

    def auth_fail(self, reply: Reply = R.R535_AUTH_FAILED) -> None:
        if reply.code < 400:
            raise UsageError("auth_fail() needs a 4xx/5xx reply")
        if self._take(AuthStart, AuthResponse) is None:
            return
        self._auth_done(reply)

    # Internals: output -------------------------------------------------------------------------------------
    def _queue(self, reply: Reply) -> None:
        self._out.append(reply.wire)

    def _send(self, reply: Reply) -> None:
        """Queue a reply; errors count towards max_errors (RFC 5321 §4.3.2 lets a server give up)."""
        self._out.append(reply.wire)
        if reply.code == 421:  # RFC 5321 §3.8: 421 announces the close, whoever chose it
            self._close("421 reply")
        elif reply.code >= 400:
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                self._shutdown(R.R421_TOO_MANY_ERRORS, "too many errors")

    def _shutdown(self, reply: Reply, reason: str) -> None:
        if reply.code == 421:  # RFC 5321 §4.2: 421 <domain> Service not available
            reply = Reply(421, reply.enhanced, f"{self.settings.hostname} {reply.text}")
        self._queue(reply)
        self._close(reason)

    def _close(self, reason: str) -> None:
        self._state = State.CLOSED
        self._waiting = None
        self._events.clear()
        self._final = Close(reason)

    def _deliver(self, ev: Event) -> Event:
        if isinstance(ev, _ANSWERED):
            self._waiting = type(ev)
        return ev

    def _take(self, *kinds: type) -> type | None:
        if self._state is State.CLOSED:
            return None  # shut down meanwhile (timeout, server stop): late answers are dropped
        kind = self._waiting
        if kind is None or kind not in kinds:
            raise UsageError(f"no {'/'.join(k.__name__ for k in kinds)} event waits for an answer")
        self._waiting = None
        return kind

    def _check_answer(self, replies: list[Reply]) -> None:
        """Refuse answers that make no sense for the waiting event (before the event is consumed)."""
        kind = self._waiting
        if kind in (AuthStart, AuthResponse) and replies[0].code < 400:
            raise UsageError("use auth_challenge() or auth_success() for positive AUTH answers")
        if kind in (MailFrom, RcptTo, MessageEnd) and any(300 <= r.code < 400 for r in replies):
            raise UsageError(f"{kind.__name__} takes 2xx, 4xx or 5xx replies")
        faulty = kind is MessageEnd and self._reader is not None and self._reader.fault is not None
        if faulty and any(r.code < 400 for r in replies):
            raise UsageError("a message with a problem must not be accepted")

    # Internals: stepping -----------------------------------------------------------------------------------
    def _step(self) -> Event | NeedData | None:
        """One unit of work: an event, NEED_DATA, or None after a reply the core gave by itself."""
        if self._mode is _Mode.DATA:
            return self._step_data()
        if self._mode is _Mode.CHUNK:
            return self._step_chunk()
        if self._mode is _Mode.TLS_WAIT or self._state is State.GREETING:
            return self._need_data()
        line = self._read_line()
        if line is None:
            return self._need_data()
        if not line:  # an overlong line was dropped
            if self._mode is _Mode.AUTH:
                self._auth_done(R.R500_AUTH_LINE_TOO_LONG)
            else:
                self._send(R.R500_LINE_TOO_LONG)
            return None
        try:
            if not line.endswith(b"\r\n") or b"\r" in line[:-2]:
                raise ReplyError(R.R500_BARE_NEWLINE)  # RFC 5321 §2.3.8
            if self._mode is _Mode.AUTH:
                return self._auth_line(line[:-2])
            return self._command(line[:-2])
        except ReplyError as e:
            if self._mode is _Mode.AUTH:
                self._auth_done(e.reply)
            elif e.close:
                self._shutdown(e.reply, "protocol error")
            else:
                self._send(e.reply)
            return None

    def _need_data(self) -> NeedData | None:
        if self._eof:  # whatever is left is an unterminated line or an incomplete message
            self._state, self._waiting, self._final = State.CLOSED, None, ConnectionClosed()
            return None
        return NEED_DATA

    def _read_line(self) -> bytes | None:
        """The next line with its LF, b"" for an overlong line (now skipped), None if incomplete."""
        buf, pos = self._buf, self._pos
        if self._skip_line:
            lf = buf.find(b"\n", pos)
            if lf < 0:
                self._buf, self._pos = b"", 0
                return None
            self._pos, self._skip_line = lf + 1, False
            pos = lf + 1
        limit = self.settings.max_command_line
        if self._mode is _Mode.AUTH or buf[pos : pos + 5].upper() == b"AUTH ":
            limit = max(limit, MAX_AUTH_LINE)  # RFC 4954 §4
        lf = buf.find(b"\n", pos, pos + limit)
        if lf >= 0:
            self._pos = lf + 1
            return buf[pos : lf + 1]
        if len(buf) - pos < limit:
            return None
        # RFC 5321 §4.5.3.1.4: reply 500 now, drop octets up to the next LF
        self._buf, self._pos, self._skip_line = b"", 0, True
        rest = buf[pos + limit :]
        lf = rest.find(b"\n")
        if lf >= 0:
            self._buf, self._skip_line = rest[lf + 1 :], False
        return b""

    def _has_input(self) -> bool:
        return self._pos < len(self._buf)

    def _drop_input(self) -> None:
        self._buf, self._pos = b"", 0

    # Internals: commands -----------------------------------------------------------------------------------
    def _command(self, raw: bytes) -> Event | None:
        try:
            text = raw.decode("utf-8")  # RFC 6531 §3.3: UTF-8 is allowed in MAIL/RCPT arguments
        except UnicodeDecodeError:
            raise ReplyError(R.R500_BAD_UTF8) from None
        word, _, arg = text.partition(" ")
        verb, arg = word.upper(), arg.strip(" ")
        if verb in _FORBIDDEN:
            raise ReplyError(R.R421_FORBIDDEN, close=True)
        if self._has_input():
            if verb in ("STARTTLS", "AUTH"):
                self._drop_input()  # RFC 3207 §4 / RFC 4954 §4: nothing may follow; treat as injection
            elif verb == "QUIT":
                self._drop_input()
            elif verb in _GROUP_END or not self._pipelining_active():
                raise ReplyError(R.R554_SYNC, close=True)  # RFC 2920 §3.1
        if verb not in (_VERBS_LMTP if self.settings.lmtp else _VERBS_SMTP):
            raise ReplyError(R.R500_UNKNOWN)  # RFC 5321 §4.2.4
        if verb not in _LEGAL[self._state]:
            refusal = _REFUSAL.get((self._state, verb)) or _STATE_REFUSAL.get(
                self._state, R.R503_BAD_SEQUENCE
            )
            if verb == "BDAT":  # RFC 3030 §2: the chunk must still be read and discarded
                return self._cmd_bdat(arg, refusal)
            raise ReplyError(refusal)
        return _HANDLERS[verb](self, arg)

    def _pipelining_active(self) -> bool:
        # RFC 2920 §3: only after EHLO advertised it; RFC 2033 §5: LMTP always has it
        return self.settings.pipelining and self._extended

    def _cmd_hello(self, arg: str) -> Event:
        if not arg:
            raise ReplyError(R.R501_SYNTAX.with_text("Syntax: EHLO hostname"))
        # RFC 5321 §4.1.4: EHLO/HELO in a transaction resets it, as RSET would
        self._clear_envelope()
        self._state = State.READY if self._helo is not None else State.FRESH
        self._pending_hello = arg
        return Hello(arg, self._verb_extended)

    def _cmd_ehlo(self, arg: str) -> Event:
        self._verb_extended = True
        return self._cmd_hello(arg)

    def _cmd_helo(self, arg: str) -> Event:
        self._verb_extended = False
        return self._cmd_hello(arg)

    def _hello_reply(self, reply: Reply) -> Reply:
        s = self.settings
        self._extended = self._verb_extended
        key = (s, self._extended, self._tls)
        cached = _HELLO_REPLIES.get(key)
        if cached is None:
            if len(_HELLO_REPLIES) > 256:
                _HELLO_REPLIES.clear()
            cached = _HELLO_REPLIES[key] = self._make_hello_reply()
        return cached

    def _make_hello_reply(self) -> Reply:
        s = self.settings
        if not self._extended:
            return Reply(250, "", s.hostname)  # RFC 5321 §4.1.1.1; RFC 2034 §3: no enhanced code
        caps: list[str] = []
        if s.pipelining:
            caps.append("PIPELINING")  # RFC 2920
        caps.append(f"SIZE {s.max_message_size}")  # RFC 1870 §4
        if s.offer_starttls and not self._tls:
            caps.append("STARTTLS")  # RFC 3207 §4.2: not after TLS
        if self._auth_offered():
            caps.append("AUTH " + " ".join(m.upper() for m in s.auth_mechanisms))  # RFC 4954 §3
        caps.append("ENHANCEDSTATUSCODES")  # RFC 2034
        if s.eightbitmime:
            caps.append("8BITMIME")  # RFC 6152
        if s.binarymime and s.chunking:
            caps.append("BINARYMIME")  # RFC 3030 §3
        if s.dsn:
            caps.append("DSN")  # RFC 3461
        if s.smtputf8:
            caps.append("SMTPUTF8")  # RFC 6531
        if s.chunking:
            caps.append("CHUNKING")  # RFC 3030 §2
        return Reply(250, "", s.hostname, tuple(caps))  # RFC 2034 §3: no enhanced code on EHLO

    def _auth_offered(self) -> bool:
        # DESIGN invariant: AUTH is never offered in clear (RFC 4954 §4 "SHOULD NOT ... without TLS")
        s = self.settings
        return bool(s.auth_mechanisms) and (self._tls or s.allow_auth_plaintext)

    def _cmd_mail(self, arg: str) -> Event:
        s = self.settings
        if s.require_auth and self._identity is None:
            # RFC 4954 §6 530; RFC 3207 §4 when AUTH needs TLS first
            raise ReplyError(R.R530_AUTH_REQUIRED if self._auth_offered() else R.R530_TLS_REQUIRED)
        if arg[:5].upper() != "FROM:":
            raise ReplyError(R.R501_SYNTAX.with_text("Syntax: MAIL FROM:<address>"))
        try:
            path, rest = parse_path(arg[5:].lstrip(" "), null_ok=True, utf8=s.smtputf8)
        except AddressError:
            raise ReplyError(R.R501_BAD_SENDER) from None
        params = self._params(rest)
        for key, value in params.items():
            self._check_mail_param(key, value)
        if path.is_utf8 and "SMTPUTF8" not in params:
            raise ReplyError(R.R553_NEEDS_SMTPUTF8)  # RFC 6531 §3.5
        self._pending = MailFrom(path.mailbox, params, path)
        return self._pending

    def _params(self, rest: str) -> dict[str, str | None]:
        try:
            return parse_params(rest, utf8=self.settings.smtputf8)
        except AddressError:
            raise ReplyError(R.R501_SYNTAX) from None

    def _check_mail_param(self, key: str, value: str | None) -> None:
        s = self.settings
        if key == "SIZE":  # RFC 1870 §3: size-value = 1*20DIGIT
            if value is None or not value.isdigit() or len(value) > 20 or not value.isascii():
                raise ReplyError(R.R501_SYNTAX)
            if int(value) > s.max_message_size:
                raise ReplyError(R.R552_TOO_BIG)  # RFC 1870 §6.3
        elif key == "BODY":  # RFC 6152 §2, RFC 3030 §3
            body = (value or "").upper()
            if not (
                body == "7BIT"
                or (body == "8BITMIME" and s.eightbitmime)
                or (body == "BINARYMIME" and s.binarymime and s.chunking)
            ):
                raise ReplyError(R.R555_PARAM)
        elif key == "SMTPUTF8":  # RFC 6531 §3.4: no value
            if value is not None or not s.smtputf8:
                raise ReplyError(R.R555_PARAM)
        elif key == "RET":  # RFC 3461 §4.3
            if (value or "").upper() not in ("FULL", "HDRS"):
                raise ReplyError(R.R501_SYNTAX)
        elif key in ("ENVID", "AUTH"):  # RFC 3461 §4.4 (100 chars max), RFC 4954 §5
            self._xtext(value, 100 if key == "ENVID" else 500)
        else:
            raise ReplyError(R.R555_PARAM)  # RFC 5321 §4.1.1.11

    @staticmethod
    def _xtext(value: str | None, limit: int) -> None:
        if value is None or len(value) > limit:
            raise ReplyError(R.R501_SYNTAX)
        try:
            xtext_decode(value)
        except AddressError:
            raise ReplyError(R.R501_SYNTAX) from None

    def _cmd_rcpt(self, arg: str) -> Event:
        s = self.settings
        if len(self._rcpts) >= s.max_recipients:
            raise ReplyError(R.R452_TOO_MANY_RCPT)  # RFC 5321 §4.5.3.1.10
        if arg[:3].upper() != "TO:":
            raise ReplyError(R.R501_SYNTAX.with_text("Syntax: RCPT TO:<address>"))
        try:
            path, rest = parse_path(arg[3:].lstrip(" "), postmaster_ok=True, utf8=s.smtputf8)
        except AddressError:
            raise ReplyError(R.R501_BAD_RCPT) from None
        params = self._params(rest)
        for key, value in params.items():
            if key == "NOTIFY":  # RFC 3461 §4.1
                words = set((value or "").upper().split(","))
                if words != {"NEVER"} and not (words and words <= _DSN_NOTIFY):
                    raise ReplyError(R.R501_SYNTAX)
            elif key == "ORCPT":  # RFC 3461 §4.2: addr-type ";" xtext
                kind, semi, orcpt = (value or "").partition(";")
                if not semi or not kind:
                    raise ReplyError(R.R501_SYNTAX)
                self._xtext(orcpt, 500)
            else:
                raise ReplyError(R.R555_PARAM)
        assert self._mail is not None
        if path.is_utf8 and "SMTPUTF8" not in self._mail.params:
            raise ReplyError(R.R553_NEEDS_SMTPUTF8)  # RFC 6531 §3.5
        self._pending = RcptTo(path.mailbox, params, path)
        return self._pending

    def _no_rcpt_reply(self) -> Reply | None:
        if self._rcpts:
            return None
        # RFC 2033 §4.2: LMTP answers 503; RFC 5321 §3.3 allows 554 "no valid recipients"
        if self.settings.lmtp:
            return R.R503_BAD_SEQUENCE.with_text("No valid recipients")
        return R.R554_NO_VALID_RCPT

    def _cmd_data(self, arg: str) -> Event:
        if arg:
            raise ReplyError(R.R501_SYNTAX)
        if refusal := self._no_rcpt_reply():
            raise ReplyError(refusal)
        assert self._mail is not None
        if (self._mail.params.get("BODY") or "").upper() == "BINARYMIME":
            raise ReplyError(R.R503_BINARY_NEEDS_BDAT)  # RFC 3030 §3
        self._data_is_bdat = False
        return DataStart(False)

    def _cmd_bdat(self, arg: str, refusal: Reply | None = None) -> Event | None:
        m = _BDAT_ARG.fullmatch(arg)
        if m is None:
            # without a size the chunk cannot be skipped: its octets would run as commands
            raise ReplyError(R.R501_SYNTAX.with_text("Syntax: BDAT size [LAST]"), close=True)
        self._chunk_size = self._chunk_left = int(m.group(1))
        self._chunk_last = m.group(2) is not None
        self._mode = _Mode.CHUNK
        self._chunk_skip = refusal or self._bdat_failed
        if self._chunk_skip is None and self._state is State.MAIL:
            self._chunk_skip = self._no_rcpt_reply()
            if self._chunk_skip is None:
                self._data_is_bdat = True
                return DataStart(True)
        return None

    def _cmd_rset(self, arg: str) -> Event:
        if arg:
            raise ReplyError(R.R501_SYNTAX)
        # RFC 5321 §4.1.1.5: RSET clears the envelope, keeps the EHLO
        self._clear_envelope()
        if self._helo is not None:
            self._state = State.READY
        self._send(R.R250_OK)
        return Reset()

    def _cmd_noop(self, arg: str) -> None:
        self._send(R.R250_OK)  # RFC 5321 §4.1.1.9: the argument is ignored

    def _cmd_quit(self, arg: str) -> Event:
        if arg:
            raise ReplyError(R.R501_SYNTAX)
        self._queue(R.R221_BYE)  # RFC 5321 §4.1.1.10
        self._close("quit")
        return Quit()

    def _cmd_vrfy(self, arg: str) -> None:
        if not arg:
            raise ReplyError(R.R501_SYNTAX)
        self._send(R.R252_CANNOT_VRFY)  # RFC 5321 §3.5.3: no user enumeration

    def _cmd_expn(self, arg: str) -> None:
        self._send(R.R502_NOT_IMPLEMENTED)  # RFC 5321 §3.5.2 allows refusing EXPN

    def _cmd_help(self, arg: str) -> None:
        self._send(R.help_reply(self._help_commands()))

    def _help_commands(self) -> list[str]:
        """RFC 5321 §4.1.1.8: the commands this session accepts (LMTP: LHLO, RFC 2033 §4.1; STARTTLS
        and AUTH only where they are offered, so port 25 does not list AUTH)."""
        s = self.settings
        cmds = ["LHLO"] if s.lmtp else ["EHLO", "HELO"]
        cmds += ["MAIL", "RCPT", "DATA"] + (["BDAT"] if s.chunking else []) + ["RSET", "NOOP", "QUIT", "VRFY"]
        if s.offer_starttls and not self._tls:
            cmds.append("STARTTLS")
        if s.auth_mechanisms:
            cmds.append("AUTH")
        return [*cmds, "HELP"]

    def _cmd_starttls(self, arg: str) -> Event:
        if arg:
            raise ReplyError(R.R501_SYNTAX)
        if not self.settings.offer_starttls:
            raise ReplyError(R.R502_NOT_IMPLEMENTED)
        if self._tls:
            raise ReplyError(R.R503_TLS_ACTIVE)
        self._queue(R.R220_TLS_READY)
        self._drop_input()
        self._mode = _Mode.TLS_WAIT
        return StartTLS()

    def _cmd_auth(self, arg: str) -> Event:
        s = self.settings
        if not self._auth_offered():
            raise ReplyError(R.R538_ENCRYPTION_REQUIRED if s.auth_mechanisms else R.R503_AUTH_DISABLED)
        if self._identity is not None:
            raise ReplyError(R.R503_ALREADY_AUTH)  # RFC 4954 §4
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        if not _SASL_MECH.fullmatch(mech):
            raise ReplyError(R.R501_SYNTAX)
        if mech not in (m.upper() for m in s.auth_mechanisms):
            raise ReplyError(R.R504_AUTH_MECH)
        initial = initial.strip(" ")
        if initial == "*":
            raise ReplyError(R.R501_AUTH_CANCELLED)
        return AuthStart(mech, _b64(initial) if initial else None)  # RFC 4954 §4: "=" is empty

    def _auth_line(self, raw: bytes) -> Event:
        self._drop_input()  # the client must wait for our next 334/235: anything more is injected
        if raw == b"*":
            raise ReplyError(R.R501_AUTH_CANCELLED)  # RFC 4954 §4
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ReplyError(R.R501_BAD_BASE64) from None
        self._mode = _Mode.COMMAND
        return AuthResponse(_b64(text) if text else b"")

    def _auth_done(self, reply: Reply) -> None:
        self._mode = _Mode.COMMAND
        self._send(reply)

    # Internals: message content ----------------------------------------------------------------------------
    def _data_started(self, reply: Reply) -> None:
        s = self.settings
        ok = reply.code < 400
        if self._data_is_bdat:
            if ok:
                assert self._mail is not None
                binary = (self._mail.params.get("BODY") or "").upper() == "BINARYMIME"
                self._reader = ChunkReader(s.max_message_size, s.max_data_line, binary)
                self._state = State.BDAT
            else:
                self._bdat_failed = self._chunk_skip = reply  # RFC 3030 §2: later chunks fail too
                self._state = State.BDAT
            return
        if ok:
            self._queue(reply if reply.code == 354 else R.R354_START_DATA)
            self._reader = DotReader(s.max_message_size, s.max_data_line)
            self._mode = _Mode.DATA
        else:
            self._mode = _Mode.COMMAND
            self._send(reply)

    def _problem(self, fault: Fault | None) -> Reply | None:
        if fault is Fault.BARE_NEWLINE:
            return R.R554_BARE_NEWLINE
        if fault is Fault.LINE_TOO_LONG:
            return R.R554_LINE_TOO_LONG
        if fault is Fault.TOO_BIG:
            return R.R552_TOO_BIG
        return None

    def _step_data(self) -> Event | NeedData | None:
        reader = self._reader
        assert isinstance(reader, DotReader)
        if not self._has_input():
            return self._need_data()
        chunk = self._buf[self._pos :] if self._pos else self._buf
        out, used, done = reader.feed(chunk)
        self._pos += used
        if done:
            self._mode = _Mode.COMMAND
            self._events.append(MessageEnd(self._problem(reader.fault)))
        return MessageData(out) if out else None

    def _step_chunk(self) -> Event | NeedData | None:
        n = min(len(self._buf) - self._pos, self._chunk_left)
        if n == 0 and self._chunk_left:
            return self._need_data()
        out = b""
        if n:
            piece = self._buf[self._pos : self._pos + n]
            self._pos += n
            self._chunk_left -= n
            if self._chunk_skip is None:
                assert isinstance(self._reader, ChunkReader)
                out = self._reader.feed(piece)
        if self._chunk_left == 0:
            self._chunk_done()
        return MessageData(out) if out else None

    def _chunk_done(self) -> None:
        self._mode = _Mode.COMMAND
        if (skip := self._chunk_skip) is not None:
            self._chunk_skip = None
            if self._chunk_last and self._state in (State.MAIL, State.BDAT):
                self._clear_envelope()  # RFC 3030 §2: the failed transaction ends with LAST
                self._state = State.READY
            self._send(skip)
        elif self._chunk_last:
            assert isinstance(self._reader, ChunkReader)
            self._reader.finish()
            self._events.append(MessageEnd(self._problem(self._reader.fault)))
            return
        else:
            self._send(Reply(250, "2.0.0", f"{self._chunk_size} octets received"))  # RFC 3030 §2
        if self._has_input() and not self._pipelining_active() and self._state is not State.CLOSED:
            self._shutdown(R.R554_SYNC, "improper pipelining")  # RFC 2920 §3.1

    def _message_answered(self, answers: list[Reply]) -> None:
        self._reader = None
        self._clear_envelope()  # RFC 5321 §4.1.1.4: the transaction ends with the reply
        self._state = State.READY
        if any(r.code < 400 for r in answers):
            self._errors = 0  # a delivered message forgives earlier mistakes
        for r in answers:
            if self._state is not State.CLOSED:
                self._send(r)


_HANDLERS: Final[dict[str, Callable[[ServerConnection, str], Event | None]]] = {
    "EHLO": ServerConnection._cmd_ehlo,
    "LHLO": ServerConnection._cmd_ehlo,
    "HELO": ServerConnection._cmd_helo,
    "MAIL": ServerConnection._cmd_mail,
    "RCPT": ServerConnection._cmd_rcpt,
    "DATA": ServerConnection._cmd_data,
    "BDAT": ServerConnection._cmd_bdat,
    "RSET": ServerConnection._cmd_rset,
    "NOOP": ServerConnection._cmd_noop,
    "QUIT": ServerConnection._cmd_quit,
    "VRFY": ServerConnection._cmd_vrfy,
    "EXPN": ServerConnection._cmd_expn,
    "HELP": ServerConnection._cmd_help,
    "STARTTLS": ServerConnection._cmd_starttls,
    "AUTH": ServerConnection._cmd_auth,
}
