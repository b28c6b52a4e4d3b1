"""SPF check_host() (RFC 7208) through pyspf, fed by our resolver; async wrappers run it in a thread.

pyspf evaluates the record (macros, mechanisms, the 10-lookup and 2-void-lookup limits of RFC 7208
§4.6.4, the RFC 7208 test suite passes). It looks names up through its module-level `DNSLookup`
hook; we install one dispatcher there that sends each query to the `SyncLookup` bound to the
current context (a ContextVar, so concurrent checks in several worker threads never mix their
resolvers). A DNS temporary failure becomes pyspf's TempError, hence `temperror`, never none/fail.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import spf as pyspf

from postier.resolver import AsyncLookup, DNSStatus, MXRecord, SyncLookup

__all__ = ["SPFStatus", "SPFResult", "check_host", "check_helo", "check_spf", "check_spf_helo",
           "pyspf_lookup"]

# RFC 7208 §4.6.4: a receiver MAY bound the whole evaluation; at least 20 seconds is recommended.
TOTAL_TIME_LIMIT = 20.0


class SPFStatus(StrEnum):
    # RFC 7208 §2.6
    NONE = "none"
    NEUTRAL = "neutral"
    PASS = "pass"
    FAIL = "fail"
    SOFTFAIL = "softfail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class SPFResult:
    status: SPFStatus
    explanation: str  # the exp= text for "fail", otherwise pyspf's description of the outcome
    domain: str       # the domain whose record was evaluated (MAIL FROM domain, or HELO)
    scope: str = "mailfrom"  # "mailfrom" or "helo" (RFC 8601 smtp.mailfrom / smtp.helo)
    identity: str = ""       # the checked identity: "user@domain" or "postmaster@helo"


_current: contextvars.ContextVar[SyncLookup] = contextvars.ContextVar("postier_spf_lookup")
type _Answers = Iterator[tuple[tuple[str, str], Any]]  # pyspf's DNSLookup result: ((name, type), value)
_original_lookup: Callable[..., _Answers] = pyspf.DNSLookup


def pyspf_lookup(resolver: SyncLookup) -> Callable[..., _Answers]:
    """A function in the shape of pyspf's `DNSLookup(name, qtype, strict, timeout)` over `resolver`.

    It yields ((name, type), value) pairs: A/AAAA -> address text, MX -> (preference, host),
    PTR -> host, TXT -> a tuple of byte strings. TEMPFAIL raises pyspf.TempError (RFC 7208 §5: a DNS
    error during evaluation is temperror); NXDOMAIN and NODATA yield nothing (void lookups, §4.6.4).
    """

    def lookup(name: str, qtype: str, strict: Any = True, timeout: float | None = None) -> _Answers:
        if qtype not in ("A", "AAAA", "MX", "PTR", "TXT"):
            return  # type SPF (99) is not used since RFC 7208 §3.1
        answer = resolver.query_sync(name, qtype, timeout)
        if answer.status is DNSStatus.TEMPFAIL:
            raise pyspf.TempError(f"DNS {answer.reason or 'temporary failure'} for {name}/{qtype}")
        for value in answer.records:
            if qtype == "MX":
                assert isinstance(value, MXRecord)
                # A null MX "." has no addresses; pyspf skips an empty host name.
                yield (name, qtype), (value.preference, "" if value.exchange == "." else value.exchange)
            elif qtype == "TXT":
                yield (name, qtype), (value,)
            else:
                yield (name, qtype), value

    return lookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: float | None = None) -> _Answers:
    resolver = _current.get(None)
    if resolver is None:  # someone else's use of pyspf in this process: leave it as it was
        return _original_lookup(name, qtype, strict, timeout)
    return pyspf_lookup(resolver)(name, qtype, strict, timeout)


pyspf.DNSLookup = _dispatch


class _Query(pyspf.query):
    """pyspf's query with RFC 7208 §5.5 error handling for "ptr" and %{p}.

    pyspf lets a DNS error in the A lookup of a PTR name end the whole check as temperror; its own
    test driver hides this by handling CNAME loops inside pyspf. With a real resolver a CNAME loop
    is a SERVFAIL, so we apply the RFC: an error on the PTR lookup means no match, an error on one
    name's address lookup skips that name.
    """

    def validated_ptrs(self) -> list[str]:
        try:
            names = self.dns_ptr(self.i)[:pyspf.MAX_PTR]  # RFC 7208 §4.6.4: at most 10 PTR names
        except pyspf.TempError:
            return []
        validated = []
        for name in names:
            try:
                addresses = self.dns_a(name, self.A)
            except pyspf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                validated.append(name)
        return validated


def _domain_of(identity: str) -> str:
    return identity.rpartition("@")[2].rstrip(".").lower()


def check_host(ip: str, mail_from: str, helo: str, resolver: SyncLookup, *, receiver: str = "",
               default_explanation: str | None = None) -> SPFResult:
    """RFC 7208 §4: evaluate the SPF record for the MAIL FROM identity of a message from `ip`.

    `mail_from` is the reverse-path without angle brackets ("" for the null sender). Blocking: call it
    in a worker thread, or use `check_spf`.
    """
    scope = "mailfrom"
    identity = mail_from
    if not mail_from:
        # RFC 7208 §2.4: with a null reverse-path the identity is postmaster@<HELO domain>.
        identity = f"postmaster@{helo}"
        scope = "helo"
    elif "@" not in mail_from:
        identity = f"postmaster@{mail_from}"  # RFC 7208 §4.3: no local-part -> "postmaster"
    domain = _domain_of(identity)
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        return SPFResult(SPFStatus.PERMERROR, f"not an IP address: {ip!r}", domain, scope, identity)
    token = _current.set(resolver)
    try:
        q = _Query(i=ip, s=identity, h=helo, receiver=receiver or None, querytime=TOTAL_TIME_LIMIT)
        if default_explanation is not None:
            q.set_default_explanation(default_explanation)
        status, _code, explanation = q.check()
    except Exception as exc:  # a pyspf bug on hostile input must not take the session down
        return SPFResult(SPFStatus.PERMERROR, f"SPF evaluation error: {exc.__class__.__name__}"[:200],
                         domain, scope, identity)
    finally:
        _current.reset(token)
    status = {"unknown": "permerror", "error": "temperror", "ambiguous": "permerror"}.get(status, status)
    return SPFResult(SPFStatus(status), str(explanation), domain, scope, identity)


def check_helo(ip: str, helo: str, resolver: SyncLookup, *, receiver: str = "") -> SPFResult:
    """RFC 7208 §2.3: the HELO identity check (check_host with postmaster@<helo>).

    An address literal or a name that is not a domain gives "none" (§2.3: only a FQDN is checked).
    """
    host = helo.strip().rstrip(".")
    if not host or host.startswith("[") or "." not in host:
        return SPFResult(SPFStatus.NONE, "HELO is not a fully qualified domain name", host.lower(), "helo",
                         f"postmaster@{host}")
    return check_host(ip, "", host, resolver, receiver=receiver)


def _is_spf_record(txt: bytes) -> bool:
    """RFC 7208 §4.5: a record starts with the version section "v=spf1" (case-insensitive)."""
    t = txt[:7].lower()
    return t == b"v=spf1" or t == b"v=spf1 "


def _plain_domain(domain: str) -> bool:
    labels = domain.split(".")
    return len(domain) <= 253 and len(labels) > 1 and all(0 < len(lb) <= 63 for lb in labels)


async def _without_record(domain: str, resolver: SyncLookup) -> bool:
    """True when the domain has no SPF record, as the async resolver (and its cache) tells.

    RFC 7208 §4.3: NXDOMAIN -> "none"; §4.5: no record beginning "v=spf1" -> "none". Most mail from
    domains without SPF is settled here, on the event loop, without pyspf or a worker thread; a
    domain with a record, a DNS failure, or a resolver that is not asynchronous goes to pyspf.
    """
    if not isinstance(resolver, AsyncLookup) or not _plain_domain(domain):
        return False
    ans = await resolver.query(domain, "TXT")
    if ans.status is DNSStatus.NXDOMAIN or ans.status is DNSStatus.NODATA:
        return True
    return ans.status is DNSStatus.OK and not any(_is_spf_record(bytes(r)) for r in ans.records)


async def check_spf(ip: str, mail_from: str, helo: str, resolver: SyncLookup, *, receiver: str = ""
                    ) -> SPFResult:
    """`check_host` off the event loop (or on it, when the domain publishes no SPF record)."""
    identity = mail_from if "@" in mail_from else f"postmaster@{mail_from or helo}"
    domain = _domain_of(identity)
    if mail_from and await _without_record(domain, resolver):
        return SPFResult(SPFStatus.NONE, "", domain, "mailfrom", identity)
    return await asyncio.to_thread(check_host, ip, mail_from, helo, resolver, receiver=receiver)


async def check_spf_helo(ip: str, helo: str, resolver: SyncLookup, *, receiver: str = "") -> SPFResult:
    """`check_helo` off the event loop (or on it, when the HELO name publishes no SPF record)."""
    host = helo.strip().rstrip(".")
    if host and not host.startswith("[") and "." in host and await _without_record(host.lower(), resolver):
        return SPFResult(SPFStatus.NONE, "", host.lower(), "helo", f"postmaster@{host}")
    return await asyncio.to_thread(check_helo, ip, helo, resolver, receiver=receiver)
