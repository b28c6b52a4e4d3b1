"""`postier sieve list|get|put|activate|deactivate|delete|check USER ...`: a user's Sieve scripts (RFC 5228)
for the administrator, over the same store ManageSieve uses (``store/sieve.py``; PostgreSQL in cluster mode)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..store.accountdb import open_accounts
from ..config import load_config
from ..store.errors import StoreError
from ..store.sieve import FileSieveStorage, ScriptError, Scripts


def _check(data: bytes) -> None:
    from .validate import CompileError, compile_script  # noqa: PLC0415 - loaded when a script is checked

    try:
        compile_script(data)
    except CompileError as e:  # every error with its line, as ManageSieve reports them
        raise ScriptError("\n".join(str(err) for err in e.errors)) from None


def _read(source: str) -> bytes:
    return sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()


def cmd_sieve(args: argparse.Namespace) -> int:
    from ..cli import CLIError, _config_path

    if args.action == "check" and args.user is None:
        raise CLIError("check needs a file")
    cfg = load_config(_config_path(args))
    accounts = open_accounts(cfg)
    try:
        user = accounts.get_user(args.user)
    finally:
        accounts.close()
    if user is None:
        raise CLIError(f"no such user: {args.user}")
    rest: list[str] = args.args
    want = {"list": 0, "get": 1, "put": 2, "activate": 1, "deactivate": 0, "delete": 1, "check": 1}[args.action]
    if len(rest) != want:
        raise CLIError(f"sieve {args.action} takes {want} argument(s) after USER")
    closing = None
    if cfg.cluster.dsn:  # cluster mode: the scripts are in PostgreSQL (docs/scaling.md)
        from ..store.cluster import require_extra
        require_extra()
        from ..store.cluster.store import open_store
        closing = open_store(cfg, workers=1)
        store: Scripts = closing.sieve_storage(cfg.sieve.max_scripts, cfg.sieve.max_script_size).scripts(user)
    else:
        store = FileSieveStorage(cfg.mail_root, cfg.sieve.max_scripts, cfg.sieve.max_script_size).scripts(user)
    try:
        if args.action == "list":
            for name, active in store.list():
                print(f"{name}{'  (active)' if active else ''}")
        elif args.action == "get":
            sys.stdout.buffer.write(store.get(rest[0]))
        elif args.action == "put":
            store.put(rest[0], _read(rest[1]), _check)
            print(f"stored {rest[0]} for {user.address}")
        elif args.action == "activate":
            store.set_active(rest[0])
        elif args.action == "deactivate":
            store.set_active("")
        elif args.action == "delete":
            store.delete(rest[0])
        else:
            _check(_read(rest[0]))
            print("script is valid")
    except ScriptError as exc:
        raise CLIError(str(exc)) from None
    except (OSError, StoreError) as exc:
        raise CLIError(str(exc)) from None
    finally:
        if closing is not None:
            closing.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("sieve", help="manage a user's Sieve filters (list, get, put, activate, check, ...)")
    p.add_argument("action", choices=("list", "get", "put", "activate", "deactivate", "delete", "check"))
    p.add_argument("user", metavar="USER", help="user address")
    p.add_argument("args", nargs="*", help="script NAME, and FILE (or - for stdin) for put and check")
    p.set_defaults(func=cmd_sieve)
