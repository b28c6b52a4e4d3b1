"""The searchable text of a large message read from a file in pieces (RFC 9051 §6.4.4 text keys,
RFC 2046 §5.1.1 delimiters), with a bounded amount of it held: `search_text_at`.

`matching.search_text` parses a message whole; for a message in a file (a spooled delivery, an
APPEND literal) that would hold the whole message and its decoded text. Here the file is read
once, 256 KiB at a time, and a copy is made that keeps every line the extraction can depend on and
leaves out the bodies of the parts it never reads (passed by jumping from one LF followed by ``--``
to the next, not line by line: 30 MiB of base64 in 25 ms here, a SHA-256 pass costs about as much):

- every header block (from the start, and after each line that begins with ``--``, up to its
  blank line), every line that begins with ``--`` (so every delimiter of every multipart), and the
  body lines of text parts, multiparts (preamble, epilogue) and of what a header block does not
  classify, all kept whole;
- of any other part's body (an attachment: not text/*, multipart/* or an encapsulated message, as
  that part's own header says), only its first and last lines (at most 1 KiB of each): the rest is
  left out, and where it was is noted.

The copy is then parsed by `mime.parse_message` and extracted by `matching.part_search_text`, the
one extraction and the one limit (`TEXT_LIMIT`) of every full-text index. Leaving out lines that
do not begin with ``--`` from the middle of a body cannot make or unmake a delimiter, a header
block or a part, so the tree is the original's; the classification of the scan is only a guess
(a ``--`` line in a text part is taken for a delimiter), and so after the parse each place where
bytes were left out is checked to lie inside the body of a part whose body is not searched (a leaf
that is not text/*). When one does not, or when what must be kept exceeds TEXT_LIMIT octets (a
large text part, a huge header block, a ``--`` line over 1 KiB), the answer is an inexact empty
text (`SearchText.exact` False): the index leaves that message to the matcher, as it does for a
message whose text `search_text` cut at the limit. So the memory held is bounded by TEXT_LIMIT
octets of copy (plus its decoded text), whatever the size of the message.
The same copy, with the check made against the bodies another reader never reads, serves the
Sieve body test on a large message (`sparse_part`; RFC 5173, `sieve/interpreter.py`).
Why written here: the stdlib's `email.feedparser` parses incrementally but keeps every part's body
(attachments included) in memory, and the offsets and degradation rules must be `mime`'s anyway.
"""

from __future__ import annotations

import struct
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass

from . import VIEWS_VERSION
from .matching import INDEXED_FIELDS, TEXT_LIMIT, SearchText, part_search_text
from .mime import Part, parse_message

__all__ = ["LAYOUT_KIND", "Layout", "layout_at", "search_text_at", "sparse_copy", "sparse_part"]

PIECE = 256 << 10  # bytes read from the file at a time
SKIP_LINE = 1024  # bytes kept of the first and last line of a body left out

_HEAD, _KEEP, _SKIP = range(3)
#: the view-cache kind of a kept `Layout` (`Layout.dump`): a new scan or views version is a new kind
LAYOUT_KIND = "lay1." + VIEWS_VERSION

#: (offset, n) -> up to n bytes of the message from `offset` (fewer only at its end)
type ReadAt = Callable[[int, int], bytes]


