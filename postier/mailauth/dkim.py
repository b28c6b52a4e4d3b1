"""DKIM signing and verification of every signature (RFC 6376, RFC 8463 ed25519, RFC 8301) via dkimpy.

dkimpy does the canonicalization and cryptography. We add what it leaves to the caller:
- every DKIM-Signature header is verified (dkimpy's `verify(idx=i)` checks one), up to a bound;
- each outcome is a status in RFC 8601 §2.7.1 terms. dkimpy answers True/False and swallows DNS
  timeouts into False, so the key is fetched here first through our resolver: a temporary DNS
  failure is `temperror`, a missing or unusable key `permerror`, a bad signature `fail`;
- the signed-header choice and key generation (via cryptography).

Signed headers (RFC 6376 §5.4, §8.15): the identity and content fields a reader sees are
"oversigned", listed once more than they occur, so nobody can add another instance (or a missing
Reply-To/Cc) after signing: From, To, Cc, Subject, Date, Reply-To, Sender, Message-ID, In-Reply-To,
References. MIME and List-* fields are signed as present only: relays and list software legitimately
add those to messages that lack them, and adding them does not change what the reader trusts.
Canonicalization relaxed/relaxed; no l= (RFC 6376 §8.2: a body length invites appended content).
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import dkim as dkimpy
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from postier.resolver import DNSStatus, SyncLookup

__all__ = ["DKIMStatus", "DKIMResult", "Algorithm", "sign", "sign_async", "verify_all", "verify_all_async",
           "generate_key", "dkim_dnsfunc", "signed_header_list", "OVERSIGNED", "SIGNED_AS_PRESENT"]

Algorithm = Literal["rsa-sha256", "ed25519-sha256"]
DnsFunc = Callable[..., bytes | None]

OVERSIGNED = ("from", "to", "cc", "subject", "date", "reply-to", "sender", "message-id",
              "in-reply-to", "references")
SIGNED_AS_PRESENT = ("mime-version", "content-type", "content-transfer-encoding", "list-id",
                     "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe",
                     "list-post", "list-owner", "list-archive")
MAX_SIGNATURES = 10   # verify at most this many; the rest are reported "neutral"
MIN_RSA_BITS = 1024   # RFC 8301 §3.2: verifiers MUST accept 1024-4096, MUST NOT below 1024


class DKIMStatus(StrEnum):
    # RFC 8601 §2.7.1
    NONE = "none"
    PASS = "pass"
    FAIL = "fail"
    POLICY = "policy"
    NEUTRAL = "neutral"
    TEMPERROR = "temperror"
    PERMERROR = "permerror"


@dataclass(frozen=True, slots=True)
class DKIMResult:
    domain: str        # d= (lower case)
    selector: str      # s=
    status: DKIMStatus
    reason: str
    algorithm: str     # a=
    identity: str = ""  # i=
    b: str = ""         # the start of b=, for header.b (RFC 6008)


# --- keys ----------------------------------------------------------------------------------------

def generate_key(algorithm: Algorithm = "rsa-sha256", bits: int = 2048) -> tuple[bytes, str]:
    """A new key: (PKCS#8 PEM private key, the TXT value to publish at <selector>._domainkey.<domain>)."""
    if algorithm == "rsa-sha256":
        if not MIN_RSA_BITS <= bits <= 8192:
            raise ValueError("RSA key size must be between 1024 and 8192 bits (RFC 8301 §3.2)")
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        txt = f"v=DKIM1; k=rsa; p={base64.b64encode(spki).decode()}"  # RFC 6376 §3.6.1
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        return pem, txt
    if algorithm == "ed25519-sha256":
        ekey = ed25519.Ed25519PrivateKey.generate()
        raw = ekey.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        txt = f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"  # RFC 8463 §4.2: the raw key
        pem = ekey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        return pem, txt
    raise ValueError(f"unknown DKIM algorithm {algorithm!r}")


def _dkimpy_key(private_key: bytes | str, algorithm: Algorithm) -> bytes:
    """Our PEM (or dkimpy's own formats) -> what dkimpy's signer takes for `algorithm`."""
    data = private_key.encode() if isinstance(private_key, str) else private_key
    if b"-----BEGIN" not in data:
        return data.strip()  # already dkimpy's form (base64 ed25519 seed)
    key = serialization.load_pem_private_key(data, password=None)
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("rsa-sha256 needs an RSA private key")
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())  # PKCS#1, what dkimpy parses
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError("ed25519-sha256 needs an Ed25519 private key")
    seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())
    return base64.b64encode(seed)


