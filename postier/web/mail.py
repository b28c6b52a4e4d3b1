"""The webmail under /mail/ (RFC 9110 HTTP, RFC 6265 cookies): log in with the mail account, read,
file and write mail in a browser, through the same store, throttle and submission pipeline as IMAP
and port 587.

Security model:
- Login is the IMAP check (`Accounts.verify_password_async`, argon2) behind the IMAP/SMTP/POP3 login
  throttle of `server.throttle`. The session lives on the server (`web.sessions`); the cookie is
  `Secure; HttpOnly; SameSite=Strict; Path=/mail/`.
- Every change is a POST carrying the session's CSRF token (form field `csrf` or header
  `X-CSRF-Token`), and a POST that the browser says comes from another site (Sec-Fetch-Site, or
  Origin) is refused, the login form's included.
- Every folder name, UID and part number comes from the request as a query or form value: folder
  names must be one of the session user's own folders (as listed by the store), UIDs integers,
  parts dotted numbers; the store for a request is always the session user's own.
- Pages carry a strict Content-Security-Policy (scripts only from /mail/static/, no inline script),
  `frame-ancestors 'none'`, nosniff and no referrer; message HTML is sanitized by nh3 (`web.render`)
  and shown in a sandboxed iframe without scripts, under its own CSP.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import email.utils
import logging
import mimetypes
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlencode, urlsplit

import jinja2
from aiohttp import web

from ..message.types import AccountError, User
from ..message.mime import decode_body, decode_transfer_encoding, header_section, parse_message
from ..message.types import Envelope
from ..proto.smtp.address import Address, parse_path
from ..proto.smtp.errors import AddressError
from ..proto.crlf import to_crlf
from ..message.matching import SearchContext
from ..proto.imap.search import HeaderKey, OrKey, SearchKey, TextKey
from ..message.threading import ThreadNode, thread_references
from ..antispam.learning import JUNK, enqueue, verdict
from ..server.imapfetch import narrow, run_search
from ..server.imapsort import sort_items
from ..store.api import FolderInfo, Mailboxes, MailStoreAPI, MessageRow
from ..store.errors import StoreError, StoreUnavailable
from ..store.index import FLAG_FLAGGED as _FLAGGED
from ..store.index import FLAG_SEEN as _SEEN
from ..message.types import MessageBody
from . import render
from .forms import Upload, _field, _form, _q
from .prefs import MAX_REMOTE_SENDERS, Prefs, PrefsStore
from .settings import SettingsPages
from .sessions import SessionTable, WebSession

if TYPE_CHECKING:
    from ..server.app import App

log = logging.getLogger("postier.webmail")

__all__ = ["COOKIE", "PAGE_SIZE", "Webmail"]

COOKIE = "postier_mail"
PREFIX = "/mail/"
PAGE_SIZE = 50
MAX_FOLDER_NAME = 1000
MAX_RECIPIENTS = 100
SEARCH_BATCH = 5000  # messages per evaluator call, as IMAP SEARCH
SEARCH_SECONDS = 10.0  # a search that finds too little stops after this long (the page says so)
MAX_QUERY = 200
THREAD_WINDOW = 2000  # the thread view groups the newest this many messages of a folder
MAX_DEPTH = 8  # replies deeper than this are indented as this deep
SSE_SECONDS = 25.0  # one event stream lasts at most this long (under the request deadline); the browser reconnects
HERE = Path(__file__).resolve().parent
STATIC = {"webmail.js": "text/javascript", "webmail.css": "text/css", "blocked.svg": "image/svg+xml"}

PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
            "frame-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
#: The sandboxed message body: no script at all, images only from us (or anywhere once asked for).
BODY_CSP = ("default-src 'none'; img-src 'self' data:{remote}; style-src 'unsafe-inline'; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'self'")
_INLINE_IMAGE = {"image/png", "image/gif", "image/jpeg", "image/webp"}
_SAFE_FILENAME = re.compile(r"[^\w.\- ()\[\]]+")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
AuthedHandler = Callable[[web.Request, WebSession, User], Awaitable[web.StreamResponse]]


@dataclass
class Area:
    """A part of the site with its own login, cookie and sessions: the webmail (/mail/) or the admin
    console (/admin/, only for accounts flagged admin)."""

    prefix: str  # "/mail/"
    cookie: str
    landing: str  # where a login leads
    sessions: SessionTable
    admin: bool = False
    name: str = "webmail"

    @property
    def login_path(self) -> str:
        return self.prefix + "login"


#: What a login or a page says while the account database (or the mail storage) is out of reach:
#: HTTP 503 with Retry-After (RFC 9110 §15.6.4, §10.2.3), never "wrong password" nor a 500.
UNAVAILABLE = "The account database cannot be reached right now; please try again in a few minutes."
RETRY_AFTER = "30"


def _unavailable(request: web.Request) -> web.Response:
    """503 as JSON for a client that asked for JSON (the pages' scripts), else as text."""
    headers = {"Retry-After": RETRY_AFTER}
    if "application/json" in request.headers.get("Accept", ""):
        return web.json_response({"error": "unavailable", "message": UNAVAILABLE}, status=503, headers=headers)
    return web.Response(status=503, text=UNAVAILABLE + "\n", headers=headers)


def _secure(resp: web.StreamResponse, csp: str = PAGE_CSP) -> web.StreamResponse:
    h = resp.headers
    h.setdefault("Content-Security-Policy", csp)
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    h.setdefault("X-Frame-Options", "DENY")
    h["Cache-Control"] = "no-store"
    return resp


class Webmail:
    def __init__(self, services: App):
        self.services = services
        self.config = services.config
        self.accounts = services.accounts
        self.throttle = services.throttle
        self.store: MailStoreAPI = services.mailstore
        self.area = Area(PREFIX, COOKIE, "/mail/folder?f=INBOX", SessionTable())
        self.sessions = self.area.sessions
        self.spool = services.config.spool_dir / "incoming"
        self.templates = jinja2.Environment(loader=jinja2.FileSystemLoader(str(HERE / "templates")),
                                            autoescape=True, undefined=jinja2.StrictUndefined)
        self.prefs = PrefsStore(services.config.mail_root)
        self.settings_pages = SettingsPages(self)

    def mount(self, app: web.Application) -> None:
        r = app.router
        self.add_login_routes(app, self.area)
        r.add_get("/mail/static/{name}", self._wrap(self.static))
        for path, fn, method in (
            ("/mail/folder", self.folder, "GET"), ("/mail/msg", self.message, "GET"),
            ("/mail/body", self.body, "GET"), ("/mail/part", self.part, "GET"), ("/mail/cid", self.cid, "GET"),
            ("/mail/events", self.events, "GET"), ("/mail/compose", self.compose_form, "GET"),
            ("/mail/act", self.act, "POST"), ("/mail/send", self.send, "POST"),
            ("/mail/remote", self.allow_remote, "POST"),
            ("/mail/settings", self.settings, "GET"), ("/mail/password", self.change_password, "POST"),
        ):
            r.add_route(method, path, self._wrap(self._authed(fn, self.area)))
        self.settings_pages.mount(app)

    # -- plumbing -----------------------------------------------------------------------------------

    def _wrap(self, fn: Handler) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            t0 = time.perf_counter()
            try:
                resp = await fn(request)
            except web.HTTPException as exc:
                _secure(exc)
                raise
            except StoreUnavailable as exc:  # cluster mode: PostgreSQL or the object store out of reach
                log.error("web: %s %s: %s", request.method, request.path, exc)
                resp = _unavailable(request)
            if not resp.prepared:
                _secure(resp)
                # W3C Server Timing: the server's own time for this request (bench/webmail_bench.py)
                resp.headers["Server-Timing"] = f"app;dur={(time.perf_counter() - t0) * 1000:.1f}"
            return resp
        return handler

    def _authed(self, fn: AuthedHandler, area: Area) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            s = area.sessions.get(request.cookies.get(area.cookie))
            if s is None:
                if request.method == "GET" and not request.path.startswith(("/mail/events", "/mail/body")):
                    raise web.HTTPSeeOther(area.login_path)
                raise web.HTTPForbidden(text="not logged in\n")
            user = await asyncio.to_thread(self.accounts.get_user, s.address)
            if user is None:
                area.sessions.drop_user(s.address)  # the account was removed
                raise web.HTTPSeeOther(area.login_path)
            if area.admin and not await asyncio.to_thread(self.accounts.is_admin, s.address):
                area.sessions.drop_user(s.address)  # no longer an admin: refused, and logged out
                raise web.HTTPForbidden(text="not an administrator\n")
            if request.method != "GET":
                if not self._same_origin(request):
                    raise web.HTTPForbidden(text="cross-site request refused\n")
                token = request.headers.get("X-CSRF-Token")
                if token is None and request.content_type in ("application/x-www-form-urlencoded",
                                                              "multipart/form-data"):
                    token = _field(await _form(request), "csrf") or None
                if not s.csrf_ok(token):
                    raise web.HTTPForbidden(text="missing or wrong CSRF token\n")
            return await fn(request, s, user)
        return handler

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        """Is this POST from our own pages? Fetch metadata first (Sec-Fetch-Site, sent whatever the
        referrer policy), then Origin (RFC 6454 §7; "null" under our no-referrer policy, which leaves
        the decision to the CSRF token)."""
        site = request.headers.get("Sec-Fetch-Site")
        if site is not None:
            return site == "same-origin"
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return True
        return urlsplit(origin).netloc.lower() == (request.host or "").lower()

    def _page(self, template: str, **ctx: Any) -> web.Response:
        html = self.templates.get_template(template).render(**ctx)
        return web.Response(text=html, content_type="text/html", charset="utf-8")

    @contextlib.asynccontextmanager
    async def _mailboxes(self, user: User) -> AsyncIterator[Mailboxes]:
        def acquire() -> Mailboxes:
            mb = self.store.acquire(user)
            try:
                mb.ensure_defaults()  # Sent, Drafts, Trash, Junk, Archive, as at an IMAP login
            except BaseException:
                self.store.release(mb)
                raise
            return mb
        mb = await self.store.call(acquire)
        try:
            yield mb
        finally:
            self.store.release_later(mb)

    @staticmethod
    def _uid(value: str | None) -> int:
        if value is None or not value.isdigit() or len(value) > 10 or not 0 < int(value) < 2**32:
            raise web.HTTPBadRequest(text="bad message id\n")
        return int(value)

    async def _folders(self, mb: Mailboxes) -> list[FolderInfo]:
        return await self.store.call(mb.list_folders)

    async def _folder(self, mb: Mailboxes, name: str | None) -> str:
        """`name` if it is one of this user's folders (exactly as the store lists it), else 404."""
        if not name or len(name) > MAX_FOLDER_NAME:
            raise web.HTTPNotFound(text="no such folder\n")
        for f in await self._folders(mb):
            if f.name == name:
                return f.name
        raise web.HTTPNotFound(text="no such folder\n")

    @staticmethod
    def _special(folders: list[FolderInfo], use: str, fallback: str) -> str | None:
        for f in folders:
            if f.special_use == use:
                return f.name
        return next((f.name for f in folders if f.name.lower() == fallback.lower()), None)

    async def _raw(self, mb: Mailboxes, folder: str, uid: int) -> tuple[MessageRow, bytes]:
        def read() -> tuple[MessageRow, bytes] | None:
            row = mb.rows(folder, [uid]).get(uid)
            if row is None:
                return None
            return row, mb.read(folder, row)
        try:
            got = await self.store.call(read)
        except StoreError:
            got = None
        if got is None:
            raise web.HTTPNotFound(text="no such message\n")
        return got

    # -- login ----------------------------------------------------------------------------------------

    def add_login_routes(self, app: web.Application, area: Area) -> None:
        """PREFIX, PREFIX + login (GET form, POST check), logout and logout-all for one area."""

        async def root(request: web.Request) -> web.StreamResponse:
            if area.sessions.get(request.cookies.get(area.cookie)) is None:
                raise web.HTTPSeeOther(area.login_path)
            raise web.HTTPSeeOther(area.landing)

        async def form(request: web.Request) -> web.StreamResponse:
            return self._login_page(area)

        async def login(request: web.Request) -> web.StreamResponse:
            return await self._login(request, area)

        async def logout(request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
            area.sessions.drop(request.cookies.get(area.cookie))
            return self._logged_out(area)

        async def logout_all(request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
            n = area.sessions.drop_user(user.address)
            log.info("%s: %s logged out everywhere (%d sessions)", area.name, user.address, n)
            return self._logged_out(area)

        r = app.router
        r.add_get(area.prefix.rstrip("/"), self._wrap(root))
        r.add_get(area.prefix, self._wrap(root))
        r.add_get(area.login_path, self._wrap(form))
        r.add_post(area.login_path, self._wrap(login))
        r.add_post(area.prefix + "logout", self._wrap(self._authed(logout, area)))
        r.add_post(area.prefix + "logout-all", self._wrap(self._authed(logout_all, area)))

    def _login_page(self, area: Area, error: str = "", status: int = 200) -> web.Response:
        resp = self._page("login.html", error=error, action=area.login_path,
                          heading="Administration" if area.admin else "Log in")
        resp.set_status(status)
        return resp

    @staticmethod
    def _logged_out(area: Area) -> web.StreamResponse:
        resp = web.HTTPSeeOther(area.login_path)
        resp.del_cookie(area.cookie, path=area.prefix, secure=True, httponly=True, samesite="Strict")
        raise resp

    async def _login(self, request: web.Request, area: Area) -> web.StreamResponse:
        if not self._same_origin(request):
            raise web.HTTPForbidden(text="cross-site request refused\n")
        ip = request.remote or "?"
        if self.throttle.blocked(ip):  # the same throttle as IMAP, POP3 and SMTP AUTH
            return self._login_page(area, "Too many failed logins; try again later.", 429)
        form = await _form(request)
        address, password = form.get("address"), form.get("password")
        user = None
        try:
            if isinstance(address, str) and isinstance(password, str) and 0 < len(address) <= 320 \
                    and 0 < len(password) <= 1024:
                user = await self.accounts.verify_password_async(address.strip(), password)
            if user is not None and area.admin and not await asyncio.to_thread(self.accounts.is_admin, user.address):
                log.info("%s: %s is not an admin (from %s)", area.name, user.address, ip)
                user = None  # counted as a failure: the same answer as a wrong password
        except StoreUnavailable as exc:  # cluster mode: the account database is out of reach
            log.error("%s: login from %s impossible: %s", area.name, ip, exc)
            resp = self._login_page(area, UNAVAILABLE, 503)  # not counted against the client
            resp.headers["Retry-After"] = RETRY_AFTER
            return resp
        if user is None:
            await self.throttle.penalize(ip)
            log.info("%s: failed login from %s", area.name, ip)
            return self._login_page(area, "Wrong address or password.", 401)
        self.throttle.success(ip)
        area.sessions.drop(request.cookies.get(area.cookie))  # no session fixation: a fresh id at every login
        sid, _s = area.sessions.create(user.address)
        log.info("%s: %s logged in from %s", area.name, user.address, ip)
        resp = web.HTTPSeeOther(area.landing)
        resp.set_cookie(area.cookie, sid, path=area.prefix, secure=True, httponly=True, samesite="Strict")
        raise resp

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        ctype = STATIC.get(name)  # a fixed list: nothing from the request reaches the file system
        if ctype is None:
            raise web.HTTPNotFound()
        data = await asyncio.to_thread((HERE / "static" / name).read_bytes)
        resp = web.Response(body=data, content_type=ctype)
        _secure(resp)
        resp.headers["Cache-Control"] = "private, max-age=300"
        return resp

    # -- reading --------------------------------------------------------------------------------------

    async def folder(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        q = request.query
        page = int(q["p"]) if q.get("p", "").isdigit() and len(q["p"]) < 7 else 0
        query = " ".join(q.get("q", "").split())[:MAX_QUERY]
        body = q.get("b") == "1"
        threads = q.get("t") == "1" and not query
        async with self._mailboxes(user) as mb:
            name = await self._folder(mb, q.get("f", "INBOX"))
            if threads:
                folders, (total, items, more) = await self.store.call(
                    _folders_and_threads, mb, user.address, name, page, PAGE_SIZE)
            else:
                folders, (total, items, more) = await self.store.call(
                    _folders_and_page, mb, user.address, name, page, PAGE_SIZE, query, body)
        pages = max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE) + (1 if more else 0)
        return self._page("folder.html", user=user.address, csrf=s.csrf, folders=folders, folder=name,
                          items=items, page=page, pages=pages, total=total, query=query, body=body, more=more,
                          threads=threads, q=_q)

    async def message(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        q = request.query
        uid = self._uid(q.get("u"))
        async with self._mailboxes(user) as mb:
            name = await self._folder(mb, q.get("f"))
            row, raw = await self._raw(mb, name, uid)
            if not row.flags & _SEEN:  # reading marks read, as IMAP FETCH BODY[] does (RFC 9051 §6.4.5)
                with contextlib.suppress(StoreError):
                    await self.store.call(mb.store, name, [uid], "+FLAGS", ["\\Seen"])
                self.store.notifier.notify(user.address, name)
            folders = await self.store.call(_folder_counts, mb, user.address)
        v = render.view(raw)
        if not v.date and row.idate:  # no usable Date field: the arrival time (INTERNALDATE)
            v.date = datetime.fromtimestamp(row.idate).strftime("%Y-%m-%d %H:%M")
        domains = {d.lower() for d in await asyncio.to_thread(self.accounts.list_domains)}
        badge = render.auth_badge(header_section(raw),
                                  self.config.authserv_id, domains)
        sender = _sender_address(v.sender)
        remote = await self._remote_allowed(s, user, name, uid, sender, badge)
        blocked = 0
        if v.html_part is not None and not remote:
            root = parse_message(raw)
            part = render.find(root, v.html_part)
            if part is not None:
                _h, blocked = render.sanitize_html(decode_body(part), lambda c: "", False)
        flagged = bool(row.flags & _FLAGGED)
        return self._page("message.html", user=user.address, csrf=s.csrf, folders=folders, folder=name, uid=uid,
                          m=v, remote=remote, blocked=blocked, flagged=flagged, badge=badge, sender=sender, q=_q)

    async def body(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """The sanitized HTML body, for the sandboxed iframe of the message page."""
        q = request.query
        uid = self._uid(q.get("u"))
        async with self._mailboxes(user) as mb:
            name = await self._folder(mb, q.get("f"))
            _row, raw = await self._raw(mb, name, uid)
        root = parse_message(raw)
        part = render.find(root, q.get("p"))
        if part is None or part.maintype != "text" or part.subtype != "html":
            raise web.HTTPNotFound(text="no such part\n")
        html = decode_body(part)[: render.MAX_HTML]
        remote = await self._remote_allowed(s, user, name, uid, _sender_address(render.view(raw).sender),
                                            await self._badge(raw))

        def cid_url(cid: str) -> str:
            return "/mail/cid?" + urlencode({"f": name, "u": uid, "c": cid})
        clean, _blocked = render.sanitize_html(html, cid_url, remote)
        doc = ('<!DOCTYPE html><html><head><meta charset="utf-8"><base target="_blank">'
               '<style>body{font-family:sans-serif;margin:8px;overflow-wrap:anywhere}img{max-width:100%}</style>'
               f"</head><body>{clean}</body></html>")
        resp = web.Response(text=doc, content_type="text/html", charset="utf-8")
        csp = BODY_CSP.format(remote=" https: http:" if remote else "")
        resp.headers["Content-Security-Policy"] = csp
        resp.headers["X-Frame-Options"] = "SAMEORIGIN"
        return resp

    async def part(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """An attachment, always as a download (never rendered in our origin)."""
        q = request.query
        uid = self._uid(q.get("u"))
        async with self._mailboxes(user) as mb:
            name = await self._folder(mb, q.get("f"))
            _row, raw = await self._raw(mb, name, uid)
        root = parse_message(raw)
        part = render.find(root, q.get("p"))
        if part is None:
            raise web.HTTPNotFound(text="no such part\n")
        att = next((a for a in render.view(raw).attachments if a.part == q.get("p")), None)
        filename = att.filename if att else f"part-{q.get('p')}"
        data = _decoded(part)
        resp = web.Response(body=data, content_type="application/octet-stream")
        resp.headers["Content-Disposition"] = _attachment(filename)
        resp.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
        return resp

    async def cid(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """RFC 2392: an inline image of the message, referenced from its HTML as cid:..."""
        q = request.query
        uid = self._uid(q.get("u"))
        cid = q.get("c", "")
        if not cid or len(cid) > 500:
            raise web.HTTPNotFound()
        async with self._mailboxes(user) as mb:
            name = await self._folder(mb, q.get("f"))
            _row, raw = await self._raw(mb, name, uid)
        part = render.cid_part(parse_message(raw), cid)
        if part is None:
            raise web.HTTPNotFound()
        ctype = f"{part.maintype}/{part.subtype}"
        if ctype not in _INLINE_IMAGE:  # SVG and everything else: not inline
            ctype = "application/octet-stream"
        resp = web.Response(body=_decoded(part), content_type=ctype)
        resp.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
        return resp

    async def allow_remote(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        form = await _form(request)
        uid = self._uid(_field(form, "u"))
        async with self._mailboxes(user) as mb:
            name = await self._folder(mb, _field(form, "f"))
            if _field(form, "always") == "1":  # remembered for the sender (managed in the settings)
                _row, raw = await self._raw(mb, name, uid)
                sender = _sender_address(render.view(raw).sender)
                if sender:
                    def change(p: Prefs) -> None:
                        if sender not in p.remote_senders:
                            p.remote_senders = [*p.remote_senders, sender][-MAX_REMOTE_SENDERS:]
                    await asyncio.to_thread(self.prefs.update, user, change)
                    log.info("webmail: %s shows remote content from %s", user.address, sender)
        if len(s.remote_ok) >= 1000:
            s.remote_ok.clear()
        s.remote_ok.add((name, uid))
        raise web.HTTPSeeOther("/mail/msg?" + _q(f=name, u=uid))

    async def _badge(self, raw: bytes) -> render.AuthBadge | None:
        domains = {d.lower() for d in await asyncio.to_thread(self.accounts.list_domains)}
        return render.auth_badge(header_section(raw),
                                 self.config.authserv_id, domains)

    async def _remote_allowed(self, s: WebSession, user: User, folder: str, uid: int, sender: str,
                              badge: render.AuthBadge | None) -> bool:
        """Remote content of this message is shown: asked for once (this session), or for its sender,
        unless our own Authentication-Results say the From address is forged (DMARC fail)."""
        if (folder, uid) in s.remote_ok:
            return True
        if not sender:
            return False
        if badge is not None and (badge.own_domain_forged or ("dmarc", "fail") in badge.results):
            return False
        prefs = await asyncio.to_thread(self.prefs.get, user)
        return sender in prefs.remote_senders

    # -- changes --------------------------------------------------------------------------------------

    async def act(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """Flags, move, delete (to Trash), junk / not junk on the selected messages of a folder."""
        form = await _form(request)
        op = _field(form, "op")
        uids = sorted({self._uid(v) for v in form.getall("u", []) if isinstance(v, str)})[:1000]
        back = _field(form, "back")
        async with self._mailboxes(user) as mb:
            name = await self._folder(mb, _field(form, "f"))
            folders = await self._folders(mb)
            if not uids:
                raise web.HTTPBadRequest(text="no message selected\n")
            dest: str | None = None
            flag_ops = {"read": ("+FLAGS", "\\Seen"), "unread": ("-FLAGS", "\\Seen"),
                        "flag": ("+FLAGS", "\\Flagged"), "unflag": ("-FLAGS", "\\Flagged")}
            try:
                if op in flag_ops:
                    mode, flag = flag_ops[op]
                    await self.store.call(mb.store, name, uids, mode, [flag])
                elif op == "move":
                    dest = await self._folder(mb, _field(form, "dest"))
                elif op == "delete":
                    trash = self._special(folders, "\\Trash", "Trash")
                    if trash is None or trash == name:  # already in the Trash: gone for good
                        await self.store.call(mb.store, name, uids, "+FLAGS", ["\\Deleted"])
                        await self.store.call(mb.expunge, name, uids)
                    else:
                        dest = trash
                elif op == "junk":
                    dest = self._special(folders, "\\Junk", "Junk")
                    if dest is None:
                        raise web.HTTPConflict(text="there is no Junk folder\n")
                elif op == "notjunk":
                    dest = "INBOX"
                else:
                    raise web.HTTPBadRequest(text="unknown action\n")
                if dest is not None and dest != name:
                    if op == "notjunk":
                        await self.store.call(mb.store, name, uids, "-FLAGS", ["$Junk"])
                    res = await self.store.call(mb.move, name, uids, dest)
                    spam = verdict(name, dest, self._junk_folder())
                    if spam is not None:  # the user's verdict trains the filter, as an IMAP move does
                        await self._learn(user, mb, dest, res.dest_uids, spam)
            except StoreError as exc:
                raise web.HTTPConflict(text=f"{exc}\n") from None
        self.store.notifier.notify(user.address, name)
        if dest is not None:
            self.store.notifier.notify(user.address, dest)
        log.info("webmail: %s %s %d message(s) in %s%s", user.address, op, len(uids), name,
                 f" to {dest}" if dest else "")
        if back == "msg" and op in flag_ops and len(uids) == 1:
            raise web.HTTPSeeOther("/mail/msg?" + _q(f=name, u=uids[0]))
        raise web.HTTPSeeOther("/mail/folder?" + _q(f=name))

    def _junk_folder(self) -> str | None:
        """The folder whose moves in and out train the spam filter, as for IMAP (None: no learning)."""
        if self.services.learning is None or JUNK not in self.config.mailbox.special_use_folders:
            return None
        return JUNK

    async def _learn(self, user: User, mb: Mailboxes, folder: str, uids: list[int], spam: bool) -> None:
        """The user's verdict trains the spam filter: one request per message on the learning queue
        that IMAP moves feed (antispam/learning.py); best effort, never an error for the user."""
        learning = self.services.learning
        if learning is None or not uids:
            return
        try:
            await enqueue(learning, self.store.call, mb, user.address, folder, uids, spam)
        except Exception:
            log.exception("webmail: queueing %s for learning failed", user.address)

    # -- writing --------------------------------------------------------------------------------------

    async def compose_form(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        q = request.query
        mode = q.get("m", "")
        to = cc = subject = text = in_reply_to = refs = ""
        attached: dict[str, str] = {}
        if mode in ("reply", "all", "fwd", "fwdatt"):
            uid = self._uid(q.get("u"))
            async with self._mailboxes(user) as mb:
                name = await self._folder(mb, q.get("f"))
                _row, raw = await self._raw(mb, name, uid)
            v = render.view(raw)
            quoted = "\n".join("> " + line for line in (v.text or "").splitlines()[:2000])
            if mode == "fwdatt":  # RFC 2046 §5.2.1: the original, whole, as a message/rfc822 part
                subject = v.subject if v.subject.lower().startswith("fwd:") else f"Fwd: {v.subject}"
                attached = {"af": name, "au": str(uid), "subject": v.subject or "(no subject)"}
            elif mode == "fwd":
                subject = v.subject if v.subject.lower().startswith("fwd:") else f"Fwd: {v.subject}"
                text = (f"\n\n---------- Forwarded message ----------\nFrom: {v.sender}\nDate: {v.date}\n"
                        f"Subject: {v.subject}\nTo: {v.to}\n\n{v.text or ''}")
            else:
                subject = v.subject if v.subject.lower().startswith("re:") else f"Re: {v.subject}"
                to = v.reply_to or v.sender
                if mode == "all":
                    mine = {a.lower() for a in await asyncio.to_thread(self.accounts.addresses_of, user)}
                    others = [a for _n, a in email.utils.getaddresses([v.to, v.cc])
                              if a and a.lower() not in mine]
                    cc = ", ".join(dict.fromkeys(others))
                in_reply_to = v.message_id
                refs = f"{v.references} {v.message_id}".strip()
                text = f"\n\nOn {v.date}, {v.sender} wrote:\n{quoted}\n"
        prefs = await asyncio.to_thread(self.prefs.get, user)
        sig = prefs.signatures.get(user.address, "")
        if sig:  # the sender's signature, under the "-- " separator line (RFC 3676 §4.3), above any quote
            text = f"\n\n-- \n{sig}\n{text}"
        return await self._compose_page(user, s, to=to, cc=cc, subject=subject, text=text, in_reply_to=in_reply_to,
                                        references=refs, attached=attached, sender=user.address)

    async def _compose_page(self, user: User, s: WebSession, error: str = "", status: int = 200,
                            **fields: Any) -> web.Response:
        """The compose form, with the user's own addresses to send as and past correspondents to complete."""
        identities = sorted(await asyncio.to_thread(self.accounts.addresses_of, user) | {user.address})
        async with self._mailboxes(user) as mb:
            folders = await self._folders(mb)
            sent = self._special(folders, "\\Sent", "Sent")
            contacts = await self.store.call(_contacts, mb, sent) if sent else []
        prefs = await asyncio.to_thread(self.prefs.get, user)
        resp = self._page("compose.html", user=user.address, csrf=s.csrf, error=error, folders=[], q=_q,
                          identities=identities, contacts=contacts, signatures=prefs.signatures, rich=prefs.rich,
                          **({"html": ""} | fields))
        resp.set_status(status)
        return resp

    async def send(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """Send through the submission pipeline of port 587 (or save to Drafts), copy to Sent."""
        form = await _form(request)
        to, cc, bcc = _field(form, "to"), _field(form, "cc"), _field(form, "bcc")
        subject, text = _field(form, "subject")[:998], _field(form, "text")
        draft = _field(form, "action") == "draft"

        sender = _field(form, "from") or user.address
        attached: dict[str, str] = {}
        if _field(form, "af"):
            attached = {"af": _field(form, "af"), "au": _field(form, "au"), "subject": _field(form, "asubject")}

        async def again(error: str, status: int = 400) -> web.Response:
            return await self._compose_page(user, s, error, status, to=to, cc=cc, subject=subject, text=text,
                                            html=render.clean_compose_html(_field(form, "html")),
                                            in_reply_to=_field(form, "in_reply_to"),
                                            references=_field(form, "references"), attached=attached,
                                            sender=sender)

        if sender != user.address and sender not in await asyncio.to_thread(self.accounts.addresses_of, user):
            return await again("You cannot send as that address.", 403)

        rcpts: list[str] = []
        heads: dict[str, list[str]] = {"To": [], "Cc": []}
        for header, value in (("To", to), ("Cc", cc), ("Bcc", bcc)):
            for _n, a in email.utils.getaddresses([value]) if value.strip() else []:
                try:
                    parse_path(f"<{a}>")
                except AddressError:
                    return await again(f"Not an address: {a}")
                rcpts.append(a)
                if header != "Bcc":
                    heads[header].append(a)
        rcpts = list(dict.fromkeys(rcpts))
        if not rcpts and not draft:
            return await again("Add at least one recipient.")
        if len(rcpts) > MAX_RECIPIENTS:
            return await again(f"At most {MAX_RECIPIENTS} recipients.")
        msg = EmailMessage(policy=email.policy.SMTP)
        msg["From"] = sender
        if heads["To"]:
            msg["To"] = ", ".join(heads["To"])
        if heads["Cc"]:
            msg["Cc"] = ", ".join(heads["Cc"])
        msg["Subject"] = subject.replace("\r", " ").replace("\n", " ")
        msg["Date"] = email.utils.formatdate(localtime=True)
        msg["Message-ID"] = f"<{secrets.token_hex(12)}@{self.config.hostname}>"
        for h, fld in (("In-Reply-To", "in_reply_to"), ("References", "references")):
            v = _field(form, fld).replace("\r", " ").replace("\n", " ").strip()
            if v and re.fullmatch(r"(<[^<>\s]{1,500}>\s*){1,50}", v):
                msg[h] = v
        msg["MIME-Version"] = "1.0"
        msg.set_content(text.replace("\r\n", "\n"))
        rich = render.clean_compose_html(_field(form, "html")) if _field(form, "html").strip() else ""
        if rich:  # RFC 2046 §5.1.4: the text part first, then the (sanitized) HTML of the rich editor
            msg.add_alternative("<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body>"
                                f"{rich}</body></html>", subtype="html")
        for f in form.getall("attach", []):
            if isinstance(f, Upload) and f.filename and f.data:
                ctype = mimetypes.guess_type(f.filename)[0] or "application/octet-stream"
                main, _, sub = ctype.partition("/")
                msg.add_attachment(f.data, maintype=main, subtype=sub, filename=_SAFE_FILENAME.sub("_", f.filename)[:200])
        if attached:
            async with self._mailboxes(user) as mb:
                name = await self._folder(mb, attached["af"])
                _row, original = await self._raw(mb, name, self._uid(attached["au"]))
            msg.add_attachment(email.message_from_bytes(original, policy=email.policy.SMTP),
                               filename="forwarded.eml")
        data = msg.as_bytes()
        if len(data) > self.config.limits.max_message_size:
            return await again("The message is too large.", 413)
        async with self._mailboxes(user) as mb:
            folders = await self._folders(mb)
            if draft:
                drafts = self._special(folders, "\\Drafts", "Drafts")
                if drafts is None:
                    return await again("There is no Drafts folder.", 409)
                await self.store.call(mb.append, drafts, data, ["\\Draft", "\\Seen"])
                self.store.notifier.notify(user.address, drafts)
                raise web.HTTPSeeOther("/mail/folder?" + _q(f=drafts))
            error = await self._submit(request, user, sender, rcpts, data)
            if error:
                return await again(error, 422)
            sent = self._special(folders, "\\Sent", "Sent")
            if sent is not None:
                try:
                    await self.store.call(mb.append, sent, data, ["\\Seen"])
                    self.store.notifier.notify(user.address, sent)
                except StoreError as exc:
                    log.warning("webmail: %s: copy to Sent failed: %s", user.address, exc)
        raise web.HTTPSeeOther("/mail/folder?" + _q(f="INBOX", sent="1"))

    async def _submit(self, request: web.Request, user: User, sender: str, rcpts: list[str], data: bytes) -> str:
        """Run the message through the port-587 pipeline (sender rights, DKIM, daily limit, queue);
        returns "" when it was accepted, else the reason shown to the user."""
        pipe = self.services.pipelines["submission"]()  # the port-587 pipeline, as configured
        env = Envelope(role="submission", peer_ip=request.remote or "127.0.0.1", helo="webmail", esmtp=True,
                       tls="HTTPS", auth_user=user)
        r = await pipe.on_mail(env, parse_path(f"<{sender}>")[0], {})
        if r.code >= 300:
            return f"Refused: {r.text}"
        for a in rcpts:
            addr: Address = parse_path(f"<{a}>")[0]
            r = await pipe.on_rcpt(env, addr, {})
            if r.code >= 300:
                return f"{a}: {r.text}"
        body = MessageBody(self.spool)
        try:
            body.write(data)
            replies = await pipe.on_message(env, body)
        finally:
            body.close()
        bad = [r for r in replies if r.code >= 300]
        if bad:
            return f"Not sent: {bad[0].text}"
        log.info("webmail: %s sent a message to %d recipient(s)", user.address, len(rcpts))
        return ""

    # -- settings -------------------------------------------------------------------------------------

    async def settings(self, request: web.Request, s: WebSession, user: User, message: str = "",
                       error: str = "", status: int = 200) -> web.StreamResponse:
        return await self.settings_pages.page(request, s, user, message, error, status)

    async def change_password(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """A new password, given the current one (checked like a login, behind the same throttle);
        every other session of the user ends."""
        form = await _form(request)
        old, new, again = _field(form, "old"), _field(form, "new"), _field(form, "again")
        ip = request.remote or "?"
        if self.throttle.blocked(ip):
            return await self.settings(request, s, user, error="Too many failed attempts; try again later.",
                                       status=429)
        if not old or len(old) > 1024 or await self.accounts.verify_password_async(user.address, old) is None:
            await self.throttle.penalize(ip)
            return await self.settings(request, s, user, error="The current password is wrong.", status=403)
        if new != again:
            return await self.settings(request, s, user, error="The new passwords differ.", status=400)
        try:
            await asyncio.to_thread(self.accounts.set_password, user.address, new)
        except AccountError as exc:
            return await self.settings(request, s, user, error=str(exc), status=400)
        self.sessions.drop_user(user.address)
        sid, fresh = self.sessions.create(user.address)  # this browser stays logged in, with a new id
        log.info("webmail: %s changed their password; other sessions ended", user.address)
        resp = await self.settings(request, fresh, user, message="Password changed.")
        resp.set_cookie(self.area.cookie, sid, path=self.area.prefix, secure=True, httponly=True, samesite="Strict")
        return resp

    # -- live updates ---------------------------------------------------------------------------------

    async def events(self, request: web.Request, s: WebSession, user: User) -> web.StreamResponse:
        """Server-sent events: "change" whenever the folder changes (the notifier of IMAP IDLE).
        Each stream ends after SSE_SECONDS (the browser's EventSource reconnects by itself)."""
        async with self._mailboxes(user) as mb:
            name = await self._folder(mb, request.query.get("f"))
            path = await self.store.call(mb.watch_path, name)
            wake = asyncio.Event()
            unwatch = self.store.notifier.watch(user.address, name, path, wake.set)
            try:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
                _secure(resp)
                await resp.prepare(request)
                await resp.write(b"retry: 2000\n\n")
                deadline = time.monotonic() + min(SSE_SECONDS, self.config.limits.command_timeout * 0.8)
                while (left := deadline - time.monotonic()) > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(wake.wait(), left)
                    if wake.is_set():
                        wake.clear()
                        await resp.write(b"event: change\ndata: " + _q(f=name).encode() + b"\n\n")
                return resp
            finally:
                unwatch()




def _sender_address(from_field: str) -> str:
    """The address of a From field, lower-cased ("" when there is none)."""
    addr = email.utils.parseaddr(from_field)[1].lower()
    return addr if "@" in addr and len(addr) <= 320 else ""


def _decoded(part: Any) -> bytes:
    try:
        return decode_transfer_encoding(part.body, part.encoding)
    except ValueError:
        return bytes(part.body)


def _attachment(filename: str) -> str:
    """RFC 6266 Content-Disposition: attachment, with an ASCII fallback and the UTF-8 name (RFC 8187)."""
    ascii_name = _SAFE_FILENAME.sub("_", filename.encode("ascii", "replace").decode("ascii"))[:200] or "attachment"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename[:200], safe='')}"


#: (user, folder) -> (the folder's state stamp, unseen count): counting the unseen messages of a
#: 100,000-message folder is a scan of its index rows, so it is redone only when the folder changed
#: (new UIDs, expunges and flag changes all move UIDNEXT, the message count or HIGHESTMODSEQ).
_UNSEEN: dict[tuple[str, str], tuple[tuple[int, int, int, int], int]] = {}
_UNSEEN_MAX = 50_000


def _folder_counts(mb: Mailboxes, user: str) -> list[tuple[FolderInfo, int]]:
    """Every folder of `user` with its unseen count (RFC 9051 §6.3.11 STATUS UNSEEN)."""
    out = []
    for f in mb.list_folders():
        try:
            snap = mb.snapshot(f.name)
            stamp = (snap.uidvalidity, snap.uidnext, snap.highestmodseq, len(snap.uids))
            hit = _UNSEEN.get((user, f.name))
            if hit is not None and hit[0] == stamp:
                unseen = hit[1]
            else:
                unseen = mb.status(f.name).unseen
                if len(_UNSEEN) >= _UNSEEN_MAX:
                    _UNSEEN.clear()
                _UNSEEN[(user, f.name)] = (stamp, unseen)
            out.append((f, unseen))
        except StoreError:
            continue
    return out


def _folders_and_page(mb: Mailboxes, user: str, name: str, page: int, size: int, query: str = "",
                      body: bool = False
                      ) -> tuple[list[tuple[FolderInfo, int]], tuple[int, list[dict[str, Any]], bool]]:
    """One worker-thread call: the folder list with unread counts, and one page of the message list,
    newest first (only that page's rows and headers are read); with `query`, one page of the messages
    matching it. Returns (folders, (total, items, more)): `more` when a search stopped early."""
    folders = _folder_counts(mb, user)
    snap = mb.snapshot(name)
    if query:
        found, more = _search(mb, name, snap.uids, query, body, (page + 1) * size)
        return folders, (len(found), _items(mb, name, found[page * size:(page + 1) * size]), more)
    total = len(snap.uids)
    hi = max(0, total - page * size)
    lo = max(0, hi - size)
    return folders, (total, _items(mb, name, list(reversed(snap.uids[lo:hi]))), False)


def _folders_and_threads(mb: Mailboxes, user: str, name: str, page: int, size: int
                         ) -> tuple[list[tuple[FolderInfo, int]], tuple[int, list[dict[str, Any]], bool]]:
    """The folder list, and one page of conversations (RFC 5256 §3 THREAD=REFERENCES, as IMAP THREAD)
    over the newest THREAD_WINDOW messages: threads newest activity first, each message with its
    depth. Returns (folders, (number of threads, items, more messages than the window))."""
    folders = _folder_counts(mb, user)
    uids = mb.snapshot(name).uids
    window = uids[-THREAD_WINDOW:]
    first = len(uids) - len(window)
    items = sort_items(mb, name, [(first + i + 1, u) for i, u in enumerate(window)], True)
    roots = thread_references(items)

    chosen = _thread_rows(roots, page, size)
    depth = dict(chosen)
    rows = _items(mb, name, [u for u, _d in chosen])
    for r in rows:
        r["depth"] = depth.get(r["uid"], 0)
    return folders, (len(roots), rows, first > 0)


def _thread_rows(roots: list[ThreadNode], page: int, size: int) -> list[tuple[int, int]]:
    """(id, depth) of every message of one page of threads, newest thread first, each thread in reply
    order. Iterative, as threading.py: a chain of replies may be as long as the window."""
    def latest(root: ThreadNode) -> tuple[float, int]:
        """The newest message of a thread: its sent date, then its id (the later arrival) on a tie."""
        best, stack = (0.0, 0), [root]
        while stack:
            node = stack.pop()
            if node.item is not None:
                best = max(best, (node.item.sent.timestamp(), node.item.id))
            stack.extend(node.children)
        return best
    ordered = sorted(roots, key=latest, reverse=True)
    chosen: list[tuple[int, int]] = []
    for root in ordered[page * size:(page + 1) * size]:
        walk: list[tuple[ThreadNode, int]] = [(root, 0)]
        while walk:
            node, d = walk.pop()
            if node.item is not None:  # a dummy (a message referred to but not here) takes no row
                chosen.append((node.item.id, min(d, MAX_DEPTH)))
            step = 1 if node.item is not None else 0
            walk.extend((c, d + step) for c in reversed(node.children))
    return chosen


def _contacts(mb: Mailboxes, sent: str, messages: int = 200, limit: int = 500) -> list[str]:
    """Addresses the user wrote to, from the To and Cc of the newest `messages` in Sent (for completion)."""
    uids = list(reversed(mb.snapshot(sent).uids[-messages:]))
    out: dict[str, None] = {}
    for item in _items(mb, sent, uids, ("to", "cc")):
        for _n, a in email.utils.getaddresses([item.get("to", ""), item.get("cc", "")]):
            if a and "@" in a and len(out) < limit:
                out.setdefault(a.lower())
    return list(out)


def _items(mb: Mailboxes, name: str, uids: list[int], extra: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    rows = mb.rows(name, uids)
    items = []
    try:
        heads = mb.peek_headers(name, rows.values())  # cluster mode: one query for the page
    except StoreUnavailable:  # out of reach (cluster mode): the page answers 503, not an empty list
        raise
    except (StoreError, OSError):
        heads = {}
    for uid in uids:
        row = rows.get(uid)
        if row is None:
            continue
        try:
            head = heads.get(uid) or mb.read_header(name, row, 16384)
        except StoreUnavailable:
            raise
        except (StoreError, OSError):  # expunged meanwhile
            continue
        info: dict[str, Any] = dict(render.summarize(to_crlf(head), extra))
        if not info["date"] and row.idate:  # no usable Date field: the arrival time (INTERNALDATE)
            info["date"] = datetime.fromtimestamp(row.idate).strftime("%Y-%m-%d %H:%M")
        info.update(uid=uid, seen=bool(row.flags & _SEEN), flagged=bool(row.flags & _FLAGGED), size=row.size)
        items.append(info)
    return items


def _search(mb: Mailboxes, name: str, uids: Sequence[int], query: str, body: bool, want: int
            ) -> tuple[list[int], bool]:
    """UIDs matching `query` in From, To, Cc or Subject (and the body when asked), newest first, by the
    IMAP SEARCH evaluator (RFC 9051 §6.4.4) over batches from the newest message back; it stops once
    `want` are found (the page asked for) or SEARCH_SECONDS have passed: (uids, stopped early)."""
    keys: list[SearchKey] = [HeaderKey(f, query) for f in ("FROM", "TO", "CC", "SUBJECT")]
    if body:
        keys.append(TextKey("BODY", query))
    key = keys[0]
    for k in keys[1:]:
        key = OrKey(key, k)
    ctx = SearchContext(max_seq=len(uids), max_uid=uids[-1] if uids else 0)
    deadline = time.monotonic() + SEARCH_SECONDS
    found: list[int] = []
    hi = len(uids)
    batch = max(200, 4 * want)  # small first: a common word fills the page from the newest messages
    narrowed = False
    while hi > 0:
        if not narrowed and hi < len(uids):
            # not a common word: the full-text index (store.fts) names the older candidates
            narrowed = True
            key, cands = narrow(mb, name, key)
            if cands is not None:
                uids = [u for u in uids[:hi] if u in cands]
                hi = len(uids)
                continue
        lo = max(0, hi - batch)
        batch = min(SEARCH_BATCH, batch * 2)
        targets = [(i + 1, uids[i]) for i in range(lo, hi)]
        matches, _n = run_search(mb, name, targets, key, ctx, 0)
        found.extend(sorted((u for _s, u, _m in matches), reverse=True))
        hi = lo
        if len(found) >= want or time.monotonic() > deadline:
            return found, hi > 0
    return found, False
