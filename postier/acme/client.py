"""An asynchronous ACME client (RFC 8555) for one job: order a certificate for a list of DNS names, proving
control with http-01 (§8.3) or tls-alpn-01 (RFC 8737), and download the chain.

Why our own client rather than certbot's `acme` + `josepy`: `acme` 5.x is synchronous (requests), so it
would run in threads beside our event loop, pulls in PyOpenSSL and requests, and no longer implements
TLS-ALPN-01. What we need of RFC 8555 is small (directory, nonces, account, order, authorizations,
finalize, download: about 200 lines here), the JWS and CSR come from `cryptography` (`acme/crypto.py`)
and the HTTP from aiohttp, which already serves our listeners; tested against Pebble, the ACME test
server of Let's Encrypt.

Every response body is bounded (`MAX_BODY`), every request has a deadline, a badNonce is retried with
the fresh nonce the error carries (§6.5), and polling honours Retry-After within an overall deadline.
Errors are `ACMEError` with a one-line message (the problem document's type and detail, §6.7).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec

from .challenges import Challenges
from .crypto import AccountKey, b64u, key_authorization, make_csr, tls_alpn_context

log = logging.getLogger("postier.acme")

__all__ = ["ACMEClient", "ACMEError", "MAX_BODY"]

MAX_BODY = 1024 * 1024  # a certificate chain is a few KiB; a directory or order far less
_JOSE = "application/jose+json"
_BAD_NONCE = "urn:ietf:params:acme:error:badNonce"


class ACMEError(Exception):
    """The CA refused or failed; str() is one line."""


@dataclass
class _Reply:
    status: int
    headers: Any  # multidict of the response headers
    body: bytes

    def json(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.body)
        except ValueError:
            raise ACMEError(f"HTTP {self.status}: not JSON") from None
        if not isinstance(doc, dict):
            raise ACMEError(f"HTTP {self.status}: not a JSON object")
        return doc


def _problem(reply: _Reply) -> str:
    """RFC 8555 §6.7 / RFC 7807: 'type: detail' of an error document, on one line."""
    try:
        doc = reply.json()
        text = f"{doc.get('type', '?')}: {doc.get('detail', '')}"
        for sub in doc.get("subproblems", [])[:3]:
            text += f"; {sub.get('identifier', {}).get('value', '?')}: {sub.get('detail', '')}"
    except ACMEError:
        text = reply.body[:200].decode("utf-8", "replace")
    return f"HTTP {reply.status} " + " ".join(text.split())


class ACMEClient:
    def __init__(self, directory_url: str, account: AccountKey, *, email: str = "",
                 ca_bundle: str | None = None, timeout: float = 30.0, deadline: float = 300.0):
        self.directory_url = directory_url
        self.account = account
        self.email = email
        self.timeout = timeout
        self.deadline = deadline  # for one whole issuance, polling included
        self.tls = ssl.create_default_context()
        if ca_bundle:
            self.tls.load_verify_locations(ca_bundle)  # a private CA besides the system store
        self.kid = ""
        self._dir: dict[str, Any] = {}
        self._nonce = ""
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ACMEClient:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.tls, limit=4),
            timeout=aiohttp.ClientTimeout(total=self.timeout), headers={"User-Agent": "postier-acme"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    # -- transport ---------------------------------------------------------------------------------

    async def _request(self, method: str, url: str, data: bytes | None = None,
                       accept: str = "application/json") -> _Reply:
        assert self._session is not None, "use `async with ACMEClient(...)`"
        headers = {"Accept": accept}
        if data is not None:
            headers["Content-Type"] = _JOSE
        try:
            async with self._session.request(method, url, data=data, headers=headers,
                                             allow_redirects=False) as resp:
                body = await resp.content.read(MAX_BODY + 1)
                if len(body) > MAX_BODY:
                    raise ACMEError(f"{url}: answer over {MAX_BODY} bytes")
                nonce = resp.headers.get("Replay-Nonce")
                if nonce:
                    self._nonce = nonce  # RFC 8555 §6.5: every answer may carry the next nonce
                return _Reply(resp.status, resp.headers, body)
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            raise ACMEError(f"{method} {url}: {type(exc).__name__}: {exc}".strip()) from None

    async def directory(self) -> dict[str, Any]:
        if not self._dir:
            reply = await self._request("GET", self.directory_url)
            if reply.status != 200:
                raise ACMEError(f"directory {self.directory_url}: {_problem(reply)}")
            self._dir = reply.json()
            for key in ("newNonce", "newAccount", "newOrder"):
                if not isinstance(self._dir.get(key), str):
                    raise ACMEError(f"directory {self.directory_url}: no {key}")
        return self._dir

    async def _post(self, url: str, payload: Any | None, accept: str = "application/json") -> _Reply:
        """A JWS POST (payload None = POST-as-GET, §6.3), retrying a rejected nonce (§6.5)."""
        for _ in range(5):
            if not self._nonce:
                reply = await self._request("HEAD", (await self.directory())["newNonce"])
                if not self._nonce:
                    raise ACMEError(f"newNonce: no Replay-Nonce (HTTP {reply.status})")
            nonce, self._nonce = self._nonce, ""
            body = self.account.sign(url, nonce, payload, self.kid or None)
            reply = await self._request("POST", url, body, accept)
            if reply.status == 400 and reply.body and _BAD_NONCE in reply.body.decode("utf-8", "replace"):
                continue  # RFC 8555 §6.5: retry with the nonce this error carried
            if reply.status >= 400:
                raise ACMEError(f"{url}: {_problem(reply)}")
            return reply
        raise ACMEError(f"{url}: the CA kept rejecting our nonces")

    # -- protocol ----------------------------------------------------------------------------------

    async def register(self) -> str:
        """Find or create the account of our key (RFC 8555 §7.3); returns its URL (the JWS kid)."""
        d = await self.directory()
        payload: dict[str, Any] = {"termsOfServiceAgreed": True}
        if self.email:
            payload["contact"] = [f"mailto:{self.email}"]
        self.kid = ""
        reply = await self._post(d["newAccount"], payload)
        kid = reply.headers.get("Location")
        if reply.status not in (200, 201) or not kid:
            raise ACMEError(f"newAccount: HTTP {reply.status} without an account URL")
        self.kid = str(kid)
        return self.kid

    async def _poll(self, url: str, until: Callable[[dict[str, Any]], bool], what: str,
                    stop_at: float) -> dict[str, Any]:
        while True:
            doc = (await self._post(url, None)).json()
            if until(doc):
                return doc
            if doc.get("status") == "invalid":
                raise ACMEError(f"{what} invalid: {_error_of(doc)}")
            if time.monotonic() > stop_at:
                raise ACMEError(f"{what}: still {doc.get('status')} at the deadline")
            await asyncio.sleep(1.0)

    async def issue(self, names: list[str], cert_key: ec.EllipticCurvePrivateKey, challenge: str,
                    challenges: Challenges) -> bytes:
        """Order, validate, finalize and download: the PEM chain for `names` (leaf first)."""
        stop_at = time.monotonic() + self.deadline
        if not self.kid:
            await self.register()
        d = await self.directory()
        reply = await self._post(d["newOrder"], {"identifiers": [{"type": "dns", "value": n} for n in names]})
        order = reply.json()
        order_url = reply.headers.get("Location", "")
        for authz_url in order.get("authorizations", []):
            await self._authorize(authz_url, challenge, challenges, stop_at)
        # RFC 8555 §7.4: finalize with the CSR once every authorization is valid
        order = await self._poll(order_url, lambda o: o.get("status") in ("ready", "valid"), "order", stop_at) \
            if order_url else order
        if order.get("status") == "ready":
            reply = await self._post(order["finalize"], {"csr": b64u(make_csr(cert_key, names))})
            order = reply.json()
        if order.get("status") != "valid":
            order = await self._poll(order_url, lambda o: o.get("status") == "valid", "order", stop_at)
        cert_url = order.get("certificate")
        if not isinstance(cert_url, str):
            raise ACMEError("order valid without a certificate URL")
        reply = await self._post(cert_url, None, accept="application/pem-certificate-chain")  # §7.4.2
        if b"-----BEGIN CERTIFICATE-----" not in reply.body:
            raise ACMEError("the certificate download is not PEM")
        return reply.body

    async def _authorize(self, url: str, kind: str, challenges: Challenges, stop_at: float) -> None:
        authz = (await self._post(url, None)).json()
        if authz.get("status") == "valid":
            return  # reused from an earlier order (RFC 8555 §7.1.4)
        name = str(authz.get("identifier", {}).get("value", "")).lower()
        chall = next((c for c in authz.get("challenges", []) if c.get("type") == kind), None)
        if chall is None:
            raise ACMEError(f"{name}: the CA offers no {kind} challenge")
        token = str(chall.get("token", ""))
        key_auth = key_authorization(token, self.account)
        if kind == "http-01":
            challenges.http01[token] = key_auth
        else:
            challenges.tls_alpn01[name] = tls_alpn_context(name, key_auth)
        try:
            await self._post(chall["url"], {})  # RFC 8555 §7.5.1: "ready, validate me"
            await self._poll(url, lambda a: a.get("status") == "valid", f"authorization of {name}", stop_at)
        finally:
            challenges.http01.pop(token, None)
            challenges.tls_alpn01.pop(name, None)


def _error_of(doc: dict[str, Any]) -> str:
    for c in doc.get("challenges", []):
        err = c.get("error")
        if isinstance(err, dict):
            return " ".join(f"{err.get('type', '?')}: {err.get('detail', '')}".split())
    err = doc.get("error")
    if isinstance(err, dict):
        return " ".join(f"{err.get('type', '?')}: {err.get('detail', '')}".split())
    return "no detail"