# --- signing -------------------------------------------------------------------------------------

def signed_header_list(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    """The h= list for a message with these header fields (see the module docstring)."""
    counts: dict[str, int] = {}
    for raw, _ in headers:
        key = raw.decode("ascii", "replace").strip().lower()
        counts[key] = counts.get(key, 0) + 1
    out: list[bytes] = []
    for name in OVERSIGNED:
        out += [name.encode()] * (counts.get(name, 0) + 1)
    for name in SIGNED_AS_PRESENT:
        out += [name.encode()] * counts.get(name, 0)
    return out


def sign(message: bytes, domain: str, selector: str, private_key_pem: bytes | str,
         algorithm: Algorithm = "rsa-sha256", *, identity: str | None = None) -> bytes:
    """The DKIM-Signature header field (folded, CRLF-terminated) to prepend to `message`.

    Raises ValueError for a bad key, algorithm or message. Blocking (RSA is pure Python in dkimpy):
    use `sign_async` on the event loop.
    """
    if algorithm not in ("rsa-sha256", "ed25519-sha256"):
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}")
    key = _dkimpy_key(private_key_pem, algorithm)
    signer = dkimpy.DKIM(message, signature_algorithm=algorithm.encode(), linesep=b"\r\n")
    try:
        return bytes(signer.sign(
            selector.encode("ascii"), domain.encode("idna").lower(), key,
            identity=identity.encode() if identity else None,
            canonicalize=(b"relaxed", b"relaxed"),      # RFC 6376 §3.4.2, §3.4.4
            include_headers=signed_header_list(signer.headers), length=False))
    except dkimpy.DKIMException as exc:
        raise ValueError(f"DKIM signing failed: {exc}") from exc


async def sign_async(message: bytes, domain: str, selector: str, private_key_pem: bytes | str,
                     algorithm: Algorithm = "rsa-sha256", *, identity: str | None = None) -> bytes:
    return await asyncio.to_thread(sign, message, domain, selector, private_key_pem, algorithm,
                                   identity=identity)


# --- verification --------------------------------------------------------------------------------

def dkim_dnsfunc(resolver: SyncLookup) -> DnsFunc:
    """dkimpy's `dnsfunc(name, timeout=5) -> TXT bytes | None` over our resolver.

    A temporary failure raises dkim.DnsTimeoutError; no record gives None (RFC 6376 §6.1.2: PERMFAIL).
    """

    def get_txt(name: bytes | str, timeout: float = 5) -> bytes | None:
        text = name.decode("ascii", "replace") if isinstance(name, bytes) else name
        answer = resolver.query_sync(text, "TXT", timeout)
        if answer.status is DNSStatus.TEMPFAIL:
            raise dkimpy.DnsTimeoutError(f"{text}: {answer.reason or 'temporary DNS failure'}")
        if not answer.ok:
            return None
        records: tuple[bytes, ...] = answer.records
        # RFC 6376 §3.6.2.2 leaves several TXT records undefined; prefer one that says v=DKIM1.
        for rec in records:
            if rec.lstrip().startswith(b"v=DKIM1"):
                return rec
        return records[0]

    return get_txt


def _text(value: bytes | None) -> str:
    return value.decode("ascii", "replace") if value else ""


