"""Self-signed TLS certificates for quickstart and demos (X.509 via the cryptography package)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .durable import write_file


#: Under the CA/Browser Forum's 398-day limit for TLS server certificates, which Apple's clients enforce.
LIFETIME_DAYS = 397


def write_self_signed(cert_path: Path, key_path: Path, hostnames: list[str], days: int = LIFETIME_DAYS) -> None:
    """Write a P-256 key (mode 0600) and a self-signed server certificate for `hostnames` (SAN, in order,
    duplicates dropped), valid `days` from now, with the serverAuth extended key usage (RFC 5280
    §4.2.1.12) that Apple's clients and offlineimap require."""
    hostnames = list(dict.fromkeys(hostnames))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])])
    sans: list[x509.GeneralName] = []
    for h in hostnames:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days) - datetime.timedelta(minutes=5))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    # Each written durably (directories included): a power cut must not leave an empty key behind.
    write_file(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), mode=0o600)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
