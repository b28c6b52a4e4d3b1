"""Sans-IO SMTP client (RFC 5321) and LMTP client (RFC 2033) for the outbound queue.

Queue commands, write `data_to_send()`, feed the server's bytes to `receive_data()` and read `ServerReply`
events, each tagged with the command (and recipient) it answers. Message content is dot-stuffed
(RFC 5321 §4.5.2) and line endings are normalised: a bare CR or LF never leaves this client
(RFC 5321 §2.3.8); each becomes CRLF, the choice least likely to lose mail that was written with Unix
line endings.
"""

from __future__ import annotations

import base64
import collections
import re
from dataclasses import dataclass
from typing import Final

from .errors import ProtocolError, UsageError
from ..crlf import to_crlf

_REPLY_LINE: Final = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*))?")  # RFC 5321 §4.2 Reply-line
_ENHANCED: Final = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?: |$)")  # RFC 2034 §4, RFC 3463 §2
# RFC 2920 §3.1 (+ STARTTLS, AUTH): after these the client must wait for the reply
_GROUP_END: Final = frozenset(
    {"GREETING", "EHLO", "HELO", "LHLO", "DATA", "VRFY", "EXPN", "NOOP", "QUIT", "STARTTLS", "AUTH"}
)


@dataclass(frozen=True, slots=True)
class ClientSettings:
    lmtp: bool = False
    max_reply_line: int = 4096  # octets, CRLF included
    max_reply_lines: int = 100


@dataclass(frozen=True, slots=True)
class ServerReply:
    """One complete (possibly multi-line) reply; `argument` names the recipient for RCPT and LMTP ends."""

    code: int
    enhanced: str
    lines: tuple[str, ...]
    for_command: str
    argument: str = ""

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def text(self) -> str:
        return " ".join(self.lines)


@dataclass(frozen=True, slots=True)
class Closed:
    """The server closed the connection with no reply outstanding."""


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()


def _arg(text: str) -> str:
    if "\r" in text or "\n" in text or "\0" in text:
        raise UsageError("command arguments must not contain CR, LF or NUL")
    return text


