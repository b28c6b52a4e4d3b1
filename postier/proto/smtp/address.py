"""Envelope addresses: RFC 5321 §4.1.2 Path, Mailbox and Mail-parameters, with RFC 6531 SMTPUTF8.

Our own parser because the standard library parses RFC 5322 header addresses (display names, comments,
obsolete forms), not the stricter envelope grammar with source routes and address literals. Relay policy is
not decided here; `Address` only exposes the facts policy needs (source route, `%`, `!`, quoted `@`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

from .errors import AddressError

MAX_PATH_OCTETS: Final = 256  # RFC 5321 §4.5.3.1.3
MAX_DOMAIN_OCTETS: Final = 255  # RFC 5321 §4.5.3.1.2
MAX_LABEL_OCTETS: Final = 63  # RFC 1035 §2.3.4

_ATEXT: Final = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"  # RFC 5322 §3.2.3 atext
_NONASCII: Final = "\u0080-\U0010ffff"  # RFC 6531 §3.3: UTF8-non-ascii


def _path_regex(utf8: bool) -> re.Pattern[str]:
    na = _NONASCII if utf8 else ""
    dot_string = rf"[{_ATEXT}{na}]+(?:\.[{_ATEXT}{na}]+)*"  # RFC 5321 §4.1.2 Dot-string
    quoted = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{na}]|\\[\x20-\x7e])*"'  # RFC 5321 §4.1.2 Quoted-string
    domain = rf"[A-Za-z0-9.{na}\-]+"  # checked label by label in _check_domain
    literal = r"\[[\x21-\x5a\x5e-\x7e]+\]"  # RFC 5321 §4.1.3 address-literal (dcontent)
    at_domain = rf"@[A-Za-z0-9.{na}\-]+"
    return re.compile(
        rf"<(?:(?P<adl>{at_domain}(?:,{at_domain})*):)?"  # RFC 5321 §4.1.2 A-d-l (source route)
        rf"(?P<local>{dot_string}|{quoted})@(?P<domain>{domain}|{literal})>"
    )


_PATH: Final = {True: _path_regex(True), False: _path_regex(False)}
_DOT_STRING: Final = re.compile(rf"[{_ATEXT}{_NONASCII}]+(?:\.[{_ATEXT}{_NONASCII}]+)*")
_QUOTED_PAIR: Final = re.compile(r"\\(.)")
_KEYWORD: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")  # RFC 5321 §4.1.2 esmtp-keyword
_VALUE: Final = {  # RFC 5321 §4.1.2 esmtp-value; RFC 6531 §3.3 adds UTF8-non-ascii
    True: re.compile(rf"[\x21-\x3c\x3e-\x7e{_NONASCII}]+"),
    False: re.compile(r"[\x21-\x3c\x3e-\x7e]+"),
}
_XTEXT: Final = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")  # RFC 3461 §4


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed Path: local part (unquoted), domain (literals keep their brackets), the raw text."""

    local: str
    domain: str
    raw: str
    source_route: tuple[str, ...] = ()
    quoted: bool = False

    @property
    def is_null(self) -> bool:
        """RFC 5321 §4.5.5: the null reverse-path `<>` of bounces."""
        return not self.local and not self.domain and not self.quoted

    @property
    def is_postmaster(self) -> bool:
        """RFC 5321 §4.5.1: `<Postmaster>` without a domain, matched case-insensitively."""
        return not self.domain and self.local.lower() == "postmaster"

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def is_utf8(self) -> bool:
        """True when the mailbox needs SMTPUTF8 (RFC 6531 §3.4)."""
        return not (self.local.isascii() and self.domain.isascii())

    @property
    def percent_hack(self) -> bool:
        """`user%other@relay`: an old relay trick; policy should refuse it for foreign domains."""
        return "%" in self.local

    @property
    def bang_path(self) -> bool:
        """`host!user@relay`: a UUCP route in the local part; policy should refuse it."""
        return "!" in self.local

    @property
    def quoted_at(self) -> bool:
        """`"user@other"@relay`: a quoted local part hiding another address."""
        return self.quoted and "@" in self.local

    @property
    def mailbox(self) -> str:
        """Canonical `local@domain` (RFC 5321 §4.1.2: quote the local part only when it needs it)."""
        if self.is_null:
            return ""
        local = self.local
        if not _DOT_STRING.fullmatch(local):
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}" if self.domain else local

    def __str__(self) -> str:
        return self.mailbox


