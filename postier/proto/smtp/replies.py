"""SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 3463, RFC 2034) as named values."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Final

_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply: basic code, enhanced code ("" where RFC 2034 §3 omits it) and one or more text lines."""

    code: int
    enhanced: str
    text: str
    more: tuple[str, ...] = ()
    wire: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"reply code {self.code} out of range")
        if self.enhanced and (
            not _ENHANCED.fullmatch(self.enhanced) or self.enhanced[0] != str(self.code)[0]
        ):
            raise ValueError(f"enhanced code {self.enhanced!r} does not fit {self.code}")
        lines = (self.text, *self.more)
        for line in lines:
            # RFC 5321 §4.2: a reply line is text up to CRLF; a CR or LF inside would forge a reply
            if "\r" in line or "\n" in line:
                raise ValueError("reply text must not contain CR or LF")
        prefix = f"{self.enhanced} " if self.enhanced else ""
        last = len(lines) - 1
        out: list[str] = []
        for i, line in enumerate(lines):
            # RFC 5321 §4.2.1: "code-" on every line but the last; RFC 2034 §4: enhanced code on each line
            text = prefix + line
            if i < last:
                out.append(f"{self.code}-{text}\r\n")
            elif text or self.code == 334:  # RFC 4954 §4: "334" SP [base64] keeps its SP when empty
                out.append(f"{self.code} {text}\r\n")
            else:
                out.append(f"{self.code}\r\n")  # RFC 5321 §4.2: Reply-code [ SP textstring ]
        object.__setattr__(self, "wire", "".join(out).encode("utf-8"))

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text, *self.more)

    @property
    def is_success(self) -> bool:
        return self.code < 400

    def with_text(self, text: str) -> Reply:
        """The same codes with another (single-line) text."""
        return Reply(self.code, self.enhanced, text)

    def with_trusted_text(self, text: str) -> Reply:
        """`with_text` for a text the server made itself (hot path: the codes are known valid, so
        only the CR/LF check runs)."""
        if not text or "\r" in text or "\n" in text:
            return self.with_text(text)  # the full checks (and their error)
        reply = object.__new__(Reply)
        wire = f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{text}\r\n".encode()
        for name, value in (("code", self.code), ("enhanced", self.enhanced), ("text", text), ("more", ()),
                            ("wire", wire)):
            object.__setattr__(reply, name, value)
        return reply


class ReplyError(Exception):
    """Raised by command handlers; the command loop turns it into the reply's bytes."""

    def __init__(self, reply: Reply, close: bool = False) -> None:
        super().__init__(f"{reply.code} {reply.enhanced} {reply.text}")
        self.reply = reply
        self.close = close


# 2xx ------------------------------------------------------------------------------------------------------
R211_STATUS: Final = Reply(211, "2.0.0", "System status")  # RFC 5321 §4.2.2
def help_reply(commands: list[str]) -> Reply:
    """RFC 5321 §4.1.1.8: 214 with the commands the session accepts."""
    return Reply(214, "2.0.0", "Commands: " + " ".join(commands))
R220_TLS_READY: Final = Reply(220, "2.0.0", "Ready to start TLS")  # RFC 3207 §4
R221_BYE: Final = Reply(221, "2.0.0", "Bye")  # RFC 5321 §4.1.1.10
R235_AUTH_OK: Final = Reply(235, "2.7.0", "Authentication successful")  # RFC 4954 §6
R250_OK: Final = Reply(250, "2.0.0", "OK")  # RFC 5321 §4.1.1.5, §4.1.1.9
R250_SENDER_OK: Final = Reply(250, "2.1.0", "Sender OK")  # RFC 5321 §4.1.1.2, RFC 3463 X.1.0
R250_RCPT_OK: Final = Reply(250, "2.1.5", "Recipient OK")  # RFC 5321 §4.1.1.3, RFC 3463 X.1.5
R250_QUEUED: Final = Reply(250, "2.0.0", "Message accepted for delivery")  # RFC 5321 §4.1.1.4
R252_CANNOT_VRFY: Final = Reply(  # RFC 5321 §3.5.3: no address enumeration
    252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery"
)

# 3xx (RFC 2034 §3: enhanced codes only on 2xx, 4xx, 5xx) -------------------------------------------------
R354_START_DATA: Final = Reply(354, "", "End data with <CR><LF>.<CR><LF>")  # RFC 5321 §4.1.1.4

