"""`postier status`: what an admin checks first, and an exit status that says whether to look closer.

Listeners (is each one answering?) and the certificate (subject, issuer, days left), who the server
runs as, the queue (size, oldest message), the last hour's accepted messages, refusals and deferrals
(server/stats.py), the space left where the data lives and the users whose quota is (nearly) full. Exit status 0 when nothing needs attention,
1 otherwise (every problem is a line starting with "!"), 2 for a bad configuration. The checks are
`server/health.py`'s, which the admin console's health page shows too.
"""

from __future__ import annotations

import argparse

from .config import Config
from .server.health import check_all


def status(cfg: Config) -> int:
    print(f"postier status ({cfg.source})")
    r = check_all(cfg)
    for fine, text in r.lines:
        print(f"  {text}" if fine else f"! {text}")
    print("needs attention" if r.problems else "all well")
    return 1 if r.problems else 0


def cmd_status(args: argparse.Namespace) -> int:
    from .cli import _load

    return status(_load(args))


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("status", help="listeners, certificate, privileges, queue, last hour, disk; exit 1 if "
                                      "something needs attention")
    p.set_defaults(func=cmd_status)
