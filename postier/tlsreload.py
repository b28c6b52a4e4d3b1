"""Swap a new certificate into running TLS contexts without a restart (RFC 8446 has no say: OpenSSL does it).

`reload_certificates()` is the one place that changes the certificate of a live listener: the ACME
manager calls it after an issuance or renewal, and the SIGHUP handler after an admin replaced the
files. It loads the chain into each existing `ssl.SSLContext` object: OpenSSL copies the context's
certificate into every new connection at accept time, so new handshakes get the new certificate while
open sessions (an IMAP IDLE) keep theirs, and listeners never have to be re-bound.

The files are read once and checked on a scratch context before any live context is touched: a key
that does not match its certificate, a truncated file or a half-written pair leaves every listener on
its old certificate (`CertificateError`), never on none. Keep the key type stable across renewals
(P-256 here): OpenSSL holds one certificate per key type, so loading an RSA pair into a context that
has an ECDSA one would add it beside the old one instead of replacing it.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:

    pass

__all__ = ["CertificateError", "reload_certificates", "load_pair", "load_pem_into"]


class CertificateError(Exception):
    """The new certificate or key is unusable; nothing was changed."""


def load_pair(cert: Path, key: Path) -> bytes:
    """The key and chain of `cert`/`key` as one PEM blob, checked to be a usable pair."""
    try:
        blob = key.read_bytes().rstrip(b"\n") + b"\n" + cert.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read {exc.filename}: {exc.strerror}") from None
    _with_file(blob, lambda path: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(path))
    return blob


def reload_certificates(contexts: Iterable[ssl.SSLContext | None], cert: Path, key: Path) -> None:
    """Load `cert` (leaf then chain, PEM) and `key` into every context; new handshakes use them.

    Raises CertificateError (and changes no context) when the pair is unusable.
    """
    blob = load_pair(cert, key)  # both files read once: a concurrent rewrite cannot mix two pairs

    def load_all(path: str) -> None:
        for ctx in contexts:
            if ctx is not None:
                ctx.load_cert_chain(path)

    _with_file(blob, load_all)


def load_pem_into(ctx: ssl.SSLContext, blob: bytes) -> None:
    """Load a key and chain held in memory (one PEM blob) into `ctx`."""
    _with_file(blob, lambda path: ctx.load_cert_chain(path))


def _with_file(blob: bytes, use: Callable[[str], object]) -> None:
    """Write `blob` to a private temporary file and call use(path); OpenSSL loads only from files."""
    fd, path = tempfile.mkstemp(prefix="postier-cert-", suffix=".pem")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        try:
            use(path)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise CertificateError(f"unusable certificate or key: {exc}") from None
    finally:
        os.unlink(path)
