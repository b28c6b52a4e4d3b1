"""DANE for outbound SMTP (RFC 7672): which TLSA records are usable, and does a server's chain match them.

Pure functions over `cryptography`. The router (`queue/delivery.py`) applies DANE to an MX host only
when both its MX answer and its TLSA answer were DNSSEC-validated (the AD bit, RFC 7672 §2.2); then
TLS is mandatory (§2.2), and the chain must match a usable record: DANE-EE(3) matches the leaf's
certificate or key with no name or expiry check (§3.1.1), DANE-TA(2) a certificate of the chain that
then anchors the leaf, whose name must be the MX host (§3.1.2, §3.2.3). PKIX-TA(0) and PKIX-EE(1) are
not usable for SMTP (§3.1.3): a set with no usable record still requires TLS, unauthenticated.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import verification

from ..resolver import TLSARecord

__all__ = ["usable", "match_chain"]


def usable(records: Sequence[TLSARecord]) -> list[TLSARecord]:
    """RFC 7672 §3.1.3: only DANE-TA(2) and DANE-EE(3), selectors 0/1, matching types 0/1/2."""
    return [r for r in records if r.usage in (2, 3) and r.selector in (0, 1) and r.mtype in (0, 1, 2)]


def _matches(rec: TLSARecord, cert: x509.Certificate) -> bool:
    if rec.selector == 0:
        data = cert.public_bytes(serialization.Encoding.DER)
    else:
        data = cert.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
    if rec.mtype == 1:
        data = hashlib.sha256(data).digest()
    elif rec.mtype == 2:
        data = hashlib.sha512(data).digest()
    return data == rec.data


def match_chain(chain: Sequence[bytes], records: Sequence[TLSARecord], host: str) -> tuple[bool, str]:
    """Does the DER chain (leaf first) satisfy one usable record for MX `host`? (ok, what matched or why not)"""
    try:
        certs = [x509.load_der_x509_certificate(c) for c in chain[:10]]
    except ValueError:
        return False, "unparsable certificate"
    if not certs:
        return False, "no certificate"
    leaf = certs[0]
    for rec in usable(records):
        if rec.usage == 3 and _matches(rec, leaf):
            return True, f"DANE-EE {rec.usage} {rec.selector} {rec.mtype}"  # RFC 7672 §3.1.1
    for rec in usable(records):
        if rec.usage != 2:
            continue
        for anchor in certs[1:]:  # RFC 7672 §3.1.2: the TA must be in the chain the server sent
            if not _matches(rec, anchor):
                continue
            try:
                store = verification.Store([anchor])
                ee = verification.ExtensionPolicy.permit_all().require_present(
                    x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None)
                verifier = verification.PolicyBuilder().store(store).extension_policies(
                    ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee
                ).build_server_verifier(x509.DNSName(host))  # RFC 7672 §3.2.3: the MX host name
                verifier.verify(leaf, [c for c in certs[1:] if c is not anchor])
            except (verification.VerificationError, ValueError) as exc:
                return False, f"DANE-TA: {str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__}"
            return True, f"DANE-TA {rec.usage} {rec.selector} {rec.mtype}"
    return False, "no TLSA record matches the certificate"