# 4xx ------------------------------------------------------------------------------------------------------
R421_SHUTDOWN: Final = Reply(421, "4.3.2", "Service shutting down, closing connection")  # RFC 5321 §3.8
R421_TIMEOUT: Final = Reply(421, "4.4.2", "Timeout, closing connection")  # RFC 5321 §4.5.3.2
R421_TOO_MANY_ERRORS: Final = Reply(421, "4.7.0", "Too many errors, closing connection")  # RFC 5321 §4.3.2
R421_BUFFER_FULL: Final = Reply(421, "4.7.0", "Too much unanswered input, closing connection")
R421_FORBIDDEN: Final = Reply(421, "4.7.0", "This is an SMTP server, closing connection")
R450_MAILBOX_BUSY: Final = Reply(450, "4.2.0", "Mailbox busy, try again later")  # RFC 5321 §4.2.3
R451_LOCAL_ERROR: Final = Reply(451, "4.3.0", "Local error in processing, try again later")  # RFC 5321 §4.2.3
R451_TEMP_LOOKUP: Final = Reply(451, "4.4.3", "Temporary lookup failure, try again later")  # RFC 3463 X.4.3
R452_TOO_MANY_RCPT: Final = Reply(452, "4.5.3", "Too many recipients")  # RFC 5321 §4.5.3.1.10
R452_NO_SPACE: Final = Reply(452, "4.3.1", "Insufficient system storage")  # RFC 1870 §6.2
R454_TLS_UNAVAILABLE: Final = Reply(454, "4.7.0", "TLS not available due to temporary reason")  # RFC 3207 §4
R454_AUTH_TEMP: Final = Reply(454, "4.7.0", "Temporary authentication failure")  # RFC 4954 §6

