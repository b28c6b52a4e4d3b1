"""Delivery Status Notifications: multipart/report (RFC 6522, was 3462) with message/delivery-status
(RFC 3464), status codes from RFC 3463, and RFC 6533's message/global-* forms for SMTPUTF8 mail.

Composed by hand rather than with the standard library's `email` package: the result is a few fixed
header blocks whose every byte we want to control (CRLF line endings, folded ASCII DSN fields, an
8-bit original header block carried unchanged), which `email` would re-encode or re-fold.

One DSN reports on any number of recipients of one message (RFC 3464 §2: one per-message block,
then one block per recipient). The caller decides when a DSN is owed (never to the null sender,
RFC 3461 §6.2 NOTIFY rules); this module only writes it.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass

from .received import utc_date
from .mime import header_section

#: RFC 3461 §4.3 / Postfix bounce_size_limit: a RET=FULL original larger than this is returned as
#: headers only (the sender has the message; the DSN must stay deliverable).
FULL_LIMIT = 100 * 1024
MAX_HEADER_BLOCK = 64 * 1024
_CTL = re.compile(r"[\x00-\x1f\x7f]+")
ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})  # RFC 3464 §2.3.3


@dataclass(frozen=True)
class DSNRecipient:
    address: str
    action: str  # RFC 3464 §2.3.3: failed | delayed | delivered | relayed | expanded
    status: str  # RFC 3463 code, e.g. "5.1.1"
    diagnostic: str = ""  # the remote reply ("550 5.1.1 No such user"), "" for local decisions
    remote_mta: str = ""  # host name of the MX that answered
    orcpt: str = ""  # RFC 3461 ORCPT as received: "rfc822;addr"
    reason: str = ""  # human-readable explanation when there is no diagnostic
    last_attempt: float | None = None
    will_retry_until: float | None = None  # delayed only (RFC 3464 §2.3.9)


@dataclass(frozen=True)
class DSNMessage:
    data: bytes  # the whole message, CRLF line endings
    message_id: str
    eightbit: bool  # carries 8-bit octets (the original's headers): send with BODY=8BITMIME
    smtputf8: bool  # needs SMTPUTF8 (a non-ASCII envelope recipient)


def _ascii(text: str, limit: int = 900) -> str:
    """A DSN field value: one line, US-ASCII (RFC 3464 §2.1.1), bounded."""
    text = _CTL.sub(" ", text).strip()
    return text.encode("ascii", "backslashreplace").decode("ascii")[:limit]


def _fold(name: str, value: str) -> str:
    """`Name: value` folded at spaces to stay near 78 octets per line (RFC 5322 §2.2.3)."""
    line = f"{name}: "
    out: list[str] = []
    for word in value.split(" "):
        if len(line) + len(word) > 78 and line.strip() and not line.endswith(": "):
            out.append(line.rstrip(" "))
            line = " "
        line += word + " "
    out.append(line.rstrip(" "))
    return "\r\n".join(out) + "\r\n"


def header_block(original: bytes) -> bytes:
    """The original's header block (up to, not including, the blank line), CRLF-terminated, bounded."""
    block = header_section(original, empty_line=False)
    if len(block) > MAX_HEADER_BLOCK:
        cut = block.rfind(b"\r\n", 0, MAX_HEADER_BLOCK)
        block = block[: cut + 2] if cut > 0 else b""
    if block and not block.endswith(b"\r\n"):
        block += b"\r\n"
    return block


def _address_type(address: str) -> str:
    # RFC 6533 §3: "utf-8" address type for internationalised addresses
    return "rfc822" if address.isascii() else "utf-8"


def _subject(actions: set[str]) -> str:
    if "failed" in actions:
        return "Undelivered Mail Returned to Sender"
    if "delayed" in actions:
        return "Delayed Mail (still being retried)"
    return "Successful Mail Delivery Report"


def _explain(actions: set[str], reporting_mta: str) -> list[str]:
    lines = [f"This is the mail system at host {reporting_mta}.", ""]
    if "failed" in actions:
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. The details are below."]
    elif "delayed" in actions:
        lines += ["Your message could not be delivered yet to one or more recipients.",
                  "It will be retried until it is too old; you do not need to send it again."]
    else:
        lines += ["Your message was successfully delivered to the destination(s)",
                  "listed below."]
    return lines + [""]


