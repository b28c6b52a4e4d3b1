"""`postier reload`: ask the running server to re-read its configuration and certificates (SIGHUP to the
pid in DATA_DIR/run/postier.pid, checked to be a postier server; see server/reload.py)."""

from __future__ import annotations

import argparse
import os
import signal

from ..cli import CLIError, _load
from .reload import pid_file, running_pid


def cmd_reload(args: argparse.Namespace) -> int:
    cfg = _load(args)
    pid = running_pid(cfg)
    if pid is None:
        raise CLIError(f"no running server for {cfg.source} ({pid_file(cfg)})")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        raise CLIError(f"cannot signal the server (pid {pid}): {exc.strerror}") from None
    print(f"asked the server (pid {pid}) to reload; its log says how it went")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("reload", help="make the running server re-read its configuration and certificates")
    p.set_defaults(func=cmd_reload)