class _Lines:
    """The lines of `size` bytes read by offset, PIECE at a time; a line longer than a caller's cap
    is cut (its rest read past, never held)."""

    def __init__(self, read_at: ReadAt, size: int, exact: bool = False) -> None:
        self._read_at = read_at
        self._size = size
        self._buf = b""
        self._i = 0
        self._next = 0
        self.exact = exact  # count the LFs of the lines passed (`passed_lf`) and note a bare LF (`bare`)
        self.passed_lf = 0
        self.bare = False

    def tell(self) -> int:
        """The offset of the next byte to be read."""
        return self._next - len(self._buf) + self._i

    def _passed(self, line: bytes) -> None:
        if self.exact and line.endswith(b"\n"):
            self.passed_lf += 1
            self.bare = self.bare or not line.endswith(b"\r\n")

    def _more(self) -> bool:
        if self._next >= self._size:
            return False
        piece = self._read_at(self._next, min(PIECE, self._size - self._next))
        if not piece:
            raise OSError("message file ended early")
        self._next += len(piece)
        self._buf = self._buf[self._i:] + piece
        self._i = 0
        return True

    def line(self, cap: int) -> tuple[bytes, int] | None:
        """The next line with its line end, or None at the end. A line of more than `cap` bytes
        comes back as its first `cap` bytes then its line end, with `cap` (where bytes were left
        out); a whole line with -1."""
        while True:
            buf, i = self._buf, self._i
            j = buf.find(b"\n", i)
            if j >= 0 and j + 1 - i <= cap:
                self._i = j + 1
                return buf[i:j + 1], -1
            if j >= 0 or len(buf) - i > cap:
                head = buf[i:i + cap]
                self._i = i + cap
                return head + self._rest(), cap
            if not self._more():
                if i >= len(buf):
                    return None
                self._i = len(buf)
                return buf[i:], -1

    def pass_run(self, cap: int) -> tuple[tuple[bytes, int, int, int] | None, bool]:
        """Read past the lines up to the next one that begins with ``--`` (left to be read) or the
        end, jumping from one LF followed by ``--`` to the next rather than line by line. Returns
        the last line passed (as `line` gives it, cut to `cap`, with the offsets where it begins and
        ends), or
        None when none was, and whether other lines were passed before it."""
        last: tuple[bytes, int, int, int] | None = None
        dropped = False
        while True:
            while len(self._buf) - self._i < 2 and self._more():
                pass
            buf, i = self._buf, self._i
            if i >= len(buf) or buf.startswith(b"--", i):
                return last, dropped
            k = buf.find(b"\n--", i)
            end = k if k >= 0 else buf.rfind(b"\n", i)
            if end < 0:  # the line goes on past what is read: taken whole (or cut) by `line`
                at = self.tell()
                got = self.line(cap)
                if got is None:
                    return last, dropped
                if last is not None:
                    self._passed(last[0])
                dropped, last = dropped or last is not None, (*got, at, self.tell())
                continue
            before = buf.rfind(b"\n", i, end)  # complete lines up to `end`: the last of them kept
            start = before + 1 if before >= 0 else i
            if last is not None:
                self._passed(last[0])
            if self.exact and start > i:
                lf = buf.count(b"\n", i, start)
                self.passed_lf += lf
                self.bare = self.bare or buf.count(b"\r\n", i, start) != lf
            dropped = dropped or last is not None or start > i
            line = buf[start:end + 1]
            at = self._next - len(buf) + start
            self._i = end + 1
            if len(line) <= cap:
                last = line, -1, at, at + len(line)
            else:
                last = line[:cap] + (b"\r\n" if line.endswith(b"\r\n") else b"\n"), cap, at, at + len(line)

    def _rest(self) -> bytes:
        """Read past the rest of the current line; its line end (CRLF, LF, or none at the end)."""
        prev = self._buf[self._i - 1:self._i]
        while True:
            buf, i = self._buf, self._i
            j = buf.find(b"\n", i)
            if j >= 0:
                before = buf[j - 1:j] if j > i else prev
                self._i = j + 1
                return b"\r\n" if before == b"\r" else b"\n"
            if len(buf) > i:
                prev = buf[-1:]
            self._i = len(buf)
            if not self._more():
                return b""


def _body_mode(header: bytes, keep_text: bool) -> int:
    """How the scan treats the body after this header block (a guess, checked after the parse)."""
    p = parse_message(header)
    if p.maintype == "message" and p.subtype in ("rfc822", "global") and p.encoding in ("7bit", "8bit", "binary"):
        return _HEAD  # the encapsulated message's header follows (as mime._parse_entity parses it)
    return _KEEP if p.maintype == "multipart" or (keep_text and p.maintype == "text") else _SKIP


#: (offset in the copy, offset in the message, LFs left out before it): where a copy resumes after a cut
type Mark = tuple[int, int, int]


def sparse_copy(read_at: ReadAt, size: int, limit: int = TEXT_LIMIT, *, keep_text: bool = True,  # noqa: C901, PLR0912
                marks: list[Mark] | None = None) -> tuple[bytes, list[int]] | None:
    """The message (CRLF line ends: a bare LF becomes CRLF, as `mime.parse_message` makes it) with
    the middle of each body that looks unsearched left out (`keep_text` False: the bodies of text
    parts too), and the offsets in the copy where bytes were left out; None when what must be kept
    exceeds `limit` octets. With `marks`, a message with a bare LF is None (the copy's offsets are
    then the message's outside the cuts) and each cut adds its Mark to `marks`."""
    lines = _Lines(read_at, size, exact=marks is not None)
    out = bytearray()
    cuts: list[int] = []

    def cut_at(copy_at: int, at: int) -> None:
        cuts.append(copy_at)
        if marks is not None:
            marks.append((copy_at, at, lines.passed_lf))

    mode, block = _HEAD, 0
    skip = max(SKIP_LINE, 2)  # a line cut to it still shows whether it begins with "--"
    while (got := lines.line(skip if mode == _SKIP else limit - len(out) + 1)) is not None:
        text, cut = _crlf(got)
        if lines.exact and len(text) != len(got[0]):
            return None
        dashes = text.startswith(b"--")
        if mode == _SKIP and not dashes:  # a body left out: its first line, then up to the next "--" line
            if cut >= 0:  # the rest of the line left out, up to its line end
                cut_at(len(out) + cut, lines.tell() - (len(text) - cut))
            out.extend(text)
            last, dropped = lines.pass_run(skip)
            if last is not None:  # its last line (a delimiter's CRLF is the end of it)
                text, cut = _crlf(last[:2])
                if lines.exact and len(text) != len(last[0]):
                    return None
                if dropped:
                    cut_at(len(out), last[2])
                if cut >= 0:
                    cut_at(len(out) + cut, last[3] - (len(text) - cut))
                out.extend(text)
            if len(out) > limit or lines.bare:  # everything kept counts (many small attachments too)
                return None
            continue
        if cut >= 0 or len(out) + len(text) > limit:
            return None
        out.extend(text)
        if dashes:
            mode, block = _HEAD, len(out)
        elif mode == _HEAD and text == b"\r\n":
            mode, block = _body_mode(bytes(out[block:]), keep_text), len(out)
    return bytes(out), cuts


