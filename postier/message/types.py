"""The nouns of mail in flight, shared by every layer above proto: the body, the envelope, its
recipients and the local users they reach, an inbound check's verdict, and the interfaces
(`InboundCheck`, `Signer`, `Enqueuer`, `MailDelivery`) the layers meet at.

They live in the message layer so that mail authentication, the store, the queue, the pipelines and
the listeners all speak of the same objects without importing each other; this module imports only
the standard library, SMTP addresses and replies, and the trace-header helpers.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from ..proto.smtp.address import Address
from ..proto.smtp.replies import Reply
from .received import queue_id

__all__ = ["HEADER_LIMIT", "MEMORY_DATA_LIMIT", "AccountError", "Action", "Enqueuer", "Envelope", "InboundCheck", "LocalOutcome",
           "MailDelivery", "MessageBody", "Recipient", "Signer", "User", "Verdict", "remote_targets"]

#: The header block of a message must end within this many octets (DESIGN: every header block has a
#: cap); the pipelines refuse longer ones (552 5.3.4) and every header inspection reads this much.
HEADER_LIMIT = 256 * 1024

#: A message larger than this is not read whole to be moved: the queue sends it from its spool file
#: (queue/runner.py), and in cluster mode it is uploaded from its spool file (store/cluster/bodies.py).
MEMORY_DATA_LIMIT = 1024 * 1024


class AccountError(Exception):
    """A user-facing problem with an account operation (message names the problem)."""


@dataclass(frozen=True)
class User:
    """A local user: the owner of a mailbox (accounts.py keeps them; recipients resolve to them)."""

    address: str
    local: str
    domain: str
    mailbox_format: str
    #: Storage quota in bytes (the user's own, else the domain's, else `[limits] default_quota`);
    #: None: no quota (store/quota.py).
    quota: int | None = None

    def home(self, mail_root: Path) -> Path:
        """The user's directory under mail_root, with a containment check."""
        # Lexical containment check: local parts and domains are validated when created, and this
        # runs for every delivery, so no resolve() (one lstat per path component) here.
        root = os.path.normpath(mail_root)
        p = os.path.normpath(os.path.join(root, self.domain, self.local))
        if not p.startswith(root + os.sep) or p.count(os.sep) != root.count(os.sep) + 2:
            raise AccountError(f"mailbox path of {self.address} escapes the mail root")
        return Path(p)

    def maildir(self, mail_root: Path) -> Path:
        return self.home(mail_root) / "Maildir"

    def mbox(self, mail_root: Path) -> Path:
        return self.home(mail_root) / "mbox"


