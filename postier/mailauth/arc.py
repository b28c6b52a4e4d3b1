"""ARC (RFC 8617): sealing the mail we forward, and validating the chain of the mail we receive, via dkimpy.

dkimpy computes the ARC set (ARC-Authentication-Results, ARC-Message-Signature, ARC-Seal; RFC 8617
§4.1) and validates chains (§5.2). We add what it leaves to the caller:
- the key: the forwarding domain's active RSA DKIM key (`mailauth/keys.py`; the nearest parent
  domain with one, as DKIM signing picks it). RFC 8617 §4.1.3 defines rsa-sha256 only: a domain
  with an ed25519 key alone forwards unsealed;
- the Authentication-Results sealed are ours, found by our authserv-id (§4.1.1: the AAR copies the
  ADMD's own results); the chain validation status of the new seal (cv=) is the `arc=` result we
  recorded inbound (§5.1.1; none when the message came without a chain). A message that
  carries no Authentication-Results of ours (mail authentication off) is forwarded unsealed;
- the AMS's signed header fields: the same choice as our DKIM signatures (`dkim.signed_header_list`);
- inbound, the key lookups go through our resolver (`dkim.dkim_dnsfunc`); arc= has the results none,
  pass and fail only (RFC 8617 §2.2), so a key that cannot be fetched makes the chain `fail`, with
  the reason.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

import dkim as dkimpy

from ..resolver import SyncLookup
from .dkim import _dkimpy_key, dkim_dnsfunc, signed_header_list
from .keys import KeyStore

__all__ = ["ARCResult", "ARCSealer", "has_chain", "seal", "verify_chain", "verify_chain_async"]

log = logging.getLogger("postier.mailauth")

MAX_VERIFY_SIZE = 32 * 1024 * 1024  # like DKIM verification: the whole message is in memory


@dataclass(frozen=True, slots=True)
class ARCResult:
    status: str  # RFC 8617 §2.2 / RFC 8601 arc=: "pass", "fail" or "none"
    reason: str
    instances: int = 0  # sets in the chain


def seal(message: bytes, domain: str, selector: str, private_key_pem: bytes | str, authserv_id: str,
         timestamp: int | None = None) -> bytes:
    """The ARC set to prepend to `message` (CRLF-terminated header fields, ARC-Seal first), or b""
    when the message has no Authentication-Results of `authserv_id` to seal (RFC 8617 §4.1.1).

    Blocking (RSA in pure Python): use `ARCSealer` on the event loop. ValueError for a bad key or message.
    """
    key = _dkimpy_key(private_key_pem, "rsa-sha256")
    try:
        arc = dkimpy.ARC(message, linesep=b"\r\n")
        lines: list[bytes] = arc.sign(selector.encode("ascii"), domain.encode("idna").lower(), key,
                                      authserv_id.lower().encode("ascii"),
                                      include_headers=signed_header_list(arc.headers), timestamp=timestamp)
    except dkimpy.DKIMException as exc:
        raise ValueError(f"ARC sealing failed: {exc}") from exc
    return b"".join(line if line.endswith(b"\r\n") else line + b"\r\n" for line in lines)


def verify_chain(message: bytes, dns: SyncLookup) -> ARCResult:
    """RFC 8617 §5.2: the validation of the ARC chain the message arrived with."""
    dnsfunc = dkim_dnsfunc(dns)
    try:
        cv, results, reason = dkimpy.arc_verify(message, dnsfunc=dnsfunc)
    except dkimpy.DnsTimeoutError as exc:
        return ARCResult("fail", f"key lookup: {exc}"[:200])
    except Exception as exc:  # hostile input gives an outcome, never an exception
        return ARCResult("fail", f"verification error: {exc.__class__.__name__}: {exc}"[:200])
    status = (cv or b"fail").decode("ascii", "replace").lower()
    if status not in ("pass", "fail", "none"):
        status = "fail"
    return ARCResult(status, str(reason)[:200], len(results))


async def verify_chain_async(message: bytes, dns: SyncLookup) -> ARCResult:
    return await asyncio.to_thread(verify_chain, message, dns)


_ARC_SEAL = re.compile(rb"^arc-seal[ \t]*:", re.IGNORECASE | re.MULTILINE)


def has_chain(header: bytes) -> bool:
    """Whether a header section carries an ARC-Seal (a quick test before a validation)."""
    return _ARC_SEAL.search(header) is not None


class ARCSealer:
    """Seals forwarded mail (alias targets elsewhere, Sieve redirect) for the forwarding domain."""

    def __init__(self, store: KeyStore, authserv_id: str) -> None:
        self.store = store
        self.authserv_id = authserv_id

    def seal_sync(self, message: bytes, domain: str) -> bytes:
        """The ARC set for `message` forwarded by `domain`, or b"" (no RSA key, nothing to seal)."""
        signing = self.store.signing_domain(domain)
        if signing is None:
            return b""
        keys = [k for k in self.store.active(signing) if k.algorithm == "rsa-sha256"]  # RFC 8617 §4.1.3
        if not keys:
            return b""
        key = keys[0]
        try:
            return seal(message, key.domain, key.selector, self.store.private_key(key), self.authserv_id)
        except (OSError, ValueError) as exc:
            log.error("arc: sealing with %s failed: %s", key.dns_name, exc)
            return b""

    async def seal(self, message: bytes, domain: str) -> bytes:
        return await asyncio.to_thread(self.seal_sync, message, domain)
