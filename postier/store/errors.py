"""Why a mail-store operation failed: one exception class per reason, in the store's own terms.

The access protocols map them to their answers (IMAP response codes of RFC 9051 §7.1 in
`server/imap.py`, `-ERR` in POP3); the store itself knows nothing of those protocols. The message
of each exception says what went wrong in words a client may be shown.
"""

from __future__ import annotations

__all__ = [
    "InvalidKeyword", "InvalidName", "MailboxExists", "MailboxNotFound", "MessageGone", "NotPermitted",
    "OverQuota", "StoreError", "StoreLimit", "StoreUnavailable", "UnknownSpecialUse",
]


class StoreError(Exception):
    """A mailbox operation failed for a reason to tell the client (the message says why)."""


class MailboxNotFound(StoreError):
    """The named mailbox does not exist (or vanished meanwhile)."""


class MailboxExists(StoreError):
    """The target name of a CREATE or RENAME is taken."""


class InvalidName(StoreError):
    """A name that cannot be a folder here (forbidden character, empty or reserved component)."""


class StoreLimit(StoreError):
    """A bound was reached: name length or depth, keywords per folder, UIDs exhausted."""


class MessageGone(StoreError):
    """A message was expunged (by another session or program) while it was being worked on."""


class OverQuota(StoreError):
    """The disk (or the user's quota) is full."""


class NotPermitted(StoreError):
    """The operation is never allowed on this target (delete INBOX, rename a folder into itself)."""


class UnknownSpecialUse(StoreError):
    """A special-use attribute (RFC 6154) the store does not know."""


class InvalidKeyword(StoreError):
    """A flag keyword that cannot be stored."""


class StoreUnavailable(StoreError):
    """The storage behind the mailboxes (cluster mode: PostgreSQL or the object store) cannot be
    reached: nothing was changed, try again later."""