@dataclass
class MessageBody:
    """The message content as it was received: in memory while small, in a spool file once large.

    Writers call `write()` as data arrives; a body over `memory_limit` spills to a temporary file
    in `spool_dir`, so a 25 MiB message costs at most `memory_limit` bytes of memory.
    """

    spool_dir: Path
    memory_limit: int = 256 * 1024

    def __post_init__(self) -> None:
        self._chunks: list[bytes] = []
        self._mem = 0
        self._file: BinaryIO | None = None
        self._borrowed = False  # a spool file owned by another process: close() leaves it
        self.size = 0

    @classmethod
    def from_spool(cls, path: str, size: int) -> MessageBody:
        """A read-only body over a spool file another process wrote (the delivery agent's view)."""
        body = cls(Path(path).parent)
        body._file = open(path, "rb")  # noqa: SIM115 - closed by close()
        body._borrowed = True
        body.size = size
        return body

    @property
    def spool_path(self) -> str | None:
        """The spool file of a spilled body (flushed, so another process can read it), else None."""
        if self._file is None:
            return None
        self._file.flush()
        return self._file.name

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self._file is None:
            self._chunks.append(data)
            self._mem += len(data)
            if self._mem > self.memory_limit:
                self._spill()
        else:
            self._file.write(data)

    def _spill(self) -> None:
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        f = cast(BinaryIO, tempfile.NamedTemporaryFile(prefix="in.", dir=self.spool_dir, delete=False))  # noqa: SIM115
        for c in self._chunks:
            f.write(c)
        self._chunks = []
        self._mem = 0
        self._file = f

    @property
    def in_memory(self) -> bool:
        return self._file is None

    def getvalue(self) -> bytes:
        """The whole body as bytes (reads the spool file back when spilled)."""
        if self._file is None:
            return b"".join(self._chunks)
        self._file.flush()
        with open(self._file.name, "rb") as f:
            return f.read()

    def head(self, limit: int) -> bytes:
        """Up to `limit` first bytes (for header inspection without reading a large body)."""
        if self._file is None:
            data = b"".join(self._chunks)
            self._chunks = [data] if data else []
            return data[:limit]
        self._file.flush()
        with open(self._file.name, "rb") as f:
            return f.read(limit)

    def read_at(self, offset: int, n: int) -> bytes:
        """Up to `n` bytes from `offset` (fewer only at the end): from memory, or by `os.pread` on
        the spool file (no shared file position, so threads may read at once)."""
        n = max(0, min(n, self.size - offset))
        if self._file is None:
            if len(self._chunks) > 1:
                self._chunks = [b"".join(self._chunks)]
            return self._chunks[0][offset:offset + n] if self._chunks else b""
        self._file.flush()
        return os.pread(self._file.fileno(), n, offset) if n else b""

    def copy_to(self, out: BinaryIO) -> None:
        """Write the body to `out` (an open file): from memory, or by an in-kernel copy."""
        if self._file is None:
            for c in self._chunks:
                out.write(c)
            return
        self._file.flush()
        out.flush()
        with open(self._file.name, "rb") as src:
            remaining = self.size
            while remaining > 0:
                n = os.copy_file_range(src.fileno(), out.fileno(), min(remaining, 1 << 24)) if hasattr(
                    os, "copy_file_range") else 0
                if n <= 0:  # not supported here: plain copy of the rest
                    src.seek(self.size - remaining)
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                    break
                remaining -= n

    def iter_chunks(self, size: int = 1 << 20) -> Iterable[bytes]:
        if self._file is None:
            yield from self._chunks
            return
        self._file.flush()
        with open(self._file.name, "rb") as f:
            while chunk := f.read(size):
                yield chunk

    def close(self) -> None:
        """Discard the body (removes the spool file, if any)."""
        if self._file is not None:
            name = self._file.name
            self._file.close()
            self._file = None
            if not self._borrowed:
                try:
                    os.unlink(name)
                except FileNotFoundError:
                    pass
        self._chunks = []


@dataclass
class Recipient:
    """One accepted RCPT and where it resolved to."""

    address: str
    users: tuple[User, ...] = ()
    remote: tuple[str, ...] = ()
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass
class Envelope:
    """Everything known about one SMTP transaction (reset by RSET and after each message)."""

    role: str
    peer_ip: str
    local_ip: str = ""
    peer_name: str | None = None
    helo: str = ""
    esmtp: bool = False
    tls: str | None = None
    auth_user: User | None = None
    mail_from: str = ""
    mail_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    _qid: str = field(default="", repr=False)
    #: Per-transaction results of mail authentication (SPF at MAIL FROM; see pipeline/mailauth.py).
    auth: dict[str, Any] = field(default_factory=dict)
    #: What the connection-level checks found (screening, rate limits), in plain words; kept for the
    #: whole connection (not reset by RSET), part of every inbound decision's explanation.
    notes: tuple[str, ...] = ()
    #: The client is on a DNS allowlist (RFC 5782): greylisting and screening do not apply.
    allowlisted: bool = False

    @property
    def qid(self) -> str:
        """The transaction's queue id, made when first asked for (most sessions never need one)."""
        if not self._qid:
            self._qid = queue_id()
        return self._qid

    @qid.setter
    def qid(self, value: str) -> None:
        self._qid = value

    def reset(self) -> None:
        self.mail_from = ""
        self.mail_params = {}
        self.recipients = []
        self._qid = ""
        if self.auth:
            self.auth = {}


