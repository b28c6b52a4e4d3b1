"""DMARC evaluation (RFC 7489, with RFC 9989's DNS tree walk, np, psd and t tags) over a Resolver.

Our own implementation: the Python DMARC libraries we tried evaluate only the first DKIM signature
or carry stale public suffix data. This module takes the SPF and DKIM outcomes (every signature)
and the RFC5322.From domain, finds the policy, checks identifier alignment and says what to do.

Choices, in brief:
- Policy discovery is RFC 9989's DNS tree walk (at most 8 queries, see `walk_targets`); the
  first valid record on the way up wins (RFC 7489's "From domain, then Organizational Domain" is
  the special case of a two-step walk).
- Organizational Domain (relaxed alignment) by the same walk (RFC 9989 §4.10.2). Safety net from
  the public suffix list (the `publicsuffixlist` package ships its data): a name the list calls a
  public suffix is never an Organizational Domain unless its own record says psd=n. Otherwise a
  stray record at, say, _dmarc.co.uk would align every co.uk domain with every other one.
  `org_method="psl"` gives RFC 7489's list-only behaviour.
- A record that fails to parse counts as absent at its level; a DNS temporary failure anywhere
  the result depends on is `temperror`.
- pct (RFC 7489 §6.6.4) and t=y (RFC 9989): a failing message not sampled gets the next milder
  disposition (reject -> quarantine -> none). The random source is injectable.
- From problems (RFC 7489 §6.6.1): `from_domain()` returns a `FromProblem` for zero or several
  From fields, several addresses or no usable domain; postier rejects such messages (5.7.1)
  rather than evaluating several domains.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.utils import getaddresses
from enum import StrEnum
from typing import Any, Literal, Protocol

import idna
from publicsuffixlist import PublicSuffixList

from postier.resolver import Answer, AsyncLookup, DNSStatus

__all__ = ["DMARCStatus", "DMARCPolicy", "Alignment", "DMARCRecord", "DMARCRecordError", "DMARCResult",
           "FromProblem", "parse_record", "from_domain", "evaluate", "discover_policy",
           "organizational_domain", "walk_targets", "psl_organizational_domain"]

MAX_WALK_LABELS = 7  # RFC 9989 §4.10.1: longer names jump to their rightmost 7 labels (8 queries at most)
MAX_TXT_RECORDS = 20


class DMARCStatus(StrEnum):
    # RFC 8601 §2.7 / RFC 7489 §11.2
    NONE = "none"
    PASS = "pass"
    FAIL = "fail"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


class DMARCPolicy(StrEnum):
    NONE = "none"
    QUARANTINE = "quarantine"
    REJECT = "reject"


class Alignment(StrEnum):
    RELAXED = "r"
    STRICT = "s"


PSD = Literal["y", "n", "u"]  # RFC 9989 psd= tag: a public suffix domain, not one, unknown


class DMARCRecordError(ValueError):
    """A TXT record that is not a valid DMARC record."""


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    policy: DMARCPolicy                              # p
    subdomain_policy: DMARCPolicy | None = None      # sp
    nonexistent_policy: DMARCPolicy | None = None    # np (RFC 9989)
    adkim: Alignment = Alignment.RELAXED
    aspf: Alignment = Alignment.RELAXED
    pct: int = 100
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: tuple[str, ...] = ("0",)
    rf: tuple[str, ...] = ("afrf",)
    ri: int = 86400
    psd: PSD = "u"                                   # RFC 9989
    testing: bool = False                            # t=y (RFC 9989)


class SPFLike(Protocol):
    @property
    def domain(self) -> str: ...
    @property
    def status(self) -> Any: ...


class DKIMLike(Protocol):
    @property
    def domain(self) -> str: ...
    @property
    def status(self) -> Any: ...


@dataclass(frozen=True, slots=True)
class DMARCResult:
    status: DMARCStatus
    policy: DMARCPolicy = DMARCPolicy.NONE        # what the domain asks for (p, sp or np)
    disposition: DMARCPolicy = DMARCPolicy.NONE   # what to do with this message (after pct / t)
    reason: str = ""
    record: DMARCRecord | None = None
    domain: str = ""                              # the RFC5322.From domain
    record_domain: str = ""                       # where the record was found
    spf_aligned: bool = False
    dkim_aligned: bool = False


# --- record syntax (RFC 7489 §6.3, §6.4; RFC 9989) -------------------------------------------------

_TAG = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:[^\s,;!]+(![0-9]+[kmgtKMGT]?)?$")
_POLICIES = {p.value: p for p in DMARCPolicy}
_PSD_VALUES: dict[str, PSD] = {"y": "y", "n": "n", "u": "u"}
_V_FIRST = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")


def _policy(value: str) -> DMARCPolicy | None:
    return _POLICIES.get(value.strip().lower())


def parse_record(txt: str | bytes) -> DMARCRecord:
    """Parse a DMARC TXT record; raises DMARCRecordError. Unknown tags are ignored (§6.3)."""
    if isinstance(txt, bytes):
        try:
            txt = txt.decode("ascii")
        except UnicodeDecodeError:
            raise DMARCRecordError("non-ASCII DMARC record") from None
    if not _V_FIRST.match(txt):
        raise DMARCRecordError("the record must start with v=DMARC1")  # RFC 7489 §6.4
    tags: dict[str, str] = {}
    for part in txt.split(";"):
        if not part.strip():
            continue  # a trailing ";" is allowed
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq or not _TAG.match(name):
            raise DMARCRecordError(f"malformed tag {part.strip()!r}")
        if name in tags:
            raise DMARCRecordError(f"duplicate tag {name}")
        tags[name] = value.strip()
    rua = tuple(u.strip() for u in tags.get("rua", "").split(",") if _URI.match(u.strip()))
    ruf = tuple(u.strip() for u in tags.get("ruf", "").split(",") if _URI.match(u.strip()))
    policy = _policy(tags.get("p", ""))
    if policy is None:
        # RFC 7489 §6.6.3 step 6: no valid p=, but a valid rua= -> act as p=none; else not a record.
        if not rua:
            raise DMARCRecordError("missing or invalid p=")
        policy = DMARCPolicy.NONE

    def alignment(tag: str) -> Alignment:
        return Alignment.STRICT if tags.get(tag, "").lower() == "s" else Alignment.RELAXED

    def number(tag: str, default: int, low: int, high: int) -> int:
        value = tags.get(tag, "")
        return int(value) if value.isdigit() and low <= int(value) <= high else default

    fo = tuple(v.strip() for v in tags.get("fo", "0").split(":"))
    rf = tuple(v.strip().lower() for v in tags.get("rf", "afrf").split(":"))
    # Invalid optional values fall back to their defaults (RFC 7489 §6.3: "syntax errors in the
    # remainder of the record SHOULD be discarded in favor of default values").
    return DMARCRecord(
        policy=policy,
        subdomain_policy=_policy(tags.get("sp", "")),
        nonexistent_policy=_policy(tags.get("np", "")),
        adkim=alignment("adkim"),
        aspf=alignment("aspf"),
        pct=number("pct", 100, 0, 100),
        rua=rua,
        ruf=ruf,
        fo=fo if all(v in ("0", "1", "d", "s") for v in fo) else ("0",),
        rf=rf if all(rf) else ("afrf",),
        ri=number("ri", 86400, 0, 2**32 - 1),
        psd=_PSD_VALUES.get(tags.get("psd", "u").lower(), "u"),
        testing=tags.get("t", "n").lower() == "y",
    )


# --- the RFC5322.From domain (RFC 7489 §6.6.1) -----------------------------------------------------

class FromProblem(StrEnum):
    MISSING = "no From header field"
    MULTIPLE_FIELDS = "more than one From header field"
    MULTIPLE_ADDRESSES = "more than one address in From"
    NO_DOMAIN = "no usable domain in From"


_LDH = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


def normalize_domain(domain: str) -> str | None:
    """Lower-case A-label form of a domain, or None if it is not a usable DNS domain."""
    domain = domain.strip().rstrip(".")
    if not domain or domain.startswith("["):
        return None
    if not domain.isascii():
        try:
            domain = idna.encode(domain, uts46=True).decode("ascii")
        except idna.IDNAError:
            return None
    domain = domain.lower()
    labels = domain.split(".")
    if len(domain) > 253 or len(labels) < 1 or not all(_LDH.match(label) for label in labels):
        return None
    return domain


def _header_fields(block: bytes) -> list[tuple[str, str]]:
    fields: list[tuple[str, str]] = []
    for line in re.split(rb"\r?\n", block):
        if not line:
            break  # end of the header section
        if line[:1] in (b" ", b"\t") and fields:
            prev_name, prev_value = fields[-1]
            fields[-1] = (prev_name, prev_value + " " + line.decode("utf-8", "replace").strip())
            continue
        name, sep, value = line.partition(b":")
        if sep:
            fields.append((name.decode("ascii", "replace").strip(), value.decode("utf-8", "replace").strip()))
    return fields


def from_domain(message_headers: bytes | Sequence[tuple[str, str]]) -> str | FromProblem:
    """The RFC5322.From domain of a message (its header section as bytes, or (name, value) pairs)."""
    fields = _header_fields(message_headers) if isinstance(message_headers, bytes) else list(message_headers)
    values = [value for name, value in fields if name.strip().lower() == "from"]
    if not values:
        return FromProblem.MISSING
    if len(values) > 1:
        return FromProblem.MULTIPLE_FIELDS
    addresses = [a for a in getaddresses([values[0]]) if a != ("", "")]
    if not addresses:
        return FromProblem.NO_DOMAIN
    if len(addresses) > 1:
        return FromProblem.MULTIPLE_ADDRESSES
    local, at, domain = addresses[0][1].rpartition("@")
    normalized = normalize_domain(domain) if at and local else None
    return normalized if normalized else FromProblem.NO_DOMAIN


# --- DNS: policy discovery and the Organizational Domain (RFC 9989 §4.10) --------------------------

class _TempError(Exception):
    pass


@dataclass
class _Lookups:
    """Per-evaluation memo of _dmarc queries, so discovery and both alignment walks share them."""

    resolver: AsyncLookup
    cache: dict[str, DMARCRecord | None] = field(default_factory=dict)

    async def record_at(self, domain: str) -> DMARCRecord | None:
        if domain in self.cache:
            return self.cache[domain]
        answer: Answer[bytes] = await self.resolver.query(f"_dmarc.{domain}", "TXT")
        if answer.status is DNSStatus.TEMPFAIL:
            raise _TempError(f"_dmarc.{domain}: {answer.reason or 'temporary DNS failure'}")
        # RFC 7489 §6.6.3: keep only records starting with v=DMARC1; exactly one must remain.
        candidates = [r for r in answer.records[:MAX_TXT_RECORDS] if _V_FIRST.match(r.decode("latin-1"))]
        record = None
        if len(candidates) == 1:
            try:
                record = parse_record(candidates[0])
            except DMARCRecordError:
                record = None
        self.cache[domain] = record
        return record


def walk_targets(domain: str) -> list[str]:
    """The names whose _dmarc records the DNS tree walk consults, in order (RFC 9989 §4.10.1)."""
    labels = domain.split(".")
    targets = [domain]
    start = min(len(labels) - 1, MAX_WALK_LABELS)  # 8 or more labels: jump to the rightmost 7
    for count in range(start, 0, -1):
        targets.append(".".join(labels[-count:]))
    return targets


@functools.cache
def suffix_list() -> PublicSuffixList:
    """The public suffix list, parsed at first use (about 50 ms: a CLI command that checks no DMARC
    does not pay it; the server warms it in a thread once it serves, `server/app.py`)."""
    return PublicSuffixList()


def psl_organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (the domain itself if it is a suffix)."""
    return suffix_list().privatesuffix(domain) or domain


