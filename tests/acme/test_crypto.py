"""ACME cryptography without a network: JWS signatures, thumbprints, CSRs, tls-alpn-01 certificates, and
the live certificate swap (`tlsreload`) over in-memory TLS handshakes."""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from postier.acme.crypto import ACME_IDENTIFIER_OID, AccountKey, generate_key, key_authorization, make_csr, \
    tls_alpn_context
from postier.certs import write_self_signed
from postier.tlsreload import CertificateError, reload_certificates


def unb64(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def test_jws_verifies_and_carries_jwk_or_kid() -> None:
    acct = AccountKey(generate_key())
    jws = json.loads(acct.sign("https://ca.test/new-acct", "nonce1", {"termsOfServiceAgreed": True}, None))
    protected = json.loads(unb64(jws["protected"]))
    assert protected == {"alg": "ES256", "nonce": "nonce1", "url": "https://ca.test/new-acct", "jwk": acct.jwk}
    sig = unb64(jws["signature"])
    assert len(sig) == 64  # RFC 7518 §3.4: R || S
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    acct.key.public_key().verify(der, f"{jws['protected']}.{jws['payload']}".encode(), ec.ECDSA(hashes.SHA256()))
    get = json.loads(acct.sign("https://ca.test/order/1", "n2", None, "https://ca.test/acct/7"))
    assert get["payload"] == ""  # POST-as-GET (RFC 8555 §6.3)
    assert json.loads(unb64(get["protected"]))["kid"] == "https://ca.test/acct/7"


def test_thumbprint_and_key_authorization() -> None:
    acct = AccountKey(generate_key())
    canon = json.dumps({"crv": "P-256", "kty": "EC", "x": acct.jwk["x"], "y": acct.jwk["y"]},
                       separators=(",", ":")).encode()  # RFC 7638 §3.2: members in lexical order
    assert unb64(acct.thumbprint()) == hashlib.sha256(canon).digest()
    assert key_authorization("tok_en-123", acct) == "tok_en-123." + acct.thumbprint()


def test_csr_names() -> None:
    key = generate_key()
    csr = x509.load_der_x509_csr(make_csr(key, ["mail.a.test", "mta-sts.a.test"]))
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mail.a.test", "mta-sts.a.test"]


def handshake(server_ctx: ssl.SSLContext, alpn: list[str] | None = None) -> tuple[x509.Certificate, str | None]:
    """A TLS handshake in memory; returns the server's certificate and the negotiated ALPN protocol."""
    client_ctx = ssl.create_default_context()
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        client_ctx.set_alpn_protocols(alpn)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = client_ctx.wrap_bio(bios[0], bios[1], server_hostname="mail.a.test")
    s = server_ctx.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(10):
        for obj in (c, s):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    der = c.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der), c.selected_alpn_protocol()


def test_tls_alpn01_certificate() -> None:
    cert, proto = handshake(tls_alpn_context("mail.a.test", "tok.thumb"), ["acme-tls/1"])
    assert proto == "acme-tls/1"
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical  # RFC 8737 §3
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.thumb").digest()


def test_reload_swaps_for_new_handshakes_and_refuses_a_bad_pair(tmp_path: Path) -> None:
    write_self_signed(tmp_path / "a.pem", tmp_path / "a.key", ["old.a.test"])
    write_self_signed(tmp_path / "b.pem", tmp_path / "b.key", ["new.a.test"])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "a.pem", tmp_path / "a.key")
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.load_cert_chain(tmp_path / "a.pem", tmp_path / "a.key")

    def names(c: ssl.SSLContext) -> list[str]:
        cert = handshake(c)[0]
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)

    assert names(ctx) == ["old.a.test"]
    with pytest.raises(CertificateError):  # key of another certificate: nothing changes
        reload_certificates([ctx, other], tmp_path / "b.pem", tmp_path / "a.key")
    (tmp_path / "half.pem").write_bytes((tmp_path / "b.pem").read_bytes()[:100])
    with pytest.raises(CertificateError):  # a truncated file: nothing changes
        reload_certificates([ctx, other], tmp_path / "half.pem", tmp_path / "b.key")
    with pytest.raises(CertificateError):
        reload_certificates([ctx], tmp_path / "missing.pem", tmp_path / "b.key")
    assert names(ctx) == ["old.a.test"] and names(other) == ["old.a.test"]
    reload_certificates([ctx, None, other], tmp_path / "b.pem", tmp_path / "b.key")
    assert names(ctx) == ["new.a.test"] and names(other) == ["new.a.test"]
