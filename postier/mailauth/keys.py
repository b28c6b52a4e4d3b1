"""The DKIM key store (RFC 6376 §3.6, RFC 8463): per-domain keys and selectors, rotation, the signer.

Layout under `config.dkim_dir` (0700), one directory per domain:

    dkim/a.test/p2026a.key     PKCS#8 PEM private key, mode 0600
    dkim/a.test/p2026a.txt     the TXT value to publish at p2026a._domainkey.a.test
    dkim/a.test/keys.json      selector -> {"algorithm", "created", "state"}

A selector's state is one of:
- "active": signs outgoing mail (at most one per algorithm per domain; RSA and ed25519 together
  give the dual signature of RFC 8463 §5);
- "published": kept in the DNS so mail signed with it still verifies, or about to be activated
  (a new key for an algorithm that already has an active one starts here: publish it, wait for
  the DNS, then `postier dkim activate`);
- "retired": no longer signs; `postier dns records` says its TXT record may be removed.

Rotation with two selectors: generate (published), publish, activate (the old one becomes
published), and later retire the old one. Domain and selector names are checked against strict
patterns before they become path components, and every path is checked to stay inside the store.

In cluster mode the same keys live in PostgreSQL (store/cluster/accounts.py `ClusterKeyStore`, a
subclass that replaces the storage methods below), so a key made on one node signs on every node.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from postier.config import normalize_domain
from postier.durable import ensure_dirs, fsync_dir, write_file
from postier.mailauth.dkim import Algorithm, generate_key, sign_async
from postier.message.mime import header_section
from postier.mailauth.dmarc import FromProblem, from_domain

if TYPE_CHECKING:
    from postier.message.types import Envelope, MessageBody

__all__ = ["KeyStore", "DKIMKey", "KeyError_", "DKIMSigner", "default_selector", "ALGORITHMS"]

log = logging.getLogger("postier.dkim")

State = Literal["active", "published", "retired"]
STATES: tuple[State, ...] = ("active", "published", "retired")
#: CLI names -> RFC 8463 / RFC 6376 algorithm names.
ALGORITHMS: dict[str, Algorithm] = {"rsa": "rsa-sha256", "ed25519": "ed25519-sha256"}
# A selector is one or more DNS labels (RFC 6376 §3.1); we keep to one LDH label.
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
MAX_HEADER_SCAN = 256 * 1024  # the header section we read to find From


class KeyError_(Exception):  # noqa: N801 - not the builtin KeyError
    """A key store operation failed; str() says why."""


@dataclass(frozen=True, slots=True)
class DKIMKey:
    domain: str
    selector: str
    algorithm: Algorithm
    state: State
    created: float
    txt: str  # the DNS TXT value

    @property
    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"


def _one_of[T: str](value: object, allowed: Iterable[T]) -> T | None:
    """`value` if it is one of `allowed` (a stored name read back as its Literal type), else None."""
    return next((a for a in allowed if a == value), None)


def default_selector(algorithm: Algorithm, when: float | None = None, taken: set[str] | frozenset[str] = frozenset()
                     ) -> str:
    """A date-based selector: "p2026a" (RSA) or "e2026a" (ed25519); the letter moves on when taken."""
    year = time.gmtime(when).tm_year
    prefix = "p" if algorithm == "rsa-sha256" else "e"
    for letter in "abcdefghijklmnopqrstuvwxyz":
        name = f"{prefix}{year}{letter}"
        if name not in taken:
            return name
    raise KeyError_(f"no free selector name for {year}; give one with --selector")


def _check_selector(selector: str) -> str:
    s = selector.strip().lower()
    if not _SELECTOR.match(s):
        raise KeyError_(f"invalid selector {selector!r} (letters, digits and '-', one DNS label)")
    return s


def _check_domain(domain: str) -> str:
    try:
        return normalize_domain(domain)
    except ValueError as exc:
        raise KeyError_(str(exc)) from None


class KeyStore:
    """Keys on disk. Cheap to create; reads keys.json on every call (the CLI may change it).

    The rules (selectors, states, rotation) are here; where keys are kept is in the storage methods
    (`_read_state`, `_write_state`, `_txt`, `_exists`, `_add_key`, `private_key`, `domains`, `_locked`)."""

    def __init__(self, root: Path):
        self.root = root

    def _dir(self, domain: str) -> Path:
        d = (self.root / _check_domain(domain)).resolve()
        root = self.root.resolve()
        if d.parent != root:  # containment: the name must not walk out of the store
            raise KeyError_(f"invalid domain {domain!r}")
        return d

    def _state_file(self, domain: str) -> Path:
        return self._dir(domain) / "keys.json"

    def _read_state(self, domain: str) -> dict[str, dict[str, object]]:
        try:
            with open(self._state_file(domain), encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise KeyError_(f"cannot read the key list of {domain}: {exc}") from None
        return data if isinstance(data, dict) else {}

    def _write_state(self, domain: str, state: dict[str, dict[str, object]]) -> None:
        path = self._state_file(domain)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)

    @contextmanager
    def _locked(self, domain: str) -> Iterator[None]:
        """Around a read-change-write of a domain's keys (the files need no lock: one admin at a time)."""
        yield

    def _txt(self, domain: str, selector: str) -> str:
        return (self._dir(domain) / f"{_check_selector(selector)}.txt").read_text().strip()

    def _exists(self, domain: str, selector: str) -> bool:
        return (self._dir(domain) / f"{selector}.key").exists()

    def _add_key(self, domain: str, selector: str, pem: bytes, txt: str, state: dict[str, dict[str, object]]
                 ) -> None:
        """Keep a new key and the domain's key list `state` (which lists it)."""
        d = self._dir(domain)
        ensure_dirs(d)  # dkim/ and dkim/DOMAIN/, each new one's parent fsynced
        key_path = d / f"{selector}.key"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        write_file(d / f"{selector}.txt", (txt + "\n").encode(), mode=0o644)
        self._write_state(domain, state)

    def domains(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "keys.json").is_file())

    def keys(self, domain: str) -> list[DKIMKey]:
        """Every selector of `domain`, oldest first."""
        name = _check_domain(domain)
        out = []
        for selector, meta in self._read_state(name).items():
            try:
                txt = self._txt(name, selector)
                alg = _one_of(meta.get("algorithm"), ALGORITHMS.values())
                state = _one_of(meta.get("state"), STATES)
                if alg is None or state is None:
                    continue
                created = meta.get("created", 0)
                if not isinstance(created, int | float | str):
                    raise TypeError(f"created is {created!r}")
                out.append(DKIMKey(name, selector, alg, state, float(created), txt))
            except (OSError, KeyError_, TypeError, ValueError):
                log.warning("dkim: skipping unreadable key %s/%s", domain, selector)
        return sorted(out, key=lambda k: (k.created, k.selector))

    def active(self, domain: str) -> list[DKIMKey]:
        return [k for k in self.keys(domain) if k.state == "active"]

    def private_key(self, key: DKIMKey) -> bytes:
        return (self._dir(key.domain) / f"{_check_selector(key.selector)}.key").read_bytes()

    def generate(self, domain: str, algorithm: Algorithm = "rsa-sha256", selector: str | None = None,
                 bits: int = 2048, now: float | None = None) -> DKIMKey:
        """Create a key. It is active when the domain has no active key of that algorithm yet."""
        now = time.time() if now is None else now
        name = _check_domain(domain)
        if selector:
            _check_selector(selector)
        pem, txt = generate_key(algorithm, bits)
        with self._locked(name):
            state = self._read_state(name)
            selector = _check_selector(selector) if selector else default_selector(algorithm, now, set(state))
            if selector in state or self._exists(name, selector):
                raise KeyError_(f"selector {selector} exists already for {name}")
            has_active = any(m.get("state") == "active" and m.get("algorithm") == algorithm for m in state.values())
            new_state: State = "published" if has_active else "active"
            state[selector] = {"algorithm": algorithm, "created": now, "state": new_state}
            self._add_key(name, selector, pem, txt, state)
        return DKIMKey(name, selector, algorithm, new_state, now, txt)

    def set_state(self, domain: str, selector: str, new: State) -> DKIMKey:
        """activate (the previous active key of that algorithm becomes published) or retire a selector."""
        selector = _check_selector(selector)
        name = _check_domain(domain)
        with self._locked(name):
            state = self._read_state(name)
            meta = state.get(selector)
            if meta is None:
                raise KeyError_(f"no selector {selector} for {name}")
            if new == "active":
                for other in state.values():
                    if other.get("state") == "active" and other.get("algorithm") == meta.get("algorithm"):
                        other["state"] = "published"
            meta["state"] = new
            self._write_state(name, state)
        return next(k for k in self.keys(domain) if k.selector == selector)

    def signing_domain(self, domain: str) -> str | None:
        """The domain we sign for when the From domain is `domain`: itself, or its nearest parent with
        an active key (relaxed alignment, RFC 7489 §3.1.1)."""
        try:
            name = _check_domain(domain)
        except KeyError_:
            return None
        labels = name.split(".")
        for i in range(len(labels) - 1):
            candidate = ".".join(labels[i:])
            if self.active(candidate):
                return candidate
        return None