class ClientConnection:
    """One SMTP or LMTP client session; the first event is the server's greeting."""

    def __init__(self, settings: ClientSettings | None = None) -> None:
        self.settings = settings or ClientSettings()
        self.extensions: dict[str, str] = {}
        self._expect: collections.deque[tuple[str, str]] = collections.deque([("GREETING", "")])
        self._buf = b""
        self._pos = 0
        self._out: list[bytes] = []
        self._lines: list[tuple[int, str]] = []
        self._eof = False
        self._tls_wait = False
        self._in_data = False
        self._line_start = True
        self._cr = b""  # a CR that ended the last chunk: it may pair with the next chunk's LF
        self._accepted: list[str] = []  # recipients accepted in this transaction, RCPT order
        self._lmtp_end = 0  # LMTP end-of-data replies still due
        self.closed = False

    # Capabilities (RFC 5321 §4.1.1.1 ehlo-line) -------------------------------------------------------------
    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.extensions

    @property
    def pipelining(self) -> bool:
        return self.settings.lmtp or "PIPELINING" in self.extensions  # RFC 2033 §5: LMTP has it

    @property
    def size_limit(self) -> int | None:
        """RFC 1870 §4: SIZE n, where 0 (or no number) means no fixed limit."""
        value = self.extensions.get("SIZE", "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(self.extensions.get("AUTH", "").upper().split())

    @property
    def accepted_recipients(self) -> tuple[str, ...]:
        return tuple(self._accepted)

    # Commands -----------------------------------------------------------------------------------------------
    def _command(self, line: str, kind: str, argument: str = "", limit: int = 512) -> None:
        if self._in_data or self._tls_wait or self.closed:
            raise UsageError(f"{kind} not allowed now")
        if self._expect and (not self.pipelining or any(k in _GROUP_END for k, _ in self._expect)):
            # RFC 2920 §3.1: without PIPELINING, or after a group-ending command, wait for replies
            raise UsageError(f"{kind} must wait for the outstanding replies")
        raw = _arg(line).encode("utf-8") + b"\r\n"
        if len(raw) > limit:  # RFC 5321 §4.5.3.1.4
            raise UsageError("command line too long")
        self._out.append(raw)
        self._expect.append((kind, argument))

    def ehlo(self, name: str) -> None:
        """EHLO (LHLO for LMTP, RFC 2033 §4.1); capabilities land in `extensions`."""
        self._command(f"{'LHLO' if self.settings.lmtp else 'EHLO'} {name}", "EHLO")

    def helo(self, name: str) -> None:
        self._command(f"HELO {name}", "HELO")

    def starttls(self) -> None:
        self._command("STARTTLS", "STARTTLS")

    def tls_started(self) -> None:
        """RFC 3207 §4.2: after the handshake, forget the capabilities; send EHLO again."""
        if not self._tls_wait:
            raise UsageError("tls_started() without a 220 to STARTTLS")
        self._tls_wait = False
        self.extensions = {}
        self._buf, self._pos = b"", 0

    def auth(self, mechanism: str, initial: bytes | None = None) -> None:
        """RFC 4954 §4 with an optional initial response (SASL-IR); "=" encodes an empty one."""
        line = f"AUTH {mechanism.upper()}"
        if initial is not None:
            line += " " + (base64.b64encode(initial).decode("ascii") or "=")
        self._command(line, "AUTH", limit=12288)

    def auth_plain(self, user: str, password: str) -> None:
        """RFC 4616 PLAIN: NUL authcid NUL password."""
        self.auth("PLAIN", b"\0" + user.encode("utf-8") + b"\0" + password.encode("utf-8"))

    def auth_response(self, data: bytes) -> None:
        """Answer a 334 challenge."""
        self._command(base64.b64encode(data).decode("ascii"), "AUTH", limit=12288)

    def auth_cancel(self) -> None:
        self._command("*", "AUTH")  # RFC 4954 §4

    @staticmethod
    def _params(params: dict[str, str | None] | None) -> str:
        out = ""
        for key, value in (params or {}).items():
            if not key or " " in key or "=" in key or (value is not None and (" " in value or not value)):
                raise UsageError(f"bad ESMTP parameter {key!r}")
            out += f" {key}" if value is None else f" {key}={value}"
        return out

    def mail(self, sender: str, params: dict[str, str | None] | None = None) -> None:
        """MAIL FROM:<sender>; "" is the null reverse-path of bounces (RFC 5321 §4.5.5)."""
        self._command(f"MAIL FROM:<{sender}>{self._params(params)}", "MAIL", sender)

    def rcpt(self, recipient: str, params: dict[str, str | None] | None = None) -> None:
        self._command(f"RCPT TO:<{recipient}>{self._params(params)}", "RCPT", recipient)

    def data(self) -> None:
        self._command("DATA", "DATA")

    def rset(self) -> None:
        self._command("RSET", "RSET")

    def noop(self) -> None:
        self._command("NOOP", "NOOP")

    def quit(self) -> None:
        self._command("QUIT", "QUIT")

    # Message content ----------------------------------------------------------------------------------------
    def _normalise(self, chunk: bytes, final: bool) -> bytes:
        data = self._cr + chunk if self._cr else chunk
        self._cr = b""
        if not final and data.endswith(b"\r"):
            data, self._cr = data[:-1], b"\r"
        return to_crlf(data, bare_cr=True)  # RFC 5321 §2.3.8: every bare CR or LF becomes CRLF

    def send_message_data(self, chunk: bytes) -> None:
        """Message content after the 354 reply to DATA; any chunking, any line endings."""
        if not self._in_data:
            raise UsageError("send_message_data() before the 354 reply to DATA")
        self._stuffed(self._normalise(chunk, final=False))

    def _stuffed(self, data: bytes) -> None:
        if not data:
            return
        if self._line_start and data[:1] == b".":
            data = b"." + data  # RFC 5321 §4.5.2: double a leading period
        data = data.replace(b"\r\n.", b"\r\n..")
        self._line_start = data.endswith(b"\r\n")
        self._out.append(data)

    def end_data(self) -> None:
        """Terminate the content with CRLF.CRLF (adding the final CRLF if it lacks one)."""
        if not self._in_data:
            raise UsageError("end_data() outside DATA")
        self._stuffed(self._normalise(b"", final=True))
        self._out.append(b".\r\n" if self._line_start else b"\r\n.\r\n")
        self._in_data, self._line_start = False, True
        self._expect.append(("DATA-END", ""))

    def bdat(self, chunk: bytes, last: bool = False) -> None:
        """RFC 3030 §2: one chunk, sent raw after its size (line endings normalised, no stuffing)."""
        held = self._cr
        data = self._normalise(chunk, final=last)
        try:
            self._command(f"BDAT {len(data)}{' LAST' if last else ''}", "BDAT-LAST" if last else "BDAT")
        except UsageError:
            self._cr = held
            raise
        self._out.append(data)

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    # Replies ------------------------------------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        """Feed the server's bytes; b"" means it closed the connection."""
        if not data:
            self._eof = True
        elif self._tls_wait:
            raise ProtocolError("data received between STARTTLS and the handshake")  # RFC 3207 §5
        else:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0

    def next_event(self) -> ServerReply | Closed | NeedData:
        limit = self.settings.max_reply_line
        while True:
            pos = self._pos
            lf = self._buf.find(b"\n", pos, pos + limit)
            if lf < 0:
                if len(self._buf) - pos >= limit:
                    raise ProtocolError("reply line too long")
                if self._eof:
                    self.closed = True
                    if self._expect or len(self._buf) > pos or self._lines:
                        raise ProtocolError("connection closed with replies outstanding")
                    return Closed()
                return NEED_DATA
            line, self._pos = self._buf[pos:lf].rstrip(b"\r"), lf + 1
            m = _REPLY_LINE.fullmatch(line)
            if m is None:
                raise ProtocolError(f"malformed reply line {line[:80]!r}")
            code = int(m.group(1))
            if self._lines and self._lines[0][0] != code:
                raise ProtocolError("multi-line reply changes its code")  # RFC 5321 §4.2.1
            self._lines.append((code, (m.group(3) or b"").decode("utf-8", "replace")))
            if len(self._lines) > self.settings.max_reply_lines:
                raise ProtocolError("too many reply lines")
            if m.group(2) != b"-":
                texts = [t for _, t in self._lines]
                self._lines = []
                return self._complete(code, texts)

    def _complete(self, code: int, texts: list[str]) -> ServerReply:
        enhanced = ""
        m = _ENHANCED.match(texts[0])
        if m and m.group(1)[0] == str(code)[0]:
            enhanced = m.group(1)
            texts = [t[len(enhanced) :].lstrip(" ") if t.startswith(enhanced) else t for t in texts]
        if not self._expect:
            if code == 421:  # RFC 5321 §3.8: the server may announce its shutdown at any time
                self.closed = True
                return ServerReply(code, enhanced, tuple(texts), "UNSOLICITED")
            raise ProtocolError(f"unexpected reply {code}")
        kind, argument = self._expect[0]
        if kind in ("DATA-END", "BDAT-LAST") and self.settings.lmtp and self._accepted:
            # RFC 2033 §4.2: one reply per accepted recipient, in RCPT order
            if self._lmtp_end == 0:
                self._lmtp_end = len(self._accepted)
            argument = self._accepted[len(self._accepted) - self._lmtp_end]
            self._lmtp_end -= 1
            if self._lmtp_end == 0:
                self._expect.popleft()
        else:
            self._expect.popleft()
        ok = code < 400
        if kind in ("MAIL", "RSET"):
            self._accepted = []  # replies arrive in order: a new transaction starts here
        if kind == "EHLO" and ok:
            self.extensions = {}
            for line in texts[1:]:
                keyword, _, value = line.partition(" ")
                self.extensions[keyword.upper()] = value
        elif kind == "RCPT" and ok:
            self._accepted.append(argument)
        elif kind == "DATA" and code == 354:
            self._in_data, self._line_start, self._cr = True, True, b""
        elif kind == "STARTTLS" and code == 220:
            if len(self._buf) > self._pos:
                raise ProtocolError("data after the 220 to STARTTLS (response injection)")  # RFC 3207 §5
            self._tls_wait = True
        elif kind == "AUTH" and code == 334:
            pass  # the caller answers with auth_response() or auth_cancel()
        elif kind == "QUIT" or code == 421:
            self.closed = True
        return ServerReply(code, enhanced, tuple(texts), kind, argument)
