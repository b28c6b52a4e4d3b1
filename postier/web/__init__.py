"""The browser side of postier: the webmail under /mail/ (`web.mail`) and the admin console under
/admin/ (`web.admin`), mounted into the HTTPS app."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from ..server.app import App

__all__ = ["mount"]


def mount(app: web.Application, services: App) -> None:
    """Add the webmail's routes (under /mail/) and the admin console's (under /admin/) to the HTTP app."""
    from .admin import AdminConsole
    from .mail import Webmail

    webmail = Webmail(services)
    webmail.mount(app)
    AdminConsole(webmail).mount(app)
