"""Storage quotas at the SMTP and LMTP doors: refusing a recipient whose mailbox is full (RFC 3463
X.2.2, "mailbox full") and the replies for a message that did not fit (store/quota.py counts).

At RCPT the message's size is not known yet: a recipient is refused when their usage is already at
the quota, or when MAIL FROM's SIZE= (RFC 1870 §5) says the message cannot fit. After DATA the store
refuses to write a message that does not fit (nothing is stored for that user), and the pipeline
answers for that recipient: per recipient on LMTP (RFC 2033 §4.2); on port 25 the whole message gets
the quota reply when nobody got it, and otherwise the full mailboxes' copies go to the queue, which
retries them (452) or bounces them (552) as it does for other local failures (Postfix and Dovecot's
LMTP behave alike). `[limits] quota_reject_permanent` chooses 552 5.2.2 over 452 4.2.2.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from ..config import Config
from ..message.types import Envelope, LocalOutcome, Recipient, User
from ..proto.smtp.replies import Reply
from ..store.index import INDEX_NAME
from ..store.quota import usage_of_index

__all__ = ["R452_MAILBOX_FULL", "R552_MAILBOX_FULL", "full_recipients", "quota_reply", "rcpt_refusal"]

R452_MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")  # RFC 5321 §4.5.3.1.10, RFC 3463 X.2.2
R552_MAILBOX_FULL = Reply(552, "5.2.2", "Mailbox full")


def quota_reply(config: Config) -> Reply:
    return R552_MAILBOX_FULL if config.limits.quota_reject_permanent else R452_MAILBOX_FULL


def _declared_size(env: Envelope) -> int:
    """MAIL FROM's SIZE= (RFC 1870 §6), 0 when absent or not a number."""
    raw = (env.mail_params or {}).get("SIZE") or ""
    return int(raw) if raw.isdigit() and len(raw) < 16 else 0


def _is_full(config: Config, user: User, size: int) -> bool:
    if user.quota is None or user.mailbox_format != "maildir":
        return False
    used = usage_of_index(user.home(config.mail_root) / INDEX_NAME, maildir=user.maildir(config.mail_root)).bytes
    return used >= user.quota or used + size > user.quota


async def rcpt_refusal(config: Config, env: Envelope, rcpt: Recipient) -> Reply | None:
    """The quota reply for a recipient just accepted when every mailbox it reaches is full (an alias
    reaching some room somewhere is accepted; the full ones are handled after DATA), else None."""
    users = [u for u in rcpt.users if u.quota is not None]
    if not users or rcpt.remote or len(users) != len(rcpt.users):
        return None
    size = _declared_size(env)
    full = await asyncio.to_thread(lambda: all(_is_full(config, u, size) for u in users))
    return quota_reply(config) if full else None


def full_recipients(recipients: Sequence[Recipient], local: LocalOutcome) -> set[str]:
    """Recipients not delivered only because their users' quotas had no room."""
    failed, over = set(local.failed_users), set(local.over_quota)
    if not over:
        return set()
    return {r.address for r in recipients if r.address not in local.delivered and r.users
            and all(u.address in over for u in r.users if u.address in failed)}