def _crlf(got: tuple[bytes, int]) -> tuple[bytes, int]:
    """A line with a bare LF ending in CRLF, as proto.crlf.to_crlf makes it (a line's LF follows its own bytes)."""
    text, cut = got
    if text.endswith(b"\n") and not text.endswith(b"\r\n"):
        return text[:-1] + b"\r\n", cut
    return text, cut


def sparse_part(read_at: ReadAt, size: int, unread: Callable[[Part], bool], limit: int = TEXT_LIMIT, *,
                keep_text: bool = True, marks: list[Mark] | None = None) -> Part | None:
    """The MIME tree of `sparse_copy`, when each place where bytes were left out lies inside the body
    of a leaf part (not a multipart, not an encapsulated message) that `unread` says is not read,
    after its first line; else None (as when the copy would exceed `limit` octets)."""
    got = sparse_copy(read_at, size, limit, keep_text=keep_text, marks=marks)
    if got is None:
        return None
    copy, cuts = got
    part = parse_message(copy)
    spans = sorted((p.body_start, p.end) for p in part.walk() if not p.children and p.message is None and unread(p))
    starts, ends = [s for s, _e in spans], [e for _s, e in spans]
    if all((k := bisect_left(starts, x) - 1) >= 0 and starts[k] < x <= ends[k] for x in cuts):
        return part
    return None


@dataclass(frozen=True, slots=True)
class Layout:
    """The MIME tree of a message in a file (`layout_at`): `part` is parsed from a copy that leaves
    out the middle of every leaf body; `at` gives an offset of the copy in the message, `body_lines`
    and `body_size` a part's as `mime.Part` gives them for the whole message."""

    part: Part
    marks: list[Mark]  # in copy order, the first (0, 0, 0)

    def _mark(self, x: int) -> Mark:
        return self.marks[bisect_right(self.marks, (x, 1 << 62, 0)) - 1]

    def at(self, x: int) -> int:
        copy_at, at, _lf = self._mark(x)
        return at + x - copy_at

    def body_size(self, p: Part) -> int:
        return self.at(p.end) - self.at(p.body_start)

    def body_lines(self, p: Part) -> int:
        return p.body_lines + self._mark(p.end)[2] - self._mark(p.body_start)[2]

    def measure(self, p: Part) -> tuple[int, int]:
        """(body size, body lines) of `p` in the message (`bodystructure.body_structure`)."""
        return self.body_size(p), self.body_lines(p)

    def dump(self) -> bytes:
        """The layout as bytes for the view cache (`load` gives it back): its marks, then the copy
        its tree is parsed from."""
        flat = [v for m in self.marks for v in m]
        return struct.pack(f"<I{len(flat)}q", len(self.marks), *flat) + self.part.msg

    @staticmethod
    def load(data: bytes) -> Layout:
        """The layout `dump` made (the copy parsed again: the same tree)."""
        (n,) = struct.unpack_from("<I", data)
        flat = struct.unpack_from(f"<{3 * n}q", data, 4)
        marks: list[Mark] = [(flat[i], flat[i + 1], flat[i + 2]) for i in range(0, 3 * n, 3)]
        return Layout(parse_message(data[4 + 24 * n:]), marks)


def layout_at(read_at: ReadAt, size: int, limit: int = TEXT_LIMIT) -> Layout | None:
    """The `Layout` of a message of `size` bytes with CRLF line ends read by offset, holding at most
    about `limit` octets of it (its header blocks, delimiter lines, multipart preambles and the
    first and last lines of each leaf body); None when that is not enough (more to keep, a bare LF,
    a guess of the scan that the parse does not confirm): the caller reads the message whole."""
    marks: list[Mark] = [(0, 0, 0)]
    part = sparse_part(read_at, size, lambda p: True, limit, keep_text=False, marks=marks)
    return Layout(part, marks) if part is not None else None


def search_text_at(read_at: ReadAt, size: int, limit: int = TEXT_LIMIT) -> SearchText:
    """`matching.search_text` of a message of `size` bytes read by offset, holding at most about
    `limit` octets of it; inexact and empty when the text cannot be had within that (see above)."""
    # `part_search_text` reads the bodies of text/* leaves only
    part = sparse_part(read_at, size, lambda p: p.maintype != "text", limit)
    if part is not None:
        return part_search_text(part, limit)
    return SearchText({f: "" for f in INDEXED_FIELDS}, "", "", "", False)
