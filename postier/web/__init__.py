"""The browser side of postier: the webmail under /mail/ (`web.mail`), mounted into the HTTPS app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ..server.app import Services

__all__ = ["mount"]


def mount(app: web.Application, services: Services) -> None:
    """Add the webmail's routes (all under /mail/) to the HTTP application."""
    from .mail import Webmail

    Webmail(services).mount(app)
