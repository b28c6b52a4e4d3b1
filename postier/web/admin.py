"""The admin console under /admin/ (RFC 9110, RFC 6265): domains, users and aliases, for accounts
flagged admin (`postier user add --admin`).

It is an `Area` of the webmail's machinery: the same login check and throttle, its own cookie
(`Path=/admin/`) and session table, CSRF tokens on every POST, the same security headers. Every
change goes through `Accounts` (the CLI's code path) and is logged with the admin who made it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from ..accounts import Accounts
from ..message.types import AccountError, User
from ..store.quota import user_usage_line
from .forms import _field, _form
from .mail import Area, Webmail
from .sessions import SessionTable, WebSession

__all__ = ["AdminConsole"]

log = logging.getLogger("postier.admin")

PREFIX = "/admin/"
COOKIE = "postier_admin"


class AdminConsole:
    def __init__(self, webmail: Webmail):
        self.web = webmail
        self.accounts: Accounts = webmail.accounts
        self.area = Area(PREFIX, COOKIE, "/admin/home", SessionTable(per_user=8, idle=15 * 60.0), admin=True,
                         name="admin")

    def mount(self, app: web.Application) -> None:
        self.web.add_login_routes(app, self.area)
        app.router.add_get("/admin/home", self.web._wrap(self.web._authed(self.home, self.area)))
        app.router.add_post("/admin/do", self.web._wrap(self.web._authed(self.do, self.area)))
        from .admin_pages import AdminPages  # noqa: PLC0415 - the status pages and their commands' code

        AdminPages(self).mount(app)

    async def home(self, request: web.Request, s: WebSession, user: User, error: str = "",
                   status: int = 200) -> web.StreamResponse:
        acc = self.accounts

        mail_root = self.web.config.mail_root

        def gather() -> tuple[list[str], list[tuple[User, bool, str]], list[tuple[str, list[str]]]]:
            # storage: "12.5M/500M (2%), 31 messages", from each index's count (store/quota.py)
            users = [(u, acc.is_admin(u.address), user_usage_line(mail_root, u)) for u in acc.list_users()]
            return acc.list_domains(), users, acc.list_aliases()
        domains, users, aliases = await asyncio.to_thread(gather)
        resp = self.web._page("admin.html", admin_user=user.address, csrf=s.csrf, domains=domains, users=users,
                              aliases=aliases, error=error)
        resp.set_status(status)
        return resp

    async def do(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """One change to the accounts database, named by `op`."""
        form = await _form(request)
        op = _field(form, "op")
        acc = self.accounts
        address, password = _field(form, "address").strip(), _field(form, "password")
        domain, alias = _field(form, "domain").strip(), _field(form, "alias").strip()
        targets = [t.strip() for t in _field(form, "targets").replace(",", " ").split() if t.strip()]
        actions: dict[str, tuple[Callable[[], object], str]] = {
            "domain_add": (lambda: acc.add_domain(domain), domain),
            "domain_remove": (lambda: acc.remove_domain(domain), domain),
            "user_add": (lambda: acc.add_user(address, password, admin=_field(form, "admin") == "1"), address),
            "user_passwd": (lambda: acc.set_password(address, password), address),
            "user_remove": (lambda: acc.remove_user(address), address),
            "alias_add": (lambda: acc.add_alias(alias, targets), f"{alias} -> {', '.join(targets)}"),
            "alias_remove": (lambda: acc.remove_alias(alias, targets or None), alias),
        }
        if op not in actions:
            raise web.HTTPBadRequest(text="unknown action\n")
        fn, target = actions[op]
        if op == "user_remove" and address.lower() == user.address:
            return await self.home(request, s, user, "You cannot remove your own account here.", 400)
        try:
            await asyncio.to_thread(fn)
        except AccountError as exc:
            log.info("admin: %s %s %s refused: %s", user.address, op, target, exc)
            return await self.home(request, s, user, str(exc), 400)
        log.info("admin: %s %s %s", user.address, op, target)  # who did what, for every change
        if op == "user_remove":
            self.web.sessions.drop_user(address.lower())  # a removed user's webmail sessions end too
        raise web.HTTPSeeOther("/admin/home")
