"""The `postier` admin command line: quickstart, demo, serve, domain/user/alias management.

Exit codes: 0 success, 1 the operation failed (the message says why), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Callable
from pathlib import Path

from .accounts import Accounts
from .config import STANDARD_PORTS, Config, ConfigError, Listener, load_config, normalize_domain
from .durable import ensure_dirs, write_file
from .message.types import AccountError
from .store.errors import StoreUnavailable
from .server.privileges import (
    DEFAULT_USER,
    PrivilegeError,
    chown_tree,
    ensure_system_user,
    for_admin_command,
    lookup,
)

DEFAULT_CONFIG = "postier.toml"
DEMO_DOMAIN = "demo.test"
DEMO_USER = "demo@demo.test"
DEMO_PASSWORD = "demo-password"
#: Where quickstart puts the LMTP socket, relative to the data directory (as Dovecot's /run/dovecot/lmtp).
LMTP_SOCKET = "run/lmtp"


class CLIError(Exception):
    """An operation failed; printed as one line, exit code 1."""


def _config_path(args: argparse.Namespace) -> Path:
    if args.config:
        return Path(args.config)
    env = os.environ.get("POSTIER_CONFIG")
    if env:
        return Path(env)
    if Path(DEFAULT_CONFIG).exists():
        return Path(DEFAULT_CONFIG)
    return Path("/etc/postier/postier.toml")


def _load(args: argparse.Namespace) -> Config:
    return load_config(_config_path(args))


def _accounts(cfg: Config) -> Accounts:
    """The accounts: the local SQLite file, or PostgreSQL in cluster mode (store/accountdb.py)."""
    from .store.accountdb import open_accounts

    return open_accounts(cfg)


def _read_password(args: argparse.Namespace, confirm: bool = True) -> str:
    if getattr(args, "password_stdin", False):
        line = sys.stdin.readline()
        if not line:
            raise CLIError("no password on standard input")
        return line.rstrip("\r\n")
    if not sys.stdin.isatty():
        raise CLIError("no terminal to ask a password on; use --password-stdin")
    pw = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Again: ") != pw:
        raise CLIError("the two passwords differ")
    return pw


# -- quickstart / demo / serve --------------------------------------------------------------------

def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(data_dir: Path, hostname: str, listen: str, port_offset: int,
                 extra: str = "", user: str = "", allow_root: bool = False) -> Path:
    """Write DATA_DIR/postier.toml with every role on its standard port + offset."""
    lines = [
        "# postier configuration: written by `postier quickstart`; edit freely.",
        f"hostname = {_toml_str(hostname)}",
        'data_dir = "."',
        "",
    ]
    # Who serve runs as once its listeners are bound (server/privileges.py), and how many worker
    # processes share them (server/supervisor.py, docs/scaling.md).
    lines += ["[server]"] + ([f"user = {_toml_str(user)}"] if user else []) + (
        ["allow_root = true"] if allow_root else []) + [
        "# workers = 0   # processes sharing every listener: 0 (the default) = one per CPU core, 1 = one", ""]
    lines += [
        "[tls]",
        'cert = "tls/cert.pem"',
        'key = "tls/key.pem"',
        "",
    ]
    for role, port in STANDARD_PORTS.items():
        if role == "lmtp":  # a Unix socket in the data directory: two instances never collide
            lines += ["[listeners.lmtp]", f"path = {_toml_str(LMTP_SOCKET)}", ""]
            continue
        lines += [f"[listeners.{role}]", f"address = {_toml_str(listen)}", f"port = {port + port_offset}", ""]
    path = data_dir / "postier.toml"
    write_file(path, ("\n".join(lines) + extra).encode(), mode=0o644)
    return path


def certificate_names(hostname: str, listen: str) -> list[str]:
    """What quickstart's certificate names: the MX host, the --listen address when it is one address
    (clients that connect by IP check it), and localhost."""
    names = [hostname]
    if listen not in ("0.0.0.0", "::", "*", ""):
        names.append(listen)
    return [*names, "localhost", "127.0.0.1"]


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .certs import write_self_signed

    try:
        domain = normalize_domain(args.domain)
    except ValueError as exc:
        raise CLIError(f"--domain: {exc}") from None
    hostname = args.hostname or f"mail.{domain}"
    try:
        hostname = normalize_domain(hostname)
    except ValueError as exc:
        raise CLIError(f"--hostname: {exc}") from None
    if not 0 <= args.port_offset <= 65535 - 995:
        raise CLIError(f"--port-offset: must be between 0 and {65535 - 995}")
    data_dir = Path(args.data_dir).resolve()
    ensure_dirs(data_dir)  # the data directory survives a power cut with everything in it
    cfg_path = data_dir / "postier.toml"
    if cfg_path.exists() and not args.force:
        raise CLIError(f"{cfg_path} exists already (use --force to overwrite)")
    tls_dir = data_dir / "tls"
    if not (tls_dir / "cert.pem").exists() or args.force:
        write_self_signed(tls_dir / "cert.pem", tls_dir / "key.pem", certificate_names(hostname, args.listen))
    # Run as root, quickstart sets up the service user serve drops to (unless told to stay root).
    as_root = os.geteuid() == 0
    user = "" if args.allow_root or not as_root else (args.user or DEFAULT_USER)
    write_config(data_dir, hostname, args.listen, args.port_offset, user=user, allow_root=args.allow_root)
    cfg = load_config(cfg_path)
    acc = _accounts(cfg)
    if domain not in acc.list_domains():
        acc.add_domain(domain)
    if args.admin:  # else postmaster@ and abuse@ reach the first user added
        acc.set_admin(args.admin)
    acc.close()
    if user:
        try:
            ident = ensure_system_user(user) if user == DEFAULT_USER else lookup(user)
            chown_tree(data_dir, ident)
        except PrivilegeError as exc:
            raise CLIError(str(exc)) from None
    if not args.quiet:
        print(f"postier: wrote {cfg_path}")
        print(f"  domain {domain}, mail host {hostname}, data in {data_dir}")
        print("  listeners: " + ", ".join(f"{r} {_where(p)}" for r, p in cfg.listeners.items()))
        print("next steps:")
        print(f"  postier --config {cfg_path} user add you@{domain}")
        print(f"  postier --config {cfg_path} serve")
        print(f"  publish the DNS records: postier --config {cfg_path} dns records {domain}")
        print("  for a trusted certificate, add [acme] enabled = true and email = \"you@...\" (Let's Encrypt);")
        print("  the self-signed tls/cert.pem serves until the first one arrives")
    return 0


def _where(lst: Listener) -> str:
    return str(lst.path) if lst.path is not None else f"{lst.address}:{lst.port}"


def cmd_demo(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    cfg_path = data_dir / "postier.toml"
    if not cfg_path.exists():
        ns = argparse.Namespace(domain=DEMO_DOMAIN, data_dir=str(data_dir), hostname=f"mail.{DEMO_DOMAIN}",
                                listen=args.listen, port_offset=args.port_offset, force=False, quiet=True,
                                admin=None, user=None, allow_root=os.geteuid() == 0)  # a demo, on high ports
        cmd_quickstart(ns)
        with open(cfg_path, "a") as f:
            f.write("\n# The demo runs without Internet DNS: SPF/DKIM/DMARC checks would all be temporary\n"
                    "# failures (451). A real deployment keeps them on (delete this table).\n"
                    "[mailauth]\nspf = false\ndkim_verify = false\ndmarc = false\n")
    cfg = load_config(cfg_path)
    acc = _accounts(cfg)
    if acc.get_user(DEMO_USER) is None:
        acc.add_user(DEMO_USER, DEMO_PASSWORD)
    acc.close()
    print("postier demo")
    print(f"  config:   {cfg_path}")
    print(f"  domain:   {DEMO_DOMAIN} (user {DEMO_USER}, password {DEMO_PASSWORD})")
    for role, lst in cfg.listeners.items():
        print(f"  {role:<12} {_where(lst)}")
    smtp = cfg.listeners.get("smtp")
    if smtp:
        print(f"  try: swaks --server {smtp.address}:{smtp.port} --to {DEMO_USER}")
    print("  (self-signed certificate: tell your client to accept it)  Ctrl-C stops.")
    sys.stdout.flush()
    return _serve(cfg)


def _serve(cfg: Config) -> int:
    from .logsetup import configure
    from .server.app import run

    configure()
    run(cfg)
    return 0


def _drop_for_admin(args: argparse.Namespace) -> None:
    """Run as root, an admin command acts as the service user: what it creates stays the server's."""
    path = _config_path(args)
    if not path.exists():
        return  # the command reports the missing configuration itself
    cfg = load_config(path)
    try:
        for_admin_command(cfg.server.user, cfg.server.group)
    except (PrivilegeError, OSError) as exc:
        raise CLIError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    return _serve(_load(args))


