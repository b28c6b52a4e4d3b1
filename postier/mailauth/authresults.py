"""Authentication-Results header fields (RFC 8601): writing ours, removing forged ones (§5).

The result clauses are rendered by the `authres` package; we fold one clause per line and keep
every property value printable ASCII. `strip_forged` is a small scanner of our own: it must remove
a header claiming our authserv-id even when the rest of that header would not parse.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from authres import DKIMAuthenticationResult, SPFAuthenticationResult
from authres.core import AuthenticationResult, AuthenticationResultProperty
from authres.dmarc import DMARCAuthenticationResult

from postier.message.rewrite import filter_fields
from postier.mailauth.dkim import DKIMResult
from postier.mailauth.dmarc import DMARCResult, DMARCStatus
from postier.mailauth.spf import SPFResult

__all__ = ["authentication_results", "strip_forged", "authserv_id_of"]

HEADER = "Authentication-Results"
_SAFE_ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+$")
_SAFE_DOMAIN = re.compile(r"^[A-Za-z0-9_.-]+$")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")
_AUTHSERV_ID = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`{|}~-]+$")  # RFC 8601 §2.2: a value (token form)


def _clean(value: str) -> str:
    return _UNPRINTABLE.sub("?", value)[:256]


def _address(identity: str) -> str:
    """An address as an RFC 8601 pvalue: the whole address when plain, else just its domain."""
    if _SAFE_ADDRESS.match(identity):
        return identity
    domain = identity.rpartition("@")[2]
    return domain if _SAFE_DOMAIN.match(domain) else _clean(domain)


def _spf_clause(result: SPFResult) -> AuthenticationResult:
    # RFC 8601 §2.7.2: smtp.mailfrom, or smtp.helo for the HELO identity (null sender, RFC 7208 §2.4)
    if result.scope == "helo":
        return SPFAuthenticationResult(result=result.status.value, smtp_helo=_clean(result.domain) or "unknown")
    return SPFAuthenticationResult(result=result.status.value,
                                   smtp_mailfrom=_address(result.identity or result.domain) or "unknown")


def _dkim_clause(result: DKIMResult) -> AuthenticationResult:
    # RFC 8601 §2.7.1; header.b from RFC 6008 tells several signatures of one domain apart
    clause = DKIMAuthenticationResult(
        result=result.status.value,
        reason=None if result.status.value == "pass" else _clean(result.reason) or None,
        header_d=_clean(result.domain) or None, header_s=_clean(result.selector) or None,
        header_a=_clean(result.algorithm) or None)
    if result.b:
        clause.properties.append(AuthenticationResultProperty("header", "b", _clean(result.b)))
    return clause


def _dmarc_clause(result: DMARCResult) -> AuthenticationResult:
    comment = None
    if result.status in (DMARCStatus.PASS, DMARCStatus.FAIL):
        comment = f"p={result.policy.value} dis={result.disposition.value}"
    return DMARCAuthenticationResult(result=result.status.value, result_comment=comment,
                                     header_from=_clean(result.domain) or None)


def authentication_results(authserv_id: str, *, spf: SPFResult | None = None, helo: SPFResult | None = None,
                           dkim: Sequence[DKIMResult] | None = None, dmarc: DMARCResult | None = None,
                           arc: tuple[str, str] | None = None) -> bytes:
    """The header field to prepend, CRLF-terminated and folded one result per line.

    `dkim=None` leaves DKIM out; an empty sequence reports "dkim=none" (the message was not signed).
    `arc` is the ARC chain validation (status, reason), RFC 8617 §2.2; None leaves it out.
    """
    if not _AUTHSERV_ID.match(authserv_id):
        raise ValueError(f"authserv-id {authserv_id!r} is not a valid RFC 8601 value")
    clauses: list[str] = []
    if spf is not None:
        clauses.append(str(_spf_clause(spf)))
    if helo is not None and (spf is None or spf.scope != "helo"):
        clauses.append(str(_spf_clause(helo)))
    if dkim is not None:
        clauses.extend([str(_dkim_clause(r)) for r in dkim] or ["dkim=none"])
    if dmarc is not None:
        clauses.append(str(_dmarc_clause(dmarc)))
    if arc is not None:  # RFC 8617 §2.2: arc=none / pass / fail
        status, reason = arc
        clauses.append(str(AuthenticationResult(
            method="arc", result=status if status in ("none", "pass", "fail") else "fail",
            reason=_clean(reason) or None if status == "fail" else None)))
    if not clauses:
        clauses.append("none")  # RFC 8601 §2.2: no method was applied
    body = ";\r\n\t".join(clauses)
    return f"{HEADER}: {authserv_id.lower()};\r\n\t{body}\r\n".encode("ascii")


def _skip_cfws(text: str, i: int) -> int:
    """Skip folding white space and (nested) comments, RFC 5322 §3.2.2."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in " \t\r\n":
            break
        i += 1
    return i


def authserv_id_of(value: str) -> str:
    """The authserv-id of an Authentication-Results field value (lower case; "" if none)."""
    i = _skip_cfws(value, 0)
    if value[i:i + 1] == '"':
        out: list[str] = []
        i += 1
        while i < len(value) and value[i] != '"':
            if value[i] == "\\":
                i += 1
            out.append(value[i:i + 1])
            i += 1
        return "".join(out).lower()
    m = re.match(r"[^\s;()\"]+", value[i:])
    return m.group(0).lower() if m else ""


def strip_forged(message: bytes, authserv_id: str) -> bytes:
    """Remove Authentication-Results fields that claim our authserv-id (RFC 8601 §5).

    `message` is a whole message or its header section; the body and every other field are kept
    byte for byte.
    """
    ours = authserv_id.lower()
    return filter_fields(message, lambda name, value, _i: name == b"authentication-results"
                         and authserv_id_of(value.decode("utf-8", "replace")) == ours)
