"""MTA-STS for outbound delivery (RFC 8461 §3-§5): discover, fetch, cache and apply a recipient domain's policy.

`PolicyCache.get(domain)` looks up `_mta-sts.DOMAIN` (§3.1), fetches the policy over HTTPS with a
verified certificate for mta-sts.DOMAIN and no redirects (§3.3), and keeps it for its max_age; a new
id in DNS makes it fetch again (§5.1). When DNS or the fetch fails, a cached policy that has not
expired is used (§5.1), so an attacker who blocks the lookup cannot strip it. The cache is kept in
DATA_DIR/mta-sts.json across restarts.

What the router does with a policy (`queue/delivery.py`): under `enforce`, only MX hosts matching the
policy's mx patterns (§4.1) are tried, each with STARTTLS and a certificate valid for its name
(§4.2); otherwise the message stays queued (a temporary failure, never a plaintext fallback). Under
`testing`, delivery goes on as before and mismatches are logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from ..resolver import BaseResolver, DNSStatus

log = logging.getLogger("postier.queue.mtasts")

__all__ = ["Policy", "PolicyError", "parse_policy", "mx_matches", "PolicyCache", "parse_txt"]

MAX_POLICY = 64 * 1024  # RFC 8461 §3.3: senders may limit the body; policies are a few hundred bytes
MAX_AGE = 31557600  # RFC 8461 §3.2
FETCH_TIMEOUT = 30.0  # RFC 8461 §3.3: "a short timeout" (60 s is the suggested maximum)
_ID_RE = re.compile(r"[A-Za-z0-9]{1,32}")


class PolicyError(ValueError):
    """A policy or record that does not parse (the domain then has no usable policy)."""


@dataclass(frozen=True)
class Policy:
    domain: str
    id: str
    mode: str  # "enforce" | "testing" | "none"
    mx: tuple[str, ...]
    max_age: int
    fetched: float  # time.time() of the fetch

    def expired(self, now: float) -> bool:
        return now >= self.fetched + self.max_age

    def matches(self, host: str) -> bool:
        return any(mx_matches(p, host) for p in self.mx)


def parse_txt(texts: list[str]) -> str | None:
    """The id of the one `v=STSv1` record among TXT strings (RFC 8461 §3.1), None if none or several."""
    recs = [t for t in texts if t.startswith("v=STSv1")]
    if len(recs) != 1:
        return None
    fields = {}
    for part in recs[0].split(";"):
        k, sep, v = part.strip().partition("=")
        if sep:
            fields[k.strip()] = v.strip()
    ident = fields.get("id", "")
    return ident if _ID_RE.fullmatch(ident) else None


def parse_policy(text: str, domain: str, ident: str, now: float) -> Policy:
    """RFC 8461 §3.2: "key: value" lines; version STSv1, mode, max_age, mx (one or more unless none)."""
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():  # CRLF or LF (§3.2: "lines ... ending with CRLF"; accept LF as many do)
        if not line.strip():
            continue
        k, sep, v = line.partition(":")
        if not sep:
            raise PolicyError(f"line without a colon: {line[:60]!r}")
        fields.setdefault(k.strip(), []).append(v.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("version is not STSv1")
    mode = (fields.get("mode") or [""])[0]
    if mode not in ("enforce", "testing", "none"):
        raise PolicyError(f"unknown mode {mode!r}")
    try:
        max_age = int((fields.get("max_age") or [""])[0])
    except ValueError:
        raise PolicyError("max_age is not a number") from None
    if not 0 <= max_age <= MAX_AGE:
        raise PolicyError("max_age out of range")
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []))
    if mode != "none" and not mx:
        raise PolicyError("no mx line")
    return Policy(domain, ident, mode, mx, max_age, now)


def mx_matches(pattern: str, host: str) -> bool:
    """RFC 8461 §4.1: exact (case-insensitive), or "*." matching exactly one leftmost label."""
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        label, dot, rest = host.partition(".")
        return bool(label) and bool(dot) and rest == pattern[2:]
    return pattern == host


Fetcher = Callable[[str], Awaitable[str]]


MAX_FAILURES = 10_000  # failed fetches remembered for TLS reports (oldest forgotten first)


def _fetch_failure(exc: BaseException) -> str:
    """RFC 8460 §4.3.2.2: why a domain's policy could not be fetched."""
    if isinstance(exc, (ssl.SSLCertVerificationError, aiohttp.ClientConnectorCertificateError)):
        return "sts-webpki-invalid"  # the policy host's certificate did not verify
    return "sts-policy-fetch-error"


