"""Serves our MTA-STS policy (RFC 8461 §3.3) at https://mta-sts.DOMAIN/.well-known/mta-sts.txt."""

from __future__ import annotations

from aiohttp import web

from .. import mtasts
from ..config import Config
from .server import HOST_KEY, Route

__all__ = ["policy_route"]


def policy_route(config: Config) -> Route:
    text = mtasts.policy_text(config)

    async def policy(request: web.Request) -> web.StreamResponse:
        # RFC 8461 §3.3: only the policy host serves it; senders fetch it with SNI mta-sts.DOMAIN
        if not request[HOST_KEY].startswith(mtasts.POLICY_HOST_PREFIX):
            raise web.HTTPNotFound()
        return web.Response(text=text, content_type="text/plain")  # RFC 8461 §3.2: text/plain

    return Route("GET", mtasts.POLICY_PATH, policy)