# 5xx ------------------------------------------------------------------------------------------------------
R500_UNKNOWN: Final = Reply(500, "5.5.1", "Command unrecognized")  # RFC 5321 §4.2.4, RFC 3463 X.5.1
R500_LINE_TOO_LONG: Final = Reply(500, "5.5.2", "Line too long")  # RFC 5321 §4.5.3.1.4
R500_AUTH_LINE_TOO_LONG: Final = Reply(  # RFC 4954 §4
    500, "5.5.6", "Authentication exchange line is too long"
)
R500_BARE_NEWLINE: Final = Reply(500, "5.5.2", "Bare CR or LF in command line")  # RFC 5321 §2.3.8
R500_BAD_UTF8: Final = Reply(500, "5.5.2", "Command line is not valid UTF-8")  # RFC 6531 §3.3
R501_SYNTAX: Final = Reply(501, "5.5.4", "Syntax error in parameters or arguments")  # RFC 5321 §4.2.2
R501_BAD_SENDER: Final = Reply(501, "5.1.7", "Bad sender address syntax")  # RFC 3463 X.1.7
R501_BAD_RCPT: Final = Reply(501, "5.1.3", "Bad recipient address syntax")  # RFC 3463 X.1.3
R501_BAD_BASE64: Final = Reply(501, "5.5.2", "Invalid base64 data")  # RFC 4954 §4
R501_AUTH_CANCELLED: Final = Reply(501, "5.0.0", "Authentication cancelled")  # RFC 4954 §4
R502_NOT_IMPLEMENTED: Final = Reply(502, "5.5.1", "Command not implemented")  # RFC 5321 §4.2.4
R503_BAD_SEQUENCE: Final = Reply(503, "5.5.1", "Bad sequence of commands")  # RFC 5321 §4.2.4
R503_HELO_FIRST: Final = Reply(503, "5.5.1", "Send HELO/EHLO first")  # RFC 5321 §4.1.4
R503_NEED_MAIL: Final = Reply(503, "5.5.1", "Need MAIL command first")  # RFC 5321 §4.1.4
R503_NESTED_MAIL: Final = Reply(503, "5.5.1", "Nested MAIL command")  # RFC 5321 §4.1.4
R503_IN_TRANSACTION: Final = Reply(503, "5.5.1", "Not allowed during a mail transaction")  # RFC 4954 §4
R503_ALREADY_AUTH: Final = Reply(503, "5.5.1", "Already authenticated")  # RFC 4954 §4
R503_TLS_ACTIVE: Final = Reply(503, "5.5.1", "TLS already active")  # RFC 3207 §4.2
R503_MIXED_BDAT: Final = Reply(503, "5.5.1", "DATA and BDAT cannot be mixed")  # RFC 3030 §2
R503_BINARY_NEEDS_BDAT: Final = Reply(503, "5.5.1", "BINARYMIME requires BDAT")  # RFC 3030 §3
R503_BDAT_EXPECTED: Final = Reply(503, "5.5.1", "Only BDAT, RSET, NOOP or QUIT now")  # RFC 3030 §2
R503_AUTH_DISABLED: Final = Reply(503, "5.5.1", "Authentication not enabled")  # RFC 4954 §4
R504_AUTH_MECH: Final = Reply(504, "5.5.4", "Unrecognized authentication type")  # RFC 4954 §4
R530_AUTH_REQUIRED: Final = Reply(530, "5.7.0", "Authentication required")  # RFC 4954 §6
R530_TLS_REQUIRED: Final = Reply(530, "5.7.0", "Must issue a STARTTLS command first")  # RFC 3207 §4
R534_AUTH_WEAK: Final = Reply(534, "5.7.9", "Authentication mechanism is too weak")  # RFC 4954 §6
R535_AUTH_FAILED: Final = Reply(535, "5.7.8", "Authentication credentials invalid")  # RFC 4954 §6
R538_ENCRYPTION_REQUIRED: Final = Reply(  # RFC 4954 §6
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
R550_NO_SUCH_USER: Final = Reply(550, "5.1.1", "No such user here")  # RFC 3463 X.1.1
R550_MAILBOX_UNAVAILABLE: Final = Reply(550, "5.2.1", "Mailbox unavailable")  # RFC 5321 §4.2.3
R550_SENDER_DENIED: Final = Reply(550, "5.7.1", "Sender address rejected")  # RFC 3463 X.7.1
R552_TOO_BIG: Final = Reply(  # RFC 1870 §6.3
    552, "5.3.4", "Message size exceeds fixed maximum message size"
)
R552_MAILBOX_FULL: Final = Reply(552, "5.2.2", "Mailbox full")  # RFC 3463 X.2.2
R553_BAD_MAILBOX: Final = Reply(553, "5.1.3", "Mailbox name not allowed")  # RFC 5321 §4.2.3
R553_NEEDS_SMTPUTF8: Final = Reply(  # RFC 6531 §3.5
    553, "5.6.7", "Non-ASCII address requires the SMTPUTF8 parameter"
)
R553_SOURCE_ROUTE: Final = Reply(553, "5.1.3", "Source routes are not accepted")  # RFC 5321 §4.1.1.3
R554_RELAY_DENIED: Final = Reply(554, "5.7.1", "Relay access denied")  # RFC 5321 §3.6.2, RFC 3463 X.7.1
R554_NO_SERVICE: Final = Reply(554, "5.7.0", "No SMTP service here")  # RFC 5321 §3.1
R554_NO_VALID_RCPT: Final = Reply(554, "5.5.1", "No valid recipients")  # RFC 5321 §3.3
R554_EARLY_TALKER: Final = Reply(  # RFC 5321 §4.3.1: the client must wait for the greeting
    554, "5.5.0", "Protocol error: talked before the greeting"
)
R554_SYNC: Final = Reply(  # RFC 2920 §3.1: improper pipelining
    554, "5.5.0", "Protocol synchronization error: improper pipelining"
)
R554_BARE_NEWLINE: Final = Reply(  # RFC 5321 §2.3.8: SMTP smuggling defence
    554, "5.6.0", "Message contains bare CR or LF, not allowed"
)
R554_LINE_TOO_LONG: Final = Reply(554, "5.6.0", "Message line too long")  # RFC 5321 §4.5.3.1.6
R555_PARAM: Final = Reply(  # RFC 5321 §4.1.1.11
    555, "5.5.4", "MAIL FROM/RCPT TO parameters not recognized or not implemented"
)


@functools.lru_cache(maxsize=64)
def greeting(hostname: str, lmtp: bool = False) -> Reply:
    """RFC 5321 §4.3.1 / §3.1: the 220 opening reply (RFC 2034 §3: no enhanced code on it)."""
    return Reply(220, "", f"{hostname} {'LMTP' if lmtp else 'ESMTP'} postier")