NULL_PATH: Final = Address("", "", "<>")


def _check_domain(domain: str, utf8: bool) -> None:
    if domain.startswith("["):
        _check_literal(domain[1:-1])
        return
    if len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        raise AddressError("domain too long")
    for label in domain.split("."):
        # RFC 5321 §4.1.2: sub-domain = Let-dig [Ldh-str]; RFC 6531 §3.3 allows U-labels
        if not label or label[0] == "-" or label[-1] == "-":
            raise AddressError(f"bad domain label in {domain!r}")
        if label.isascii():
            if len(label) > MAX_LABEL_OCTETS:
                raise AddressError("domain label too long")
        elif not utf8:
            raise AddressError("non-ASCII domain without SMTPUTF8")


def _check_literal(inner: str) -> None:
    # RFC 5321 §4.1.3: IPv4-address-literal / IPv6-address-literal; other tags are not registered for use
    try:
        if inner[:5].lower() == "ipv6:":
            if "%" in inner:  # scope ids are not part of the grammar
                raise ValueError(inner)
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError(f"bad address literal [{inner}]") from None


def parse_path(
    text: str, *, null_ok: bool = False, postmaster_ok: bool = False, utf8: bool = True
) -> tuple[Address, str]:
    """Parse one Path at the start of `text`; return it and the rest (the parameters, if any).

    `null_ok` accepts `<>` (MAIL, RFC 5321 §4.1.1.2); `postmaster_ok` accepts `<postmaster>` (RCPT,
    RFC 5321 §4.1.1.3); `utf8` allows RFC 6531 non-ASCII mailboxes.
    """
    if null_ok and text.startswith("<>"):
        return NULL_PATH, text[2:]
    if postmaster_ok and text[:12].lower() == "<postmaster>":
        return Address(text[1:11], "", text[:12]), text[12:]
    m = _PATH[utf8].match(text)
    if m is None:
        raise AddressError("malformed path")
    raw = m.group(0)
    if len(raw.encode("utf-8")) > MAX_PATH_OCTETS:
        raise AddressError("path too long")
    domain = m.group("domain")
    _check_domain(domain, utf8)
    route: tuple[str, ...] = ()
    if adl := m.group("adl"):
        # RFC 5321 §4.1.1.3 and Appendix C: parsed so that policy can refuse, never used for routing
        route = tuple(d[1:] for d in adl.split(","))
        for hop in route:
            _check_domain(hop, utf8)
    local = m.group("local")
    quoted = local.startswith('"')
    if quoted:
        local = _QUOTED_PAIR.sub(r"\1", local[1:-1])
    return Address(local, domain, raw, route, quoted), text[m.end() :]


def parse_params(text: str, *, utf8: bool = True) -> dict[str, str | None]:
    """RFC 5321 §4.1.2 Mail-parameters after a Path: `SP keyword[=value]...`; keywords upper-cased."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    if text[0] != " ":
        raise AddressError("parameters must follow the path after a space")
    for item in text.split(" "):
        if not item:
            continue  # tolerate repeated spaces
        key, eq, value = item.partition("=")
        if not _KEYWORD.fullmatch(key):
            raise AddressError(f"bad parameter keyword {key!r}")
        if eq and not _VALUE[utf8].fullmatch(value):
            raise AddressError(f"bad value for {key}")
        key = key.upper()
        if key in params:
            raise AddressError(f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def xtext_decode(text: str) -> str:
    """RFC 3461 §4 xtext (ENVID, ORCPT, AUTH=) to text."""
    if not _XTEXT.fullmatch(text):
        raise AddressError("malformed xtext")
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), text)


def xtext_encode(text: str) -> str:
    """RFC 3461 §4: `+`, `=`, controls, space and non-ASCII become `+XX` (UTF-8 octets)."""
    out: list[str] = []
    for ch in text:
        if "!" <= ch <= "~" and ch not in "+=":
            out.append(ch)
        else:
            out.extend(f"+{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)