# -- domains, users, aliases ----------------------------------------------------------------------

def cmd_domain(args: argparse.Namespace) -> int:
    acc = _accounts(_load(args))
    if args.action == "add":
        print(f"added domain {acc.add_domain(_one(args, 'domain'))}")
    elif args.action == "remove":
        acc.remove_domain(_one(args, "domain"))
        print(f"removed domain {args.names[0]}")
    elif args.action == "quota":
        if len(args.names) != 2:
            raise CLIError("usage: domain quota DOMAIN SIZE|none|default")
        acc.set_domain_quota(args.names[0], _quota_arg(args.names[1]))
        print(f"quota of {args.names[0]}'s users: {args.names[1]}")
    else:
        for d in acc.list_domains():
            print(d)
    return 0


def cmd_user(args: argparse.Namespace) -> int:
    acc = _accounts(_load(args))
    if args.action == "add":
        addr = _one(args, "address")
        quota = _quota_arg(args.quota) if args.quota else -1
        u = acc.add_user(addr, _read_password(args), args.format, admin=args.admin)
        if quota != -1:
            acc.set_quota(u.address, quota)
        print(f"added user {u.address} ({u.mailbox_format}{', admin' if args.admin else ''}"
              f"{f', quota {args.quota}' if args.quota else ''})")
    elif args.action == "quota":
        if len(args.names) != 2:
            raise CLIError("usage: user quota ADDRESS SIZE|none|default")
        acc.set_quota(args.names[0], _quota_arg(args.names[1]))
        print(f"quota of {args.names[0]}: {args.names[1]}")
    elif args.action == "passwd":
        addr = _one(args, "address")
        if acc.get_user(addr) is None:
            raise CLIError(f"no such user: {addr}")
        acc.set_password(addr, _read_password(args))
        print(f"password changed for {addr}")
    elif args.action == "remove":
        acc.remove_user(_one(args, "address"))
        print(f"removed user {args.names[0]} (the mailbox stays on disk)")
    else:
        from .store.quota import user_usage_line

        cfg = _load(args)
        for u in acc.list_users(args.names[0] if args.names else None):
            print(f"{u.address}\t{u.mailbox_format}\t{user_usage_line(cfg.mail_root, u)}")
    return 0


