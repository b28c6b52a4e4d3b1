"""Sieve comparators (RFC 4790, RFC 5228 §2.7.3) and match types :is/:contains/:matches (RFC 5228 §2.7.1),
:value/:count (RFC 5231) and :regex (draft-ietf-sieve-regex-01), with match variables (RFC 5229 §3.2).

:regex and :matches run on the ``regex`` package rather than ``re`` because it takes a timeout: a
single backtracking search (``(a|aa)+$`` on 33 characters took 1.6 s in ``re`` here) is the one piece
of a script the step budget cannot bound, so every search gets ``timeout`` seconds (the interpreter
passes what is left of its per-run budget) and raises ``MatchTimeout`` past it. Patterns are at most
``MAX_REGEX`` characters and cached; POSIX bracket classes (``[[:alpha:]]``) are translated; subjects
are capped at ``MAX_SUBJECT``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache

import regex

__all__ = [
    "COMPARATORS", "MAX_REGEX", "MatchError", "MatchTimeout", "compare_relational", "glob_match", "match_value",
    "regex_compile",
]

MAX_REGEX = 1024
MAX_SUBJECT = 1 << 20


class MatchError(Exception):
    """A key that cannot be used (bad regex); a runtime error of the script."""


class MatchTimeout(MatchError):
    """A :matches or :regex search ran past its time budget."""


COMPARATORS = ("i;octet", "i;ascii-casemap", "i;ascii-numeric", "i;unicode-casemap")


def _ascii_lower(s: str) -> str:
    """RFC 4790 §9.2 i;ascii-casemap: only a-z/A-Z fold."""
    return s.translate(_ASCII_FOLD)


_ASCII_FOLD = {ord(c): ord(c) + 32 for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


def _fold(comparator: str) -> Callable[[str], str]:
    if comparator == "i;ascii-casemap":
        return _ascii_lower
    if comparator == "i;unicode-casemap":  # RFC 5051: titlecase-folded; casefold() is close
        return str.casefold
    return lambda s: s


def _numeric(s: str) -> int | None:
    """RFC 4790 §9.1 i;ascii-numeric: the leading digits; None (positive infinity) without any."""
    m = re.match(r"[0-9]+", s)
    return int(m.group()) if m else None


def compare_relational(comparator: str, rel: str, value: str, key: str) -> bool:
    """RFC 5231 §4: value REL key under the comparator's ordering."""
    c: int
    if comparator == "i;ascii-numeric":
        a, b = _numeric(value), _numeric(key)
        if a is None and b is None:
            c = 0
        elif a is None:
            c = 1
        elif b is None:
            c = -1
        else:
            c = (a > b) - (a < b)
    else:
        f = _fold(comparator)
        va, vb = f(value), f(key)
        if comparator == "i;octet":
            ea, eb = va.encode("utf-8", "surrogateescape"), vb.encode("utf-8", "surrogateescape")
            c = (ea > eb) - (ea < eb)
        else:
            c = (va > vb) - (va < vb)
    return {"gt": c > 0, "ge": c >= 0, "lt": c < 0, "le": c <= 0, "eq": c == 0, "ne": c != 0}[rel]


def glob_match(pattern: str, value: str, comparator: str, timeout: float | None = None) -> list[str] | None:
    """RFC 5228 §2.7.1 :matches: "*" any sequence, "?" one character, "\\" quotes; returns the
    match values (RFC 5229 §3.2: ${0} the whole value, then one per wildcard) or None."""
    rx = _glob_regex(pattern, comparator)
    try:
        m = rx.fullmatch(value, timeout=timeout)
    except TimeoutError:
        raise MatchTimeout(":matches took too long") from None
    if m is None:
        return None
    return [m.group(0), *(g or "" for g in m.groups())]


@lru_cache(maxsize=256)
def _glob_regex(pattern: str, comparator: str) -> regex.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append("(.*?)")  # RFC 5229 §3.2: shortest match for the earlier wildcards
        elif c == "?":
            out.append("(.)")
        else:
            out.append(re.escape(c))
        i += 1
    flags = regex.DOTALL | regex.VERSION0
    if comparator == "i;ascii-casemap":
        flags |= regex.IGNORECASE | regex.ASCII
    elif comparator == "i;unicode-casemap":
        flags |= regex.IGNORECASE
    return regex.compile("".join(out), flags)


_POSIX_CLASSES = {
    "alpha": "a-zA-Z", "digit": "0-9", "alnum": "a-zA-Z0-9", "upper": "A-Z", "lower": "a-z",
    "space": " \\t\\r\\n\\v\\f", "blank": " \\t", "punct": "!-/:-@\\[-`{-~", "xdigit": "0-9A-Fa-f",
    "cntrl": "\\x00-\\x1f\\x7f", "print": " -~", "graph": "!-~", "word": "\\w",
}


def regex_compile(pattern: str, comparator: str) -> regex.Pattern[str]:
    """Compile a :regex key (bounded size); raises MatchError for an invalid or oversized one."""
    if len(pattern) > MAX_REGEX:
        raise MatchError(f"regular expression longer than {MAX_REGEX} characters")
    return _regex(pattern, comparator)


@lru_cache(maxsize=256)
def _regex(pattern: str, comparator: str) -> regex.Pattern[str]:
    translated = re.sub(r"\[:([a-z]+):\]", lambda m: _POSIX_CLASSES.get(m.group(1), m.group(0)), pattern)
    flags = regex.VERSION0
    if comparator == "i;ascii-casemap":
        flags |= regex.IGNORECASE | regex.ASCII
    elif comparator == "i;unicode-casemap":
        flags |= regex.IGNORECASE
    try:
        return regex.compile(translated, flags)
    except (regex.error, RecursionError, OverflowError) as e:
        raise MatchError(f"invalid regular expression {pattern!r}: {e}") from None


def match_value(match: str, comparator: str, rel: str | None, value: str, key: str,
                timeout: float | None = None) -> list[str] | None:
    """Whether ``value`` matches ``key``; the match values for :matches/:regex (else an empty list)
    when it does, None when it does not. :count is evaluated by the caller."""
    value = value[:MAX_SUBJECT]
    if match == "is":  # RFC 5228 §2.7.1
        if comparator == "i;ascii-numeric":
            return [] if compare_relational(comparator, "eq", value, key) else None
        f = _fold(comparator)
        return [] if f(value) == f(key) else None
    if match == "contains":
        f = _fold(comparator)
        return [] if f(key) in f(value) else None
    if match == "matches":
        if "*" not in key and "?" not in key and "\\" not in key:  # no wildcard: plain equality
            f = _fold(comparator)
            return [value] if f(value) == f(key) else None
        return glob_match(key, value, comparator, timeout)
    if match == "value":  # RFC 5231 §4.1
        assert rel is not None
        return [] if compare_relational(comparator, rel, value, key) else None
    if match == "regex":
        try:
            m = regex_compile(key, comparator).search(value, timeout=timeout)
        except TimeoutError:
            raise MatchTimeout(":regex took too long") from None
        if m is None:
            return None
        return [m.group(0), *(g or "" for g in m.groups())]
    raise MatchError(f"unknown match type {match}")
