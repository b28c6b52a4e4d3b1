"""The outcome of each outbound TLS session attempt, in RFC 8460 terms (§4.3 result types, §4.4 policies).

`TLSRecorder.session` is the `Connector`'s session hook (`delivery.py`): for every host the queue
tries it decides which policy applied to the recipient domain (DANE's TLSA records for that host,
else the domain's MTA-STS policy, else none: RFC 8461 §2, DANE takes precedence), whether the
session met it, and if not why, and counts that in the TLS report store (`mailauth/tlsrpt.py`).
A domain whose MTA-STS policy could not be fetched or read (`PolicyCache.failures`, and no cached
policy in force) has its sessions counted as that failure (§4.3.2.2).
Connection trouble that never reached TLS (refused, timeouts, a 5xx greeting) is not a TLS outcome
and is not counted. Recording never costs a delivery: a store error is logged and ignored.

`post_report` is the other way a report travels (§3 "https" rua): a POST over verified TLS, the host
resolved by our resolver as the MTA-STS policy fetch does.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import aiohttp

from ..mailauth.tlsrpt import NO_POLICY, STS, TLSA, SessionResult, TLSPolicy, TLSReportStore
from ..resolver import BaseResolver
from .client import TLSResult
from .delivery import Failure, Host, Route
from .mtasts import _OurDNS

__all__ = ["TLSRecorder", "classify", "post_report"]

POST_TIMEOUT = 60.0

log = logging.getLogger("postier.tlsrpt")

#: Our own failure texts (delivery.py `Connector._setup`, client.py) -> RFC 8460 §4.3 result types.
_NO_STARTTLS = ("STARTTLS refused", "does not offer STARTTLS")


def classify(reason: str) -> str:
    """An unverified certificate's reason (client.py `verify_chain`, `verify_dane`) -> a §4.3 result type."""
    low = reason.lower()
    if low.startswith("dane:"):
        return "tlsa-invalid"  # §4.3.2.1: no TLSA record of the host matched
    if "subjectaltname" in low or "hostname" in low or "name mismatch" in low:
        return "certificate-host-mismatch"
    if "expired" in low or "not valid at validation time" in low or "validity" in low:
        return "certificate-expired"
    if "exhausted" in low or "issuer" in low or "self-signed" in low or "ca store" in low:
        return "certificate-not-trusted"
    return "validation-failure"


def _tlsa_text(host: Host) -> tuple[str, ...]:
    return tuple(f"{r.usage} {r.selector} {r.mtype} {r.data.hex()}" for r in host.tlsa)


class TLSRecorder:
    def __init__(self, store: TLSReportStore, sending_ip: str | None, clock: Callable[[], float] = time.time,
                 sts_failures: Mapping[str, tuple[str, str]] | None = None):
        self.store = store
        self.sending_ip = sending_ip or ""
        self.clock = clock
        #: `PolicyCache.failures`: domains whose MTA-STS policy could not be fetched or read
        self.sts_failures: Mapping[str, tuple[str, str]] = sts_failures if sts_failures is not None else {}

    def policy(self, route: Route, host: Host) -> TLSPolicy:
        if host.dane and host.tlsa:  # RFC 8460 §4.4: tlsa, policy-string = the TLSA records
            return TLSPolicy(TLSA, route.domain, _tlsa_text(host), (host.name,))
        if route.sts is not None and not host.dane:
            p = route.sts
            lines = ("version: STSv1", f"mode: {p.mode}", *(f"mx: {m}" for m in p.mx), f"max_age: {p.max_age}")
            return TLSPolicy(STS, route.domain, lines, p.mx)
        return TLSPolicy(NO_POLICY, route.domain)

    def outcome(self, route: Route, host: Host, tls: TLSResult | None, failure: Failure | None
                ) -> SessionResult | None:
        """What this attempt means for the report, or None when it never reached TLS."""
        result = self._outcome(route, host, tls, failure)
        sts_failure = self.sts_failures.get(route.domain)
        if result is not None and result.policy.type == NO_POLICY and sts_failure is not None:
            # RFC 8460 §4.3.2.2: the domain publishes a policy we could not fetch or read
            return SessionResult(TLSPolicy(STS, route.domain), sts_failure[0], self.sending_ip, host.name, host.ip,
                                 sts_failure[1])
        return result

    def _outcome(self, route: Route, host: Host, tls: TLSResult | None, failure: Failure | None
                 ) -> SessionResult | None:
        policy = self.policy(route, host)
        detail = {"sending_ip": self.sending_ip, "receiving_mx": host.name, "receiving_ip": host.ip}
        if tls is None:
            reply = failure.reply if failure is not None else ""
            if any(t in reply for t in _NO_STARTTLS):
                return SessionResult(policy, "starttls-not-supported", reason=reply[:200], **detail)
            if "certificate not verified: " in reply:
                why = reply.split("certificate not verified: ", 1)[1]
                return SessionResult(policy, classify(why), reason=why[:200], **detail)
            if "TLS handshake" in reply:
                return SessionResult(policy, "validation-failure", reason=reply[:200], **detail)
            return None  # not a TLS outcome (connection refused, timeout, greeting)
        if not tls.version:  # plaintext: the server had no STARTTLS or refused it (no policy required it)
            return SessionResult(policy, "starttls-not-supported", reason="no STARTTLS", **detail)
        if policy.type != NO_POLICY and not tls.verified:  # e.g. an MTA-STS policy in mode testing
            return SessionResult(policy, classify(tls.reason), reason=tls.reason[:200], **detail)
        return SessionResult(policy)

    async def session(self, route: Route, host: Host, tls: TLSResult | None, failure: Failure | None) -> None:
        result = self.outcome(route, host, tls, failure)
        if result is None:
            return
        try:
            if not await asyncio.to_thread(self.store.record, result, self.clock()):
                log.warning("tlsrpt: the day's bound of distinct outcomes is reached; %s not counted", route.domain)
        except Exception:  # reporting must never cost a delivery
            log.exception("tlsrpt: recording the TLS outcome for %s failed", route.domain)


async def post_report(url: str, data: bytes, media_type: str, resolver: BaseResolver, ca_file: Path | None = None
                      ) -> str:
    """POST a report to an https rua (RFC 8460 §3); "" when it was taken (2xx), else why not."""
    tls = ssl.create_default_context()
    if ca_file is not None:
        tls.load_verify_locations(str(ca_file))
    connector = aiohttp.TCPConnector(resolver=_OurDNS(resolver), use_dns_cache=False)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT),
                                         connector=connector) as session, \
                session.post(url, data=data, headers={"Content-Type": media_type}, ssl=tls,
                             allow_redirects=False) as resp:
            return "" if 200 <= resp.status < 300 else f"HTTP {resp.status}"
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError, ValueError) as exc:
        return " ".join(str(exc).split())[:200] or type(exc).__name__
