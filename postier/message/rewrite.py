"""A received message with its header section rewritten (fields removed), without copying the body.

Inbound checks change the header section of a message they accept: forged Authentication-Results
removed (RFC 8601 §5), the fields Rspamd asks to remove, a sender's own X-Spam-* fields. The body,
possibly a 25 MiB spool file, is read through, never copied: `RewrittenBody` is the new header section
followed by the original bytes after the old one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .types import MessageBody


class RewrittenBody(MessageBody):
    """The received body with its header section replaced; reads through to the original.

    Owns no file: the original body is closed by its owner (the SMTP session) after delivery.
    """

    def __init__(self, original: MessageBody, head: bytes, skip: int):
        super().__init__(original.spool_dir, original.memory_limit)
        self._orig = original
        self._head = head
        self._skip = skip
        self.size = len(head) + original.size - skip

    def write(self, data: bytes) -> None:
        raise TypeError("a rewritten body is read-only")

    @property
    def in_memory(self) -> bool:
        return self._orig.in_memory

    def getvalue(self) -> bytes:
        return self._head + self._orig.getvalue()[self._skip:]

    def head(self, limit: int) -> bytes:
        return (self._head + self._orig.head(limit + self._skip)[self._skip:])[:limit]

    def iter_chunks(self, size: int = 1 << 20) -> Iterable[bytes]:
        yield self._head
        skip = self._skip
        for chunk in self._orig.iter_chunks(size):
            if skip >= len(chunk):
                skip -= len(chunk)
                continue
            yield chunk[skip:]
            skip = 0

    def copy_to(self, out: Any) -> None:
        for chunk in self.iter_chunks():
            out.write(chunk)

    def close(self) -> None:
        pass


def filter_fields(header: bytes, drop: Callable[[bytes, bytes, int], bool]) -> bytes:
    """The header section without the fields `drop(lowercased name, value, index)` chooses.

    `index` counts the fields of the same name from 1, top down. Folded lines stay with their field
    (RFC 5322 §2.2.3); the end of the header section and every kept field stay byte for byte.
    """
    lines = header.splitlines(keepends=True)
    out: list[bytes] = []
    field: list[bytes] = []
    seen: dict[bytes, int] = {}

    def flush() -> None:
        if field:
            raw = b"".join(field)
            name, _, value = raw.partition(b":")
            key = name.strip().lower()
            seen[key] = seen.get(key, 0) + 1
            if not drop(key, value, seen[key]):
                out.extend(field)
            field.clear()

    for index, line in enumerate(lines):
        if line in (b"\r\n", b"\n"):  # end of the header section
            flush()
            out.extend(lines[index:])
            return b"".join(out)
        if line[:1] in (b" ", b"\t") and field:
            field.append(line)
        else:
            flush()
            field.append(line)
    flush()
    return b"".join(out)


def remove_fields(header: bytes, orders: Mapping[str, int]) -> bytes:
    """Remove fields by name, milter style: order 0 removes every instance, N > 0 the Nth from the
    top, N < 0 the Nth from the bottom (the semantics of Rspamd's `milter.remove_headers`)."""
    wanted = {name.strip().lower().encode("ascii", "replace"): order for name, order in orders.items()}
    if not wanted:
        return header
    counts: dict[bytes, int] = {}

    def count(name: bytes, _value: bytes, index: int) -> bool:
        counts[name] = index
        return False

    if any(order < 0 for order in wanted.values()):
        filter_fields(header, count)

    def drop(name: bytes, _value: bytes, index: int) -> bool:
        order = wanted.get(name)
        if order is None:
            return False
        if order == 0:
            return True
        return index == (order if order > 0 else counts.get(name, 0) + 1 + order)

    return filter_fields(header, drop)
