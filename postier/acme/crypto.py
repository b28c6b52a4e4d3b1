"""The cryptography of ACME (RFC 8555 §6.2): JWS with ES256 (RFC 7515, RFC 7518 §3.4), JWK thumbprints
(RFC 7638), key authorizations (§8.1), CSRs (§7.4) and tls-alpn-01 validation certificates (RFC 8737 §3).

Pure functions over the `cryptography` package; no I/O but the temporary file OpenSSL needs to load a
certificate into an `ssl.SSLContext`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import ssl
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID, ObjectIdentifier

from ..tlsreload import load_pem_into

__all__ = ["b64u", "AccountKey", "generate_key", "load_key", "key_pem", "make_csr", "key_authorization",
           "tls_alpn_context", "ACME_IDENTIFIER_OID"]

#: RFC 8737 §6.1: id-pe-acmeIdentifier.
ACME_IDENTIFIER_OID = ObjectIdentifier("1.3.6.1.5.5.7.1.31")


def b64u(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise ValueError("not a P-256 private key")
    return key


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class AccountKey:
    """The ACME account key (P-256) and the JWS it signs."""

    def __init__(self, key: ec.EllipticCurvePrivateKey):
        self.key = key
        nums = key.public_key().public_numbers()
        # RFC 7518 §6.2.1: x and y as 32-octet big-endian strings
        self.jwk = {"crv": "P-256", "kty": "EC", "x": b64u(nums.x.to_bytes(32, "big")),
                    "y": b64u(nums.y.to_bytes(32, "big"))}

    def thumbprint(self) -> str:
        """RFC 7638 §3: SHA-256 over the required members, sorted, without whitespace."""
        canon = json.dumps(self.jwk, sort_keys=True, separators=(",", ":")).encode()
        return b64u(hashlib.sha256(canon).digest())

    def sign(self, url: str, nonce: str, payload: Any | None, kid: str | None) -> bytes:
        """A flattened JWS (RFC 7515 §7.2.2) for an ACME POST (RFC 8555 §6.2); payload None = POST-as-GET."""
        protected: dict[str, Any] = {"alg": "ES256", "nonce": nonce, "url": url}
        if kid:
            protected["kid"] = kid  # RFC 8555 §6.2: kid once the account exists...
        else:
            protected["jwk"] = self.jwk  # ...jwk for newAccount
        p64 = b64u(json.dumps(protected).encode())
        body64 = "" if payload is None else b64u(json.dumps(payload).encode())  # RFC 8555 §6.3
        der = self.key.sign(f"{p64}.{body64}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")  # RFC 7518 §3.4: R || S, not DER
        return json.dumps({"protected": p64, "payload": body64, "signature": b64u(sig)}).encode()


def key_authorization(token: str, account: AccountKey) -> str:
    """RFC 8555 §8.1: token || '.' || base64url(JWK thumbprint)."""
    return f"{token}.{account.thumbprint()}"


def make_csr(key: ec.EllipticCurvePrivateKey, names: list[str]) -> bytes:
    """A DER CSR for `names` (RFC 8555 §7.4: the identifiers go in the SAN extension)."""
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.DER)


def tls_alpn_context(name: str, key_auth: str) -> ssl.SSLContext:
    """A server context presenting the RFC 8737 §3 validation certificate for `name` (ALPN acme-tls/1)."""
    key = generate_key()
    digest = hashlib.sha256(key_auth.encode("ascii")).digest()
    # RFC 8737 §3: extnValue is the DER of an OCTET STRING holding the SHA-256 digest; critical
    ext_value = b"\x04\x20" + digest
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, ext_value), critical=True)
            .sign(key, hashes.SHA256()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["acme-tls/1"])  # RFC 8737 §6.2
    load_pem_into(ctx, key_pem(key) + cert.public_bytes(serialization.Encoding.PEM))
    return ctx
