"""`postier why QUEUE-ID|MESSAGE-ID`: every inbound decision on a message, in plain words."""

from __future__ import annotations

import argparse

from ..config import Config
from .verdicts import VerdictLog

VERDICTS_NAME = "verdicts.sqlite"


def verdicts_path(cfg: Config) -> str:
    return str(cfg.data_dir / VERDICTS_NAME)


def cmd_why(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..cli import CLIError, _load

    cfg = _load(args)
    path = Path(verdicts_path(cfg))
    if not path.exists():
        raise CLIError(f"no inbound decisions recorded yet ({path})")
    log = VerdictLog(path)
    try:
        found = log.find(args.ident)
    finally:
        log.close()
    if not found:
        raise CLIError(f"no inbound decision recorded for {args.ident!r} (queue id or Message-ID)")
    print("\n\n".join(v.render() for v in found))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("why", help="why a message was accepted, sent to Junk, deferred or refused")
    p.add_argument("ident", metavar="QUEUE-ID|MESSAGE-ID")
    p.set_defaults(func=cmd_why)
