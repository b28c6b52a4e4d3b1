"""Content filtering by Rspamd over its HTTP protocol (`/checkv2`), and learning (`/learnspam`, `/learnham`).

Rspamd is the engine: postier sends it the message with the envelope as request headers (`IP`,
`Helo`, `From`, `Rcpt`, `Queue-Id`, `User`, `Hostname`) and maps the action it answers onto one
inbound decision (`RspamdAction` -> `SpamDecision`):

| Rspamd action            | postier                                                           |
|--------------------------|-------------------------------------------------------------------|
| reject                   | 550 5.7.1 with Rspamd's SMTP message                               |
| soft reject, greylist    | 451 4.7.1                                                         |
| rewrite subject, add header | delivered to the recipient's Junk folder, with X-Spam headers  |
| no action                | delivered to the INBOX                                            |

SPF, DKIM and DMARC were already evaluated by postier (pipeline/mailauth.py): their groups are
disabled per request (`Settings` header), so Rspamd does not redo the DNS work. The milter-style
header changes Rspamd asks for (`milter.add_headers` / `remove_headers`) and its subject rewrite
are returned for the spam check (antispam/check.py) to apply.

When Rspamd cannot be reached, or does not answer within `timeout`, the result is `unavailable`;
the caller applies `fail_open` (deliver with `X-Spam-Status: unknown`) or answers 451.

The HTTP client is aiohttp's (the HTTP layer's library; one HTTP stack in the project). Bodies are
streamed from the spool file when the message is large, never read into memory whole here.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("postier.antispam")

#: Rspamd symbol groups postier has already evaluated itself.
OWN_CHECKS = ("spf", "dkim", "dmarc")
_CHUNK = 64 * 1024
MAX_REPLY = 4 * 1024 * 1024  # a /checkv2 answer larger than this is not a real Rspamd


class SpamDecision(StrEnum):
    ACCEPT = "accept"
    JUNK = "junk"
    DEFER = "defer"
    REJECT = "reject"
    UNKNOWN = "unknown"  # Rspamd unavailable


_ACTIONS = {
    "reject": SpamDecision.REJECT,
    "soft reject": SpamDecision.DEFER,
    "greylist": SpamDecision.DEFER,
    "rewrite subject": SpamDecision.JUNK,
    "add header": SpamDecision.JUNK,
    "no action": SpamDecision.ACCEPT,
}


@dataclass(frozen=True)
class Symbol:
    name: str
    score: float
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class RspamdResult:
    decision: SpamDecision
    action: str = ""
    score: float = 0.0
    required: float = 0.0
    symbols: tuple[Symbol, ...] = ()
    smtp_message: str = ""
    subject: str | None = None
    add_headers: tuple[tuple[str, str], ...] = ()
    #: (field name, order): 0 every instance, N > 0 the Nth from the top, N < 0 from the bottom.
    remove_headers: tuple[tuple[str, int], ...] = ()
    error: str = ""

    @property
    def unavailable(self) -> bool:
        return self.decision is SpamDecision.UNKNOWN

    def report(self, limit: int = 20) -> str:
        """The symbols that scored, highest first: `SYM(score) ...` for X-Spam-Report and `why`."""
        syms = sorted((s for s in self.symbols if s.score), key=lambda s: -abs(s.score))[:limit]
        return " ".join(f"{s.name}({s.score:g})" for s in syms)

    def explain(self) -> str:
        if self.unavailable:
            return f"rspamd unavailable ({self.error})"
        what = {SpamDecision.REJECT: "refused", SpamDecision.DEFER: "deferred", SpamDecision.JUNK: "junk",
                SpamDecision.ACCEPT: "clean"}.get(self.decision, str(self.decision))
        rep = self.report(8)
        return (f"rspamd: {what} ({self.action}), score {self.score:g}/{self.required:g}"
                + (f": {rep}" if rep else ""))

    def spam_headers(self) -> list[tuple[str, str]]:
        """X-Spam-* headers summarising the verdict, for the delivered copy."""
        if self.unavailable:
            return [("X-Spam-Status", "unknown")]
        flag = "Yes" if self.decision in (SpamDecision.JUNK, SpamDecision.REJECT) else "No"
        out = [("X-Spam-Status", f"{flag}, score={self.score:.2f} required={self.required:.2f}"),
               ("X-Spam-Action", self.action)]
        rep = self.report()
        if rep:
            out.append(("X-Spam-Report", rep))
        if flag == "Yes":
            out.append(("X-Spam-Flag", "YES"))
        return out


#: The fields `spam_headers` writes (and Rspamd's own flag): a sender's copies are removed from the
#: delivered message, so that a mail client filtering on them sees only ours.
OUR_SPAM_FIELDS = ("X-Spam-Status", "X-Spam-Action", "X-Spam-Report", "X-Spam-Flag", "X-Spam")


@dataclass(frozen=True)
class Envelope:
    """What Rspamd is told about the transaction (request headers of its protocol)."""

    ip: str = ""
    helo: str = ""
    sender: str = ""
    recipients: Sequence[str] = ()
    queue_id: str = ""
    user: str = ""  # set for authenticated submissions
    hostname: str = ""  # the client's validated reverse name


@dataclass
class RspamdClient:
    url: str  # normal worker, e.g. http://127.0.0.1:11333
    controller: str = ""  # controller worker for learning, e.g. http://127.0.0.1:11334
    password: str = ""
    timeout: float = 15.0
    _session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=64, force_close=False))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def check(self, message: bytes | Path, env: Envelope, prefix: bytes = b"") -> RspamdResult:
        """Scan a message (bytes, or a file streamed from disk) with `prefix` (headers we prepend) first."""
        headers = {"Settings": json.dumps({"groups_disabled": list(OWN_CHECKS)})}
        if env.ip:
            headers["IP"] = env.ip
        if env.helo:
            headers["Helo"] = env.helo
        headers["From"] = env.sender or "<>"
        if env.queue_id:
            headers["Queue-Id"] = env.queue_id
        if env.user:
            headers["User"] = env.user
        if env.hostname:
            headers["Hostname"] = env.hostname
        hdr_items: list[tuple[str, str]] = list(headers.items())
        hdr_items += [("Rcpt", r) for r in env.recipients]
        data: bytes | AsyncIterator[bytes]
        if isinstance(message, Path):
            data = _stream(prefix, message)
            hdr_items.append(("Content-Length", str(len(prefix) + message.stat().st_size)))
        else:
            data = prefix + message
        try:
            async with self._client().post(self.url.rstrip("/") + "/checkv2", data=data,
                                           headers=hdr_items) as resp:
                body = await resp.content.read(MAX_REPLY + 1)
                if resp.status != 200:
                    return RspamdResult(SpamDecision.UNKNOWN, error=f"HTTP {resp.status}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return RspamdResult(SpamDecision.UNKNOWN, error=f"{exc.__class__.__name__}: {exc}"[:200])
        if len(body) > MAX_REPLY:
            return RspamdResult(SpamDecision.UNKNOWN, error="answer too large")
        try:
            return parse_check_reply(json.loads(body))
        except (ValueError, TypeError, KeyError) as exc:
            return RspamdResult(SpamDecision.UNKNOWN, error=f"malformed answer: {exc}"[:200])

    async def learn(self, message: bytes, spam: bool) -> tuple[bool, str]:
        """Train Rspamd's classifier; (done, reason). A message already learnt counts as done."""
        if not self.controller:
            return False, "no controller configured"
        path = "/learnspam" if spam else "/learnham"
        headers = {"Password": self.password} if self.password else {}
        try:
            async with self._client().post(self.controller.rstrip("/") + path, data=message,
                                           headers=headers) as resp:
                text = (await resp.content.read(65536)).decode("utf-8", "replace")
                if resp.status == 200:
                    return True, "learnt"
                if resp.status == 208 or "already learned" in text or "already learnt" in text:
                    return True, "already learnt"
                return False, f"HTTP {resp.status}: {text[:200]}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return False, f"{exc.__class__.__name__}: {exc}"[:200]

    async def stat(self) -> dict[str, Any]:
        headers = {"Password": self.password} if self.password else {}
        async with self._client().get(self.controller.rstrip("/") + "/stat", headers=headers) as resp:
            result: dict[str, Any] = json.loads(await resp.content.read(MAX_REPLY))
            return result


