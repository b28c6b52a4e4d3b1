"""The systemd readiness protocol (sd_notify(3)): READY=1, RELOADING=1, STOPPING=1, STATUS=...

systemd (`Type=notify`) passes NOTIFY_SOCKET, a Unix datagram socket ("@name" is in the abstract
namespace); the service sends newline-separated KEY=VALUE assignments to it. The protocol is one
datagram, so it is written here rather than pulled in with libsystemd. Without NOTIFY_SOCKET (not
started by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("postier")


def notify(*assignments: str) -> bool:
    """Send `assignments` ("READY=1", "STATUS=...") to systemd; True if sent."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace
    elif not path.startswith("/"):
        return False  # sd_notify(3) knows only these two forms (and vsock, which we do not use)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto("\n".join(assignments).encode(), path)
    except OSError as exc:
        log.warning("cannot notify the service manager at %s: %s", path, exc)
        return False
    return True


def ready(status: str = "") -> bool:
    """Every listener is bound and privileges are dropped: accepting connections."""
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    """A reload starts; MONOTONIC_USEC lets Type=notify-reload match it (systemd 253+)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")
