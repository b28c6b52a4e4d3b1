"""External programs the tests talk to, and the Debian package that provides each.

`require(program)` returns the program's path. When it is missing the test is skipped, or, under
`POSTIER_REQUIRE_INTEROP=1` (what `make test` and CI set), it fails with the package to install: a
fresh machine that lacks a package must turn CI red, never quietly green. `scripts/install-test-deps`
installs every package named here (`tests/test_install_deps.py` checks the two lists agree).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

#: program -> Debian package that provides it.
PACKAGES: dict[str, str] = {
    "swaks": "swaks",
    "postfix": "postfix",
    "postsuper": "postfix",
    "postqueue": "postfix",
    "smtp-sink": "postfix",
    "smtp-source": "postfix",
    "dovecot": "dovecot-core",
    "doveadm": "dovecot-core",
    "mutt": "mutt",
    "mbsync": "isync",
    "fetchmail": "fetchmail",
    "getmail": "getmail6",
    "opendkim-testmsg": "opendkim-tools",
    "nmap": "nmap",
    "fiu-run": "fiu-utils",
    "fiu-ctrl": "fiu-utils",
    "ip": "iproute2",
    "unshare": "util-linux",
    "systemd-analyze": "systemd",
    "rspamd": "rspamd",
    "redis-server": "redis-server",
    "fusermount3": "fuse3",
    "useradd": "passwd",
    "setfacl": "acl",
    "pebble": "pebble",
    "sieve-test": "dovecot-sieve",
    "sieve-connect": "sieve-connect",
    "chromium": "chromium",
    "chromedriver": "chromium-driver",
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "runuser": "util-linux",
    # tests/cluster: Debian keeps them off PATH, in /usr/lib/postgresql/15/bin
    "initdb": "postgresql",
    "pg_ctl": "postgresql",
}

#: Perl modules programs need but Debian only recommends (install-test-deps installs them explicitly).
PERL_MODULES: dict[str, str] = {
    "Net::SSLeay": "libnet-ssleay-perl",  # swaks -tls: "TLS not available: requires Net::SSLeay"
    "IO::Socket::SSL": "libio-socket-ssl-perl",
}


def required() -> bool:
    return os.environ.get("POSTIER_REQUIRE_INTEROP") == "1"


def missing(what: str) -> None:
    """Skip, or fail under POSTIER_REQUIRE_INTEROP=1; the message names the package."""
    if required():
        pytest.fail(f"{what} (POSTIER_REQUIRE_INTEROP=1: run scripts/install-test-deps as root)")
    pytest.skip(what)


def find(program: str) -> str | None:
    return shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/sbin/{program}") if os.access(p, os.X_OK)), None)


def require(program: str) -> str:
    """The path of `program`; skip or fail (naming its Debian package) when it is not installed."""
    path = find(program)
    if path is None:
        missing(f"{program} is not installed (Debian package {PACKAGES.get(program, '?')})")
        raise AssertionError("unreachable")  # pragma: no cover
    return path


def require_perl_module(module: str) -> None:
    """Skip or fail (naming the package) when Perl cannot load `module`."""
    ok = shutil.which("perl") is not None and subprocess.run(
        ["perl", f"-M{module}", "-e", "1"], capture_output=True, timeout=30).returncode == 0
    if not ok:
        missing(f"Perl module {module} is not installed (Debian package {PERL_MODULES[module]})")


def mbsync_config(rc: Path, local: Path, port: int, user: str, password: str, cafile: Path,
                  ssl_type: str = "IMAPS", host: str = "127.0.0.1") -> Path:
    """An mbsync (isync) configuration syncing every folder of `user` both ways with the Maildir
    `local`, over IMAPS or STARTTLS (`ssl_type`), trusting `cafile`; written to `rc`."""
    rc.write_text(f"""IMAPAccount postier
Host {host}
Port {port}
User {user}
Pass {password}
SSLType {ssl_type}
CertificateFile {cafile}

IMAPStore remote
Account postier

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel c
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
Remove Both
SyncState *
Sync All
""")
    return rc


def mbsync(rc: Path, verbose: bool = False) -> str:
    """Run `mbsync -a` with that configuration; its output (the test fails on a non-zero exit)."""
    p = subprocess.run([require("mbsync"), *(["-V"] if verbose else []), "-c", str(rc), "-a"],
                       capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout + p.stderr
