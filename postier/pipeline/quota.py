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
import logging
import sqlite3
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import formatdate, make_msgid

from ..config import Config
from ..message.received import return_path
from ..message.types import Envelope, LocalOutcome, MailDelivery, Recipient, User
from ..proto.smtp.replies import Reply
from ..store.delivery import LocalDelivery
from ..store.errors import StoreError
from ..store.quota import format_size

__all__ = ["R452_MAILBOX_FULL", "R552_MAILBOX_FULL", "QuotaWarnings", "full_recipients", "quota_reply",
           "rcpt_refusal"]

log = logging.getLogger("postier.quota")

R452_MAILBOX_FULL = Reply(452, "4.2.2", "Mailbox full")  # RFC 5321 §4.5.3.1.10, RFC 3463 X.2.2
R552_MAILBOX_FULL = Reply(552, "5.2.2", "Mailbox full")


def quota_reply(config: Config) -> Reply:
    return R552_MAILBOX_FULL if config.limits.quota_reject_permanent else R452_MAILBOX_FULL


def _declared_size(env: Envelope) -> int:
    """MAIL FROM's SIZE= (RFC 1870 §6), 0 when absent or not a number."""
    raw = (env.mail_params or {}).get("SIZE") or ""
    return int(raw) if raw.isdigit() and len(raw) < 16 else 0


def _is_full(mda: MailDelivery, user: User, size: int) -> bool:
    if user.quota is None or user.mailbox_format != "maildir":
        return False
    try:
        used = mda.quota_used(user)  # the Maildir index's count, or cluster mode's PostgreSQL rows
    except (sqlite3.Error, OSError, StoreError) as exc:  # a damaged index: the store decides after DATA
        log.warning("%s: quota check at RCPT failed: %s", user.address, exc)
        return False
    return used >= user.quota or used + size > user.quota


async def rcpt_refusal(config: Config, env: Envelope, rcpt: Recipient, mda: MailDelivery) -> Reply | None:
    """The quota reply for a recipient just accepted when every mailbox it reaches is full (an alias
    reaching some room somewhere is accepted; the full ones are handled after DATA), else None."""
    users = [u for u in rcpt.users if u.quota is not None]
    if not users or rcpt.remote or len(users) != len(rcpt.users):
        return None
    size = _declared_size(env)
    full = await asyncio.to_thread(lambda: all(_is_full(mda, u, size) for u in users))
    return quota_reply(config) if full else None


def full_recipients(recipients: Sequence[Recipient], local: LocalOutcome) -> set[str]:
    """Recipients not delivered only because their users' quotas had no room."""
    failed, over = set(local.failed_users), set(local.over_quota)
    if not over:
        return set()
    return {r.address for r in recipients if r.address not in local.delivered and r.users
            and all(u.address in over for u in r.users if u.address in failed)}


# -- warnings at 80 % and 95 % ---------------------------------------------------------------------

class QuotaWarnings:
    """After each delivery to a user with a quota: when the usage has newly reached 80 % or 95 %
    (store/quota.py `warning_due`: once per crossing, re-armed when the usage went below), one
    warning into the user's INBOX through the same local delivery (`LocalDelivery.deliver`), with
    the null sender and ``Auto-Submitted: auto-generated`` (RFC 3834 §5), so nothing answers it.
    Wired in server/app.py as a `LocalDelivery.listeners` entry (in cluster mode too: the MDA keeps
    the warned level, `LocalDelivery.quota_warning_due`)."""

    def __init__(self, config: Config, mda: LocalDelivery) -> None:
        self.config = config
        self.mda = mda
        self._tasks: set[asyncio.Task[None]] = set()

    def on_delivery(self, user: User, folder: str) -> None:
        if user.quota is None or user.mailbox_format != "maildir":
            return
        try:
            task = asyncio.get_running_loop().create_task(self._check(user))
        except RuntimeError:
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _check(self, user: User) -> None:
        assert user.quota is not None
        try:
            level = await asyncio.to_thread(self.mda.quota_warning_due, user)
            if level is not None:
                await self.mda.deliver([(user, None)], return_path(""), self.warning(user, level, user.quota), "")
                log.info("%s: quota warning at %d%%", user.address, level)
        except Exception:  # a warning must never disturb deliveries
            log.exception("%s: quota warning failed", user.address)

    def warning(self, user: User, level: int, limit: int) -> bytes:
        msg = EmailMessage(policy=SMTP)
        msg["From"] = f"Mail System <postmaster@{self.config.hostname}>"
        msg["To"] = user.address
        msg["Subject"] = f"Your mailbox is {level}% full"
        msg["Date"] = formatdate(localtime=False)
        msg["Message-ID"] = make_msgid(domain=self.config.hostname)
        msg["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5
        msg.set_content(
            f"Your mailbox {user.address} uses {level}% or more of its {format_size(limit)} quota.\n\n"
            "When it is full, new mail is refused (senders are told to try again later, or it\n"
            "bounces). Delete or archive old messages, and empty the Trash, to make room.\n")
        return msg.as_bytes()
