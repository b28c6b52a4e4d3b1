"""What delivery does with a Sieve result (RFC 5228 §2.10, RFC 5429, RFC 5230, RFC 5293): a plan of
stores, outgoing messages and an SMTP-time refusal; pure code for the MDA to carry out.

``plan()`` turns ``Result.final()`` into: ``stores`` (mailbox, flags, :create, the message as edited:
a ``Copy``, its header over the original's body, which is never read here),
``sends`` (redirects with loop detection and the envelope-sender policy of ``redirect.py``; vacation
replies decided and composed by ``vacation.py``, with :from and :addresses limited to the user's own
addresses; rejection notices), ``refuse`` (the reason for a 550
when the message is still in the SMTP/LMTP transaction and only this recipient is concerned, RFC 5429
§2.1-2.2: ``ereject`` must, ``reject`` may refuse in protocol) and ``duplicate_marks``. A redirect
caught in a loop becomes a keep, so no mail is lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid

from .interpreter import Copy, Message, Result, parse_address
from .redirect import envelope_sender, is_loop, redirect_trace
from .vacation import VacationStore, compose, decide, record

__all__ = ["Delivery", "Plan", "Send", "Store", "plan", "rejection_notice"]


@dataclass(frozen=True, slots=True)
class Store:
    mailbox: str
    flags: tuple[str, ...]
    create: bool
    message: Copy  # the message as the action saw it, over the original's body (never joined here)


@dataclass(frozen=True, slots=True)
class Send:
    kind: str  # "redirect", "vacation", "reject"
    mail_from: str  # "" is the null reverse-path
    rcpt_to: str
    message: Copy | bytes  # a redirect's copy of the message; a reply or notice composed here


@dataclass(slots=True)
class Plan:
    stores: list[Store] = field(default_factory=list)
    sends: list[Send] = field(default_factory=list)
    refuse: str | None = None
    duplicate_marks: list[tuple[str, int]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Delivery:
    """The delivery a result is planned for."""

    sender: str
    recipient: str
    orig_recipient: str | None = None
    user_email: str | None = None  # the user's own address, when it differs from the recipient
    own_addresses: tuple[str, ...] = ()  # every address of the user (vacation :addresses adds to it)
    in_smtp: bool = False  # still in an SMTP/LMTP transaction concerning this recipient alone
    redirect_sender: str = "sender"  # redirect.envelope_sender policy
    hostname: str = "localhost"


def rejection_notice(reason: str, message: Message, d: Delivery, now: float | None = None) -> bytes:
    """RFC 5429 §2.1.1: an MDN (RFC 8098) with disposition "deleted" and the refusal reason."""
    boundary = make_msgid(domain=d.hostname)[1:-1].replace("@", ".")
    original_id = message.values("message-id")
    lines = [
        f"From: Mail Delivery <MAILER-DAEMON@{d.hostname}>",
        f"To: <{d.sender}>",
        "Subject: Automatically rejected mail",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: {make_msgid(domain=d.hostname)}",
        "Auto-Submitted: auto-replied (rejected)",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=disposition-notification; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"Your message to <{d.recipient}> was automatically rejected:",
        "",
        reason,
        "",
        f"--{boundary}",
        "Content-Type: message/disposition-notification",
        "",
        f"Reporting-UA: {d.hostname}; postier",
        f"Final-Recipient: rfc822; {d.recipient}",
        *([f"Original-Message-ID: {original_id[0].decode('utf-8', 'replace')}"] if original_id else []),
        "Disposition: automatic-action/MDN-sent-automatically; deleted",
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    head = message.head.decode("utf-8", "replace")
    text = "\r\n".join(lines) + "\r\n" + head + f"\r\n--{boundary}--\r\n"
    return text.encode("utf-8")


def _own_only(params: dict[str, object], own: list[str]) -> dict[str, object]:
    """Vacation :from and :addresses limited to the user's own addresses (a script may not reply in
    someone else's name or on their behalf); a foreign :from falls back to the recipient."""
    mine = {o.strip("<> ").lower() for o in own if o}
    out = dict(params)
    frm = params.get("from")
    if isinstance(frm, str) and frm:
        parsed = parse_address(frm)
        if parsed is None or f"{parsed[0]}@{parsed[1]}".lower() not in mine:
            out["from"] = None
    listed = params.get("addresses")
    if isinstance(listed, list):
        out["addresses"] = [x for x in listed if str(x).strip("<> ").lower() in mine]
    return out


def plan(result: Result, message: Message, d: Delivery, vacation_store: VacationStore,
         default_mailbox: str = "INBOX", now: float | None = None) -> Plan:
    now = time.time() if now is None else now
    out = Plan(duplicate_marks=list(result.duplicate_marks) if result.error is None else [])
    final = message.head if message.edited else None  # the header after every edit (None: as received)
    keep_added = False
    user = d.user_email or d.recipient
    for a in result.final(default_mailbox):
        head = a.head if a.head is not None else final  # None: the implicit keep (see add_action)
        body = Copy(message, None if head == message.original_head else head)
        if a.kind in ("keep", "store"):
            out.stores.append(Store(a.target, a.flags or (), a.create, body))
            keep_added = keep_added or a.target == default_mailbox
        elif a.kind == "redirect":
            if is_loop(message, user) or is_loop(message, d.recipient):
                if not keep_added:  # RFC 5228 §4.2: a loop is not followed; the mail is kept
                    out.stores.append(Store(default_mailbox, (), False, body))
                    keep_added = True
                continue
            frm = envelope_sender(d.redirect_sender, d.sender, d.recipient, d.orig_recipient, d.user_email)
            out.sends.append(Send("redirect", frm, a.target, Copy(message, body.head, redirect_trace(user))))
        elif a.kind in ("reject", "ereject"):
            if d.in_smtp:
                out.refuse = a.target  # RFC 5429 §2.2: refused in protocol, nothing else sent
            elif d.sender.strip("<> "):  # never to the null sender
                out.sends.append(Send("reject", "", d.sender, rejection_notice(a.target, message, d, now)))
        elif a.kind == "vacation" and a.vacation is not None:
            own: Iterable[str] = (*d.own_addresses, *((d.user_email,) if d.user_email else ()))
            params = _own_only(a.vacation, [d.recipient, *own])
            decision = decide(params, message, d.sender, d.recipient, list(own), vacation_store, now)
            if decision.reply:
                record(params, decision, vacation_store, now)
                reply = compose(params, message, d.sender, decision.matched or user, d.hostname, now)
                out.sends.append(Send("vacation", "", d.sender, reply))  # RFC 5230 §4.3: null sender
    return out