class PolicyCache:
    def __init__(self, resolver: BaseResolver, path: Path | None, ca_file: Path | None = None, port: int = 443,
                 fetch: Fetcher | None = None):
        self.resolver = resolver
        self.path = path
        self.port = port
        self.tls = ssl.create_default_context()
        if ca_file is not None:
            self.tls.load_verify_locations(str(ca_file))
        self._fetch = fetch or self._https_get
        self._policies: dict[str, Policy] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: domain -> (RFC 8460 §4.3.2.2 result type, reason) of its last failed fetch, for TLS reports
        self.failures: dict[str, tuple[str, str]] = {}
        self._load()

    def _load(self) -> None:
        if self.path is None:
            return
        try:
            raw = json.loads(self.path.read_bytes())
            for d in raw.values():
                p = Policy(d["domain"], d["id"], d["mode"], tuple(d["mx"]), int(d["max_age"]), float(d["fetched"]))
                self._policies[p.domain] = p
        except (OSError, ValueError, KeyError, TypeError):
            pass

    def _save(self) -> None:
        if self.path is None:
            return
        data = json.dumps({d: asdict(p) for d, p in self._policies.items()}).encode()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    async def get(self, domain: str) -> Policy | None:
        """The policy in force for `domain`, or None (deliver as without MTA-STS)."""
        lock = self._locks.setdefault(domain, asyncio.Lock())
        async with lock:  # one lookup and fetch per domain at a time
            return await self._get(domain)

    async def _get(self, domain: str) -> Policy | None:
        now = time.time()
        cached = self._policies.get(domain)
        if cached is not None and cached.expired(now):
            cached = None
        ans = await self.resolver.txt(f"_mta-sts.{domain}")
        if ans.status is not DNSStatus.OK:
            # RFC 8461 §5.1: no record (or DNS trouble) and a cached policy: keep using it
            if ans.status is not DNSStatus.TEMPFAIL:
                self.failures.pop(domain, None)
            return cached
        ident = parse_txt([bytes(r).decode("ascii", "replace") for r in ans.records])
        if ident is None or (cached is not None and cached.id == ident):
            self.failures.pop(domain, None)
            return cached
        try:
            text = await self._fetch(domain)
        except (PolicyError, aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError, UnicodeError) as exc:
            self._failed(domain, _fetch_failure(exc), exc)
            return cached  # §5.1: a failed refresh keeps the cached policy
        try:
            policy = parse_policy(text, domain, ident, now)
        except PolicyError as exc:
            self._failed(domain, "sts-policy-invalid", exc)  # RFC 8460 §4.3.2.2
            return cached
        self.failures.pop(domain, None)
        self._policies[domain] = policy
        with contextlib.suppress(OSError):
            await asyncio.to_thread(self._save)
        log.info("mta-sts: %s: policy %s, mode %s, mx %s", domain, ident, policy.mode, ",".join(policy.mx))
        return policy

    def _failed(self, domain: str, kind: str, exc: BaseException) -> None:
        why = " ".join(str(exc).split()) or type(exc).__name__
        log.warning("mta-sts: %s: policy fetch failed: %s", domain, why)
        self.failures[domain] = (kind, why[:200])
        if len(self.failures) > MAX_FAILURES:
            self.failures.pop(next(iter(self.failures)))

    async def _https_get(self, domain: str) -> str:
        """RFC 8461 §3.3: GET over verified TLS for mta-sts.DOMAIN, 200 only, no redirects, text/plain."""
        port = "" if self.port == 443 else f":{self.port}"
        url = f"https://mta-sts.{domain}{port}/.well-known/mta-sts.txt"
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
        connector = aiohttp.TCPConnector(resolver=_OurDNS(self.resolver), use_dns_cache=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session, \
                session.get(url, ssl=self.tls, allow_redirects=False) as resp:
            if resp.status != 200:
                raise PolicyError(f"HTTP {resp.status}")
            if resp.content_type != "text/plain":
                raise PolicyError(f"media type {resp.content_type}, not text/plain")
            body = await resp.content.read(MAX_POLICY + 1)
            if len(body) > MAX_POLICY:
                raise PolicyError("policy too large")
            return body.decode("utf-8")


class _OurDNS(AbstractResolver):
    """aiohttp resolves the policy host through our resolver (the one MX lookups use), not getaddrinfo."""

    def __init__(self, resolver: BaseResolver):
        self.resolver = resolver

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        ans = await self.resolver.addresses(host)
        if not ans.records:
            raise OSError(f"{host}: no address ({ans.status.value})")
        return [ResolveResult(hostname=host, host=ip, port=port,
                              family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                              proto=0, flags=socket.AI_NUMERICHOST) for ip in ans.records]

    async def close(self) -> None:
        pass
