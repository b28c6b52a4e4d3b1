"""Sans-IO ManageSieve server session (RFC 5804): bytes in, events out, replies serialised here.

Shape of h11 and ``proto/pop3``: ``receive_data()``, ``next_event()`` (an event or ``NEED_DATA``),
``data_to_send()``. The core answers CAPABILITY, NOOP, LOGOUT, UNAUTHENTICATE, STARTTLS's OK and syntax
errors itself; anything that needs TLS, passwords or the script store is an event the application
answers through ``ok()``/``no()``/``script()``/``listing()``. AUTHENTICATE is framed here (the
mechanism name, base64 responses, the client's cancel) and run by the application, with the same
``proto.sasl.ServerExchange`` and ``server/auth.settle`` as every other protocol: ``AuthStart`` and
``AuthResponse`` out, ``auth_challenge()``/``auth_success()``/``auth_failure()``/``bye()`` back.

Every buffer is bounded: a line is at most ``max_line`` octets, a literal (RFC 5804 §4 ``{n+}`` or
``{n}``) is *signalled* with ``NeedLiteral`` before it is read: the application accepts it
(``accept_literal()``) or refuses it (``reject_literal()``: the octets the client sends anyway are
counted away unstored and the command gets ``NO (QUOTA/MAXSIZE)``). Legal commands per state are data
(``_LEGAL``). SASL is refused before TLS unless ``allow_plaintext`` (RFC 5804 §2.1).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final


__all__ = [
    "NEED_DATA", "AuthResponse", "AuthStart", "Authenticated", "Event", "Logout", "ManageSieveConnection",
    "ManageSieveSettings", "NeedLiteral", "ScriptCommand", "StartTLS", "State",
]


class _Sentinel:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _Sentinel()


class State(enum.Enum):
    NONAUTH = "nonauth"
    AUTH = "auth"
    LOGOUT = "logout"


@dataclass(frozen=True, slots=True)
class ManageSieveSettings:
    implementation: str = "postier"
    sieve_extensions: tuple[str, ...] = ()
    mechanisms: tuple[str, ...] = ("PLAIN", "SCRAM-SHA-256")
    tls_available: bool = True
    allow_plaintext: bool = False
    max_line: int = 8192
    max_literal: int = 1 << 20
    max_redirects: int = 4
    notify: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Start TLS now (the OK is already queued); then call ``tls_started()``."""