class DKIMSigner:
    """The `Signer` of the submission pipeline: signs submitted mail for its From domain (RFC 6376 §5).

    `sign(env, body)` returns the DKIM-Signature header lines to prepend (b"" when we hold no key
    for the From domain, or the message has no single From address). Both an RSA and an ed25519
    signature when both keys are active (RFC 8463 §5: receivers use the one they understand).
    Whole message in memory: the submission pipeline caps its size (limits.max_message_size).
    """

    def __init__(self, store: KeyStore):
        self.store = store

    async def sign_bytes(self, message: bytes) -> bytes:
        author = from_domain(header_section(message, empty_line=False)[:MAX_HEADER_SCAN])
        if isinstance(author, FromProblem):
            return b""
        domain = await asyncio.to_thread(self.store.signing_domain, author)
        if domain is None:
            return b""
        keys = await asyncio.to_thread(self.store.active, domain)
        out = []
        for key in keys:
            try:
                pem = await asyncio.to_thread(self.store.private_key, key)
                out.append(await sign_async(message, key.domain, key.selector, pem, key.algorithm))
            except (OSError, ValueError) as exc:
                log.error("dkim: signing with %s failed: %s", key.dns_name, exc)
        return b"".join(out)

    async def sign(self, env: Envelope, body: MessageBody) -> bytes:
        return await self.sign_bytes(await asyncio.to_thread(body.getvalue))
