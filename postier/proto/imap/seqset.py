"""IMAP sequence sets (RFC 9051 §9 sequence-set, RFC 5182 "$"), resolved lazily against a maximum."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from .errors import ParseError

__all__ = ["MAX_NUMBER", "SequenceSet"]

MAX_NUMBER = 4294967295  # RFC 9051 §9: nz-number fits in 32 bits

# One range; None stands for "*" (the largest number in use). A single number n is (n, n).
SeqRange = tuple[int | None, int | None]

_MAX_RANGES = 100_000  # bound on the number of comma-separated elements


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """A parsed sequence set. ``saved`` is the RFC 5182 "$" (the last SEARCH SAVE result).

    Nothing is resolved at parse time: "*" means the mailbox's largest message sequence number
    (or UID) when the command runs, so call ``resolve``/``contains``/``iter`` with that value.
    """

    ranges: tuple[SeqRange, ...] = ()
    saved: bool = False

    @classmethod
    def parse(cls, text: str | bytes) -> SequenceSet:
        """Parse ``1:3,5,7:*`` or ``$``; raise ParseError on anything else."""
        s = text.decode("ascii", "replace") if isinstance(text, bytes) else text
        if s == "$":
            return cls(saved=True)  # RFC 5182 §2.1
        if not s:
            raise ParseError("Empty sequence set")
        parts = s.split(",")
        if len(parts) > _MAX_RANGES:
            raise ParseError("Sequence set too long")
        ranges: list[SeqRange] = []
        for part in parts:
            lo, sep, hi = part.partition(":")
            a = _parse_seq_number(lo)
            ranges.append((a, _parse_seq_number(hi) if sep else a))
        return cls(tuple(ranges))

    @classmethod
    def from_ids(cls, ids: Iterable[int]) -> SequenceSet:
        """Build the shortest set covering exactly ``ids`` (sorted, runs compressed)."""
        ranges: list[SeqRange] = []
        for n in sorted(set(ids)):
            if ranges:
                lo, hi = ranges[-1]
                assert lo is not None and hi is not None
                if n == hi + 1:
                    ranges[-1] = (lo, n)
                    continue
            ranges.append((n, n))
        return cls(tuple(ranges))

    def __str__(self) -> str:
        if self.saved:
            return "$"
        out = []
        for lo, hi in self.ranges:
            a = "*" if lo is None else str(lo)
            if lo == hi:
                out.append(a)
            else:
                out.append(a + ":" + ("*" if hi is None else str(hi)))
        return ",".join(out)

    def __bool__(self) -> bool:
        return self.saved or bool(self.ranges)

    @property
    def uses_star(self) -> bool:
        return any(lo is None or hi is None for lo, hi in self.ranges)

    def resolve(self, max_value: int) -> list[tuple[int, int]]:
        """Merged, sorted (low, high) ranges with "*" replaced by ``max_value``.

        Ranges are not clamped: ``5:*`` with max 3 is (3, 5), which contains 3 as RFC 9051 §9 wants
        ("a range of 559:* always includes the UID of the last message"). "$" cannot be resolved
        here: the session holds the saved result.
        """
        if self.saved:
            raise ValueError("the saved result $ is resolved by the session")
        spans = []
        for lo, hi in self.ranges:
            a = max_value if lo is None else lo
            b = max_value if hi is None else hi
            spans.append((a, b) if a <= b else (b, a))  # RFC 9051 §9: 4:2 is 2:4
        spans.sort()
        merged: list[tuple[int, int]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1] + 1:
                if b > merged[-1][1]:
                    merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        return merged

    def contains(self, value: int, max_value: int) -> bool:
        return any(a <= value <= b for a, b in self.resolve(max_value))

    def iter(self, max_value: int) -> Iterator[int]:
        """Ascending members that are between 1 and ``max_value`` (the usable ones)."""
        for a, b in self.resolve(max_value):
            yield from range(max(a, 1), min(b, max_value) + 1)

    def max_number(self) -> int:
        """The largest explicit number (0 if none), for "is any number beyond the mailbox" checks."""
        return max((x for r in self.ranges for x in r if x is not None), default=0)


def _parse_seq_number(s: str) -> int | None:
    if s == "*":
        return None
    # RFC 9051 §9: nz-number = digit-nz *DIGIT
    if not s or not s.isascii() or not s.isdigit() or s[0] == "0" or len(s) > 10:
        raise ParseError("Invalid sequence set")
    n = int(s)
    if n > MAX_NUMBER:
        raise ParseError("Invalid sequence set")
    return n
