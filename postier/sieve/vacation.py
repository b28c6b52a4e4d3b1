"""Vacation (RFC 5230, :seconds from RFC 6131): whether to reply, and the reply message; pure code.

``decide`` applies RFC 5230 §4.5-§4.6 and RFC 3834 §2: never to the null sender or to list and
robot addresses, never to Auto-Submitted mail (other than "no"), mailing lists (List-Id, any List-*
field, Precedence bulk/list/junk) or to ourselves, only when one of our addresses is in a recipient
field, and at most once per sender per period (``VacationStore``: a small interface the caller backs
with its own storage). ``compose`` builds the reply (RFC 5230 §5, RFC 3834 §3): Auto-Submitted:
auto-replied, In-Reply-To and References to the original, "Auto: " subject by default.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.header import Header
from email.utils import formatdate, make_msgid
from typing import Protocol

from postier.message.envelope import parse_addresses
from postier.message.mime import decode_header_text

from .interpreter import Message

__all__ = ["MemoryVacationStore", "VacationDecision", "VacationStore", "compose", "decide"]

MIN_PERIOD = 1  # RFC 6131 §2: :seconds 0 means "reply every time" is allowed; we keep 1 s
MAX_PERIOD = 90 * 86400
MAX_SUBJECT = 256  # characters of "Auto: <original subject>…" at most
_ROBOTS = ("mailer-daemon", "listserv", "majordomo", "owner-", "-request", "postmaster")
_RECIPIENT_HEADERS = ("to", "cc", "bcc", "resent-to", "resent-cc", "resent-bcc")


class VacationStore(Protocol):
    """Who got a reply when: ``seen`` is true while a reply to ``key`` is still within its period."""

    def seen(self, key: str, now: float) -> bool: ...

    def record(self, key: str, until: float) -> None: ...


@dataclass
class MemoryVacationStore:
    entries: dict[str, float] = field(default_factory=dict)

    def seen(self, key: str, now: float) -> bool:
        return self.entries.get(key, 0.0) > now

    def record(self, key: str, until: float) -> None:
        self.entries[key] = until


@dataclass(frozen=True, slots=True)
class VacationDecision:
    reply: bool
    reason: str  # why not (or "reply")
    key: str = ""
    matched: str = ""  # our address as found in the recipient fields: the reply's From


def _addr(text: str) -> str:
    text = text.strip().removeprefix("<").removesuffix(">")
    local, _, domain = text.rpartition("@")
    return f"{local}@{domain.lower()}" if local else text.lower()


def _header_addresses(message: Message, names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for raw in message.values(name):
            for a in parse_addresses(raw):
                if a.mailbox is not None and a.host is not None:
                    out.append(_addr(a.mailbox.decode("utf-8", "replace") + "@" +
                                     a.host.decode("utf-8", "replace")))
    return out


def decide(params: dict[str, object], message: Message, sender: str, recipient: str,
           own_addresses: Iterable[str], store: VacationStore, now: float | None = None) -> VacationDecision:
    """Whether the vacation action of ``params`` (from the interpreter) sends a reply."""
    now = time.time() if now is None else now
    sender_addr = _addr(sender)
    if not sender or sender_addr in ("", "@"):  # RFC 5230 §4.5: never to the null sender
        return VacationDecision(False, "null sender")
    local = sender_addr.rpartition("@")[0].lower()
    if any(local == r or (r.endswith("-") and local.startswith(r)) or (r.startswith("-") and local.endswith(r))
           for r in _ROBOTS):  # RFC 5230 §4.6
        return VacationDecision(False, "sender is a list or robot address")
    auto = message.values("auto-submitted")
    if auto and any(v.split(b";")[0].strip().lower() != b"no" for v in auto):  # RFC 3834 §2
        return VacationDecision(False, "auto-submitted message")
    if message.values("list-id") or any(n.lower().startswith("list-") for n, _ in message.fields):
        return VacationDecision(False, "mailing list message")  # RFC 5230 §4.6, RFC 2369/2919
    if any(v.strip().lower() in (b"bulk", b"list", b"junk") for v in message.values("precedence")):
        return VacationDecision(False, "bulk message")
    suppress = {w.strip().lower() for v in message.values("x-auto-response-suppress") for w in v.split(b",")}
    if suppress & {b"all", b"oof"}:  # Microsoft's [MS-OXCMAIL] §2.2.3.2.20: no out-of-office replies
        return VacationDecision(False, "auto-responses suppressed")
    extra = params.get("addresses")
    listed = [str(x) for x in extra] if isinstance(extra, list) else []
    mine = {_addr(a).lower() for a in [recipient, *own_addresses, *listed] if a}
    if sender_addr.lower() in mine:  # RFC 5230 §4.5: never to ourselves
        return VacationDecision(False, "sender is ourselves")
    found = [a for a in _header_addresses(message, _RECIPIENT_HEADERS) if a.lower() in mine]
    if not found:  # RFC 5230 §4.5
        return VacationDecision(False, "not addressed to us")
    handle = params.get("handle")
    if handle is None:  # RFC 5230 §4.2: the default handle is derived from the arguments
        handle = hashlib.sha256(repr((params.get("reason"), params.get("subject"), params.get("from"),
                                      params.get("mime"))).encode()).hexdigest()[:32]
    key = f"{handle}\0{sender_addr.lower()}"  # one reply per sender, however its case is written
    if store.seen(key, now):  # RFC 5230 §4.1: once per sender per period
        return VacationDecision(False, "already replied within the period", key)
    return VacationDecision(True, "reply", key, found[0])


def record(params: dict[str, object], decision: VacationDecision, store: VacationStore,
           now: float | None = None) -> None:
    now = time.time() if now is None else now
    seconds = int(str(params.get("seconds", 7 * 86400)))
    seconds = min(max(seconds, MIN_PERIOD), MAX_PERIOD)  # RFC 5230 §4.1, RFC 6131 §2
    store.record(decision.key, now + seconds)


def _encode(value: str) -> str:
    return value if value.isascii() else Header(value, "utf-8").encode()


def _reply_to(message: Message, sender: str, ignore_envelope: bool = False) -> str:
    """The original's From/Sender/Reply-To entry for the envelope sender (keeping its display name),
    else the bare sender address (RFC 5230 §4.3); with ``ignore_envelope``, the first of Reply-To,
    Sender and From whatever the envelope says (for senders rewritten by SRS)."""
    target = _addr(sender)
    for name in ("reply-to", "sender", "from") if ignore_envelope else ("from", "sender", "reply-to"):
        for raw in message.values(name):
            for a in parse_addresses(raw):
                if a.mailbox is None or a.host is None:
                    continue
                addr = a.mailbox.decode("utf-8", "replace") + "@" + a.host.decode("utf-8", "replace")
                if ignore_envelope:
                    target = _addr(addr)
                if _addr(addr) == target and a.name:
                    phrase = decode_header_text(a.name).replace("\\", "\\\\").replace('"', '\\"')
                    return f'{_encode(chr(34) + phrase + chr(34))} <{addr}>'
                if _addr(addr) == target:
                    return f"<{addr}>"
    return f"<{target}>"


def compose(params: dict[str, object], message: Message, sender: str, recipient: str,
            hostname: str = "localhost", now: float | None = None, *,
            default_subject: str | None = None, subject_template: str | None = None,
            ignore_envelope: bool = False) -> bytes:
    """The reply (RFC 5230 §5); sent with the null reverse-path (RFC 5230 §4.3)."""
    subject = params.get("subject")
    if subject is None:
        original = message.values("subject")
        text = decode_header_text(original[0]) if original else ""
        if len("Auto: " + text) > MAX_SUBJECT:  # keep the reply's subject short, with an ellipsis
            text = text[: MAX_SUBJECT - len("Auto: ") - 1] + "\u2026"
        if subject_template and text:
            subject = subject_template.replace("%{subject}", text).replace("%$", text)
        elif default_subject and not text:
            subject = default_subject
        else:
            subject = "Auto: " + text  # RFC 5230 §4.3: "Auto: " and the original subject
    frm = str(params.get("from") or recipient)
    lines = [
        f"From: {_encode(frm)}",
        f"To: {_reply_to(message, sender, ignore_envelope)}",
        f"Subject: {_encode(str(subject))}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: {make_msgid(domain=hostname)}",
        "Auto-Submitted: auto-replied (vacation)",  # RFC 3834 §5
        "Precedence: bulk",
    ]
    msgid = message.values("message-id")
    if msgid:  # RFC 5230 §5.2, RFC 5322 §3.6.4
        mid = msgid[0].decode("utf-8", "replace").strip()
        lines.append(f"In-Reply-To: {mid}")
        refs = [r.decode("utf-8", "replace") for r in message.values("references")]
        lines.append("References: " + " ".join([*refs, mid]).strip())
    reason = str(params.get("reason", ""))
    lines.append("MIME-Version: 1.0")
    if params.get("mime"):  # RFC 5230 §5.4: the reason is a MIME entity
        head = "\r\n".join(lines) + "\r\n"
        return (head + reason.replace("\r\n", "\n").replace("\n", "\r\n")).encode("utf-8")
    lines += ["Content-Type: text/plain; charset=utf-8", "Content-Transfer-Encoding: 8bit"]
    body = reason.replace("\r\n", "\n").replace("\n", "\r\n")
    if not body.endswith("\r\n"):
        body += "\r\n"
    return ("\r\n".join(lines) + "\r\n\r\n" + body).encode("utf-8")