async def _discover(domain: str, lookups: _Lookups) -> tuple[DMARCRecord, str] | None:
    """The first valid record on the tree walk and where it was found; raises _TempError."""
    for target in walk_targets(domain):
        record = await lookups.record_at(target)
        if record is not None:
            return record, target
    return None


async def _org_domain(domain: str, lookups: _Lookups, method: str = "treewalk") -> str:
    """RFC 9989 §4.10.2 (or RFC 7489 §3.2 with method="psl"); raises _TempError."""
    if method == "psl":
        return psl_organizational_domain(domain)
    labels = domain.split(".")
    highest: str | None = None
    for target in walk_targets(domain):
        record = await lookups.record_at(target)
        if record is None:
            continue
        if record.psd == "n":
            return target  # the domain says it is an Organizational Domain
        if record.psd == "y" and target != domain:
            # a public suffix domain: the Organizational Domain is the name one label below it
            return ".".join(labels[-(target.count(".") + 2):])
        highest = target
    if highest is None:
        return domain
    if suffix_list().is_public(highest):  # our safety net, see the module docstring
        return psl_organizational_domain(domain)
    return highest


async def discover_policy(domain: str, resolver: AsyncLookup) -> Answer[tuple[DMARCRecord, str]]:
    """Policy discovery for a From domain: OK with one (record, where found), NODATA, or TEMPFAIL."""
    author = normalize_domain(domain)
    if author is None:
        return Answer(DNSStatus.NXDOMAIN, (), "invalid domain")
    try:
        found = await _discover(author, _Lookups(resolver))
    except _TempError as exc:
        return Answer(DNSStatus.TEMPFAIL, (), str(exc))
    return Answer(DNSStatus.OK, (found,)) if found else Answer(DNSStatus.NODATA, (), "no DMARC record")


