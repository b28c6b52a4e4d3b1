"""The checks of `postier status` and the admin console's health page: listeners answering, the
certificate, who the server runs as, the queue, the last hour's figures (server/stats.py), disk space.

Each check adds lines to a `Report` (ok, or a problem that needs attention); `postier status` prints
them, the admin console shows them.
"""

from __future__ import annotations

import datetime
import os
import pwd
import socket
import time
from pathlib import Path

from ..config import Config
from . import reload, stats
from .sockets import where

__all__ = ["Report", "check_all"]

CERT_WARN_DAYS = 14  # renew before this (Let's Encrypt renews at 30 days left)
QUEUE_WARN_AGE = 86400.0  # a message waiting longer than a day
DISK_WARN_FRACTION = 0.05
DISK_WARN_BYTES = 1 << 30
STATS_STALE = 4 * stats.INTERVAL


class Report:
    def __init__(self) -> None:
        self.problems = 0
        self.lines: list[tuple[bool, str]] = []  # (fine, text), in order

    def ok(self, text: str) -> None:
        self.lines.append((True, text))

    def bad(self, text: str) -> None:
        self.problems += 1
        self.lines.append((False, text))


def _answers(cfg: Config, role: str) -> bool:
    lst = cfg.listeners[role]
    try:
        if lst.path is not None:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(3)
                s.connect(str(lst.path))
        else:
            host = "127.0.0.1" if lst.address in ("*", "", "0.0.0.0") else (
                "::1" if lst.address == "::" else lst.address)
            socket.create_connection((host, lst.port), timeout=3).close()
    except OSError:
        return False
    return True


def _certificate(cfg: Config, r: Report) -> None:
    if cfg.tls.cert is None:
        r.ok("certificate: none configured (no TLS)")
        return
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(cfg.tls.cert.read_bytes())
    except (OSError, ValueError) as exc:
        r.bad(f"certificate: cannot read {cfg.tls.cert}: {exc}")
        return
    left = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    days = left.days
    subject, issuer = cert.subject.rfc4514_string(), cert.issuer.rfc4514_string()
    line = f"certificate: {subject}, issued by {issuer}{' (self-signed)' if subject == issuer else ''}, "
    if left.total_seconds() <= 0:
        r.bad(line + f"EXPIRED {-days} days ago")
    elif days < CERT_WARN_DAYS:
        r.bad(line + f"{days} days left: renew it (then `postier reload`)")
    else:
        r.ok(line + f"{days} days left")


def _process(cfg: Config, r: Report) -> bool:
    pid = reload.running_pid(cfg)
    if pid is None:
        r.bad(f"server: not running (no live pid in {reload.pid_file(cfg)})")
        return False
    uid = gid = -1
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[2])  # effective
        elif line.startswith("Gid:"):
            gid = int(line.split()[2])
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    text = f"server: pid {pid}, running as {name} (uid {uid}, gid {gid})"
    if uid == 0 and not cfg.server.allow_root:
        r.bad(text + ": root, but [server] allow_root is not set")
    elif cfg.server.user and name != cfg.server.user:
        r.bad(text + f", not [server] user {cfg.server.user}")
    else:
        r.ok(text)
    return True


def _queue(cfg: Config, r: Report) -> None:
    from ..queue.cluster import open_spool
    from ..store.errors import StoreUnavailable

    spool = open_spool(cfg)  # in cluster mode, the queue every node shares
    try:
        n, oldest = spool.summary()
    except StoreUnavailable as exc:
        r.bad(f"queue: {exc}")
        return
    finally:
        spool.close()
    if not n or oldest is None:
        r.ok("queue: empty")
        return
    age = time.time() - oldest
    text = f"queue: {n} message{'s' if n != 1 else ''}, oldest {age / 3600:.1f} hours"
    if age > QUEUE_WARN_AGE:
        r.bad(text + " (see `postier queue list`)")
    else:
        r.ok(text)


def _traffic(cfg: Config, r: Report, running: bool) -> None:
    data = stats.read(cfg.data_dir)
    if data is None:
        r.ok("last hour: no figures yet")
        return
    counts = data.get("last_hour")
    written = data.get("written")
    if not isinstance(counts, dict) or not isinstance(written, (int, float)):
        r.bad(f"last hour: unreadable {stats.path(cfg.data_dir)}")
        return
    text = (f"last hour: {counts.get('accepted', 0)} messages accepted, {counts.get('refused', 0)} refusals, "
            f"{counts.get('deferred', 0)} deferrals")
    if running and time.time() - written > STATS_STALE:
        r.bad(text + f" (figures {int(time.time() - written)} s old: is the server stuck?)")
    else:
        r.ok(text)


def _disk(cfg: Config, r: Report) -> None:
    st = os.statvfs(cfg.data_dir)
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    text = f"disk: {free / (1 << 30):.1f} GiB free of {total / (1 << 30):.1f} GiB in {cfg.data_dir}"
    if total and (free < DISK_WARN_BYTES or free / total < DISK_WARN_FRACTION):
        r.bad(text)
    else:
        r.ok(text)


def _quotas(cfg: Config, r: Report) -> None:
    """Users at 95 % of their storage quota or more (store/quota.py), each a problem line."""
    from ..store.accountdb import open_accounts
    from ..store.quota import WARN_LEVELS, user_usages

    accounts = open_accounts(cfg)
    try:
        users = [u for u in accounts.list_users() if u.quota is not None]
    finally:
        accounts.close()
    full = [(u, g) for u, g in user_usages(cfg.mail_root, users) if g.percent >= WARN_LEVELS[-1]]
    for u, g in full:
        r.bad(f"quota: {u.address} at {g.percent}% ({g.bytes} of {g.limit} bytes)")
    if not full:
        r.ok(f"quotas: {len(users)} user{'s' if len(users) != 1 else ''} with a quota, none at "
             f"{WARN_LEVELS[-1]}% or more")


def check_all(cfg: Config) -> Report:
    """Every check, in the order `postier status` prints them (blocking: sockets, files)."""
    r = Report()
    running = _process(cfg, r)
    for role, lst in cfg.listeners.items():
        if running and not _answers(cfg, role):
            r.bad(f"listener {role} on {where(lst)}: not answering")
        else:
            r.ok(f"listener {role} on {where(lst)}" + (": answering" if running else ""))
    _certificate(cfg, r)
    _queue(cfg, r)
    _traffic(cfg, r, running)
    _disk(cfg, r)
    _quotas(cfg, r)
    return r
