"""HTTP routes that let mail clients configure themselves: Thunderbird autoconfig, Outlook autodiscover
(POX XML and autodiscover.json), an Apple .mobileconfig profile behind a login (documents in
`postier/autoconfig.py`; SRV records for the same endpoints are RFC 6186/8314, in `dns records`).

Every route answers without an `emailaddress` too (Thunderbird and others leave it out; a 400 there
breaks the set-up), taking the domain from the Host name instead.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable

from aiohttp import web

from .. import autoconfig
from ..accounts import Accounts
from ..config import Config
from ..server.throttle import AuthThrottle
from ..store.errors import StoreUnavailable
from .server import HOST_KEY, Route

log = logging.getLogger("postier.http")

__all__ = ["ClientSetup"]

_SERVICE_PREFIXES = ("autoconfig.", "autodiscover.", "mta-sts.")
_XML = "application/xml"


class ClientSetup:
    def __init__(self, config: Config, accounts: Accounts, throttle: AuthThrottle,
                 domains: Callable[[], list[str]]):
        self.config = config
        self.accounts = accounts
        self.throttle = throttle
        self._domains = domains

    def routes(self) -> list[Route]:
        r = [
            Route("GET", "/.well-known/autoconfig/mail/config-v1.1.xml", self.thunderbird),
            Route("GET", "/mail/config-v1.1.xml", self.thunderbird),
            Route("GET", "/autodiscover/autodiscover.json", self.autodiscover_json),
            Route("GET", "/autodiscover/autodiscover.json/v1.0/{email}", self.autodiscover_json),
            Route("GET", "/mail.mobileconfig", self.mobileconfig),
        ]
        for path in ("/autodiscover/autodiscover.xml", "/Autodiscover/Autodiscover.xml"):
            r += [Route("POST", path, self.autodiscover), Route("GET", path, self.autodiscover)]
        return r

    def domain_for(self, request: web.Request, email: str | None) -> str:
        """The mail domain a request is about: the address's when it is ours, else the Host's."""
        local = self._domains()
        if email and "@" in email:
            d = email.rpartition("@")[2].strip().lower().rstrip(".")
            if d in local:
                return d
        host = request[HOST_KEY]
        for p in _SERVICE_PREFIXES:
            if host.startswith(p) and host[len(p):] in local:
                return host[len(p):]
        if host in local:
            return host
        parent = host.partition(".")[2]  # mail.example.org -> example.org
        if parent in local:
            return parent
        return local[0] if local else host

    async def thunderbird(self, request: web.Request) -> web.StreamResponse:
        email = request.query.get("emailaddress")
        body = autoconfig.thunderbird_xml(self.config, self.domain_for(request, email))
        return web.Response(body=body, content_type=_XML, charset="utf-8")

    async def autodiscover(self, request: web.Request) -> web.StreamResponse:
        email = autoconfig.parse_autodiscover_request(await request.read()) if request.can_read_body else None
        body = autoconfig.autodiscover_xml(self.config, email)
        return web.Response(body=body, content_type=_XML, charset="utf-8")

    async def autodiscover_json(self, request: web.Request) -> web.StreamResponse:
        email = request.match_info.get("email") or request.query.get("Email")
        doc = autoconfig.autodiscover_json(self.config, self.domain_for(request, email),
                                           request.query.get("Protocol", "AutodiscoverV1"))
        if doc is None:
            return web.json_response({"ErrorCode": "ProtocolNotSupported",
                                      "ErrorMessage": "only AutodiscoverV1 is served here"}, status=400)
        return web.json_response(doc)

    async def mobileconfig(self, request: web.Request) -> web.StreamResponse:
        """The profile of the user who logs in (HTTP Basic, RFC 7617, over TLS only)."""
        ip = request.remote or "?"
        if self.throttle.blocked(ip):
            return web.Response(status=429, text="too many failed logins; try later\n")
        creds = _basic(request.headers.get("Authorization", ""))
        try:
            user = await self.accounts.verify_password_async(*creds) if creds else None
        except StoreUnavailable as exc:  # cluster mode: the account database is out of reach
            log.error("mobileconfig: login from %s impossible: %s", ip, exc)
            return web.Response(status=503, text="the account database cannot be reached; try again later\n",
                                headers={"Retry-After": "30"})
        if user is None:
            if creds:
                await self.throttle.penalize(ip)
            return web.Response(status=401, text="log in with your mail address and password\n",
                                headers={"WWW-Authenticate": 'Basic realm="postier", charset="UTF-8"'})
        self.throttle.success(ip)
        try:
            body = autoconfig.mobileconfig(self.config, user.address)
        except ValueError as exc:
            return web.Response(status=404, text=f"{exc}\n")
        return web.Response(body=body, content_type="application/x-apple-aspen-config", headers={
            "Content-Disposition": 'attachment; filename="mail.mobileconfig"'})


def _basic(header: str) -> tuple[str, str] | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        text = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = text.partition(":")
    return (user, password) if sep and user else None
