"""What the webmail shows of one message: header summary, the text or sanitized HTML body (nh3),
the attachments and the `cid:` parts, from the MIME tree of `message.mime` (RFC 2045/2046/2392).

HTML is cleaned by nh3 (the Rust ammonia sanitizer, an allow-list parser: never regular
expressions), and the result is further confined by the browser: it is shown in a sandboxed iframe
without scripts, under its own Content-Security-Policy. Remote images are replaced by a placeholder
unless the user asked for this message's remote content; `cid:` references (RFC 2392) become URLs of
the message's own parts.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import authres
import nh3

from ..message.mime import Part, decode_body, decode_header_text, parse_message, parse_params
from ..message.sections import find_part

__all__ = ["BLOCKED_IMAGE", "Attachment", "AuthBadge", "MessageView", "auth_badge", "find", "parse_part_id", "sanitize_html", "summarize",
           "view"]

#: Shown instead of a remote image until the user asks for remote content.
BLOCKED_IMAGE = "/mail/static/blocked.svg"
MAX_PART_ID = 32  # "1.2.3": characters
MAX_HTML = 4 * 1024 * 1024  # decoded HTML larger than this is shown as text

_PART_ID = re.compile(r"^[1-9][0-9]{0,4}(\.[1-9][0-9]{0,4}){0,7}$")
_DATA_IMAGE = re.compile(r"^data:image/(png|gif|jpeg|webp);base64,[A-Za-z0-9+/=\s]*$", re.IGNORECASE)

_TAGS = {
    "a", "abbr", "b", "blockquote", "br", "caption", "center", "cite", "code", "col", "colgroup", "dd", "del",
    "div", "dl", "dt", "em", "font", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i", "img", "ins", "li", "ol",
    "p", "pre", "q", "s", "small", "span", "strike", "strong", "sub", "sup", "table", "tbody", "td", "tfoot",
    "th", "thead", "tr", "tt", "u", "ul",
}
#: Removed with everything inside them (the rest of the unknown tags keep their text).
_DROP_CONTENT = {"script", "style", "title", "template", "noscript", "textarea", "select", "option", "object",
                 "iframe", "frame", "frameset", "noframes", "embed", "applet", "head", "svg", "math"}
_ATTRS = {
    "*": {"title", "align", "valign", "width", "height", "dir", "lang", "bgcolor", "color", "style"},
    "a": {"href"},
    "img": {"src", "alt"},
    "td": {"colspan", "rowspan"},
    "th": {"colspan", "rowspan"},
    "font": {"face", "size"},
    "table": {"border", "cellpadding", "cellspacing"},
    "ol": {"start", "type"},
}
#: CSS properties kept in style attributes: none of them can take a url() (no remote loads).
_STYLE_PROPS = {
    "color", "background-color", "font-size", "font-weight", "font-style", "font-family", "font-variant",
    "text-align", "text-decoration", "text-transform", "text-indent", "letter-spacing", "line-height",
    "white-space", "vertical-align", "margin", "margin-top", "margin-right", "margin-bottom", "margin-left",
    "padding", "padding-top", "padding-right", "padding-bottom", "padding-left", "border", "border-top",
    "border-right", "border-bottom", "border-left", "border-color", "border-style", "border-width",
    "border-collapse", "border-spacing", "border-radius", "width", "max-width", "min-width", "height",
    "max-height", "min-height", "display", "direction",
}


@dataclass(frozen=True, slots=True)
class Attachment:
    part: str  # part number, "2" or "1.3"
    filename: str
    content_type: str
    size: int  # encoded octets


@dataclass
class MessageView:
    subject: str
    sender: str
    to: str
    cc: str
    date: str
    message_id: str
    references: str
    reply_to: str
    text: str | None  # the text/plain body (or None)
    html_part: str | None  # part number of the text/html body to show in the iframe
    attachments: list[Attachment] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class AuthBadge:
    """What our own Authentication-Results field (RFC 8601) says of a message, for the reader."""

    results: tuple[tuple[str, str], ...]  # (method, result): ("spf", "pass"), ("dkim", "fail"), ...
    own_domain_forged: bool  # From names one of our domains, yet DMARC did not pass

    @property
    def ok(self) -> bool:
        return any(m == "dmarc" and r == "pass" for m, r in self.results) and not self.own_domain_forged


def auth_badge(raw: bytes, authserv_id: str, local_domains: set[str]) -> AuthBadge | None:
    """The badge from the first Authentication-Results field carrying our authserv-id (forged ones
    with that id are removed at delivery, RFC 8601 §5), or None when there is none (local mail)."""
    root = parse_message(raw)
    for f in root.headers("authentication-results"):
        value = f.unfolded().decode("utf-8", "replace")
        try:
            h = authres.AuthenticationResultsHeader.parse(  # type: ignore[call-arg]  # a classmethod mypy reads as the core one
                "Authentication-Results: " + value)
        except Exception:  # authres raises its own and ValueError-like errors on malformed fields
            continue
        if str(h.authserv_id).lower() != authserv_id.lower():
            continue
        results = tuple((str(r.method).lower(), str(r.result).lower()) for r in h.results)[:10]
        if not results:  # "none": no method applied (mail authentication is off)
            return None
        sender = root.first("from") or b""
        domains = {a.rpartition("@")[2].lower() for _n, a in email.utils.getaddresses([decode_header_text(sender)])}
        dmarc_pass = any(m == "dmarc" and r == "pass" for m, r in results)
        return AuthBadge(results, bool(domains & local_domains) and not dmarc_pass)
    return None


def parse_part_id(value: str | None) -> tuple[int, ...] | None:
    """A validated part number ("1.2") as a path, or None."""
    if value is None or len(value) > MAX_PART_ID or not _PART_ID.match(value):
        return None
    return tuple(int(x) for x in value.split("."))


def find(root: Part, part_id: str | None) -> Part | None:
    path = parse_part_id(part_id)
    if path is None:
        return None
    p = find_part(root, path)
    return p if p is not None and not p.is_multipart else None


def _header(part: Part, name: str) -> str:
    raw = part.first(name)
    return decode_header_text(raw) if raw is not None else ""


def _disposition(part: Part) -> tuple[str, str]:
    """(disposition type, file name) of a part."""
    raw = part.first("content-disposition") or b""
    kind = raw.split(b";", 1)[0].strip().decode("ascii", "replace").lower()
    name = b""
    i = raw.find(b";")
    if i >= 0:
        params = {k.lower(): v for k, v in parse_params(raw, i)}
        name = params.get(b"filename", b"")
        if not name and b"filename*" in params:  # RFC 2231 §4: charset'lang'percent-encoded
            from urllib.parse import unquote_to_bytes
            _cs, _, rest = params[b"filename*"].partition(b"'")
            _lang, _, enc = rest.partition(b"'")
            name = unquote_to_bytes(enc)
    if not name:
        name = part.param("name") or b""
    return kind, decode_header_text(name) if name else ""


def _leaves(root: Part) -> list[tuple[str, Part]]:
    """(part number, part) of every leaf of the MIME tree, encapsulated messages not entered."""
    out: list[tuple[str, Part]] = []
    stack: list[tuple[str, Part]] = [("", root)]
    while stack and len(out) < 1000:
        num, p = stack.pop()
        if p.children:
            for i in range(len(p.children), 0, -1):
                stack.append((f"{num}.{i}" if num else str(i), p.children[i - 1]))
        else:
            out.append((num or "1", p))
    return out


def summarize(header: bytes, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Subject, From and Date of a header block (and the `extra` fields), for the message list."""
    root = parse_message(header if header.endswith(b"\r\n\r\n") else header + b"\r\n")
    out = {"subject": _header(root, "subject"), "from": _header(root, "from"), "date": _date(root)}
    for name in extra:
        out[name] = _header(root, name)
    return out