def compose_dsn(*, reporting_mta: str, sender: str, recipients: list[DSNRecipient], original: bytes,
                complete: bool, queue_id: str, arrival: float, now: float, envid: str = "", ret: str = "",
                smtputf8: bool = False) -> DSNMessage:
    """Write the DSN for `recipients` of one message, addressed to its envelope `sender`.

    `original` is the queued message, or at least its beginning (`complete` False): its header block
    is returned (text/rfc822-headers), or the whole message when RET=FULL, `complete` and small.
    """
    if not recipients:
        raise ValueError("a DSN reports on at least one recipient")
    for r in recipients:
        if r.action not in ACTIONS:
            raise ValueError(f"unknown DSN action {r.action!r}")
    headers = header_block(original)
    utf8 = smtputf8 or not sender.isascii() or any(not r.address.isascii() for r in recipients)
    actions = {r.action for r in recipients}
    boundary = f"{queue_id}.{secrets.token_hex(8)}/{reporting_mta}"
    message_id = f"<{queue_id}.{secrets.token_hex(6)}.dsn@{reporting_mta}>"
    date = utc_date(now)
    top = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{sender}>",
        f"Subject: {_subject(actions)}",
        f"Date: {date}",
        f"Message-ID: {message_id}",
        "Auto-Submitted: auto-replied",  # RFC 3834 §5: DSNs are automatic replies
        "MIME-Version: 1.0",
        # RFC 6522 §3: report-type names the second part's type
        f'Content-Type: multipart/report; report-type={"global-delivery-status" if utf8 else "delivery-status"};',
        f'\tboundary="{boundary}"',
        "",
    ]
    text = _explain(actions, reporting_mta)
    for r in recipients:
        why = r.diagnostic or r.reason or r.status
        where = f" host {r.remote_mta} said:" if r.remote_mta and r.diagnostic else ""
        text.append(f"<{r.address}>:{where} {why}")
    # RFC 3464 §2.2: per-message fields
    status = [f"Reporting-MTA: dns; {reporting_mta}", f"X-Postier-Queue-ID: {queue_id}"]
    if envid:
        status.append(f"Original-Envelope-Id: {_ascii(envid, 100)}")  # RFC 3464 §2.2.1
    status.append(f"Arrival-Date: {utc_date(arrival)}")
    fields = "\r\n".join(status) + "\r\n"
    for r in recipients:  # RFC 3464 §2.3: per-recipient fields
        fields += "\r\n"
        addr = r.address if utf8 else _ascii(r.address, 320)
        if r.orcpt:
            fields += f"Original-Recipient: {r.orcpt if utf8 else _ascii(r.orcpt, 500)}\r\n"  # §2.3.1
        fields += f"Final-Recipient: {_address_type(r.address)}; {addr}\r\n"  # §2.3.2
        fields += f"Action: {r.action}\r\n"  # §2.3.3
        fields += f"Status: {r.status}\r\n"  # §2.3.4
        if r.remote_mta:
            fields += f"Remote-MTA: dns; {_ascii(r.remote_mta, 255)}\r\n"  # §2.3.5
        if r.diagnostic:
            fields += _fold("Diagnostic-Code", f"smtp; {_ascii(r.diagnostic)}")  # §2.3.6
        if r.last_attempt is not None:
            fields += f"Last-Attempt-Date: {utc_date(r.last_attempt)}\r\n"  # §2.3.7
        if r.will_retry_until is not None:
            fields += f"Will-Retry-Until: {utc_date(r.will_retry_until)}\r\n"  # §2.3.9
    eight = not headers.isascii()
    full = ret.upper() == "FULL" and complete and len(original) <= FULL_LIMIT and "failed" in actions
    if full:
        # RFC 3461 §4.3 RET=FULL; RFC 6533 §6.1 message/global for internationalised originals
        ctype = "message/global" if (utf8 or not original.isascii()) else "message/rfc822"
        returned, desc = original if original.endswith(b"\r\n") else original + b"\r\n", "Undelivered Message"
        eight = eight or not original.isascii()
    else:
        # RFC 6522 §4 text/rfc822-headers; RFC 6533 §6.3 message/global-headers
        ctype = "message/global-headers" if (utf8 or eight) else "text/rfc822-headers"
        returned, desc = headers, "Undelivered Message Headers" if "failed" in actions else "Message Headers"
    body = [
        f"This is a MIME-encapsulated message.\r\n\r\n--{boundary}\r\n",
        f"Content-Description: Notification\r\nContent-Type: text/plain; charset={'utf-8' if utf8 else 'us-ascii'}\r\n\r\n",
        "\r\n".join(t if utf8 else _ascii(t, 2000) for t in text) + "\r\n\r\n",
        f"--{boundary}\r\n",
        "Content-Description: Delivery report\r\n",
        f"Content-Type: message/{'global-delivery-status' if utf8 else 'delivery-status'}\r\n\r\n",
        fields,
        f"\r\n--{boundary}\r\n",
        f"Content-Description: {desc}\r\nContent-Type: {ctype}\r\n",
        "Content-Transfer-Encoding: 8bit\r\n" if eight else "",
        "\r\n",
    ]
    data = ("\r\n".join(top) + "\r\n").encode("utf-8") + "".join(body).encode("utf-8") + returned
    data += f"\r\n--{boundary}--\r\n".encode()
    # Only the envelope (MAIL FROM:<> RCPT TO:<sender>) needs SMTPUTF8; message/global-* content
    # needs 8BITMIME (RFC 6533 §5).
    return DSNMessage(data, message_id, eightbit=eight or not data.isascii(), smtputf8=not sender.isascii())
