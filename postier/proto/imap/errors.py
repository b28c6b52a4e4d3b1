"""The one error type of the IMAP protocol core (RFC 9051 §7.1.5 BAD, §7.1.2 NO)."""

from __future__ import annotations

__all__ = ["ParseError"]


class ParseError(Exception):
    """A command (or a line) the server cannot accept.

    The server answers ``<tag> BAD [code] text`` when ``tag`` is known, else ``* BAD text``.
    ``status`` is "BAD" for syntax errors and "NO" for the few well-formed-but-refused cases
    the parser can detect itself (an unknown SEARCH charset: ``NO [BADCHARSET ...]``).
    ``code`` is an optional response code atom such as "TOOBIG", "BADCHARSET" or "CANNOT".
    The reader has always resynchronised on the next command when this is raised.
    """

    def __init__(
        self,
        message: str,
        *,
        tag: str | None = None,
        code: str | None = None,
        status: str = "BAD",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.tag = tag
        self.code = code
        self.status = status

    def __repr__(self) -> str:
        return f"ParseError({self.message!r}, tag={self.tag!r}, code={self.code!r}, status={self.status!r})"