def _quota_arg(text: str) -> int | None:
    """SIZE (500M, 1G, bytes) -> bytes; "none" -> None (no quota); "default" -> -1 (inherit)."""
    if text.strip().lower() == "default":
        return -1
    from .store.quota import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def cmd_alias(args: argparse.Namespace) -> int:
    acc = _accounts(_load(args))
    if args.action == "add":
        if len(args.names) < 2:
            raise CLIError("usage: alias add ALIAS TARGET...")
        acc.add_alias(args.names[0], args.names[1:])
        print(f"alias {args.names[0]} -> {', '.join(args.names[1:])}")
    elif args.action == "remove":
        if not args.names:
            raise CLIError("usage: alias remove ALIAS [TARGET...]")
        acc.remove_alias(args.names[0], args.names[1:] or None)
        print(f"removed alias {args.names[0]}")
    else:
        for alias, targets in acc.list_aliases():
            print(f"{alias}\t{', '.join(targets)}")
    return 0


def _one(args: argparse.Namespace, what: str) -> str:
    if len(args.names) != 1:
        raise CLIError(f"usage: {args.command} {args.action} {what.upper()}")
    return str(args.names[0])


# -- parser ---------------------------------------------------------------------------------------

#: Extra sub-command registrars from other layers: (module, function) called with the subparsers.
#: The modules that add more commands (`register(sub)`), with the commands each adds: a command line
#: naming one of them imports that module alone (the others' imports cost a few tenths of a second
#: on every command); help, and a command named nowhere, import them all.
#: tests/test_cli_commands.py checks the names against what each module registers.
EXTRA_COMMANDS: dict[str, tuple[str, ...]] = {
    "postier.queue.cli": ("queue",),
    "postier.mailauth.cli": ("dkim", "dmarc", "dns", "tls"),
    "postier.store.cli": ("export", "import", "reindex"),
    "postier.backup": ("backup", "restore"),
    "postier.antispam.cli": ("why",),
    "postier.acme.cli": ("cert",),
    "postier.server.cli": ("reload",),
    "postier.systemd": ("systemd-unit",),
    "postier.status": ("status",),
    "postier.sieve.cli": ("sieve",),
    "postier.store.cluster.cli": ("cluster",),
}
CORE_COMMANDS = ("quickstart", "demo", "serve", "domain", "user", "alias")


