"""What ACME keeps on disk (RFC 8555 has no say): DATA_DIR/acme/ holds the account key, the certificate key,
the issued chain and the renewal state, every file 0600 in a 0700 directory, written atomically.

The certificate key is generated once and kept across renewals, so the TLSA record of our key
(DANE-EE 3 1 1) stays valid through them (RFC 7671 §8.1 operators' advice).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ..config import Config
from .crypto import AccountKey, generate_key, key_pem, load_key

__all__ = ["CertStore", "State", "renewal_time"]


@dataclass
class State:
    """The renewal bookkeeping `postier cert status` shows."""

    last_attempt: float = 0.0
    last_success: float = 0.0
    last_error: str = ""
    failures: int = 0
    next_attempt: float = 0.0
    account_url: str = ""
    names: list[str] = field(default_factory=list)


def renewal_time(cert: x509.Certificate) -> float:
    """Two thirds into the certificate's lifetime (as Let's Encrypt advises for 90-day certificates)."""
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    return start + (end - start) * 2 / 3


class CertStore:
    def __init__(self, data_dir: Path):
        self.dir = data_dir / "acme"
        self.account_key_path = self.dir / "account.key"
        self.key_path = self.dir / "key.pem"
        self.cert_path = self.dir / "cert.pem"
        self.state_path = self.dir / "state.json"
        self.request_path = self.dir / "renew.request"

    def _write(self, path: Path, data: bytes) -> None:
        """Write, fsync, rename, fsync the directory: a crash leaves the old file or the new one."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def _key(self, path: Path) -> ec.EllipticCurvePrivateKey:
        if path.exists():
            return load_key(path.read_bytes())
        key = generate_key()
        self._write(path, key_pem(key))
        return key

    def account_key(self) -> AccountKey:
        return AccountKey(self._key(self.account_key_path))

    def cert_key(self) -> ec.EllipticCurvePrivateKey:
        return self._key(self.key_path)

    def certificate(self) -> x509.Certificate | None:
        """The issued leaf certificate, when there is one that matches our key."""
        try:
            leaf = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = load_key(self.key_path.read_bytes())
        except (OSError, ValueError):
            return None
        if leaf.public_key() != key.public_key():
            return None
        return leaf

    def current_files(self) -> tuple[Path, Path] | None:
        """(cert, key) of the issued certificate while it is in date, else None (use the fallback)."""
        leaf = self.certificate()
        if leaf is None or leaf.not_valid_after_utc <= datetime.datetime.now(datetime.UTC):
            return None
        return self.cert_path, self.key_path

    def save_certificate(self, chain_pem: bytes) -> None:
        self._write(self.cert_path, chain_pem)

    def state(self) -> State:
        try:
            raw: dict[str, Any] = json.loads(self.state_path.read_bytes())
        except (OSError, ValueError):
            return State()
        known = State.__dataclass_fields__
        return State(**{k: v for k, v in raw.items() if k in known})

    def save_state(self, state: State) -> None:
        self._write(self.state_path, json.dumps(asdict(state), indent=1).encode())

    def request_renewal(self) -> float:
        """Ask the running server to renew now (`postier cert renew`); returns the request's time."""
        now = time.time()
        self._write(self.request_path, str(now).encode())
        return now

    def take_request(self) -> bool:
        try:
            self.request_path.unlink()
        except FileNotFoundError:
            return False
        return True


def certificate_files(cfg: Config) -> tuple[Path, Path] | None:
    """The pair listeners should serve: the ACME-issued one once it exists and is in date, else [tls].

    The SIGHUP reload and start-up both ask here, so a reload never puts the self-signed fallback back
    over a certificate ACME obtained.
    """
    issued = CertStore(cfg.data_dir).current_files()
    if issued is not None:
        return issued
    if cfg.tls.cert is None or cfg.tls.key is None:
        return None
    return cfg.tls.cert, cfg.tls.key


def tlsa_keys(cfg: Config) -> list[tuple[str, str]]:
    """(what, SHA-256 of the SubjectPublicKeyInfo in hex) for DANE-EE 3 1 1 records (RFC 7671 §5.1).

    The key in service first; with ACME on and its certificate not yet in service, also the ACME key
    that will replace it (created now if need be: it is kept across renewals), so both can be
    published before the switch (RFC 7671 §8.1).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization


    def digest(pub: CertificatePublicKeyTypes) -> str:
        der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(der).hexdigest()

    out: list[tuple[str, str]] = []
    files = certificate_files(cfg)
    if files is not None:
        try:
            leaf = x509.load_pem_x509_certificate(files[0].read_bytes())
            out.append(("the key in service", digest(leaf.public_key())))
        except (OSError, ValueError):
            pass
    if cfg.acme.enabled:
        store = CertStore(cfg.data_dir)
        nxt = ("the ACME key (kept across renewals)", digest(store.cert_key().public_key()))
        if nxt[1] not in {d for _, d in out}:
            out.append(nxt)
    return out
