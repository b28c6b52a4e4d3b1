"""Trace headers written by postier: Received (RFC 5321 §4.4) and Return-Path (RFC 5321 §4.4)."""

from __future__ import annotations

import email.utils
import os
import random
import re
import time

from .mime import header_section

_UNSAFE = re.compile(r"[^\x21-\x7e]")  # printable ASCII without space, for tokens from the peer
# Queue ids need uniqueness, not secrecy: a generator seeded from os.urandom once per process
# instead of a getrandom() system call per id (two ids per message on the MX hot path). Seeded
# again in a forked child: workers forked by the supervisor would otherwise draw the same ids in
# the same second (the second worker's spool files then collided with the first's).
_rng = random.Random()
os.register_at_fork(after_in_child=_rng.seed)
_date: tuple[int, str] = (0, "")


def queue_id() -> str:
    """A short unique id for logs and the Received `id` clause (RFC 5321 §4.4): time + 40 random bits."""
    return f"{int(time.time()):X}{_rng.getrandbits(40):010X}"


def utc_date(when: float) -> str:
    """RFC 5322 §3.3 date-time in UTC with the zone `+0000`: "-0000" (what email.utils writes for
    localtime=False) means the local offset is unknown, which is not true of UTC."""
    return email.utils.formatdate(when, localtime=False)[:-5] + "+0000"


def _formatdate(when: float | None) -> str:
    """RFC 5322 §3.3 date-time in UTC, computed once per second for the current time."""
    global _date
    if when is not None:
        return utc_date(when)
    now = int(time.time())
    if _date[0] != now:
        _date = (now, utc_date(now))
    return _date[1]


def _token(text: str, limit: int = 200) -> str:
    return _UNSAFE.sub("?", text)[:limit] or "unknown"


def protocol_name(esmtp: bool, tls: bool, auth: bool, lmtp: bool = False) -> str:
    """RFC 3848 / RFC 2033 §4.1 `with` protocol types: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA, LMTP..."""
    if lmtp:
        base = "LMTP"
    else:
        base = "ESMTP" if esmtp else "SMTP"
    if base == "SMTP":
        return base
    return base + ("S" if tls else "") + ("A" if auth else "")


def received_header(*, helo: str, peer_ip: str, peer_name: str | None, by_host: str, protocol: str,
                    qid: str, tls: str | None = None, recipient: str | None = None,
                    when: float | None = None) -> bytes:
    """One Received header, folded, CRLF-terminated. Every peer-supplied token is sanitised."""
    rdns = f"{_token(peer_name)} " if peer_name else ""
    ip = f"IPv6:{peer_ip}" if ":" in peer_ip else peer_ip
    # RFC 5321 §4.4: TCP-info is the address of a TCP peer; a Unix-socket (LMTP) peer has none.
    tcp_info = f" ({rdns}[{ip}])" if peer_ip else ""
    lines = [f"Received: from {_token(helo)}{tcp_info}",
             f"\tby {by_host} (postier) with {protocol} id {qid}"]
    if tls:  # Postfix's form: (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)
        version, _, cipher = tls.partition(" ")
        lines.append(f"\t(using {_token(version)} with cipher {_token(cipher)})")
    if recipient:
        lines.append(f"\tfor <{_token(recipient, 320)}>")
    lines[-1] += ";"
    lines.append("\t" + _formatdate(when))
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def return_path(sender: str) -> bytes:
    """RFC 5321 §4.4: the final delivery adds Return-Path with the envelope sender (<> for bounces)."""
    return f"Return-Path: <{_token(sender, 320) if sender else ''}>\r\n".encode()


def count_received(head: bytes) -> int:
    """Number of Received headers in a header block (loop detection, RFC 5321 §6.3)."""
    return len(re.findall(rb"(?im)^received:", header_section(head, empty_line=False)))
