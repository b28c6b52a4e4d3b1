"""The webmail's settings page (RFC 5228 Sieve, RFC 5230 vacation): filter rules and vacation through
a simple form, the raw Sieve script, signatures per identity, the senders whose remote content is
shown, and the password.

Scripts go through the one per-user script store of ManageSieve and delivery (`SieveFilter.store_for`,
`store/sieve.py`) and are compiled by the upload-time validator (`sieve.validate.compile_script`)
before they are stored: an invalid script is never saved, and its errors are shown with line and
column. The form writes the script "webmail" and makes it the active one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from aiohttp import web

from ..message.types import User
from ..proto.smtp.address import parse_path
from ..proto.smtp.errors import AddressError
from ..sieve.validate import CompileError, SieveError, compile_script
from ..store.sieve import ScriptError, Scripts
from .forms import _field, _form
from .prefs import ACTIONS, FIELDS, MAX_RULES, MAX_SIGNATURE, MAX_VALUE, Prefs, Rule, Rules, Vacation, generate, \
    read_rules
from .sessions import WebSession

if TYPE_CHECKING:
    from .mail import Webmail

__all__ = ["SCRIPT", "SettingsPages"]

log = logging.getLogger("postier.webmail")

SCRIPT = "webmail"  # the name of the script the form writes
MAX_SCRIPT_FORM = 64 * 1024


class SettingsPages:
    def __init__(self, webmail: Webmail) -> None:
        self.web = webmail

    def mount(self, app: web.Application) -> None:
        w = self.web
        r = app.router
        for path, fn in (("/mail/rules", self.save_rules), ("/mail/sieve", self.save_raw),
                         ("/mail/signature", self.save_signature), ("/mail/senders", self.save_senders)):
            r.add_post(path, w._wrap(w._authed(fn, w.area)))

    def _scripts(self, user: User) -> Scripts | None:
        sieve = self.web.services.sieve
        return None if sieve is None else sieve.store_for(user)

    async def page(self, request: web.Request, s: WebSession, user: User, message: str = "", error: str = "",
                   status: int = 200, raw: str | None = None, raw_errors: list[SieveError] | None = None,
                   form: Rules | None = None) -> web.Response:
        store = self._scripts(user)

        def load() -> tuple[str | None, bytes]:
            if store is None:
                return None, b""
            active = store.active_script()
            return (active[0], active[1]) if active else (None, b"")
        active, script = await asyncio.to_thread(load)
        rules = read_rules(script) if active == SCRIPT else None
        hand_written = active is not None and rules is None
        if form is not None:
            rules = form
        rules = rules or Rules()
        prefs: Prefs = await asyncio.to_thread(self.web.prefs.get, user)
        identities = sorted(await asyncio.to_thread(self.web.accounts.addresses_of, user) | {user.address})
        async with self.web._mailboxes(user) as mb:
            folders = [f.name for f in await self.web._folders(mb)]
        resp = self.web._page(
            "settings.html", user=user.address, csrf=s.csrf, message=message, error=error, sieve=store is not None,
            active=active, hand_written=hand_written, rules=rules, blank=Rule("from", "", "fileinto", "INBOX"),
            script=raw if raw is not None else script.decode("utf-8", "replace"), raw_errors=raw_errors or [],
            prefs=prefs, identities=identities, mail_folders=folders, fields=FIELDS, actions=ACTIONS)
        resp.set_status(status)
        return resp

    async def _store_script(self, user: User, data: bytes, name: str) -> None:
        store = self._scripts(user)
        if store is None:
            raise web.HTTPConflict(text="filtering is turned off on this server\n")

        def put() -> None:
            store.put(name, data)  # compiled by the caller, whose errors carry line and column
            store.set_active(name)
        await asyncio.to_thread(put)

    async def save_rules(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """The simple form: rules and vacation, turned into the script "webmail" (made active)."""
        form = await _form(request)
        async with self.web._mailboxes(user) as mb:
            folders = {f.name for f in await self.web._folders(mb)}
        rules = Rules()
        fields, values, actions, targets = (form.getall(k, []) for k in ("field", "value", "action", "folder"))
        for fl, val, act, dest in zip(fields, values, actions, targets, strict=False):
            if not all(isinstance(x, str) for x in (fl, val, act, dest)):
                raise web.HTTPBadRequest(text="bad form\n")
            assert isinstance(val, str) and isinstance(dest, str) and isinstance(fl, str) and isinstance(act, str)
            val = " ".join(val.split())
            if not val:
                continue  # an empty row: no rule
            if fl not in FIELDS or act not in ACTIONS or len(val) > MAX_VALUE:
                raise web.HTTPBadRequest(text="bad rule\n")
            if act == "fileinto" and dest not in folders:  # only the user's own folders
                raise web.HTTPBadRequest(text="no such folder\n")
            rules.rules.append(Rule(fl, val, act, dest if act == "fileinto" else ""))
        if len(rules.rules) > MAX_RULES:
            return await self.page(request, s, user, error=f"At most {MAX_RULES} rules.", status=400, form=rules)
        days = _field(form, "days").strip()
        addresses = [a for a in _field(form, "addresses").replace(",", " ").split() if a][:20]
        subject = " ".join(_field(form, "vsubject").split())[:200]  # one line: it becomes a header field
        rules.vacation = Vacation(_field(form, "vacation") == "1", subject,
                                  _field(form, "vbody")[:4000], int(days) if days.isdigit() and len(days) < 4 else 0,
                                  addresses)
        if not 1 <= rules.vacation.days <= 90:
            return await self.page(request, s, user, error="Days: a number from 1 to 90.", status=400, form=rules)
        for a in addresses:
            try:
                parse_path(f"<{a}>")
            except AddressError:
                return await self.page(request, s, user, error=f"Not an address: {a}", status=400, form=rules)
        data = generate(rules).encode()
        try:
            compile_script(data, SCRIPT)  # the generator's own output, checked as any upload
            await self._store_script(user, data, SCRIPT)
        except (CompileError, ScriptError) as exc:
            return await self.page(request, s, user, error=f"Not saved: {exc}", status=400, form=rules)
        log.info("webmail: %s saved %d filter rule(s), vacation %s", user.address, len(rules.rules),
                 "on" if rules.vacation.enabled else "off")
        return await self.page(request, s, user, message="Filters saved.")

    async def save_raw(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """The raw script editor: compiled first, stored (as the active script, or "webmail") only when valid."""
        form = await _form(request)
        text = _field(form, "script")
        if len(text) > MAX_SCRIPT_FORM:
            raise web.HTTPRequestEntityTooLarge(MAX_SCRIPT_FORM, len(text))
        data = text.replace("\r\n", "\n").replace("\n", "\r\n").encode()
        try:
            compile_script(data, SCRIPT)
        except CompileError as exc:
            return await self.page(request, s, user, error="The script has errors; it was not saved.", status=400,
                                   raw=text, raw_errors=exc.errors)
        store = self._scripts(user)
        active = await asyncio.to_thread(store.active) if store is not None else None
        try:
            await self._store_script(user, data, active or SCRIPT)
        except ScriptError as exc:
            return await self.page(request, s, user, error=f"Not saved: {exc}", status=400, raw=text)
        log.info("webmail: %s saved their Sieve script by hand", user.address)
        return await self.page(request, s, user, message="Script saved.")

    async def save_signature(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """One identity's signature (an address the user may send as)."""
        form = await _form(request)
        identity = _field(form, "identity").strip().lower()
        text = _field(form, "signature").replace("\r\n", "\n").rstrip()
        mine = {a.lower() for a in await asyncio.to_thread(self.web.accounts.addresses_of, user)} | {user.address}
        if identity not in mine:
            raise web.HTTPForbidden(text="not one of your addresses\n")
        if len(text) > MAX_SIGNATURE:
            return await self.page(request, s, user, error=f"At most {MAX_SIGNATURE} characters.", status=400)

        def change(p: Prefs) -> None:
            if text:
                p.signatures[identity] = text
            else:
                p.signatures.pop(identity, None)
            p.rich = _field(form, "rich") == "1"
        await asyncio.to_thread(self.web.prefs.update, user, change)
        return await self.page(request, s, user, message="Signature saved.")

    async def save_senders(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """Remove senders from the list whose remote content is shown (added from a message's page)."""
        form = await _form(request)
        drop = {v.lower() for v in form.getall("remove", []) if isinstance(v, str)}

        def change(p: Prefs) -> None:
            p.remote_senders = [a for a in p.remote_senders if a not in drop]
        await asyncio.to_thread(self.web.prefs.update, user, change)
        return await self.page(request, s, user, message="Saved.")


def signature_of(prefs: Prefs, identity: str) -> str:
    return prefs.signatures.get(identity.lower(), "")
