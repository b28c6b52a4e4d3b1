"""A throwaway Postfix instance for interoperability tests and benchmarks.

Its own config_directory, queue_directory and data_directory under a temporary folder, its own
smtpd on a loopback high port, no chroot, no system instance touched. Needs root (Postfix's master
runs as root and drops to the `postfix` user) and Debian's postfix package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"

MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

POSTSCREEN_CF = """\
{listen} inet n - n - 1 postscreen
smtpd     pass  -       -       n       -       -       smtpd
dnsblog   unix  -       -       n       -       0       dnsblog
tlsproxy  unix  -       -       n       -       0       tlsproxy"""


def available() -> bool:
    return os.path.exists(POSTFIX) and os.geteuid() == 0


class Postfix:
    def __init__(self, listen: str, port: int, main: dict[str, str] | None = None, master_extra: str = "",
                 prefix: list[str] | None = None, postscreen: bool = False):
        """`master_extra`: more master.cf services (a policy service); `prefix`: a command that runs
        `postfix start` (and so the whole instance) inside it, as bench/postfix_checks.py's namespace;
        `postscreen`: postscreen(8) owns the port and passes clients to smtpd."""
        # Not under pytest's tmp_path: its parents are mode 0700 and Postfix's daemons run as the
        # postfix user, which must traverse to data_directory.
        root = Path(tempfile.mkdtemp(prefix="postier-postfix-"))
        root.chmod(0o755)
        self.root = root
        self.port = port
        self.listen = listen
        self.prefix = list(prefix or [])
        self.etc = root / "etc"
        self.etc.mkdir(parents=True, exist_ok=True)
        (root / "spool").mkdir(mode=0o755, exist_ok=True)
        (root / "spool").chmod(0o755)  # whatever the umask: Postfix's daemons (not root) traverse it
        (root / "data").mkdir(exist_ok=True)
        shutil.chown(root / "data", "postfix")
        self.maillog = root / "maillog"
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(root / "spool"),
            "data_directory": str(root / "data"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix.test",
            "mydomain": "postfix.test",
            "mydestination": "",
            "inet_interfaces": listen,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(root),
            "smtp_dns_support_level": "disabled",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "biff": "no",
            "smtputf8_enable": "yes",
            "minimal_backoff_time": "5s",
            "maximal_backoff_time": "10s",
            "queue_run_delay": "5s",
        }
        settings.update(main or {})
        (self.etc / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        master = MASTER_CF.format(listen=f"{listen}:{port}")
        if postscreen:
            master = master.replace(f"{listen}:{port} inet n - n - - smtpd", POSTSCREEN_CF.format(listen=f"{listen}:{port}"))
        (self.etc / "master.cf").write_text(master + master_extra)

    def _postfix(self, *args: str, prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
        # postfix(1) prints its fatal errors only to a terminal or the log: keep both readable.
        return subprocess.run([*(prefix or []), POSTFIX, "-c", str(self.etc), *args], capture_output=True,
                              text=True, timeout=60)

    def start(self, timeout: float = 20) -> None:
        p = self._postfix("start", prefix=self.prefix)
        if p.returncode != 0:
            raise RuntimeError(f"postfix start failed: {p.stderr} {self.log()}")
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.listen, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"postfix did not listen: {self.log()}")

    def stop(self) -> None:
        pidfile = self.root / "spool" / "pid" / "master.pid"
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = 0
        self._postfix("stop")
        deadline = time.monotonic() + 10  # master exits asynchronously
        while pid and time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)

    def flush(self) -> None:
        self._postfix("flush")

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = self.root / "spool" / sub
            if d.exists() and any(p.is_file() for p in d.rglob("*")):
                return False
        return True