def _date(root: Part) -> str:
    raw = root.first("date")
    if raw is None:
        return ""
    try:
        d = email.utils.parsedate_to_datetime(raw.decode("ascii", "replace"))
    except (TypeError, ValueError, IndexError):
        return ""
    return d.strftime("%Y-%m-%d %H:%M") if isinstance(d, datetime) else ""


def view(raw: bytes) -> MessageView:
    root = parse_message(raw)
    text: str | None = None
    html_part: str | None = None
    attachments: list[Attachment] = []
    for num, p in _leaves(root):
        kind, filename = _disposition(p)
        ctype = f"{p.maintype}/{p.subtype}"
        if kind != "attachment" and not filename and p.maintype == "text" and p.subtype in ("plain", "html"):
            if p.subtype == "plain" and text is None:
                text = decode_body(p)
                continue
            if p.subtype == "html" and html_part is None:
                html_part = num
                continue
        if p.body_size == 0 and not filename:
            continue
        attachments.append(Attachment(num, filename or f"part-{num}", ctype, p.body_size))
    return MessageView(
        subject=_header(root, "subject"), sender=_header(root, "from"), to=_header(root, "to"),
        cc=_header(root, "cc"), date=_date(root), message_id=_header(root, "message-id"),
        references=_header(root, "references"), reply_to=_header(root, "reply-to"),
        text=text, html_part=html_part, attachments=attachments)


