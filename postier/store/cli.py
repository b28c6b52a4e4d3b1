"""`postier reindex USER`: rebuild a user's mailbox index from the Maildir, keeping the UIDs its
journals record (see `store.index`)."""

from __future__ import annotations

import argparse

from ..accounts import Accounts
from ..config import load_config
from .errors import StoreError
from .mailbox import MailStore


def cmd_reindex(args: argparse.Namespace) -> int:
    from ..cli import CLIError, _config_path

    cfg = load_config(_config_path(args))
    accounts = Accounts(cfg.accounts_db, cfg.mailbox.recipient_delimiter, cfg.mailbox.default_format)
    try:
        for address in args.users:
            user = accounts.get_user(address)
            if user is None:
                raise CLIError(f"no such user: {address}")
            if user.mailbox_format != "maildir":
                raise CLIError(f"{user.address} uses {user.mailbox_format}: there is no index to rebuild")
            store = MailStore(cfg.mail_root, cfg.mailbox.special_use_folders, workers=1)
            try:
                counts = store.reindex(user)
            except StoreError as exc:
                raise CLIError(f"{user.address}: {exc}") from None
            finally:
                store.close()
            total = sum(counts.values())
            print(f"reindexed {user.address}: {len(counts)} folders, {total} messages")
            for name, n in sorted(counts.items()):
                print(f"  {name}\t{n}")
    finally:
        accounts.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("reindex", help="rebuild users' mailbox indexes from their Maildirs (UIDs are kept)")
    p.add_argument("users", nargs="+", metavar="USER", help="user address")
    p.set_defaults(func=cmd_reindex)
