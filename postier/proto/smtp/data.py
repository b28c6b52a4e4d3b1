"""Message content framing: DATA dot-unstuffing and end detection (RFC 5321 §4.5.2), BDAT chunks (RFC 3030).

Both readers scan whole chunks with bytes.find/count and loop in Python over no line but a stuffed one:
this is the hot path of the server. Both flag, without buffering, the three faults that make a message
undeliverable: a bare CR or LF (RFC 5321 §2.3.8, SMTP smuggling), a line over the limit and a message over
the size limit. After a fault they stop emitting content but keep reading to the end of the message.
"""

from __future__ import annotations

import enum

_CRLF = b"\r\n"
_NOT_CR_LF = bytes(c for c in range(256) if c not in _CRLF)  # every octet but CR and LF
_DOT_MISSES = 8  # dots not at a line's start after which DotReader searches for CRLF "." instead


class Fault(enum.Enum):
    BARE_NEWLINE = "bare CR or LF"
    LINE_TOO_LONG = "line too long"
    TOO_BIG = "message too big"


class _Checker:
    """Size, line length and bare CR/LF checks over wire segments that never split a CRLF."""

    __slots__ = ("fault", "max_line", "max_size", "size", "_line")

    def __init__(self, max_size: int, max_line: int) -> None:
        self.max_size = max_size
        self.max_line = max_line
        self.size = 0  # content octets accepted so far (RFC 1870 §3 counts CRLFs, not stuffing dots)
        self.fault: Fault | None = None
        self._line = 0  # octets of the current, unterminated line

    def _check(self, seg: bytes) -> None:
        # RFC 5321 §2.3.8: CR and LF only ever appear together as CRLF. One pass keeps the CRs and
        # LFs alone (translate's C loop: a third of the time of counting CR, LF and CRLF apart).
        ends = seg.translate(None, _NOT_CR_LF)
        if ends != _CRLF * (len(ends) >> 1):
            self.fault = Fault.BARE_NEWLINE
            return
        # RFC 5321 §4.5.3.1.6 (limit raised by configuration): jump from the last LF inside each window of
        # max_line octets, so a chunk of short lines costs one rfind per max_line octets.
        n, pos, cur, limit = len(seg), 0, self._line, self.max_line
        while pos + limit - cur < n:
            lf = seg.rfind(b"\n", pos, pos + limit - cur)
            if lf < 0:
                self.fault = Fault.LINE_TOO_LONG
                return
            pos, cur = lf + 1, 0
        lf = seg.rfind(b"\n", pos)
        self._line = cur + n - pos if lf < 0 else n - lf - 1

    def _count(self, out: bytes) -> bool:
        self.size += len(out)
        if self.size > self.max_size:  # RFC 1870 §6.3
            self.fault = Fault.TOO_BIG
        return self.fault is None


class DotReader(_Checker):
    """Reads DATA content: returns unstuffed content and how much input the message used.

    A held-back tail (at most 4 octets that could begin CRLF.CRLF) carries state between chunks; the stream
    is read as if preceded by CRLF, so a first line "." ends the message and a first ".." is unstuffed.
    """

    __slots__ = ("_tail", "_strip")

    def __init__(self, max_size: int, max_line: int) -> None:
        super().__init__(max_size, max_line)
        self._tail = b"\r\n"
        self._strip = 2

    def feed(self, data: bytes) -> tuple[bytes, int, bool]:
        """Return (content, octets of `data` consumed, message ended). Content is b"" after a fault."""
        buf = self._tail + data if self._tail else data
        # One search finds both the end and the stuffed dots: each CRLF "." is the end marker when a
        # CRLF follows it (RFC 5321 §4.1.1.4) and a stuffed dot otherwise (RFC 5321 §4.5.2). A CRLF "."
        # with too few octets after it to tell is held back with the tail.
        # Most content has few dots (base64 none): they are found by memchr (`find` of one octet, a
        # twentieth of the three-octet search's time), until _DOT_MISSES of them begin no line.
        n, pos, at, cut, done, pieces, misses = len(buf), 0, 0, -1, False, [], 0
        while True:
            if misses < _DOT_MISSES:
                dot = buf.find(b".", at + 2)
                if dot >= 0 and buf[dot - 2 : dot] != _CRLF:
                    misses += 1
                    at = dot - 1
                    continue
                hit = dot - 2 if dot >= 0 else -1
            else:
                hit = buf.find(b"\r\n.", at)
            if hit < 0:
                break
            after = buf[hit + 3 : hit + 5]
            if after == b"\r\n":
                cut, done = hit + 2, True
                break
            if after == b"\r" or hit + 3 == n:
                cut = hit
                break
            pieces.append(buf[pos : hit + 2])
            pos = at = hit + 3
        if cut < 0:
            cut = n - 2 if buf.endswith(b"\r\n") else n - 1 if buf.endswith(b"\r") else n
        if done:
            used = cut + 3 - len(self._tail)
            self._tail = b""
        else:
            used = len(data)
            self._tail = buf[cut:]
        if self.fault is not None:
            return b"", used, done
        seg = buf[:cut]
        self._check(seg)
        if pieces:
            pieces.append(buf[pos:cut])
            out = b"".join(pieces)
        else:
            out = seg
        if self._strip:  # the virtual CRLF, possibly arriving over several feeds
            k = min(self._strip, len(out))
            out, self._strip = out[k:], self._strip - k
        if self.fault is None and self._count(out):
            return out, used, done
        return b"", used, done


class ChunkReader(_Checker):
    """Checks BDAT content (RFC 3030 §2: raw octets, no stuffing); a CRLF may straddle two chunks.

    With `binary` (BODY=BINARYMIME, RFC 3030 §3) content is arbitrary octets: only the size is checked.
    """

    __slots__ = ("binary", "_cr")

    def __init__(self, max_size: int, max_line: int, binary: bool = False) -> None:
        super().__init__(max_size, max_line)
        self.binary = binary
        self._cr = b""  # a CR that ended the previous piece, waiting for its LF

    def feed(self, data: bytes) -> bytes:
        """Check one piece of chunk content and return it (b"" after a fault)."""
        if self.fault is not None or not data:
            return b""
        if self.binary:
            return data if self._count(data) else b""
        seg = self._cr + data if self._cr else data
        if seg.endswith(b"\r"):
            self._cr, seg = b"\r", seg[:-1]
        else:
            self._cr = b""
        self._check(seg)
        if self.fault is None and self._count(seg):
            return seg
        return b""

    def finish(self) -> bytes:
        """End of the last chunk: a CR still waiting is bare."""
        if self._cr and self.fault is None:
            self.fault = Fault.BARE_NEWLINE
        self._cr = b""
        return b""