class Action(StrEnum):
    """What becomes of a message after the inbound checks (DESIGN.md policy)."""

    ACCEPT = "accept"  # delivered to the inbox
    JUNK = "junk"  # delivered to the user's Junk folder
    DEFER = "defer"  # refused for now (4xx): the sender tries again later
    REJECT = "reject"  # refused (5xx)


@dataclass(frozen=True)
class Verdict:
    """An inbound check's decision for one message."""

    action: Action = Action.ACCEPT
    reply: Reply | None = None  # for DEFER/REJECT
    headers: bytes = b""  # Authentication-Results etc., prepended
    body: MessageBody | None = None  # a replacement body (e.g. forged A-R headers removed)
    #: What decided it, in plain words ("spf=pass", "rspamd: junk (add header), score 7/15: ..."),
    #: for the log line and `postier why`.
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class LocalOutcome:
    """What local delivery of some recipients achieved (see `MailDelivery.deliver_recipients`)."""

    delivered: frozenset[str]  # recipient addresses every user of which got the message
    failed_users: tuple[str, ...]  # addresses of the users whose delivery failed
    over_quota: tuple[str, ...] = ()  # those of failed_users refused because their quota is full


# -- the interfaces the layers meet at (implemented above, wired in server/app.py) ----------------

class InboundCheck(Protocol):
    """A check of mail arriving on port 25 (mail authentication today; spam checks later)."""

    async def check_mail(self, env: Envelope, address: Address) -> Reply | None:
        """At MAIL FROM: a refusal, or None to go on."""

    async def evaluate(self, env: Envelope, body: MessageBody) -> Verdict:
        """At the end of DATA: the verdict on the message."""

    async def check_rcpt(self, env: Envelope, address: str) -> Reply | None:
        """At RCPT TO, once the recipient is known to be ours: a refusal (greylisting), or None."""


class DecisionLog(Protocol):
    """Where inbound decisions go for `postier why` (antispam/verdicts.py); never slows the reply."""

    def record_later(self, queue_id: str, message_id: str, client: str, sender: str, recipients: Sequence[str],
                     action: str, reasons: Sequence[str]) -> None: ...


_MESSAGE_ID = re.compile(rb"(?im)^message-id:[ \t]*(<[^>\r\n]{1,500}>)")


def message_id(head: bytes) -> str:
    """The Message-ID (RFC 5322 §3.6.4) of a header section, "" when there is none."""
    m = _MESSAGE_ID.search(head)
    return m.group(1).decode("utf-8", "replace") if m else ""


class Signer(Protocol):
    """Signs outgoing mail (DKIM, RFC 6376).

    `sign` gets the envelope and the message exactly as it will be sent and returns the header
    field(s) to prepend, CRLF-terminated, or b"" when there is nothing to sign with. An exception
    is a temporary failure of the submission (451), so that mail never leaves unsigned by accident.
    """

    async def sign(self, env: Envelope, body: MessageBody) -> bytes: ...


class Enqueuer(Protocol):
    """The durable outbound queue as the pipelines and jobs see it."""

    async def enqueue(self, env: Envelope, recipients: list[str], prefix: bytes, body: MessageBody) -> str:
        """Durably queue `body` (after `prefix`) for `recipients`; the queue id. Raises on failure."""

    async def sends_today(self, user: str) -> int:
        """Messages `user` submitted in the last 24 hours."""


class MailDelivery(Protocol):
    """Local delivery (the MDA) as the pipelines and the queue see it."""

    async def deliver_recipients(self, recipients: Sequence[Recipient], prefix: bytes, body: MessageBody | bytes,
                                 envelope_from: str, folder: str | None = None) -> LocalOutcome:
        """Deliver durably to every user the recipients reach, each once."""

    def quota_used(self, user: User) -> int:
        """Bytes the user's mailboxes use now, for the quota check at RCPT (blocking)."""


def remote_targets(recipients: Iterable[Recipient]) -> list[str]:
    """The addresses outside our domains that the recipients expand to, once each, in order."""
    return list(dict.fromkeys(a for r in recipients for a in r.remote))
