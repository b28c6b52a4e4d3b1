"""The answers to pending ACME challenges (RFC 8555 §8.3 http-01, RFC 8737 tls-alpn-01), shared by the
ACME client that sets them and the HTTP layer that serves them.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass, field

__all__ = ["Challenges", "ACME_TLS_ALPN", "TOKEN_RE"]

#: RFC 8737 §6.2: the ALPN protocol id of a tls-alpn-01 validation handshake.
ACME_TLS_ALPN = "acme-tls/1"
#: RFC 8555 §8.1: a token is base64url without padding (and at least 128 bits of entropy).
TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{16,256}")


@dataclass
class Challenges:
    """Pending answers: the ACME client adds them before it asks the CA to validate, and removes them after."""

    #: http-01: token -> key authorization, served at /.well-known/acme-challenge/TOKEN.
    http01: dict[str, str] = field(default_factory=dict)
    #: tls-alpn-01: DNS name -> a server context that presents the validation certificate.
    tls_alpn01: dict[str, ssl.SSLContext] = field(default_factory=dict)

    def key_authorization(self, token: str) -> str | None:
        if not TOKEN_RE.fullmatch(token):  # never a path, never a lookup with user-shaped keys
            return None
        return self.http01.get(token)
