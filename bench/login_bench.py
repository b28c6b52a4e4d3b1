"""IMAP login rate: postier (with and without its login cache) side by side with Dovecot.

postier checks its default argon2id hashes (RFC 9106's second option: t=3, 64 MiB, p=4). Dovecot
runs twice: checking the very same hash (a passwd-file with ``{ARGON2ID}...``, authentication cache
on; Dovecot's cache keeps the hash, not the outcome, so every login still runs argon2), and with
bench/imap_bench.py's static plaintext passdb, its cheapest possible login (what imaptest's stress
figures use). Plain TCP on loopback; each login is a new connection: greeting, LOGIN, LOGOUT.
Measured per server:

  * the first login (nothing cached),
  * logins per second from one client, one after the other,
  * logins per second from --clients clients at once (each logs in again and again),

with every loop bounded by --logins and --seconds. postier without cache (`login_cache_size = 0`)
is today's cost: every login pays argon2.

    python -m bench.login_bench [--logins 200] [--clients 10] [--seconds 10]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.imap_bench import DOMAIN, PASSWORD, Client, Dovecot  # noqa: E402
from postier.accounts import Accounts  # noqa: E402
from tests.harness import Instance  # noqa: E402

USER = f"bob@{DOMAIN}"


def start_postier(root: Path, cache: bool) -> tuple[Instance, str]:
    inst = Instance(root, DOMAIN, extra_config=(
        "[limits]\nmax_connections = 500\nmax_connections_per_ip = 500\n"
        "[imap]\nmax_connections_per_user = 500\n"
        f"[auth]\nallow_plaintext = true\nlogin_cache_size = {10_000 if cache else 0}\n"))
    accounts = Accounts(inst.root / "accounts.sqlite")  # default (production) argon2 parameters
    accounts.add_user(USER, PASSWORD)
    stored = accounts._conn().execute("SELECT password FROM users WHERE address=?", (USER,)).fetchone()[0]
    accounts.close()
    inst.start(wait_role="imap")
    return inst, stored


def start_dovecot(root: Path, stored_hash: str | None) -> Dovecot:
    """Dovecot checking ``stored_hash`` (argon2id), or its static plaintext passdb when None."""
    dove = Dovecot(root, 100)
    if stored_hash is None:
        dove.home("bob").mkdir(parents=True)
        (dove.home("bob") / "Maildir").mkdir()
        dove.start()
        return dove
    conf = dove.conf.read_text()
    conf = conf.replace(f"driver = static\n  args = password={PASSWORD}",
                        f"driver = passwd-file\n  args = scheme=ARGON2ID {root}/passwd")
    conf += "auth_cache_size = 10M\nauth_cache_ttl = 1 hour\nauth_cache_negative_ttl = 0\n"
    dove.conf.write_text(conf)
    (root / "passwd").write_text(f"{USER}:{{ARGON2ID}}{stored_hash}\n")
    dove.home("bob").mkdir(parents=True)
    (dove.home("bob") / "Maildir").mkdir()
    dove.start()
    return dove


def one_login(port: int) -> float:
    t0 = time.perf_counter()
    c = Client(port)
    try:
        c.cmd(f"LOGIN {USER} {PASSWORD}")
        c.cmd("LOGOUT")
    finally:
        c.close()
    return time.perf_counter() - t0


def sequential(port: int, logins: int, seconds: float) -> float:
    """Logins per second, one client, bounded in count and time."""
    n = 0
    t0 = time.perf_counter()
    while n < logins and time.perf_counter() - t0 < seconds:
        one_login(port)
        n += 1
    return n / (time.perf_counter() - t0)


def concurrent(port: int, clients: int, logins: int, seconds: float) -> tuple[float, int]:
    """(logins per second, errors) with `clients` clients logging in again and again."""
    done = [0] * clients
    errors = [0] * clients
    deadline = time.perf_counter() + seconds
    start = threading.Barrier(clients + 1)

    def run(k: int) -> None:
        start.wait()
        while done[k] < logins and time.perf_counter() < deadline:
            try:
                one_login(port)
                done[k] += 1
            except (OSError, RuntimeError):
                errors[k] += 1
                if errors[k] > 5:
                    return

    threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0), sum(errors)


def measure(name: str, port: int, args: argparse.Namespace) -> dict[str, float]:
    print(f"{name}: first login...", flush=True)
    first = one_login(port)
    print(f"{name}: sequential...", flush=True)
    seq = sequential(port, args.logins, args.seconds)
    print(f"{name}: {args.clients} clients...", flush=True)
    rate, errors = concurrent(port, args.clients, max(1, args.logins // args.clients), args.seconds)
    return {"first": first, "sequential": seq, "concurrent": rate, "errors": errors}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.login_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--logins", type=int, default=200, help="at most this many logins per measurement")
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0, help="at most this long per measurement")
    ap.add_argument("--no-dovecot", action="store_true")
    args = ap.parse_args(argv)
    if not args.no_dovecot and shutil.which("dovecot") is None:
        print("dovecot is not installed (Debian: dovecot-imapd); use --no-dovecot", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="login-bench-"))
    tmp.chmod(0o755)  # Dovecot's processes run as another user and must traverse it
    results: dict[str, dict[str, float]] = {}
    try:
        for name, cache in (("postier", True), ("postier, no cache", False)):
            inst, stored = start_postier(tmp / name.replace(", ", "-").replace(" ", "-"), cache)
            try:
                results[name] = measure(name, inst.port("imap"), args)
            finally:
                inst.stop()
        if not args.no_dovecot:
            for name, pw_hash in (("dovecot", stored), ("dovecot, plaintext", None)):
                dove = start_dovecot(tmp / name.replace(", ", "-"), pw_hash)
                try:
                    results[name] = measure(name, dove.port, args)
                finally:
                    dove.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(f"IMAP logins (argon2id t=3 m=64MiB p=4; connect + LOGIN + LOGOUT; {args.clients} clients at once)")
    print(f"{'':20} {'first login':>12} {'1 client':>12} {f'{args.clients} clients':>14} {'errors':>7}")
    for name, r in results.items():
        print(f"{name:20} {r['first'] * 1000:>10.0f}ms {r['sequential']:>10.1f}/s {r['concurrent']:>12.1f}/s "
              f"{r['errors']:>7.0f}")
    for other in ("dovecot", "dovecot, plaintext"):
        if other in results:
            p, d = results["postier"], results[other]
            print(f"postier / {other}: 1 client {p['sequential'] / d['sequential']:.2f}x, "
                  f"{args.clients} clients {p['concurrent'] / d['concurrent']:.2f}x")
    nc = results["postier, no cache"]
    print(f"login cache: {results['postier']['concurrent'] / nc['concurrent']:.0f}x the logins/s of no cache "
          f"({args.clients} clients)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
