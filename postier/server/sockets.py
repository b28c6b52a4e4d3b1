"""Listening sockets, bound before anything else runs (so that `serve` can then drop root).

`bind_all(config)` opens every configured listener: TCP (`address`, `port`; "*" or "" = every
address, IPv6 and IPv4 in one dual-stack socket where the system has one) or a Unix socket (`path`,
see unixsock.py). The caller hands them to asyncio (`ListenerSet.start(sockets)`) once privileges
are dropped; a port that is taken is reported by role and address before any service starts.
"""

from __future__ import annotations

import socket
from pathlib import Path

from ..config import Config, Listener
from . import unixsock

BACKLOG = 1024


class BindError(OSError):
    """A listener could not be opened; str() names the role and the address."""


def where(lst: Listener) -> str:
    return str(lst.path) if lst.path is not None else f"{lst.address}:{lst.port}"


def bind(lst: Listener) -> socket.socket:
    """One bound socket for `lst`. It does not listen yet: asyncio calls listen() when the server
    starts serving, so a client connecting earlier is refused rather than left waiting unanswered."""
    if lst.path is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(unixsock.prepare(lst.path))
            unixsock.finish(lst.path)
        except BaseException:
            sock.close()
            raise
        return sock
    if lst.address in ("*", ""):
        dual = socket.has_dualstack_ipv6()
        family, addr = (socket.AF_INET6, ("::", lst.port)) if dual else (socket.AF_INET, ("0.0.0.0", lst.port))
    else:
        infos = socket.getaddrinfo(lst.address, lst.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sa = infos[0]
        addr, dual = (str(sa[0]), int(sa[1])), False
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old connections linger
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual else 1)
        sock.bind(addr)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_all(cfg: Config, roles: set[str] | None = None) -> dict[str, socket.socket]:
    """Every listener of `cfg` (or only `roles`), by role; on failure none stays open."""
    out: dict[str, socket.socket] = {}
    try:
        for role, lst in cfg.listeners.items():
            if roles is not None and role not in roles:
                continue
            try:
                out[role] = bind(lst)
            except OSError as exc:
                raise BindError(exc.errno, f"{role} on {where(lst)}: {exc.strerror or exc}") from None
    except BaseException:
        for s in out.values():
            s.close()
        raise
    return out


def owned_paths(cfg: Config) -> list[Path]:
    """Files the listeners create (Unix sockets and their directories), for a handover of ownership."""
    out: list[Path] = []
    for lst in cfg.listeners.values():
        if lst.path is not None:
            out += [lst.path.parent, lst.path]
    return out
