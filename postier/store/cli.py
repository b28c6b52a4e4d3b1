"""`postier reindex USER`: rebuild a user's mailbox index from the Maildir, keeping the UIDs its
journals record (see `store.index`); in cluster mode, rewrite the user's full-text rows
(store.cluster.fulltext)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..accounts import Accounts
from .accountdb import open_accounts
from ..config import load_config
from .errors import StoreError
from .mailbox import MailStore


def cmd_reindex(args: argparse.Namespace) -> int:
    from ..cli import CLIError, _config_path

    cfg = load_config(_config_path(args))
    if cfg.cluster.dsn:
        return _reindex_cluster(args)
    accounts = open_accounts(cfg)
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


def _reindex_cluster(args: argparse.Namespace) -> int:
    """Cluster mode: the mailbox index is PostgreSQL itself (nothing to rebuild); the full-text rows of
    every body of each user are rewritten (store.cluster.fulltext)."""
    from ..cli import CLIError

    for address in args.users:
        accounts, store, user, mb, _home = _open_user(args, address)
        try:
            n = mb.rebuild_text_index()
        except StoreError as exc:
            raise CLIError(f"{user.address}: {exc}") from None
        finally:
            store.release(mb)
            store.close()
            accounts.close()
        print(f"reindexed {user.address}: full-text rows of {n} message bodies rewritten")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("reindex", help="rebuild users' mailbox indexes from their Maildirs (UIDs are kept); "
                                       "in cluster mode, their full-text search rows")
    p.add_argument("users", nargs="+", metavar="USER", help="user address")
    p.set_defaults(func=cmd_reindex)
    register_transfer(sub)


# -- migration: import / export (store.transfer) ---------------------------------------------------

def _open_user(args: argparse.Namespace, address: str) -> tuple[Accounts, Any, Any, Any, Path]:
    """(accounts, store, user, mailboxes, user's home) for import/export: the Maildir store, or in
    cluster mode (`[cluster]`) the PostgreSQL/S3 one, so that the same commands move a user between
    the modes (docs/scaling.md)."""
    from ..cli import CLIError, _config_path

    cfg = load_config(_config_path(args))
    accounts = open_accounts(cfg)
    user = accounts.get_user(address)
    if user is None:
        accounts.close()
        raise CLIError(f"no such user: {address}")
    if user.mailbox_format != "maildir":
        accounts.close()
        raise CLIError(f"{user.address} uses {user.mailbox_format}: import and export need a Maildir user")
    store: Any
    if cfg.cluster.dsn:
        from .cluster import require_extra
        require_extra()
        from .cluster.store import open_store
        store = open_store(cfg, workers=1)
    else:
        # the user lock file of a server's workers (`[server] workers`): an import excludes their sessions
        store = MailStore(cfg.mail_root, cfg.mailbox.special_use_folders, workers=1, shared=True)
    try:
        mb = store.acquire(user)
        mb.ensure_defaults()
    except StoreError as exc:
        store.close()
        accounts.close()
        raise CLIError(f"{user.address}: {exc}") from None
    return accounts, store, user, mb, user.home(cfg.mail_root)


def cmd_import(args: argparse.Namespace) -> int:
    import getpass
    import imaplib
    import ssl
    import sys

    from ..cli import CLIError
    from .transfer import ImportState, TransferError, import_imap, import_maildir, import_mbox

    accounts, store, user, mb, home = _open_user(args, args.into)
    home.mkdir(parents=True, exist_ok=True)  # cluster mode: the import state is still a local file
    state = ImportState(home / "postier-import.sqlite")
    try:
        if args.kind == "imap":
            if not args.host or not args.user:
                raise CLIError("import imap needs --host and --user")
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\r\n")
            elif sys.stdin.isatty():
                password = getpass.getpass(f"Password for {args.user} at {args.host}: ")
            else:
                raise CLIError("no terminal to ask the password on; use --password-stdin")
            ctx = ssl.create_default_context(cafile=args.ca_file) if args.ca_file else ssl.create_default_context()
            port = args.port or (993 if args.security == "tls" else 143)
            client = _imap_login(args.host, port, args.security, ctx, args.user, password)
            try:
                st = import_imap(mb, client, f"imap://{args.user}@{args.host}:{port}", state, verify=args.verify)
            finally:
                try:
                    client.logout()
                except (OSError, imaplib.IMAP4.error):
                    pass
        elif args.kind == "maildir":
            st = import_maildir(mb, Path(args.path), state)
        else:
            st = import_mbox(mb, Path(args.path), state)
    except (TransferError, StoreError) as exc:
        raise CLIError(str(exc)) from None
    finally:
        state.close()
        store.release(mb)
        store.close()
        accounts.close()
    print(f"imported into {user.address}: {st.folders} folders, {st.copied} messages copied "
          f"({st.bytes} bytes), {st.skipped} already there")
    for d in st.differences:
        print(f"DIFFERENCE: {d}")
    if args.verify:
        print("verify: " + ("no difference" if not st.differences else f"{len(st.differences)} difference(s)"))
    return 1 if st.differences else 0


def _imap_login(host: str, port: int, security: str, ctx: Any, user: str, password: str) -> Any:
    """A logged-in imaplib client for `postier import imap` (CLIError naming the server on failure)."""
    import imaplib
    import ssl
    import sys

    from ..cli import CLIError

    try:
        client: imaplib.IMAP4
        if security == "tls":
            client = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=60)
        else:
            client = imaplib.IMAP4(host, port, timeout=60)
            if security == "starttls":
                client.starttls(ctx)
            else:
                print("postier: warning: --security none sends the password in clear text", file=sys.stderr)
        client.login(user, password)
    except (OSError, imaplib.IMAP4.error, ssl.SSLError) as exc:
        raise CLIError(f"{host}:{port}: {exc}") from None
    return client


def cmd_export(args: argparse.Namespace) -> int:
    from ..cli import CLIError
    from .transfer import TransferError, export_maildir, export_mbox

    if bool(args.maildir) == bool(args.mbox):
        raise CLIError("export needs exactly one of --maildir DIR or --mbox DIR")
    accounts, store, user, mb, _home = _open_user(args, args.user)
    try:
        st = export_maildir(mb, Path(args.maildir)) if args.maildir else export_mbox(mb, Path(args.mbox))
    except (TransferError, StoreError) as exc:
        raise CLIError(str(exc)) from None
    finally:
        store.release(mb)
        store.close()
        accounts.close()
    print(f"exported {user.address}: {st.folders} folders, {st.copied} messages, {st.bytes} bytes")
    return 0


def register_transfer(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("import", help="copy mail into a user's mailbox from IMAP, a Maildir or mbox files "
                                      "(resumable: a second run copies only what is new)")
    p.add_argument("kind", choices=("imap", "maildir", "mbox"))
    p.add_argument("path", nargs="?", help="Maildir root, or mbox file or directory")
    p.add_argument("--into", required=True, metavar="USER", help="the postier user to copy into")
    p.add_argument("--host", help="IMAP: the source server")
    p.add_argument("--port", type=int, help="IMAP: port (993 with --security tls, else 143)")
    p.add_argument("--user", help="IMAP: the login name at the source")
    p.add_argument("--password-stdin", action="store_true", help="IMAP: read the password from stdin")
    p.add_argument("--security", choices=("tls", "starttls", "none"), default="tls",
                   help="IMAP: implicit TLS (default), STARTTLS, or none (clear text: only for a local source)")
    p.add_argument("--ca-file", help="IMAP: CA certificates to verify the source server with")
    p.add_argument("--verify", action="store_true", help="IMAP: compare counts and hashes per folder afterwards")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("export", help="write a user's mail as a Maildir (Dovecot keeps the UIDs) or mbox files")
    p.add_argument("user", metavar="USER")
    p.add_argument("--maildir", metavar="DIR", help="a new (empty) directory for the Maildir++ tree")
    p.add_argument("--mbox", metavar="DIR", help="a directory for one mboxrd file per folder")
    p.set_defaults(func=cmd_export)
