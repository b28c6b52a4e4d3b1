"""The Sender Rewriting Scheme (SRS, draft-mengwong-sender-rewrite / Shevek's "SRS0/SRS1" scheme): the
envelope sender of forwarded mail rewritten into an address at our domain, and bounces to it verified
and routed back; pure code (the key comes from the caller).

Why our own code: the PyPI packages for SRS are unmaintained (pysrs's last release predates Python 3)
and the scheme is a few lines of HMAC. Addresses:

    SRS0=HHHH=TT=orig.domain=orig-local@our.domain      forwarded mail whose sender was not SRS
    SRS1=HHHH=first.hop==HHHH=TT=dom=local@our.domain   forwarding an SRS0 address of another forwarder

``HHHH`` is the first 4 characters of the base32 HMAC-SHA256 (key, lower-cased rest); base32 so the
check survives case-folding MTAs. ``TT`` is the day number modulo 1024 in two base32 characters; an
address older than ``max_age_days`` (or from the future) is expired. A bounce to SRS1 goes back to
the first forwarder's SRS0 address; to SRS0, to the original sender.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from pathlib import Path

from ..durable import write_file

__all__ = ["SRS", "SRSError", "is_srs", "load_secret"]

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_TIME_SLOTS = 1024  # two base32 characters
_HASH_LEN = 4


class SRSError(ValueError):
    """A forged, expired or malformed SRS address."""


def is_srs(local_part: str) -> bool:
    return local_part[:5].upper() in ("SRS0=", "SRS1=", "SRS0+", "SRS0-", "SRS1+", "SRS1-")


def load_secret(path: Path) -> bytes:
    """The SRS key: 32 random bytes, made durably with mode 0600 at first use."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        write_file(path, secrets.token_hex(32).encode() + b"\n", mode=0o600)  # made once, by build_app
        data = path.read_bytes()
    key = data.strip()
    if len(key) < 16:
        raise SRSError(f"{path}: the SRS secret is too short")
    return key


class SRS:
    """Forward and reverse SRS addresses with one key (rotate by listing old keys in ``old_keys``)."""

    def __init__(self, key: bytes, max_age_days: int = 21, old_keys: tuple[bytes, ...] = ()) -> None:
        self.keys = (key, *old_keys)
        self.max_age_days = max_age_days

    def _hash(self, key: bytes, *parts: str) -> str:
        mac = hmac.new(key, "".join(parts).lower().encode("utf-8"), hashlib.sha256).digest()
        return base64.b32encode(mac).decode().lower()[:_HASH_LEN]

    @staticmethod
    def _stamp(now: float) -> str:
        day = int(now // 86400) % _TIME_SLOTS
        return _B32[day >> 5] + _B32[day & 31]

    def _check(self, given: str, *parts: str) -> None:
        if not any(hmac.compare_digest(given.lower(), self._hash(k, *parts)) for k in self.keys):
            raise SRSError("SRS hash does not verify")

    def _check_stamp(self, stamp: str, now: float) -> None:
        stamp = stamp.lower()
        if len(stamp) != 2 or any(c not in _B32 for c in stamp):
            raise SRSError("bad SRS timestamp")
        then = (_B32.index(stamp[0]) << 5) | _B32.index(stamp[1])
        age = (int(now // 86400) - then) % _TIME_SLOTS
        if age > self.max_age_days:
            raise SRSError("SRS address expired")

    def forward(self, sender: str, domain: str, now: float | None = None) -> str:
        """The envelope sender for mail from ``sender`` forwarded by ``domain`` (the null sender and
        senders already at ``domain`` stay as they are)."""
        now = time.time() if now is None else now
        local, at, host = sender.rpartition("@")
        if not at or not local or host.lower() == domain.lower():
            return sender
        if local[:5].upper() == "SRS0=" and local.count("=") >= 4:
            # SRS1: keep the first forwarder and its opaque part (SRS0's hash, stamp, original)
            opaque = local[5:]
            h = self._hash(self.keys[0], host, opaque)
            return f"SRS1={h}={host}=={opaque}@{domain}"
        if local[:5].upper() == "SRS1=":
            parts = local[5:].split("=", 2)  # hash, first hop, "=opaque"
            if len(parts) == 3 and parts[2].startswith("="):
                first, opaque = parts[1], parts[2][1:]
                h = self._hash(self.keys[0], first, opaque)
                return f"SRS1={h}={first}=={opaque}@{domain}"
        stamp = self._stamp(now)
        h = self._hash(self.keys[0], stamp, host, local)
        return f"SRS0={h}={stamp}={host}={local}@{domain}"

    def reverse(self, address: str, now: float | None = None) -> str:
        """Where a bounce to our SRS ``address`` goes; SRSError for a forged or expired one."""
        now = time.time() if now is None else now
        local, at, _domain = address.rpartition("@")
        if not at or not is_srs(local):
            raise SRSError("not an SRS address")
        tag, rest = local[:4].upper(), local[5:]
        if tag == "SRS0":
            parts = rest.split("=", 3)
            if len(parts) != 4 or not all(parts):
                raise SRSError("malformed SRS0 address")
            h, stamp, host, orig = parts
            self._check(h, stamp, host, orig)
            self._check_stamp(stamp, now)
            return f"{orig}@{host}"
        parts = rest.split("=", 2)
        if len(parts) != 3 or not parts[2].startswith("=") or not parts[1] or len(parts[2]) < 2:
            raise SRSError("malformed SRS1 address")
        h, first, opaque = parts[0], parts[1], parts[2][1:]
        self._check(h, first, opaque)
        return f"SRS0={opaque}@{first}"
