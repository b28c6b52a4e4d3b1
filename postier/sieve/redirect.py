"""What a Sieve redirect (RFC 5228 §4.2) sends: the envelope sender and the forwarded message, with loop
detection through an ``X-Sieve-Redirected-From`` trace field; pure code.

RFC 5228 §4.2 asks implementations to take measures against redirect loops. A redirected copy carries
``X-Sieve-Redirected-From: <the user's address>`` (the field Pigeonhole uses, so loops through a
Dovecot server are caught too); a message that already carries one naming this user is not redirected
again (the caller keeps it instead). The envelope sender follows a policy like Pigeonhole's
``sieve_redirect_envelope_from``: ``sender`` (default), ``recipient``, ``orig_recipient``,
``user_email`` or an explicit ``<address>``; the null sender is never replaced (RFC 5321 §4.5.5:
bounces must not bounce). postier's SRS rewriting applies after this choice.
"""

from __future__ import annotations

from postier.message.envelope import parse_addresses

from .interpreter import Message

__all__ = ["REDIRECTED_FROM", "envelope_sender", "is_loop", "redirect_trace", "redirected_message"]

REDIRECTED_FROM = "X-Sieve-Redirected-From"


def _norm(addr: str) -> str:
    addr = addr.strip().removeprefix("<").removesuffix(">")
    local, at, domain = addr.rpartition("@")
    return f"{local}@{domain.lower()}" if at else addr


def envelope_sender(policy: str, sender: str, recipient: str, orig_recipient: str | None,
                    user_email: str | None) -> str:
    """The MAIL FROM of a redirected copy ("" for the null reverse-path)."""
    if _norm(sender) == "":
        return ""  # never turn a bounce into something that can bounce
    policy = policy.strip().lower()
    if policy in ("", "sender"):
        return _norm(sender)
    if policy == "recipient":
        return _norm(recipient)
    if policy == "orig_recipient":
        return _norm(orig_recipient or recipient)
    if policy == "user_email":
        return _norm(user_email or recipient)
    if policy.startswith("<") and policy.endswith(">"):
        return _norm(policy)
    return _norm(sender)


def is_loop(message: Message, user: str) -> bool:
    """True when the message was already redirected by this user's script (RFC 5228 §4.2)."""
    me = _norm(user)
    for raw in message.values(REDIRECTED_FROM):
        for a in parse_addresses(raw):
            if a.mailbox is not None and a.host is not None:
                addr = a.mailbox.decode("utf-8", "replace") + "@" + a.host.decode("utf-8", "replace")
                if _norm(addr) == me:
                    return True
    return False


def redirect_trace(user: str) -> bytes:
    """The trace field prepended to a redirected copy (`outcome.plan` puts it before the message)."""
    return f"{REDIRECTED_FROM}: {_norm(user)}\r\n".encode()


def redirected_message(raw: bytes, user: str) -> bytes:
    """The forwarded octets: the message unchanged but for the prepended trace field."""
    return redirect_trace(user) + raw
