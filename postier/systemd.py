"""`postier systemd-unit`: the systemd service unit for this installation and configuration.

The unit starts `postier serve` as root so that it can bind ports 25, 143, 993, ...; postier itself
then drops to `[server] user` (server/privileges.py), which is why the capability bounding set keeps
exactly CAP_NET_BIND_SERVICE, CAP_SETUID, CAP_SETGID (the drop) and CAP_CHOWN (handing the LMTP socket
over). `Type=notify`: systemd waits for READY=1 (server/notify.py), sent once every listener is bound
and privileges are dropped; `systemctl reload` sends SIGHUP (server/reload.py). The sandbox makes the
whole file system read-only except the data directory (`ProtectSystem=strict`, `ReadWritePaths=`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .config import Config

UNIT = """\
# postier mail server: install as /etc/systemd/system/postier.service, then
#   systemctl daemon-reload && systemctl enable --now postier
[Unit]
Description=postier mail server (SMTP, submission, IMAP, POP3, LMTP)
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_start} --config {config} serve
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=5s
TimeoutStopSec=30s
KillMode=mixed
UMask=0077
LimitNOFILE=65536

# Started as root to bind ports below 1024; postier drops to [server] user itself.
CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_CHOWN
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={data_dir}
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def _systemd_path(p: Path | str) -> str:
    """A path as a unit file wants it (absolute; spaces escaped by systemd's rules)."""
    return str(p).replace("\\", "\\\\").replace(" ", "\\x20")


def executable() -> str:
    """The `postier` command of this installation (the console script next to this interpreter)."""
    beside = Path(sys.executable).parent / "postier"
    if beside.exists():
        return str(beside)
    found = shutil.which("postier")
    return os.path.abspath(found) if found else f"{sys.executable} -m postier"


def unit(cfg: Config) -> str:
    assert cfg.source is not None
    return UNIT.format(exec_start=executable(), config=_systemd_path(cfg.source),
                       data_dir=_systemd_path(cfg.data_dir))


def cmd_systemd_unit(args: argparse.Namespace) -> int:
    from .cli import _load

    sys.stdout.write(unit(_load(args)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("systemd-unit", help="print the systemd service unit for this configuration")
    p.set_defaults(func=cmd_systemd_unit)
