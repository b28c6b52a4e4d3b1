"""Modified UTF-7 mailbox names (RFC 3501 §5.1.3): IMAP4rev1 clients on the wire, Maildir++ folder
directory names on disk (as Dovecot writes them), hence outside `proto.imap`.

Written here because Python has no codec for it (the stdlib "utf-7" is RFC 2152 with a different
shift character and alphabet). The decoder is strict so that every name has one spelling: it refuses
encoded printable ASCII, non-zero padding bits, unterminated shifts, "&" not followed by "-" or a
base64 run, and lone UTF-16 surrogates.
"""

from __future__ import annotations

import base64
import binascii

__all__ = ["Mutf7Error", "mutf7_decode", "mutf7_encode"]


class Mutf7Error(ValueError):
    """The bytes are not a canonical modified UTF-7 string."""


def _is_direct(ch: str) -> bool:
    # RFC 3501 §5.1.3: printable US-ASCII (0x20-0x7e) represents itself, "&" excepted.
    return "\x20" <= ch <= "\x7e"


def mutf7_encode(name: str) -> str:
    """Encode a Unicode mailbox name to modified UTF-7 (pure ASCII)."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be", "surrogatepass")
            # RFC 3501 §5.1.3: modified BASE64, "," replaces "/", no "=" padding.
            b64 = base64.b64encode(raw).rstrip(b"=").replace(b"/", b",").decode("ascii")
            out.append("&" + b64 + "-")
            run.clear()

    for ch in name:
        if _is_direct(ch):
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    flush()
    return "".join(out)


_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,")


def mutf7_decode(data: str | bytes) -> str:
    """Decode a modified UTF-7 mailbox name; raise Mutf7Error unless canonical."""
    raw = data.encode("latin-1") if isinstance(data, str) else bytes(data)
    out: list[str] = []
    i, n = 0, len(raw)
    prev_shift_end = -1  # where the last non-empty shift ended, to refuse "&AOQ-&AOQ-"
    while i < n:
        c = raw[i]
        if c != 0x26:  # "&"
            if not 0x20 <= c <= 0x7E:
                raise Mutf7Error("8-bit or control character in modified UTF-7")
            out.append(chr(c))
            i += 1
            continue
        start = i
        end = raw.find(b"-", i + 1)
        if end < 0:
            raise Mutf7Error("unterminated &-shift")
        chunk = raw[i + 1 : end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        if any(b not in _B64_CHARS for b in chunk):
            raise Mutf7Error("invalid character in &-shift")
        if len(chunk) % 4 == 1:
            raise Mutf7Error("truncated base64 in &-shift")
        padded = chunk.replace(b",", b"/") + b"=" * (-len(chunk) % 4)
        try:
            decoded = base64.b64decode(padded, validate=True)
        except binascii.Error as exc:
            raise Mutf7Error("invalid base64 in &-shift") from exc
        if len(decoded) % 2:
            raise Mutf7Error("odd UTF-16 length in &-shift")
        # Canonical form only: the re-encoding must give back the same characters (no stray bits).
        if base64.b64encode(decoded).rstrip(b"=").replace(b"/", b",") != chunk:
            raise Mutf7Error("non-zero padding bits in &-shift")
        try:
            text = decoded.decode("utf-16-be")
        except UnicodeDecodeError as exc:
            raise Mutf7Error("invalid UTF-16 in &-shift") from exc
        if any(_is_direct(ch) for ch in text):
            raise Mutf7Error("printable ASCII must not be shifted")
        if prev_shift_end == start:
            raise Mutf7Error("adjacent &-shifts must be one run")
        prev_shift_end = i
        out.append(text)
    return "".join(out)