async def _stream(prefix: bytes, path: Path) -> AsyncIterator[bytes]:
    if prefix:
        yield prefix
    f = await asyncio.to_thread(open, path, "rb")
    try:
        while chunk := await asyncio.to_thread(f.read, _CHUNK):
            yield chunk
    finally:
        f.close()


def parse_check_reply(d: Any) -> RspamdResult:
    """A /checkv2 JSON answer -> RspamdResult; KeyError/TypeError/ValueError when it is not one."""
    if not isinstance(d, dict):
        raise TypeError("not an object")
    action = str(d["action"])
    decision = _ACTIONS.get(action)
    if decision is None:
        raise ValueError(f"unknown action {action!r}")
    symbols = []
    for name, s in (d.get("symbols") or {}).items():
        if isinstance(s, dict):
            opts = s.get("options") or ()
            symbols.append(Symbol(str(name), float(s.get("score", 0.0)), tuple(str(o) for o in opts)[:10]))
    messages = d.get("messages") or {}
    milter = d.get("milter") or {}
    add: list[tuple[str, str]] = []
    for name, val in (milter.get("add_headers") or {}).items():
        vals = val if isinstance(val, list) else [val]
        for v in vals:
            add.append((str(name), str(v.get("value", "")) if isinstance(v, dict) else str(v)))
    remove = tuple((str(n), v if isinstance(v, int) and not isinstance(v, bool) else 0)
                   for n, v in (milter.get("remove_headers") or {}).items())
    subject = d.get("subject")
    return RspamdResult(decision, action, float(d.get("score", 0.0)), float(d.get("required_score", 0.0)),
                        tuple(symbols), str(messages.get("smtp_message", "")) if isinstance(messages, dict) else "",
                        str(subject) if subject is not None else None, tuple(add), remove)