async def organizational_domain(domain: str, resolver: AsyncLookup, method: str = "treewalk") -> Answer[str]:
    """The Organizational Domain of `domain`: OK with one name, or TEMPFAIL."""
    name = normalize_domain(domain)
    if name is None:
        return Answer(DNSStatus.NXDOMAIN, (), "invalid domain")
    try:
        return Answer(DNSStatus.OK, (await _org_domain(name, _Lookups(resolver), method),))
    except _TempError as exc:
        return Answer(DNSStatus.TEMPFAIL, (), str(exc))


def _common_suffix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(reversed(a.split(".")), reversed(b.split(".")), strict=False):
        if x != y:
            break
        n += 1
    return n


async def _aligned(auth_domain: str, author: str, mode: Alignment, lookups: _Lookups, method: str) -> bool:
    """RFC 7489 §3.1: identifier alignment, strict (identical) or relaxed (same Org Domain)."""
    auth = normalize_domain(auth_domain)
    if auth is None:
        return False
    if auth == author:
        return True
    if mode is Alignment.STRICT or _common_suffix(auth, author) == 0:
        return False
    return await _org_domain(auth, lookups, method) == await _org_domain(author, lookups, method)


_MILDER = {DMARCPolicy.REJECT: DMARCPolicy.QUARANTINE, DMARCPolicy.QUARANTINE: DMARCPolicy.NONE,
           DMARCPolicy.NONE: DMARCPolicy.NONE}


