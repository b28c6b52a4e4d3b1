"""Line ends: bare LF (and, for the SMTP wire, bare CR) turned into CRLF (RFC 5322 §2.1, RFC 5321 §2.3.8).

The one copy of the conversion every layer uses: the SMTP client normalising what it sends, the MIME
parser, the Maildir and cluster stores (a bare-LF file written by another tool, an APPEND with bare
LF), the full-text index and the importers. Two semantics, chosen by a parameter:

- ``bare_cr=False`` (the stores, the parser): only a LF not preceded by CR gets a CR; a lone CR
  stays, because inside stored mail it is content (RFC 5322 §2.3 forbids it, yet rewriting it would
  change what another tool wrote and the octets IMAP serves), and Maildir files written by Unix tools
  only ever have bare LF.
- ``bare_cr=True`` (the SMTP client): every bare CR and every bare LF becomes CRLF, because on the
  wire CR and LF only ever appear together (RFC 5321 §2.3.8); a lone CR sent as is would be refused
  by our own server and is an SMTP smuggling vector.

Written here rather than with ``re.sub(rb"(?<!\\r)\\n", ...)``: the two ``bytes.replace`` passes are
several times faster on large bodies, and the count check returns the same object when nothing needs
converting (no copy of a large message).
"""

from __future__ import annotations

__all__ = ["bare_lf", "to_crlf"]


def bare_lf(data: bytes | bytearray, prev_cr: bool = False) -> int:
    """How many LFs of ``data`` are not preceded by CR: the octets `to_crlf` adds. ``prev_cr`` says
    that ``data`` continues a piece which ended with CR (a CRLF split between two reads), so that a
    first LF is not bare."""
    n = data.count(b"\n") - data.count(b"\r\n")
    if prev_cr and data[:1] == b"\n":
        n -= 1
    return n


def to_crlf(data: bytes, bare_cr: bool = False) -> bytes:
    """``data`` with each bare LF (and with ``bare_cr`` each bare CR) turned into CRLF; existing
    CRLF untouched. ``data`` itself (the same object) when there is nothing to convert."""
    crlf = data.count(b"\r\n")
    if bare_cr:
        if data.count(b"\r") == crlf and data.count(b"\n") == crlf:
            return data
        # RFC 5321 §2.3.8: every bare CR or LF becomes CRLF
        return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data.count(b"\n") == crlf:
        return data
    # each LF becomes CRLF, a CRLF staying CRLF (its CR taken away first, then given back)
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