def _command_word(argv: list[str]) -> str | None:
    """The command `argv` names (the first word that is neither an option nor --config's value),
    or None when an option before it (-h, --version, an unknown one) may need every command."""
    words = iter(argv)
    for word in words:
        if word in ("--config", "-c"):
            next(words, None)
        elif word.startswith("--config=") or (word.startswith("-c") and not word.startswith("--")):
            continue
        elif word.startswith("-"):
            return None
        else:
            return word
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with `command`, only the modules adding that command are imported."""
    p = argparse.ArgumentParser(prog="postier", description="postier: a complete, self-hostable mail system")
    p.add_argument("--config", "-c", help=f"configuration file (default: $POSTIER_CONFIG, ./{DEFAULT_CONFIG}, "
                                          "/etc/postier/postier.toml)")
    p.add_argument("--version", action="version", version="postier 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("quickstart", help="write a configuration, a certificate and a first domain")
    q.add_argument("--domain", required=True)
    q.add_argument("--data-dir", required=True)
    q.add_argument("--hostname", help="the MX host name (default mail.DOMAIN)")
    q.add_argument("--listen", default="0.0.0.0", help="address every listener binds (default 0.0.0.0)")
    q.add_argument("--port-offset", type=int, default=0, help="add N to every standard port (25 -> 25+N)")
    q.add_argument("--admin", metavar="ADDRESS",
                   help="who receives postmaster@ and abuse@ of every domain (default: the first user)")
    q.add_argument("--user", help=f"run as root: the service user serve drops to (default {DEFAULT_USER}, "
                                  "created with useradd --system if missing); the data directory becomes its")
    q.add_argument("--allow-root", action="store_true", help="let serve keep running as root (not advised)")
    q.add_argument("--force", action="store_true", help="overwrite an existing configuration")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quickstart)

    d = sub.add_parser("demo", help="quickstart a demo domain and user in ./demo-data, then serve")
    d.add_argument("--data-dir", default="demo-data")
    d.add_argument("--listen", default="127.0.0.1")
    d.add_argument("--port-offset", type=int, default=10000)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("serve", help="run every configured listener until SIGTERM/SIGINT")
    s.set_defaults(func=cmd_serve)
    for cmd in (q, d, s):  # these decide themselves who they run as; every other command drops
        cmd.set_defaults(keep_privileges=True)

    for name, func, actions, extra in (
        ("domain", cmd_domain, ("add", "list", "remove", "quota"), None),
        ("user", cmd_user, ("add", "list", "passwd", "quota", "remove"), "user"),
        ("alias", cmd_alias, ("add", "list", "remove"), None),
    ):
        sp = sub.add_parser(name, help={"domain": "manage local domains", "user": "manage users (mailboxes)",
                                        "alias": "manage aliases"}[name])
        sp.add_argument("action", choices=actions)
        sp.add_argument("names", nargs="*")
        if extra == "user":
            sp.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
            sp.add_argument("--format", choices=("maildir", "mbox"), help="mailbox format (default from config)")
            sp.add_argument("--admin", action="store_true", help="add: the user may use the admin console (/admin/)")
            sp.add_argument("--quota", metavar="SIZE", help="add: storage quota (500M, 1G, none; default from "
                                                            "the domain or [limits] default_quota)")
        sp.set_defaults(func=func)

    import importlib

    wanted = [m for m, names in EXTRA_COMMANDS.items() if command in names]
    if not wanted and command not in CORE_COMMANDS:
        wanted = list(EXTRA_COMMANDS)
    for modname in wanted:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name and modname.startswith(exc.name):
                continue
            raise
        register: Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None] = mod.register
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_word(argv))
    args = parser.parse_args(argv)
    try:
        if os.geteuid() == 0 and not getattr(args, "keep_privileges", False):
            _drop_for_admin(args)
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"postier: config error: {exc}", file=sys.stderr)
        return 2
    except (AccountError, CLIError, StoreUnavailable) as exc:
        print(f"postier: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
