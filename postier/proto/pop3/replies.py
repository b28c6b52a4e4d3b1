"""POP3 replies (RFC 1939 §3) with their RFC 2449 §8 / RFC 3206 response codes, as named values."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Reply:
    """One status line: "+OK" or "-ERR", an optional [CODE], and human-readable text."""

    ok: bool
    text: str = ""
    code: str | None = None

    def fill(self, **values: object) -> Reply:
        """This reply with its text's ``{placeholders}`` filled in."""
        return replace(self, text=self.text.format(**values))

    def to_bytes(self) -> bytes:
        parts = ["+OK" if self.ok else "-ERR"]
        if self.code:
            parts.append(f"[{self.code}]")  # RFC 2449 §8: the code follows the status indicator
        if self.text:
            parts.append(self.text)
        return (" ".join(parts) + "\r\n").encode("utf-8")


class Pop3Error(Exception):
    """Raised by a command handler; the command loop sends ``reply`` and counts an error."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


# Positive replies
OK_GREETING = Reply(True, "{greeting}")  # RFC 1939 §4 (no APOP timestamp: APOP is not offered)
OK_EMPTY = Reply(True)
OK_CAPA = Reply(True, "Capability list follows")  # RFC 2449 §5
OK_STLS = Reply(True, "Begin TLS negotiation")  # RFC 2595 §4
OK_USER = Reply(True, "Send PASS")  # RFC 1939 §7 USER
OK_MAILDROP = Reply(True, "Maildrop has {count} messages ({octets} octets)")  # RFC 1939 §7 PASS
OK_STAT = Reply(True, "{count} {octets}")  # RFC 1939 §5 STAT: exactly "count octets"
OK_LIST_ALL = Reply(True, "{count} messages ({octets} octets)")
OK_SCAN_LISTING = Reply(True, "{msgno} {value}")  # RFC 1939 §5 LIST n / RFC 1939 §7 UIDL n
OK_UIDL_ALL = Reply(True, "Unique-ID listing follows")
OK_RETR = Reply(True, "{size} octets")  # RFC 1939 §5 RETR
OK_TOP = Reply(True, "Top of message follows")  # RFC 1939 §7 TOP
OK_DELETED = Reply(True, "Message {msgno} deleted")  # RFC 1939 §5 DELE
OK_MECHANISMS = Reply(True, "Supported mechanisms follow")
OK_SIGNING_OFF = Reply(True, "Logging out")  # RFC 1939 §6 QUIT

# Negative replies
ERR_UNKNOWN_COMMAND = Reply(False, "Unknown command")
ERR_WRONG_STATE = Reply(False, "Command not valid in this state")
ERR_SYNTAX = Reply(False, "Syntax error")
ERR_LINE_TOO_LONG = Reply(False, "Line too long")  # RFC 2449 §4: 255 octets including CRLF
ERR_NO_SUCH_MESSAGE = Reply(False, "No such message")
ERR_ALREADY_DELETED = Reply(False, "Message {msgno} already deleted")
ERR_USER_FIRST = Reply(False, "Send USER first")
ERR_STLS_UNAVAILABLE = Reply(False, "STLS not available")
ERR_TLS_ACTIVE = Reply(False, "TLS already active")
# RFC 3206 §5 [AUTH]: credentials may not be used here (wording as Dovecot, which clients recognise)
ERR_PLAINTEXT = Reply(
    False, "Plaintext authentication disallowed on non-secure (SSL/TLS) connections.", "AUTH"
)
ERR_AUTH_FAILED = Reply(False, "Authentication failed.", "AUTH")  # RFC 3206 §5
ERR_IN_USE = Reply(False, "Maildrop is locked by another session.", "IN-USE")  # RFC 2449 §8.1
ERR_LOGIN_DELAY = Reply(False, "Logged in too recently.", "LOGIN-DELAY")  # RFC 2449 §8.1
ERR_MAILDROP_UNAVAILABLE = Reply(False, "Maildrop not available.", "SYS/PERM")  # RFC 3206 §4
ERR_TRY_LATER = Reply(False, "Temporary server problem, try again later.", "SYS/TEMP")  # RFC 3206 §4
ERR_AUTH_CANCELLED = Reply(False, "Authentication cancelled.")  # RFC 5034 §4 "*"
ERR_UNSUPPORTED_MECHANISM = Reply(False, "Unsupported authentication mechanism.")
ERR_BAD_BASE64 = Reply(False, "Invalid base64 data.")
ERR_MESSAGE_UNAVAILABLE = Reply(False, "Message is no longer available.", "SYS/TEMP")  # RFC 3206 §4
ERR_UPDATE_FAILED = Reply(False, "Some deleted messages not removed.", "SYS/TEMP")
ERR_TOO_MANY_ERRORS = Reply(False, "Too many errors, closing connection.")
ERR_INPUT_OVERFLOW = Reply(False, "Too much pipelined input, closing connection.")
