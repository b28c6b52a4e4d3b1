"""Least privilege: the service user, dropping root after the listeners are bound, never regaining it.

`serve` started as root binds every listener first (ports below 1024 need root or
CAP_NET_BIND_SERVICE), then drops to `[server] user`/`group` in the only safe order (supplementary
groups, then the group, then the user: setuid first would leave no right to change groups) and checks
that root cannot be regained, before it opens a database, starts the delivery agent or accepts a
connection: every session, parser and child process runs unprivileged. Started as another user it
simply runs as that user. Staying root is refused unless `[server] allow_root` says so.

Admin commands run as root (`user add`, `dkim generate`, `queue delete`, ...) drop to the same user
before they touch the data directory, so they never leave root-owned files the server cannot write.
`quickstart` run as root creates the system user (`useradd --system`, as Debian's packages create
theirs) and hands the data directory over to it. Files created at run time are private (umask 0077).
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import subprocess
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("postier")

#: The user quickstart creates when it runs as root.
DEFAULT_USER = "postier"
#: Run-time files are never world- or group-readable (mail, keys, databases).
UMASK = 0o077


class PrivilegeError(Exception):
    """Dropping privileges failed or could be undone; str() is one line for the admin."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int


def lookup(user: str, group: str = "") -> Identity:
    """uid and gid of `user` (and of `group`, default the user's primary group)."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"server.user: no such user: {user!r}") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise PrivilegeError(f"server.group: no such group: {group!r}") from None
    return Identity(user, pw.pw_uid, gid)


def drop(ident: Identity) -> None:
    """Become `ident` for good: supplementary groups, gid, uid, in that order; then verify."""
    os.initgroups(ident.user, ident.gid)  # the user's own supplementary groups, root's are gone
    os.setresgid(ident.gid, ident.gid, ident.gid)  # real, effective and saved: no way back
    os.setresuid(ident.uid, ident.uid, ident.uid)
    verify(ident)


def verify(ident: Identity) -> None:
    """Raise unless we are `ident` in every id and root cannot be regained."""
    if os.getresuid() != (ident.uid,) * 3 or os.getresgid() != (ident.gid,) * 3:
        raise PrivilegeError(f"could not become {ident.user}: uids {os.getresuid()}, gids {os.getresgid()}")
    if ident.uid != 0:
        for regain in (os.setuid, os.seteuid, os.setgid):
            try:
                regain(0)
            except PermissionError:
                continue
            raise PrivilegeError(f"dropped to {ident.user} but could switch back to root")
        if ident.gid != 0 and 0 in os.getgroups():
            raise PrivilegeError(f"dropped to {ident.user} but still in group root")


def service_identity(user: str, group: str) -> Identity | None:
    """Who the configured service runs as, or None when no user is configured."""
    return lookup(user, group) if user else None


def after_bind(user: str, group: str, allow_root: bool, own: list[Path]) -> None:
    """In `serve`, once every listener is bound: drop to the service user when root, hand it the
    files bound as root (`own`: Unix sockets and their directory), refuse to stay root unless allowed."""
    os.umask(UMASK)
    ident = service_identity(user, group)
    if os.geteuid() == 0 and ident is not None and ident.uid != 0:
        for p in own:
            os.chown(p, ident.uid, ident.gid)
        drop(ident)
        log.info("running as %s (uid %d, gid %d)", ident.user, ident.uid, ident.gid)
    elif ident is not None and os.geteuid() not in (0, ident.uid):
        log.warning("started as uid %d, not root: cannot switch to %s; running as uid %d",
                    os.geteuid(), ident.user, os.geteuid())
    if os.geteuid() == 0 and not allow_root:
        raise PrivilegeError("refusing to run as root: set [server] user (the service user) "
                             "or [server] allow_root = true")


def for_admin_command(user: str, group: str) -> None:
    """Admin commands run as root act as the service user (the files they create are the server's)."""
    os.umask(UMASK)
    ident = service_identity(user, group)
    if os.geteuid() == 0 and ident is not None and ident.uid != 0:
        drop(ident)


def ensure_system_user(name: str = DEFAULT_USER) -> Identity:
    """The system user `name`, created with `useradd --system` (own group, no login, no home) if missing."""
    try:
        return lookup(name)
    except PrivilegeError:
        pass
    nologin = next((p for p in ("/usr/sbin/nologin", "/sbin/nologin") if os.path.exists(p)), "/bin/false")
    r = subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", nologin, "--comment", "postier mail server", name],
                       capture_output=True, text=True, timeout=60)
    try:
        return lookup(name)  # also when a concurrent useradd won the race (exit status 9)
    except PrivilegeError:
        raise PrivilegeError(f"useradd {name} failed: {r.stderr.strip() or r.returncode}") from None


def chown_tree(root: Path, ident: Identity) -> None:
    """Hand `root` and everything below it to `ident` (symlinks themselves, never their targets)."""
    os.chown(root, ident.uid, ident.gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), ident.uid, ident.gid, follow_symlinks=False)
