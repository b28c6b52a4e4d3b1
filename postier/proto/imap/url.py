"""IMAP URLs naming one message or a part of it (RFC 5092 subset), as CATENATE uses them (RFC 4469 §3).

Parsed here by hand: the standard library's ``urllib.parse`` splits generic URIs but knows nothing of
IMAP URL parameters (``;UIDVALIDITY=``, ``;UID=``, ``;SECTION=``, ``;PARTIAL=``), and an IMAP URL
library for Python does not exist in a maintained form. Accepted forms (RFC 5092 §6, §7):

* absolute: ``imap://[user[;AUTH=mech]@]host[:port]/mailbox[;UIDVALIDITY=n]/;UID=n[/;SECTION=s][/;PARTIAL=o[.l]]``
* path-absolute (relative to the server): ``/mailbox[;UIDVALIDITY=n]/;UID=n...``
* relative to the selected mailbox: ``;UID=n...``

Parameter names are case-insensitive; the mailbox is percent-encoded UTF-8 (RFC 5092 §3.2, not
modified UTF-7); the section is a percent-encoded section-spec of FETCH BODY[] (RFC 5092 §3.3).
URLAUTH (``;EXPIRE=``, ``;URLAUTH=``, RFC 4467) and message lists (``?search``) are not served: they
raise ``UrlError``, and the server answers ``NO [BADURL url]`` (RFC 4469 §5).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from .commands import Section
from .errors import ParseError
from .parser import parse_section

__all__ = ["ImapUrl", "UrlError", "parse_url"]

_SERVER = re.compile(r"imap://(?:(?P<user>[^@/;]*)(?:;AUTH=[^@/]*)?@)?(?P<host>\[[0-9A-Fa-f:.]+\]|[^:/@\[\]]+)"
                     r"(?::(?P<port>\d{1,5}))?(?=/|\Z)", re.IGNORECASE)
_PARAM = re.compile(r";(?P<name>[A-Za-z]+)=(?P<value>[^/;]*)\Z")
_NZ = re.compile(r"[1-9][0-9]{0,9}\Z")
_NUMBER = re.compile(r"[0-9]{1,10}\Z")
_PCT_OK = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,=:@]|%[0-9A-Fa-f]{2})*\Z")  # RFC 3986 pchar minus ";" "/"


class UrlError(ValueError):
    """The URL is malformed or names something this server does not serve."""


@dataclass(frozen=True, slots=True)
class ImapUrl:
    """One message (or part) named by an IMAP URL; ``mailbox`` None: relative to the selected one."""

    uid: int
    mailbox: str | None = None
    uidvalidity: int | None = None
    section: Section | None = None
    partial: tuple[int, int | None] | None = None  # (offset, length or None for "to the end")
    user: str | None = None
    host: str | None = None
    port: int | None = None


def parse_url(text: str) -> ImapUrl:
    """Parse one URL of the forms in the module docstring; UrlError otherwise."""
    if not text or any(c <= " " or c > "~" for c in text) or len(text) > 4096:
        raise UrlError("invalid characters")
    user = host = None
    port: int | None = None
    rest = text
    m = _SERVER.match(text)
    if m is not None:
        user = _decode(m.group("user")) if m.group("user") is not None else None
        host = m.group("host").lower()
        port = int(m.group("port")) if m.group("port") else None
        rest = text[m.end():]
        if not rest.startswith("/"):
            raise UrlError("no mailbox")
    elif "://" in text.split("/", 1)[0] or text.lower().startswith("imap:"):
        raise UrlError("not an IMAP URL of this server")
    if "?" in rest or "#" in rest:
        raise UrlError("search programs and fragments are not served")
    mailbox: str | None = None
    uidvalidity: int | None = None
    if rest.startswith("/"):  # RFC 5092 §7: mailbox [;UIDVALIDITY=n] "/" then the message
        head, sep, rest = rest[1:].partition("/")
        if not sep:
            raise UrlError("no message UID")
        name, _semi, params = head.partition(";")
        if not name:
            raise UrlError("empty mailbox name")
        mailbox = _decode(name)
        if params:
            p = _PARAM.match(";" + params)
            if p is None or p.group("name").upper() != "UIDVALIDITY" or not _NZ.match(p.group("value")):
                raise UrlError("invalid mailbox parameter")
            uidvalidity = int(p.group("value"))
    fields: dict[str, str] = {}
    for seg in rest.split("/"):
        p = _PARAM.match(seg)
        if p is None:
            raise UrlError("invalid URL segment")
        key = p.group("name").upper()
        if key in fields or key not in ("UID", "SECTION", "PARTIAL"):
            raise UrlError(f"{key} not served here" if key in ("EXPIRE", "URLAUTH") else "invalid URL parameter")
        if list(fields) + [key] != [k for k in ("UID", "SECTION", "PARTIAL") if k in fields or k == key]:
            raise UrlError("URL parameters out of order")
        fields[key] = p.group("value")
    if "UID" not in fields or not _NZ.match(fields["UID"]) or int(fields["UID"]) >= 1 << 32:
        raise UrlError("a message UID is required")
    section = None
    if "SECTION" in fields:
        raw = fields["SECTION"]
        if not _PCT_OK.match(raw):
            raise UrlError("invalid section")
        try:
            section = parse_section(unquote_to_bytes(raw))
        except ParseError:
            raise UrlError("invalid section") from None
    partial: tuple[int, int | None] | None = None
    if "PARTIAL" in fields:  # RFC 5092 §3.4: offset ["." length]
        off, dot, length = fields["PARTIAL"].partition(".")
        if not _NUMBER.match(off) or (dot and not _NZ.match(length)):
            raise UrlError("invalid partial range")
        partial = (int(off), int(length) if dot else None)
    return ImapUrl(int(fields["UID"]), mailbox, uidvalidity, section, partial, user, host, port)


def _decode(raw: str) -> str:
    if not _PCT_OK.match(raw):
        raise UrlError("invalid characters in the URL")
    try:
        return unquote_to_bytes(raw).decode("utf-8")  # RFC 5092 §3.2: UTF-8, percent-encoded
    except UnicodeDecodeError:
        raise UrlError("mailbox name is not UTF-8") from None