def _verify_one(verifier: dkimpy.DKIM, idx: int, header_value: bytes, dnsfunc: DnsFunc) -> DKIMResult:
    try:
        tags: dict[bytes, bytes] = parse_tag_value(re.sub(rb"\r?\n", b"", header_value))
    except InvalidTagValueList as exc:
        return DKIMResult("", "", DKIMStatus.NEUTRAL, f"signature syntax: {exc}"[:200], "")
    domain, selector, alg = _text(tags.get(b"d")).lower(), _text(tags.get(b"s")), _text(tags.get(b"a"))
    b = re.sub(r"\s+", "", _text(tags.get(b"b")))[:12]

    def result(status: DKIMStatus, reason: str) -> DKIMResult:
        return DKIMResult(domain, selector, status, reason[:200], alg, _text(tags.get(b"i")), b)

    if alg == "rsa-sha1":
        return result(DKIMStatus.PERMERROR, "rsa-sha1 is not acceptable (RFC 8301 §3.1)")
    try:
        verifier.verify_headerprep(idx)  # RFC 6376 §6.1.1: required tags, versions, expiry
    except dkimpy.ValidationError as exc:
        return result(DKIMStatus.PERMERROR, str(exc))
    except dkimpy.DKIMException as exc:
        return result(DKIMStatus.NEUTRAL, str(exc))
    # RFC 6376 §6.1.2: get the public key
    name = tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."
    try:
        txt = dnsfunc(name, timeout=verifier.timeout)
    except dkimpy.DnsTimeoutError as exc:
        return result(DKIMStatus.TEMPERROR, f"key lookup: {exc}")
    if not txt:
        return result(DKIMStatus.PERMERROR, f"no key at {_text(name)}")
    try:
        dkimpy.evaluate_pk(name, txt)
    except Exception as exc:  # dkimpy raises several types for a malformed or revoked key
        return result(DKIMStatus.PERMERROR, f"unusable key: {exc}")
    try:
        ok = verifier.verify(idx, dnsfunc=lambda _name, timeout=5: txt)
    except dkimpy.KeyFormatError as exc:  # e.g. a key below the minimum size
        return result(DKIMStatus.PERMERROR, str(exc))
    except dkimpy.ValidationError as exc:  # body hash mismatch
        return result(DKIMStatus.FAIL, str(exc))
    except Exception as exc:  # hostile input must give an outcome, never an exception
        return result(DKIMStatus.NEUTRAL, f"verification error: {exc.__class__.__name__}: {exc}")
    if ok:
        return result(DKIMStatus.PASS, "good signature")
    return result(DKIMStatus.FAIL, "signature did not verify")


def verify_all(message: bytes, dns: SyncLookup | DnsFunc, *, max_signatures: int = MAX_SIGNATURES,
               minkey: int = MIN_RSA_BITS) -> list[DKIMResult]:
    """One result per DKIM-Signature header, top first; an empty list means dkim=none.

    `dns` is a resolver (anything with `query_sync`) or a dkimpy-style dnsfunc. Blocking: use
    `verify_all_async` on the event loop.
    """
    dnsfunc: DnsFunc = dkim_dnsfunc(dns) if isinstance(dns, SyncLookup) else dns
    try:
        verifier = dkimpy.DKIM(message, minkey=minkey)
    except Exception as exc:
        return [DKIMResult("", "", DKIMStatus.NEUTRAL, f"unparsable message: {exc}"[:200], "")]
    sigs = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    results: list[DKIMResult] = []
    for idx, value in enumerate(sigs):
        if idx >= max_signatures:
            results.append(DKIMResult("", "", DKIMStatus.NEUTRAL, "too many signatures; not verified", ""))
            continue
        results.append(_verify_one(verifier, idx, value, dnsfunc))
    return results


async def verify_all_async(message: bytes, dns: SyncLookup | DnsFunc, *,
                           max_signatures: int = MAX_SIGNATURES) -> list[DKIMResult]:
    return await asyncio.to_thread(verify_all, message, dns, max_signatures=max_signatures)