@dataclass(frozen=True, slots=True)
class AuthStart:
    """AUTHENTICATE with a mechanism among ``settings.mechanisms`` and its decoded initial response
    (None: none sent); answer with ``auth_challenge()``, ``auth_success()``, ``auth_failure()`` or
    ``bye()``."""

    mechanism: str
    initial: bytes | None


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """The client's decoded answer to the last ``auth_challenge()``; answered the same way."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Authenticated:
    user: str


@dataclass(frozen=True, slots=True)
class NeedLiteral:
    """The client announced a literal of ``size`` octets for ``command``."""

    command: str
    size: int


@dataclass(frozen=True, slots=True)
class ScriptCommand:
    """PUTSCRIPT, CHECKSCRIPT, HAVESPACE, SETACTIVE, GETSCRIPT, LISTSCRIPTS, DELETESCRIPT or
    RENAMESCRIPT with its arguments (strings as bytes, numbers as int); answer with one reply."""

    name: str
    args: tuple[bytes | int, ...]


@dataclass(frozen=True, slots=True)
class Logout:
    """BYE or OK sent; close the connection once ``data_to_send()`` is flushed."""


Event = StartTLS | AuthStart | AuthResponse | Authenticated | NeedLiteral | ScriptCommand | Logout


class ProtocolError(Exception):
    pass


# RFC 5804 §2: commands and their arguments ("s" string, "n" number), by state.
_ARGS: dict[str, tuple[str, ...]] = {
    "CAPABILITY": (), "LOGOUT": (), "NOOP": ("s?",), "STARTTLS": (), "AUTHENTICATE": ("s", "s?"),
    "UNAUTHENTICATE": (), "PUTSCRIPT": ("s", "s"), "CHECKSCRIPT": ("s",), "HAVESPACE": ("s", "n"),
    "SETACTIVE": ("s",), "GETSCRIPT": ("s",), "LISTSCRIPTS": (), "DELETESCRIPT": ("s",),
    "RENAMESCRIPT": ("s", "s"),
}
_LEGAL: dict[State, frozenset[str]] = {
    State.NONAUTH: frozenset({"CAPABILITY", "LOGOUT", "NOOP", "STARTTLS", "AUTHENTICATE"}),
    State.AUTH: frozenset({"CAPABILITY", "LOGOUT", "NOOP", "UNAUTHENTICATE", "PUTSCRIPT", "CHECKSCRIPT",
                           "HAVESPACE", "SETACTIVE", "GETSCRIPT", "LISTSCRIPTS", "DELETESCRIPT",
                           "RENAMESCRIPT"}),
    State.LOGOUT: frozenset(),
}
_SCRIPT_COMMANDS = frozenset({"PUTSCRIPT", "CHECKSCRIPT", "HAVESPACE", "SETACTIVE", "GETSCRIPT",
                              "LISTSCRIPTS", "DELETESCRIPT", "RENAMESCRIPT"})
_LITERAL = re.compile(rb"\{(\d{1,10})(\+?)\}\Z")
_ATOM = re.compile(rb"[A-Za-z]+")


def quote(data: bytes) -> bytes:
    """RFC 5804 §4 string: quoted when short and plain, else a literal."""
    if len(data) < 1024 and b"\r" not in data and b"\n" not in data and b"\0" not in data:
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def _response(kind: str, code: str | None, text: str | bytes) -> bytes:
    out = kind.encode()
    if code:
        out += b" (" + code.encode() + b")"
    msg = text.encode("utf-8") if isinstance(text, str) else text
    if msg:
        out += b" " + quote(msg)
    return out + b"\r\n"


class ManageSieveConnection:
    def __init__(self, settings: ManageSieveSettings, *, tls_active: bool = False) -> None:
        self.settings = settings
        self.tls_active = tls_active
        self.state = State.NONAUTH
        self.user: str | None = None
        self._in = bytearray()
        self._out = bytearray()
        self._events: list[Event] = []
        self._line_args: list[bytes | int] = []
        self._line_buf = bytearray()  # the current command, collected across literals
        self._literal: int | None = None  # octets of an accepted literal still to read
        self._skip = 0  # octets of a refused literal still to drop
        self._pending_literal: tuple[int, bool] | None = None
        self._skipping_command = False
        self._awaiting_reply: str | None = None
        self._sasl_pending = False  # an AuthStart/AuthResponse waits for the application's answer
        self._sasl_wait = False  # waiting for a client SASL response line
        self._out += self.capability_lines() + _response("OK", None, f"{settings.implementation} ready")

    # -- I/O ----------------------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        self._in += data

    @property
    def partial_input(self) -> bool:
        """True while a command is partly received (part of a line, a literal being read or
        skipped): the driver then bounds the time until it is complete (slowloris)."""
        return bool(self._in) or self._literal is not None or self._skip > 0 or bool(self._line_args)

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | _Sentinel:
        while not self._events:
            if self.state is State.LOGOUT or self._awaiting_reply or self._pending_literal or self._sasl_pending:
                return NEED_DATA
            if not self._step():
                return NEED_DATA
        return self._events.pop(0)

    # -- capability (RFC 5804 §1.7) ----------------------------------------------------------------

    def capability_lines(self) -> bytes:
        s = self.settings
        lines: list[tuple[bytes, bytes | None]] = [(b"IMPLEMENTATION", s.implementation.encode())]
        sasl_ok = self.tls_active or s.allow_plaintext
        lines.append((b"SASL", " ".join(s.mechanisms if sasl_ok and self.state is State.NONAUTH
                                       else ()).encode()))
        lines.append((b"SIEVE", " ".join(s.sieve_extensions).encode()))
        if s.tls_available and not self.tls_active and self.state is State.NONAUTH:
            lines.append((b"STARTTLS", None))
        lines.append((b"MAXREDIRECTS", str(s.max_redirects).encode()))
        if s.notify:
            lines.append((b"NOTIFY", " ".join(s.notify).encode()))
        if self.user is not None:
            lines.append((b"OWNER", self.user.encode()))
        lines.append((b"VERSION", b"1.0"))
        return b"".join(quote(k) + (b" " + quote(v) if v is not None else b"") + b"\r\n" for k, v in lines)

    # -- replies from the application ---------------------------------------------------------------

    def _replied(self) -> None:
        if self._awaiting_reply is None:
            raise RuntimeError("no command waits for a reply")
        self._awaiting_reply = None

    def ok(self, text: str = "", code: str | None = None) -> None:
        self._replied()
        self._out += _response("OK", code, text)

    def no(self, text: str, code: str | None = None) -> None:
        self._replied()
        self._out += _response("NO", code, text)

    def script(self, data: bytes) -> None:
        """GETSCRIPT answer (RFC 5804 §2.9): the script as a literal, then OK."""
        self._replied()
        self._out += b"{%d}\r\n" % len(data) + data + b"\r\n" + _response("OK", None, "")

    def listing(self, scripts: Iterable[tuple[str, bool]]) -> None:
        """LISTSCRIPTS answer (RFC 5804 §2.7)."""
        self._replied()
        for name, active in scripts:
            self._out += quote(name.encode("utf-8")) + (b" ACTIVE" if active else b"") + b"\r\n"
        self._out += _response("OK", None, "")

    def drop_input(self) -> int:
        """Discard buffered, unread input (call on StartTLS: plaintext pipelined after STARTTLS must
        not be read as if it came over TLS). Returns the number of octets dropped."""
        n = len(self._in)
        self._in.clear()
        return n

    def tls_started(self) -> None:
        """RFC 5804 §2.2: after TLS the server sends its capabilities again."""
        self.tls_active = True
        self._out += self.capability_lines() + _response("OK", None, "TLS active")

    def accept_literal(self) -> None:
        if self._pending_literal is None:
            raise RuntimeError("no literal pending")
        self._literal = self._pending_literal[0]
        self._pending_literal = None

    def reject_literal(self) -> None:
        if self._pending_literal is None:
            raise RuntimeError("no literal pending")
        self._skip = self._pending_literal[0]
        self._pending_literal = None
        self._skipping_command = True

    def _auth_answered(self) -> None:
        if not self._sasl_pending:
            raise RuntimeError("no authentication step waits for an answer")
        self._sasl_pending = False

    def auth_challenge(self, data: bytes) -> None:
        """RFC 5804 §2.1: a server challenge (base64 in a string); the client's line comes back as
        ``AuthResponse``."""
        self._auth_answered()
        self._out += quote(base64.b64encode(data)) + b"\r\n"
        self._sasl_wait = True

    def auth_success(self, user: str, additional: bytes | None = None) -> None:
        """Authenticated as ``user``; ``additional`` (SCRAM's server signature) goes in the OK."""
        self._auth_answered()
        self.state = State.AUTH
        self.user = user
        code = None
        if additional is not None:  # RFC 5804 §2.1: additional data in the OK response code
            code = 'SASL "' + base64.b64encode(additional).decode("ascii") + '"'
        self._out += _response("OK", code, "Authenticated")
        self._events.append(Authenticated(user))

    def auth_failure(self) -> None:
        self._auth_answered()
        self._sasl_fail("authentication failed")

    def auth_unavailable(self, text: str = "Authentication is impossible right now; try again later") -> None:
        """The credentials could not be checked (the account database is out of reach): not a
        failure of the client's. RFC 5804 §1.3 TRYLATER: the client may try the same again later."""
        self._auth_answered()
        self._sasl_wait = False
        self._out += _response("NO", "TRYLATER", text)

    def bye(self, text: str) -> None:
        """End the session (RFC 5804 §1.3 BYE), e.g. too many failed logins; ``Logout`` follows."""
        self._sasl_pending = False
        self._sasl_wait = False
        self._out += _response("BYE", None, text)
        self.state = State.LOGOUT
        self._events.append(Logout())

    # -- framing ------------------------------------------------------------------------------------

    def _step(self) -> bool:
        """Consume input; False when more data is needed."""
        if self._skip:
            if not self._in:
                return False
            n = min(self._skip, len(self._in))
            del self._in[:n]
            self._skip -= n
            return True
        if self._literal is not None:
            if len(self._in) < self._literal:
                return False
            self._line_args.append(bytes(self._in[: self._literal]))
            del self._in[: self._literal]
            self._literal = None
        end = self._in.find(b"\n")
        if end < 0:
            if len(self._in) > self.settings.max_line:
                self._in.clear()
                self._reset_command()
                self._out += _response("NO", None, "line too long")
            return False
        raw = bytes(self._in[:end])
        del self._in[: end + 1]
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if len(line) > self.settings.max_line:
            self._reset_command()
            self._out += _response("NO", None, "line too long")
            return True
        if self._sasl_wait:
            self._sasl_line(line)
            return True
        if self._skipping_command:
            if _LITERAL.search(line):  # a further refused literal of the same command
                m = _LITERAL.search(line)
                assert m is not None
                self._skip = int(m.group(1))
                return True
            self._reset_command()
            self._out += _response("NO", "QUOTA/MAXSIZE", "literal too large")
            return True
        try:
            self._line(line)
        except ProtocolError as e:
            self._reset_command()
            self._out += _response("NO", None, str(e))
        return True

    def _reset_command(self) -> None:
        self._line_args = []
        self._line_buf.clear()
        self._skipping_command = False

    def _line(self, line: bytes) -> None:
        tokens, literal = self._tokens(line)
        self._line_buf += line
        self._line_args.extend(tokens)
        if literal is not None:
            size, _ = literal
            name = self._line_args[0] if self._line_args else b""
            command = name.decode("ascii", "replace").upper() if isinstance(name, bytes) else ""
            self._pending_literal = literal
            if size > self.settings.max_literal:
                self.reject_literal()
                return
            self._events.append(NeedLiteral(command, size))
            return
        args = self._line_args
        self._reset_command()
        self._dispatch(args)

    def _tokens(self, line: bytes) -> tuple[list[bytes | int], tuple[int, bool] | None]:
        out: list[bytes | int] = []
        i, n = 0, len(line)
        while i < n:
            c = line[i : i + 1]
            if c == b" ":
                i += 1
                continue
            if c == b'"':
                j = i + 1
                buf = bytearray()
                while True:
                    if j >= n:
                        raise ProtocolError("unterminated string")
                    ch = line[j : j + 1]
                    if ch == b"\\" and j + 1 < n and line[j + 1 : j + 2] in (b"\\", b'"'):
                        buf += line[j + 1 : j + 2]
                        j += 2
                        continue
                    if ch == b'"':
                        break
                    buf += ch
                    j += 1
                out.append(bytes(buf))
                i = j + 1
                continue
            if c == b"{":
                m = _LITERAL.search(line, i)
                if m is None or m.start() != i:
                    raise ProtocolError("bad literal")
                return out, (int(m.group(1)), m.group(2) == b"+")
            j = i
            while j < n and line[j : j + 1] != b" ":
                j += 1
            word = line[i:j]
            if word.isdigit():
                out.append(int(word))
            elif _ATOM.fullmatch(word):
                out.append(word)  # a command name; only valid first
            else:
                raise ProtocolError(f"unexpected {word.decode('ascii', 'replace')!r}")
            i = j
        return out, None

    # -- commands -----------------------------------------------------------------------------------

    def _dispatch(self, args: list[bytes | int]) -> None:
        if not args:
            raise ProtocolError("empty command")
        head = args[0]
        if not isinstance(head, bytes) or not _ATOM.fullmatch(head):
            raise ProtocolError("expected a command")
        name = head.decode("ascii").upper()
        if name not in _ARGS:
            raise ProtocolError(f"unknown command {name}")
        if name not in _LEGAL[self.state]:
            raise ProtocolError(f"{name} not allowed now")
        values = args[1:]
        spec = _ARGS[name]
        required = [s for s in spec if not s.endswith("?")]
        if not len(required) <= len(values) <= len(spec):
            raise ProtocolError(f"wrong number of arguments for {name}")
        for want, got in zip(spec, values, strict=False):
            if want.startswith("n") and not isinstance(got, int):
                raise ProtocolError(f"{name} expects a number")
            if want.startswith("s") and not isinstance(got, bytes):
                raise ProtocolError(f"{name} expects a string")
        getattr(self, "_cmd_" + name.lower(), self._cmd_script)(name, values)

    def _cmd_capability(self, name: str, args: Sequence[bytes | int]) -> None:
        self._out += self.capability_lines() + _response("OK", None, "")

    def _cmd_noop(self, name: str, args: Sequence[bytes | int]) -> None:
        if args:  # RFC 5804 §2.13: the tag is echoed
            tag = args[0]
            assert isinstance(tag, bytes)
            self._out += b"OK (TAG " + quote(tag) + b') "Done"\r\n'
        else:
            self._out += _response("OK", None, "Done")

    def _cmd_logout(self, name: str, args: Sequence[bytes | int]) -> None:
        self._out += _response("OK", None, "Logout completed")
        self.state = State.LOGOUT
        self._events.append(Logout())

    def _cmd_starttls(self, name: str, args: Sequence[bytes | int]) -> None:
        if self.tls_active or not self.settings.tls_available:
            raise ProtocolError("TLS not available")
        self._out += _response("OK", None, "Begin TLS negotiation")
        self._events.append(StartTLS())

    def _cmd_unauthenticate(self, name: str, args: Sequence[bytes | int]) -> None:
        self.state = State.NONAUTH  # RFC 5804 §2.14.1
        self.user = None
        self._out += _response("OK", None, "")

    def _cmd_authenticate(self, name: str, args: Sequence[bytes | int]) -> None:
        if not (self.tls_active or self.settings.allow_plaintext):  # RFC 5804 §2.1
            self._out += _response("NO", "ENCRYPT-NEEDED", "authentication needs TLS")
            return
        mech_name = bytes(args[0]).decode("ascii", "replace") if isinstance(args[0], bytes) else ""
        if mech_name.upper() not in (m.upper() for m in self.settings.mechanisms):
            self._out += _response("NO", None, "unsupported mechanism")
            return
        initial: bytes | None = None
        if len(args) > 1:
            try:
                initial = base64.b64decode(bytes(args[1]) if isinstance(args[1], bytes) else b"", validate=True)
            except (binascii.Error, ValueError):
                self._sasl_fail("bad base64")
                return
        self._sasl_pending = True
        self._events.append(AuthStart(mech_name.upper(), initial))

    def _sasl_line(self, line: bytes) -> None:
        self._sasl_wait = False
        try:
            tokens, literal = self._tokens(line)
        except ProtocolError:
            self._sasl_fail("bad response")
            return
        if literal is not None or len(tokens) != 1 or not isinstance(tokens[0], bytes):
            self._sasl_fail("bad response")
            return
        data = tokens[0]
        if data == b"*":  # RFC 5804 §2.1: the client cancels
            self._sasl_fail("cancelled")
            return
        try:
            decoded = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            self._sasl_fail("bad base64")
            return
        self._sasl_pending = True
        self._events.append(AuthResponse(decoded))

    def _sasl_fail(self, why: str) -> None:
        self._sasl_wait = False
        self._out += _response("NO", None, "Authentication failed")

    def _cmd_script(self, name: str, args: Sequence[bytes | int]) -> None:
        self._awaiting_reply = name
        self._events.append(ScriptCommand(name, tuple(args)))

