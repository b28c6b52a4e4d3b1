"""The TLS profile of every listener: Mozilla's "intermediate" server configuration (version 5.7).

TLS 1.2 and 1.3 only; under TLS 1.2 only ECDHE key exchange with AES-GCM or ChaCha20-Poly1305 (no CBC:
LUCKY13 and the rest of the padding-oracle family; no static RSA: no forward secrecy; no DHE: Python's
ssl module loads no DH parameters, so those suites could never be chosen anyway). TLS 1.3's suites are
all AEAD and are OpenSSL's defaults. The client's preference decides (Mozilla: every suite here is
strong, and a phone without AES hardware prefers ChaCha20). No compression (CRIME), no renegotiation.
One function, used by `Config.ssl_context()`, so STARTTLS and implicit-TLS ports share it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

#: Mozilla intermediate TLS 1.2 suites in its order, less the DHE ones (see the docstring).
TLS12_CIPHERS = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
])


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server-side context with the intermediate profile and the certificate chain loaded."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(TLS12_CIPHERS)  # TLS 1.2 only; 1.3 suites are set apart by OpenSSL
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.load_cert_chain(cert, key)
    return ctx