def cid_part(root: Part, cid: str) -> Part | None:
    """RFC 2392: the part whose Content-ID is <cid>."""
    want = cid.strip().strip("<>").lower()
    if not want:
        return None
    for _num, p in _leaves(root):
        c = p.first("content-id")
        if c is not None and c.decode("ascii", "replace").strip().strip("<>").lower() == want:
            return p
    return None


def sanitize_html(html: str, cid_url: Callable[[str], str], remote: bool) -> tuple[str, int]:
    """The HTML cleaned for display; and how many remote images were blocked."""
    blocked = 0

    def attr(tag: str, name: str, value: str) -> str | None:
        nonlocal blocked
        v = value.strip()
        low = v.lower()
        if name == "style" and ("expression" in low or "url(" in low or "\\" in low or "@" in low):
            return None  # old IE script in CSS, remote loads, escapes that hide either: the whole attribute goes
        if tag == "a" and name == "href":
            return v if low.startswith(("http://", "https://", "mailto:")) else None
        if tag == "img" and name == "src":
            if low.startswith("cid:"):
                return cid_url(v[4:])
            if _DATA_IMAGE.match(v):
                return v
            if low.startswith(("http://", "https://", "//")):
                if remote:
                    return v
                blocked += 1
                return BLOCKED_IMAGE
            return None
        return value

    clean = nh3.clean(html, tags=_TAGS, clean_content_tags=_DROP_CONTENT, attributes=_ATTRS,
                      attribute_filter=attr, url_schemes={"http", "https", "mailto", "cid", "data"},
                      filter_style_properties=_STYLE_PROPS, set_tag_attribute_values={"a": {"target": "_blank"}},
                      link_rel="noopener noreferrer")
    return clean, blocked


#: What the rich-text compose editor may send: bold, italic, lists and links, nothing else.
COMPOSE_TAGS = {"p", "div", "br", "b", "strong", "i", "em", "ul", "ol", "li", "a"}
MAX_COMPOSE_HTML = 1024 * 1024


def clean_compose_html(html: str) -> str:
    """The rich-text compose body, cleaned by nh3 before it is sent: only COMPOSE_TAGS, links only
    http(s) and mailto, no attribute but a link's href; "" when nothing is left."""
    clean = nh3.clean(html[:MAX_COMPOSE_HTML], tags=COMPOSE_TAGS, clean_content_tags=_DROP_CONTENT,
                      attributes={"a": {"href"}}, url_schemes={"http", "https", "mailto"},
                      link_rel="noopener noreferrer")
    return clean.strip()
