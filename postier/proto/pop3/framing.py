"""Multi-line POP3 response bodies (RFC 1939 §3): CRLF lines, dot-stuffing, the "." terminator, TOP.

Works chunk by chunk so a large message is never held in memory twice; line endings and dot-stuffing
are correct across any chunk boundary.
"""

from __future__ import annotations

import re

_LINE_END = re.compile(rb"\r\n|\r|\n")
TERMINATOR = b".\r\n"


class MessageEncoder:
    """Turn a stored message into the body of a RETR (``top_lines`` None) or TOP response.

    Stored line ends (CRLF, bare LF or bare CR) all go out as CRLF; the store computes message sizes
    on the same CRLF form. A last line without a line end gets one.
    """

    def __init__(self, top_lines: int | None = None) -> None:
        if top_lines is not None and top_lines < 0:
            raise ValueError("top_lines must be >= 0")
        self._top = top_lines
        self._at_line_start = True
        self._pending_cr = False  # a chunk ended in CR: CRLF or a bare CR, the next chunk tells
        self._in_headers = True
        self._body_lines = 0
        self._done = False

    @property
    def needs_more(self) -> bool:
        """False once TOP has all the lines it wants, or after finish(): further data is ignored."""
        return not self._done

    def feed(self, chunk: bytes) -> bytes:
        """The wire bytes for ``chunk`` (possibly fewer, held back until the next chunk)."""
        if self._done or not chunk:
            return b""
        if self._pending_cr:
            chunk = b"\r" + chunk
            self._pending_cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._pending_cr = True
        return self._emit(_LINE_END.sub(b"\r\n", chunk))

    def finish(self) -> bytes:
        """The remaining wire bytes and the terminating "." line (RFC 1939 §3)."""
        tail = b""
        if not self._done:
            if self._pending_cr:
                self._pending_cr = False
                tail = self._emit(b"\r\n")
            if not self._done and not self._at_line_start:
                tail += b"\r\n"
        self._done = True
        return tail + TERMINATOR

    def _emit(self, text: bytes) -> bytes:
        if self._top is not None:
            text = self._cut_top(text)
        if not text:
            return b""
        # RFC 1939 §3: a line starting with "." gets one more "." (byte-stuffing)
        out = text.replace(b"\r\n.", b"\r\n..")
        if self._at_line_start and out.startswith(b"."):
            out = b"." + out
        self._at_line_start = out.endswith(b"\r\n")
        return out

    def _cut_top(self, text: bytes) -> bytes:
        """RFC 1939 §7 TOP: the header, the blank line, then ``top_lines`` lines of the body."""
        assert self._top is not None
        pos = 0
        at_start = self._at_line_start
        while (eol := text.find(b"\r\n", pos)) >= 0:
            if self._in_headers:
                if eol == pos and at_start:  # the empty line ending the header
                    self._in_headers = False
                    if self._top == 0:
                        self._done = True
                        return text[: eol + 2]
            else:
                self._body_lines += 1
                if self._body_lines >= self._top:
                    self._done = True
                    return text[: eol + 2]
            pos = eol + 2
            at_start = True
        return text


def encode_message(data: bytes, top_lines: int | None = None) -> bytes:
    """The whole response body for ``data`` in one piece, terminator included."""
    encoder = MessageEncoder(top_lines)
    return encoder.feed(data) + encoder.finish()


def encode_lines(lines: list[str]) -> bytes:
    """A multi-line listing (CAPA, LIST, UIDL): CRLF lines, dot-stuffed, then the terminator."""
    out = bytearray()
    for line in lines:
        encoded = line.encode("utf-8")
        if encoded.startswith(b"."):
            out += b"."  # RFC 1939 §3
        out += encoded + b"\r\n"
    out += TERMINATOR
    return bytes(out)
