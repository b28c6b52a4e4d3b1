"""Which mailboxes LIST and LSUB name, with which attributes (RFC 9051 §6.3.9, RFC 3501 §6.3.9,
RFC 5258 LIST-EXTENDED, RFC 6154 SPECIAL-USE, RFC 3348 CHILDREN), from the folders and
subscriptions the store reports: pure functions, no I/O; the driver writes the responses.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

from .commands import List

__all__ = ["ListEntry", "list_entries", "lsub_entries", "pattern_matcher"]

INBOX = "INBOX"


@dataclass(frozen=True, slots=True)
class ListEntry:
    name: str
    attributes: tuple[str, ...]
    childinfo: tuple[str, ...] = ()  # RFC 5258 §3.5 CHILDINFO extended data


def pattern_matcher(reference: str, pattern: str, separator: str) -> Callable[[str], bool]:
    """RFC 9051 §6.3.9 LIST matching: "*" matches anything, "%" anything but the separator;
    the INBOX component is case-insensitive."""
    full = reference + pattern
    if full[:5].upper() == INBOX and (len(full) == 5 or full[5] in (separator, "*", "%")):
        full = INBOX + full[5:]
    rx = re.compile("".join(
        ".*" if ch == "*" else f"[^{re.escape(separator)}]*" if ch == "%" else re.escape(ch) for ch in full),
        re.DOTALL)
    return lambda name: rx.fullmatch(name) is not None


def _parents(names: Collection[str], separator: str) -> set[str]:
    """The names that have at least one child among `names` (or implied by a deeper name)."""
    out: set[str] = set()
    for n in names:
        parts = n.split(separator)
        for i in range(1, len(parts)):
            out.add(separator.join(parts[:i]))
    return out


def _order(name: str) -> tuple[bool, str]:
    return name != INBOX, name


def list_entries(cmd: List, folders: Mapping[str, str], subscriptions: Collection[str],
                 separator: str) -> list[ListEntry]:
    """The LIST answer. `folders`: every existing folder -> its special-use attribute ("" if none)."""
    ext = cmd.extended
    sel_opts = cmd.selection
    if not cmd.patterns or cmd.patterns == ("",) and not ext:
        return [ListEntry("", ("\\Noselect",))]  # RFC 9051 §6.3.9: the hierarchy delimiter
    subs = set(subscriptions)
    universe = set(folders) | _parents(folders, separator)
    want_subscribed = "SUBSCRIBED" in sel_opts
    if want_subscribed:
        universe |= subs
    matchers = [pattern_matcher(cmd.reference, p, separator) for p in cmd.patterns if p != ""]
    children = _parents(universe, separator)
    # RFC 5258 §3.5 CHILDINFO: a parent that matches but is not subscribed is listed only for a
    # subscribed descendant that the patterns do not list themselves.
    sub_parents = _parents({n for n in subs if not any(m(n) for m in matchers)}, separator) \
        if "RECURSIVEMATCH" in sel_opts else set()
    out: list[ListEntry] = []
    for name in sorted(universe, key=_order):
        if not any(m(name) for m in matchers):
            continue
        use = folders.get(name, "")
        childinfo: tuple[str, ...] = ()
        if want_subscribed and name not in subs:
            if name not in sub_parents:
                continue
            childinfo = ("SUBSCRIBED",)
        if "SPECIAL-USE" in sel_opts and not use:
            continue
        attrs: list[str] = []
        if name not in folders:
            attrs.append("\\NonExistent" if ext else "\\Noselect")
        attrs.append("\\HasChildren" if name in children else "\\HasNoChildren")
        if use:
            attrs.append(use)
        if (want_subscribed or cmd.returns.subscribed) and name in subs:
            attrs.append("\\Subscribed")
        out.append(ListEntry(name, tuple(attrs), childinfo))
    return out


def lsub_entries(reference: str, pattern: str, subscriptions: Collection[str], folders: Collection[str],
                 separator: str) -> list[ListEntry]:
    """The LSUB answer (RFC 3501 §6.3.9): subscribed names that match; a matching parent of a
    subscribed name that does not match is listed \\Noselect."""
    if pattern == "":
        return [ListEntry("", ("\\Noselect",))]
    m = pattern_matcher(reference, pattern, separator)
    subs = set(subscriptions)
    seen: set[str] = set()
    out: list[ListEntry] = []
    for name in sorted(subs, key=_order):
        if m(name):
            if name not in seen:
                seen.add(name)
                out.append(ListEntry(name, () if name in folders else ("\\Noselect",)))
            continue
        parts = name.split(separator)
        for i in range(len(parts) - 1, 0, -1):
            parent = separator.join(parts[:i])
            if m(parent) and parent not in seen and parent not in subs:
                seen.add(parent)
                out.append(ListEntry(parent, ("\\Noselect",)))
                break
    return out
