"""IMAP ENVELOPE (RFC 9051 §7.5.2, RFC 3501 §7.4.2) from a message header, with RFC 5322 §3.4
address lists (groups, obsolete routes) parsed leniently: never raising, like Dovecot.

Values stay raw octets as the RFC asks (RFC 2047 encoded words are not decoded); header values are
unfolded, and the Subject and display names also have each run of white space made one space (as
Dovecot sends them: ``for_humans``). Sender and Reply-To default to From when absent or empty. Addresses without a domain get
the host "MISSING_DOMAIN" and empty local parts "MISSING_MAILBOX" (Dovecot's convention), so that a
NIL host keeps meaning "group syntax".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postier.proto.imap.response import Raw, encode_nstring

from .mime import Part, decode_header_text

__all__ = [
    "ImapAddress", "ImapEnvelope", "address_text", "encode_envelope", "envelope", "envelope_bytes", "for_humans",
    "parse_addresses",
]

MISSING_DOMAIN = b"MISSING_DOMAIN"
MISSING_MAILBOX = b"MISSING_MAILBOX"
_MAX_ADDRESSES = 1000


@dataclass(frozen=True, slots=True)
class ImapAddress:
    """(name adl mailbox host); a group start is (None, None, group-name, None) and a group end
    is all None (RFC 9051 §7.5.2)."""

    name: bytes | None
    adl: bytes | None
    mailbox: bytes | None
    host: bytes | None


@dataclass(frozen=True, slots=True)
class ImapEnvelope:
    date: bytes | None
    subject: bytes | None
    from_: tuple[ImapAddress, ...] | None
    sender: tuple[ImapAddress, ...] | None
    reply_to: tuple[ImapAddress, ...] | None
    to: tuple[ImapAddress, ...] | None
    cc: tuple[ImapAddress, ...] | None
    bcc: tuple[ImapAddress, ...] | None
    in_reply_to: bytes | None
    message_id: bytes | None


def envelope(part: Part) -> ImapEnvelope:
    """The envelope of a message (the root Part or an encapsulated ``Part.message``).

    Like Dovecot: a repeated address field (two To: lines) contributes the addresses of all its
    occurrences; a repeated Date, Subject, In-Reply-To or Message-ID gives its last value.
    """

    def addresses(name: bytes) -> tuple[ImapAddress, ...] | None:
        found: list[ImapAddress] = []
        for f in part.headers(name):
            found.extend(parse_addresses(f.unfolded()))
        return tuple(found[:_MAX_ADDRESSES]) or None

    def last(name: bytes) -> bytes | None:
        value = None
        for f in part.headers(name):
            value = f.unfolded()
        return None if value is None else _no_nul(value)

    from_ = addresses(b"from")
    subject = last(b"subject")
    return ImapEnvelope(
        date=last(b"date"),
        subject=None if subject is None else for_humans(subject),
        from_=from_,
        sender=addresses(b"sender") or from_,  # RFC 9051 §7.5.2: default to from
        reply_to=addresses(b"reply-to") or from_,
        to=addresses(b"to"),
        cc=addresses(b"cc"),
        bcc=addresses(b"bcc"),
        in_reply_to=last(b"in-reply-to"),
        message_id=last(b"message-id"),
    )


_WSP_RUN = re.compile(rb"[ \t\r\n]+")


def for_humans(value: bytes) -> bytes:
    """Subject and display names as Dovecot sends them: unfolded (RFC 5322 §2.2.3), every run of
    white space (tab, a lone CR) one space, none at the ends; NUL as U+FFFD."""
    return _no_nul(_WSP_RUN.sub(b" ", value).strip(b" "))


def _no_nul(value: bytes) -> bytes:
    # an IMAP string cannot carry NUL (RFC 9051 §4.3); Dovecot shows U+FFFD
    return value.replace(b"\x00", "\ufffd".encode()) if b"\x00" in value else value


def encode_envelope(env: ImapEnvelope, *, utf8: bool = False) -> bytes:
    """RFC 9051 §9 envelope; address lists are ``"(" 1*address ")"`` with no space between."""

    def ns(v: bytes | None) -> bytes:
        return encode_nstring(v, utf8=utf8)

    def alist(addrs: tuple[ImapAddress, ...] | None) -> bytes:
        if addrs is None:
            return b"NIL"
        return b"(" + b"".join(
            b"(" + b" ".join((ns(a.name), ns(a.adl), ns(a.mailbox), ns(a.host))) + b")" for a in addrs
        ) + b")"

    return b"(" + b" ".join((
        ns(env.date), ns(env.subject), alist(env.from_), alist(env.sender), alist(env.reply_to),
        alist(env.to), alist(env.cc), alist(env.bcc), ns(env.in_reply_to), ns(env.message_id),
    )) + b")"


def envelope_bytes(part: Part, *, utf8: bool = False) -> Raw:
    """The serialised ENVELOPE of ``part`` (8-bit values as literals unless ``utf8``)."""
    return Raw(encode_envelope(envelope(part), utf8=utf8))


# -- RFC 5322 §3.4 address lists --------------------------------------------------------------------

_SPECIALS = b"()<>[]:;@\\,.\""

# A token: (kind, text, preceded by whitespace). kind is "q" quoted string (unquoted text), "a" atom,
# "l" domain literal, "c" comment, or the special character itself.
type _Tok = tuple[str, bytes, bool]


def _tokens(s: bytes) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n = 0, len(s)
    space = False
    while i < n and len(toks) < 20_000:
        c = s[i]
        if c in b" \t\r\n":
            space = True
            i += 1
            continue
        if c == 0x22:  # quoted-string
            out = bytearray()
            i += 1
            while i < n and s[i] != 0x22:
                if s[i] == 0x5C and i + 1 < n:
                    i += 1
                out.append(s[i])
                i += 1
            toks.append(("q", bytes(out), space))
            i += 1
        elif c == 0x28:  # comment, nested
            depth, j = 0, i
            while j < n:
                if s[j] == 0x5C:
                    j += 2
                    continue
                if s[j] == 0x28:
                    depth += 1
                elif s[j] == 0x29:
                    depth -= 1
                    if depth == 0:
                        break
                j += 1
            toks.append(("c", s[i + 1 : j].strip(), space))
            i = j + 1
        elif c == 0x5B:  # domain literal
            j = s.find(b"]", i)
            j = n - 1 if j < 0 else j
            toks.append(("l", s[i : j + 1], space))
            i = j + 1
        elif c in _SPECIALS:
            toks.append((chr(c), bytes([c]), space))
            i += 1
        else:
            j = i
            while j < n and s[j] not in _SPECIALS and s[j] not in b" \t\r\n":
                j += 1
            toks.append(("a", s[i:j], space))
            i = j
        space = False
    return toks


def _phrase(words: list[_Tok]) -> bytes | None:
    """Display name: words with single spaces where the header had whitespace; quotes removed."""
    out = b""
    for _kind, text, space in words:
        out += (b" " if space and out else b"") + text
    return out or None


def _name(value: bytes | None) -> bytes | None:
    return None if value is None else for_humans(value) or None


def _join(words: list[_Tok]) -> bytes:
    return b"".join(text for kind, text, _ in words if kind != "c")


def parse_addresses(value: bytes) -> tuple[ImapAddress, ...]:
    """Parse an address-list header value (unfolded); junk is skipped, never raised."""
    toks = _tokens(value)
    out: list[ImapAddress] = []
    i, n = 0, len(toks)
    in_group = False
    while i < n and len(out) < _MAX_ADDRESSES:
        words: list[_Tok] = []
        comment: bytes | None = None
        while i < n and toks[i][0] not in ("<", ":", ";", ",", "@", ">"):
            if toks[i][0] == "c":
                comment = toks[i][1] or comment
            else:
                words.append(toks[i])
            i += 1
        kind = toks[i][0] if i < n else ""
        if kind == ":" and not in_group:  # group start: display-name ":"
            out.append(ImapAddress(None, None, _phrase(words) or b"", None))
            in_group = True
            i += 1
            continue
        if kind == "<":
            addr, i = _angle_addr(toks, i + 1, _name(_phrase(words) or comment))
            if addr is not None:
                out.append(addr)
        elif kind == "@":
            j = i + 1
            domain: list[_Tok] = []
            after: bytes | None = None
            while j < n and toks[j][0] not in (",", ";", "<", ">", ":"):
                if toks[j][0] == "c":
                    after = toks[j][1] or after
                domain.append(toks[j])
                j += 1
            host = _join(domain) or MISSING_DOMAIN
            # "user@host (Real Name)": a comment after the address stands in for the display name
            # (one before it does not, as in Dovecot)
            out.append(ImapAddress(_name(after), None, _join(words) or MISSING_MAILBOX, host))
            i = j
        elif words:  # a bare local part ("undisclosed-recipients", "root")
            out.append(ImapAddress(_name(comment), None, _join(words), MISSING_DOMAIN))
        # skip to the next separator
        while i < n and toks[i][0] not in (",", ";"):
            i += 1
        if i < n and toks[i][0] == ";":
            if in_group:
                out.append(ImapAddress(None, None, None, None))  # group end
                in_group = False
            i += 1
        elif i < n:
            i += 1
    if in_group:
        out.append(ImapAddress(None, None, None, None))  # unterminated group
    return tuple(out)


def _angle_addr(toks: list[_Tok], i: int, name: bytes | None) -> tuple[ImapAddress | None, int]:
    n = len(toks)
    j = i
    while j < n and toks[j][0] != ">":
        j += 1
    inner = [t for t in toks[i:j] if t[0] != "c"]
    i = j + 1 if j < n else j
    adl: bytes | None = None
    # obs-route: "@a,@b:" before the addr-spec (RFC 5322 §4.4)
    colon = next((k for k, t in enumerate(inner) if t[0] == ":"), None)
    if colon is not None and inner and inner[0][0] == "@":
        adl = _join(inner[:colon])
        inner = inner[colon + 1 :]
    if not inner:
        return ImapAddress(name, adl, MISSING_MAILBOX, MISSING_DOMAIN), i  # "<>", as Dovecot shows it
    at = max((k for k, t in enumerate(inner) if t[0] == "@"), default=None)
    if at is None:
        return ImapAddress(name, adl, _join(inner), MISSING_DOMAIN), i
    local = _join(inner[:at]) or MISSING_MAILBOX
    host = _join(inner[at + 1 :]) or MISSING_DOMAIN
    return ImapAddress(name, adl, local, host), i


def address_text(value: bytes) -> str:
    """An address field as SEARCH FROM/TO/CC/BCC sees it (as Dovecot does): the parsed addresses
    written out again, ``Name <local@domain>`` or ``local@domain``, names with RFC 2047 words
    decoded and quoted when they hold specials, groups as ``Team: ...;``, comments and folding
    gone. So ``<user (comment)@ (comment) domain.org>`` is found as "user@domain.org"."""
    out: list[str] = []
    for a in parse_addresses(value):
        if a.host is None:
            out.append(";" if a.mailbox is None else decode_header_text(a.mailbox) + ":")
            continue
        local = (a.mailbox or b"").decode("utf-8", "replace")
        spec = local if a.host == MISSING_DOMAIN else local + "@" + a.host.decode("utf-8", "replace")
        if a.name is None:
            out.append(spec)
            continue
        name = decode_header_text(a.name)
        if any(c in name for c in '()<>[]:;@\\,."'):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        out.append(f"{name} <{spec}>")
    return ", ".join(out)