async def _requested_policy(record: DMARCRecord, record_domain: str, author: str,
                            resolver: AsyncLookup) -> DMARCPolicy:
    if record_domain == author:
        return record.policy
    if record.nonexistent_policy is not None:
        # RFC 9989: np= applies when the author domain does not exist in the DNS.
        answer = await resolver.query(author, "A")
        if answer.status is DNSStatus.TEMPFAIL:
            raise _TempError(f"{author}: {answer.reason or 'temporary DNS failure'}")
        if answer.status is DNSStatus.NXDOMAIN:
            return record.nonexistent_policy
    return record.subdomain_policy or record.policy  # RFC 7489 §6.3 sp=


async def evaluate(author_domain: str, spf: SPFLike | None, dkim: Sequence[DKIMLike], resolver: AsyncLookup,
                   *, rng: random.Random | None = None, org_method: str = "treewalk") -> DMARCResult:
    """DMARC for a message whose From domain is `author_domain` (RFC 7489 §6.6).

    `spf` is the MAIL FROM result (its domain is the HELO domain for a null sender, RFC 7208 §2.4);
    `dkim` holds one result per signature: any passing aligned signature passes DMARC.
    """
    author = normalize_domain(author_domain)
    if author is None:
        return DMARCResult(DMARCStatus.PERMERROR, reason="invalid From domain", domain=author_domain)
    lookups = _Lookups(resolver)
    try:
        found = await _discover(author, lookups)
    except _TempError as exc:
        return DMARCResult(DMARCStatus.TEMPERROR, reason=str(exc), domain=author)
    if found is None:
        return DMARCResult(DMARCStatus.NONE, reason="no DMARC record", domain=author)
    record, record_domain = found

    def result(status: DMARCStatus, policy: DMARCPolicy, disposition: DMARCPolicy, reason: str,
               spf_aligned: bool = False, dkim_aligned: bool = False) -> DMARCResult:
        return DMARCResult(status, policy, disposition, reason, record, author, record_domain,
                           spf_aligned, dkim_aligned)

    try:
        policy = await _requested_policy(record, record_domain, author, resolver)
    except _TempError as exc:
        return result(DMARCStatus.TEMPERROR, record.policy, DMARCPolicy.NONE, str(exc))

    # RFC 7489 §3.1 / §6.6.2: identifiers that passed their own check, tried for alignment. Identical
    # domains need no DNS; relaxed alignment may walk the tree.
    candidates = [("dkim", r.domain, record.adkim) for r in dkim if str(r.status) == "pass"]
    if spf is not None and str(spf.status) == "pass":
        candidates.append(("spf", spf.domain, record.aspf))
    aligned = {kind for kind, domain, _ in candidates if normalize_domain(domain) == author}
    tempfail = ""
    for kind, domain, mode in candidates:
        if kind in aligned:
            continue
        try:
            if await _aligned(domain, author, mode, lookups, org_method):
                aligned.add(kind)
        except _TempError as exc:
            tempfail = str(exc)
    if aligned:
        which = " and ".join(k.upper() for k in ("dkim", "spf") if k in aligned)
        return result(DMARCStatus.PASS, policy, DMARCPolicy.NONE, f"aligned {which} pass",
                      "spf" in aligned, "dkim" in aligned)
    if tempfail:
        return result(DMARCStatus.TEMPERROR, policy, DMARCPolicy.NONE, tempfail)

    disposition = policy
    reason = "no aligned SPF or DKIM pass"
    if record.testing:  # RFC 9989 t=y
        disposition, reason = _MILDER[policy], reason + "; t=y (testing)"
    elif record.pct < 100 and (rng or random.Random()).random() * 100 >= record.pct:
        disposition, reason = _MILDER[policy], reason + f"; not sampled (pct={record.pct})"  # RFC 7489 §6.6.4
    return result(DMARCStatus.FAIL, policy, disposition, reason)
