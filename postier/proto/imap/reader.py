"""Sans-IO IMAP command reader (RFC 9051 §2.2, §4.3 literals, RFC 7888 LITERAL+/LITERAL-).

Bytes in, events out, in the style of h11::

    reader = CommandReader(ReaderLimits())
    reader.feed(data)
    while (event := reader.next_event()) is not None:   # may raise ParseError
        match event:
            case NeedContinuation(): ...  # call accept_literal() and send "+ Ready", or reject_literal()
            case RawLine(data=line): ...  # IDLE's DONE or an AUTHENTICATE response
            case Command(): ...

The reader only frames: it collects one command's lines and literals (never more than the limits)
and hands the whole to ``parse_command``. A synchronising literal ``{n}`` is *signalled*, not read:
the server decides whether to send "+" (RFC 9051 §7.5). An APPEND literal of at least
``limits.spool_from`` octets is not kept either: when the server has set ``reader.spool``, its
octets go to the ``SpooledLiteral`` that ``spool(size)`` returns as they arrive, so one command
holds at most a read's worth of such a literal in memory; the parsed command carries the spooled
object, and the server discards it when done (the reader discards those of a command that fails
to parse, and all on ``close()``). Literals over ``limits.max_literal`` are
refused by the reader itself with ``ParseError(code="TOOBIG")`` and no "+" is ever needed. After any
ParseError the reader has resynchronised on the next command: a too-long line is skipped up to its
LF, and a refused non-synchronising literal ``{n+}`` (which the client sends anyway) is counted
away without being stored. Call ``next_event`` until it returns None after every ``feed``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto

from .commands import Command, SpooledLiteral
from .errors import ParseError
from .parser import DEFAULT_MAX_DEPTH, parse_command, read_tag

__all__ = ["CommandReader", "NeedContinuation", "RawLine", "ReaderLimits"]

_LITERAL_AT_END = re.compile(rb"(~?)\{(\d+)(\+?)\}\Z")
_COMMAND_WORDS = re.compile(rb"[^ ]+ ([A-Za-z]+)(?: ([A-Za-z]+))?")
_TAIL = 48  # bytes of a skipped line kept to spot a trailing {n+}


@dataclass(frozen=True, slots=True)
class ReaderLimits:
    """Caps on what one command may make the reader hold (DESIGN: every buffer bounded).

    ``max_line``: one line (between literals), CRLF excluded. ``max_literal``: one literal.
    ``max_command``: all lines and literals of one command together. ``max_nonsync``: 4096 when the
    server advertises LITERAL- (RFC 7888 §5) rather than LITERAL+, else None. ``max_depth``:
    parenthesis nesting.
    """

    max_line: int = 64 * 1024  # Dovecot's imap_max_line_length; a long ID or SEARCH fits
    max_literal: int = 64 * 1024
    max_command: int = 128 * 1024
    max_literals: int = 64
    max_nonsync: int | None = None
    max_depth: int = DEFAULT_MAX_DEPTH
    spool_from: int | None = None  # APPEND literals this large go to ``reader.spool`` (None: never)
    max_spooled: int = 0  # all spooled literals of one command together

    @classmethod
    def authenticated(cls, append_limit: int, *, max_nonsync: int | None = None) -> ReaderLimits:
        """Limits after login: literals up to the APPENDLIMIT (RFC 7889); APPEND literals of 64 KiB
        or more spooled, at most four APPENDLIMITs of them per command (RFC 3502 MULTIAPPEND)."""
        return cls(max_literal=append_limit, max_command=append_limit + 128 * 1024,
                   max_nonsync=max_nonsync, spool_from=64 * 1024, max_spooled=4 * append_limit)


@dataclass(frozen=True, slots=True)
class NeedContinuation:
    """The client announced a synchronising literal and waits for "+" (RFC 9051 §7.5).

    ``command`` is the upper-cased command word ("APPEND", "LOGIN", "UID FETCH"...), best effort,
    so the server can apply a per-command limit (APPENDLIMIT, quota) before accepting.
    """

    tag: str | None
    command: str
    size: int
    binary: bool  # literal8 "~{n}" (RFC 3516 §4.4)


@dataclass(frozen=True, slots=True)
class RawLine:
    """A line read after ``expect_line()``: DONE for IDLE, a SASL response for AUTHENTICATE."""

    data: bytes  # without the line terminator


class _Mode(Enum):
    LINE = auto()
    LITERAL = auto()
    WAIT = auto()  # a synchronising literal awaits accept_literal()/reject_literal()
    SKIP_LINE = auto()
    SKIP_LITERAL = auto()


class CommandReader:
    """Frames client bytes into commands; see the module docstring for the protocol."""

    def __init__(self, limits: ReaderLimits | None = None, *, utf8: bool = False) -> None:
        self.limits = limits or ReaderLimits()
        self.utf8 = utf8  # mailbox names in UTF-8 (IMAP4rev2 / UTF8=ACCEPT enabled) or mUTF-7
        self._buf = bytearray()
        self._scan_from = 0
        self._cmd = bytearray()
        self._literals = 0
        self._mode = _Mode.LINE
        self._remaining = 0
        self._pending: NeedContinuation | None = None
        self._skip_tail = b""
        self._raw = False
        #: Where large APPEND literals go (set by the server once a user is logged in).
        self.spool: Callable[[int], SpooledLiteral] | None = None
        self._spooled: dict[int, SpooledLiteral] = {}  # of the command being read, by offset in _cmd
        self._spooled_size = 0
        self._sink: SpooledLiteral | None = None  # the literal being received goes here
        self._pending_spool = False

    # -- driver API -----------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not consumed yet (the command being assembled excluded)."""
        return len(self._buf)

    @property
    def held(self) -> int:
        """Bytes held in memory: unread input plus the command assembled so far (a spooled
        literal's octets are not held)."""
        return len(self._buf) + len(self._cmd)

    @property
    def in_command(self) -> bool:
        """True if unprocessed bytes are buffered or a command is partly assembled (e.g. to decide
        whether an idle-timeout or shutdown interrupts a client mid-command)."""
        return bool(self._cmd) or self._mode is not _Mode.LINE or bool(self._buf)

    def discard_buffered(self) -> int:
        """Drop unread bytes; call right after STARTTLS succeeds (RFC 9051 §6.2.1: no plaintext
        command injection into the TLS session). Returns how many bytes were dropped."""
        dropped = len(self._buf)
        self._buf.clear()
        self._scan_from = 0
        return dropped

    def expect_line(self) -> None:
        """Make the next event a RawLine (IDLE's DONE, RFC 2177; SASL responses, RFC 9051 §6.2.2)."""
        self._raw = True

    def accept_literal(self) -> None:
        """The server sent "+": the literal's bytes follow."""
        if self._mode is not _Mode.WAIT or self._pending is None:
            raise RuntimeError("no literal is waiting")
        self._remaining = self._pending.size
        self._pending = None
        self._mode = _Mode.LITERAL
        if self._pending_spool:
            self._start_spool(self._remaining)

    def reject_literal(self) -> None:
        """The server answered the command with BAD/NO instead of "+": the client will not send
        the literal, and the next bytes start a new command."""
        if self._mode is not _Mode.WAIT:
            raise RuntimeError("no literal is waiting")
        self._reset()

    def close(self) -> None:
        """The session ends: discard the spooled literals of a command not handed over."""
        self._reset()

    def next_event(self) -> Command | NeedContinuation | RawLine | None:
        """The next complete event, or None when more bytes are needed. Raises ParseError."""
        while True:
            mode = self._mode
            if mode is _Mode.WAIT:
                assert self._pending is not None
                return self._pending
            if mode is _Mode.LITERAL or mode is _Mode.SKIP_LITERAL:
                take = min(self._remaining, len(self._buf))
                if mode is _Mode.LITERAL:
                    if self._sink is not None:
                        self._sink.write(bytes(self._buf[:take]))
                    else:
                        self._cmd += self._buf[:take]
                del self._buf[:take]
                self._remaining -= take
                if self._remaining:
                    return None
                self._sink = None
                self._mode = _Mode.LINE if mode is _Mode.LITERAL else _Mode.SKIP_LINE
                continue
            if mode is _Mode.SKIP_LINE:
                if not self._skip_line():
                    return None
                continue
            event = self._line()
            if event is not _Again.AGAIN:
                return event

    # -- internals ------------------------------------------------------------------------------

    def _reset(self) -> None:
        self._cmd.clear()
        self._literals = 0
        self._pending = None
        self._mode = _Mode.LINE
        self._remaining = 0
        self._discard_spooled(self._take_spooled())

    def _take_spooled(self) -> dict[int, SpooledLiteral]:
        spooled, self._spooled = self._spooled, {}
        self._spooled_size = 0
        self._sink = None
        self._pending_spool = False
        return spooled

    @staticmethod
    def _discard_spooled(spooled: dict[int, SpooledLiteral]) -> None:
        for lit in spooled.values():
            lit.discard()

    def _start_spool(self, size: int) -> None:
        assert self.spool is not None
        self._sink = self.spool(size)
        self._spooled[len(self._cmd)] = self._sink  # where its octets would have started
        self._spooled_size += size
        self._pending_spool = False

    def _fail(self, message: str, tag: str | None, code: str | None = None) -> ParseError:
        self._reset()
        return ParseError(message, tag=tag, code=code)

    def _skip_line(self) -> bool:
        """Discard up to the next LF; then, if the line announced {n+}, discard n more bytes."""
        i = self._buf.find(b"\n")
        if i < 0:
            self._skip_tail = (self._skip_tail + bytes(self._buf[-_TAIL:]))[-_TAIL:]
            self._buf.clear()
            return False
        tail = (self._skip_tail + bytes(self._buf[max(0, i - _TAIL) : i]))[-_TAIL:].rstrip(b"\r")
        del self._buf[: i + 1]
        self._skip_tail = b""
        self._scan_from = 0
        m = _LITERAL_AT_END.search(tail)
        if m and m.group(3):  # RFC 7888: a non-synchronising literal arrives regardless
            self._mode = _Mode.SKIP_LITERAL
            self._remaining = int(m.group(2))
        else:
            self._mode = _Mode.LINE
        return True

    def _current_tag(self) -> str | None:
        return read_tag(bytes(self._cmd[:256]) if self._cmd else bytes(self._buf[:256]))

    def _line(self) -> Command | NeedContinuation | RawLine | None | _Again:
        limits = self.limits
        i = self._buf.find(b"\n", self._scan_from)
        too_long = (i < 0 and len(self._buf) > limits.max_line + 1) or i > limits.max_line + 1
        if too_long:
            tag = None if self._raw else self._current_tag()
            self._raw = False
            self._reset()
            self._mode = _Mode.SKIP_LINE
            self._scan_from = 0
            raise ParseError("Line too long", tag=tag, code="TOOBIG")
        if i < 0:
            self._scan_from = len(self._buf)
            return None
        body = bytes(self._buf[:i])
        del self._buf[: i + 1]
        self._scan_from = 0
        if body.endswith(b"\r"):
            body = body[:-1]
        if self._raw:
            self._raw = False
            return RawLine(body)
        self._cmd += body
        self._cmd += b"\r\n"
        m = _LITERAL_AT_END.search(body)
        if m is None:
            data = bytes(self._cmd)
            spooled = self._take_spooled()
            self._reset()
            if data == b"\r\n":
                raise ParseError("Empty command line")
            try:
                return parse_command(data, utf8=self.utf8, max_depth=limits.max_depth, spooled=spooled)
            except BaseException:
                self._discard_spooled(spooled)
                raise
        size = int(m.group(2)) if len(m.group(2)) <= 20 else 1 << 70
        binary = bool(m.group(1))
        nonsync = bool(m.group(3))
        tag = self._current_tag()
        self._literals += 1
        spool = (self.spool is not None and limits.spool_from is not None and size >= limits.spool_from
                 and self._command_words() == "APPEND")
        too_big = (
            size > limits.max_literal
            or (self._spooled_size + size > limits.max_spooled if spool else len(self._cmd) + size > limits.max_command)
            or (nonsync and limits.max_nonsync is not None and size > limits.max_nonsync)
        )
        if too_big or self._literals > limits.max_literals:
            err = self._fail("Literal too large" if too_big else "Too many literals", tag, "TOOBIG")
            if nonsync:  # RFC 7888 §4: the client sends it anyway; skip it, then the line's rest
                self._mode = _Mode.SKIP_LITERAL
                self._remaining = size
            raise err
        if nonsync:
            self._mode = _Mode.LITERAL
            self._remaining = size
            if spool:
                self._start_spool(size)
            return _Again.AGAIN
        self._pending_spool = spool
        self._mode = _Mode.WAIT
        self._pending = NeedContinuation(tag, self._command_words(), size, binary)
        return self._pending

    def _command_words(self) -> str:
        m = _COMMAND_WORDS.match(bytes(self._cmd[:512]))
        if m is None:
            return ""
        first = m.group(1).decode("ascii").upper()
        if first == "UID" and m.group(2):
            return "UID " + m.group(2).decode("ascii").upper()
        return first


class _Again(Enum):
    """_line() consumed a line that announced a non-synchronising literal: read on."""

    AGAIN = auto()
