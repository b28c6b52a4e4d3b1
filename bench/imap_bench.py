"""IMAP benchmark: postier side by side with Dovecot on one generated Maildir.

Generates a mailbox of N small messages (a third already read, in cur/; the rest in new/), starts a
postier instance and a Dovecot (Debian's dovecot-imapd, its own configuration and directories, on
free loopback ports, never the system instance) serving a copy of the same Maildir, and times on each:

  * the first SELECT (no index yet) and a second SELECT on a new connection,
  * UID FETCH 1:* (FLAGS),
  * UID SEARCH HEADER SUBJECT x (the first search: nothing cached; a one-character needle),
  * UID SEARCH SUBJECT/FROM/BODY/TEXT with longer needles, each first (on a fresh connection, the
    first search of that key) and repeated (best of --repeats): postier answers them from its
    full-text index (store/fts.py), which the bench builds from the generated Maildir before the
    server starts, as `postier reindex` does for a Maildir copied in (the build time is reported);
    Dovecot runs without an FTS plugin, as Debian's dovecot-imapd ships,
  * FETCH 1:1000 (BODY.PEEK[]),

then the memory each server needs per idle connection (C connections logged in, INBOX of a small
mailbox selected, in IDLE): postier's process RSS growth, and the growth of the summed RSS and PSS
of all Dovecot processes; and a stress figure: 10 clients (--stress-clients) for 30 s
(--stress-seconds) on one user with a small INBOX, each in a loop logging in, selecting, fetching
flags and headers, storing flags, appending, expunging what it appended and logging out:
commands per second, errors and the servers' CPU time per command (every process of the server,
exited ones included), the servers taking turns in --stress-rounds rounds so that a busy moment of
the machine hurts each alike. Both servers are spoken to over plain TCP on loopback so that TLS costs
nothing on either side (Dovecot: `ssl = no`; postier's plain `imap` listener).

With `--workers N` (N > 1) a third server, postier with `[server] workers = N` on its own copy of
the Maildir, is timed in the same interleaved steps and stress rounds (docs/scaling.md).
`--stress-only` runs the stress figure alone (no large mailbox, no idle-memory or step timings).

    python -m bench.imap_bench [--messages 100000] [--connections 1000] [--repeats 3]
                               [--stress-seconds 30] [--stress-rounds 3] [--keep] [--workers N]
    python -m bench imap --stress-only --workers 2      # the stress figure: 1 and 2 workers, Dovecot
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from postier.accounts import Accounts  # noqa: E402
from postier.store.fts import FTS_NAME, build_file  # noqa: E402
from tests.harness import Instance, free_port  # noqa: E402

PASSWORD = "bench-password"
DOMAIN = "bench.test"


# -- a minimal timing client ----------------------------------------------------------------------

class Client:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=600)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.n = 0
        greeting = self.sock.recv(65536)
        if not greeting.startswith(b"* OK"):
            raise RuntimeError(greeting)

    def wait(self, tag: bytes) -> bytes:
        """Everything up to and including the tagged response line."""
        marker = b"\r\n" + tag + b" "
        buf = bytearray(b"\r\n")  # so that a tagged line with nothing before it matches too
        found = -1
        while True:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("server closed the connection")
            start = max(0, len(buf) - len(marker))
            buf += chunk
            if found < 0:
                found = buf.find(marker, start)
            if found >= 0 and buf.endswith(b"\r\n") and buf.find(b"\r\n", found + 2) == len(buf) - 2:
                return bytes(buf[2:])

    def cmd(self, text: str) -> tuple[float, bytes]:
        self.n += 1
        tag = b"b%d" % self.n
        t0 = time.perf_counter()
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        data = self.wait(tag)
        elapsed = time.perf_counter() - t0
        last = data[data.rfind(b"\r\n" + tag + b" ") + 2:] if not data.startswith(tag + b" ") else data
        if not last.startswith(tag + b" OK"):
            raise RuntimeError(f"{text}: {last[:200]!r}")
        return elapsed, data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def login(port: int, user: str) -> Client:
    c = Client(port)
    c.cmd(f"LOGIN {user} {PASSWORD}")
    return c


# -- mailbox generation ---------------------------------------------------------------------------

def generate(maildir: Path, n: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    base_t = int(time.time()) - n - 86400
    for i in range(n):
        subject = f"report {i} x" if i % 10 == 0 else f"note {i}"
        data = (f"Return-Path: <sender{i % 97}@example.net>\r\nFrom: Sender {i % 97} <sender{i % 97}@example.net>\r\n"
                f"To: bob@{DOMAIN}\r\nSubject: {subject}\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
                f"Message-ID: <{i}.bench@example.net>\r\n\r\nMessage number {i}.\r\n"
                + "Some more text for the body of this message.\r\n" * 3).encode()
        name = f"{base_t + i}.M{i}P1Q{i}.{host},S={len(data)}"
        if i % 3 == 0:
            path = maildir / "cur" / (name + ":2,S")
        else:
            path = maildir / "new" / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, data)
        os.close(fd)
        os.utime(path, (base_t + i, base_t + i))
    old = time.time() - 60  # as if delivered a while ago
    for sub in ("cur", "new"):
        os.utime(maildir / sub, (old, old))


# -- memory ---------------------------------------------------------------------------------------

def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for k in kids:
        out += _children(int(k))
    return out


def memory(pids: list[int]) -> tuple[int, int]:
    """(summed RSS, summed PSS) in KiB."""
    return sum(_status_kib(p, "VmRSS") for p in pids), sum(_pss_kib(p) for p in pids)


async def _idle_connections(port: int, user: str, count: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    sem = asyncio.Semaphore(25)

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            await r.readline()
            for tag, cmd in ((b"a", f"LOGIN {user} {PASSWORD}".encode()), (b"b", b"SELECT INBOX")):
                w.write(tag + b" " + cmd + b"\r\n")
                while True:
                    line = await r.readline()
                    if not line:
                        raise ConnectionError("closed")
                    if line.startswith(tag + b" "):
                        if not line.startswith(tag + b" OK"):
                            raise RuntimeError(line)
                        break
            w.write(b"c IDLE\r\n")
            line = await r.readline()
            if not line.startswith(b"+"):
                raise RuntimeError(line)
            return r, w

    return list(await asyncio.gather(*(one() for _ in range(count))))


def idle_memory(port: int, user: str, count: int, pids: Callable[[], list[int]]) -> tuple[float, float]:
    """KiB per idle connection: (RSS growth, PSS growth) / count."""
    warm = login(port, user)
    warm.cmd("SELECT INBOX")
    warm.close()
    time.sleep(1.0)
    rss0, pss0 = memory(pids())

    async def run() -> tuple[int, int]:
        conns = await _idle_connections(port, user, count)
        await asyncio.sleep(2.0)
        rss1, pss1 = memory(pids())
        for _r, w in conns:
            w.write(b"DONE\r\nd LOGOUT\r\n")
        await asyncio.sleep(0.5)
        for _r, w in conns:
            w.close()
        return rss1, pss1

    rss1, pss1 = asyncio.run(run())
    return (rss1 - rss0) / count, (pss1 - pss0) / count


# -- the two servers ------------------------------------------------------------------------------

def start_postier(root: Path, connections: int, workers: int = 1) -> Instance:
    inst = Instance(root / ("postier" if workers == 1 else "postier-n"), DOMAIN, workers=workers, extra_config=(
        f"[limits]\nmax_connections = {connections + 100}\nmax_connections_per_ip = {connections + 100}\n"
        f"[imap]\nmax_connections_per_user = {connections + 100}\n"
        "[auth]\nallow_plaintext = true\n"))
    accounts = Accounts(inst.root / "accounts.sqlite")
    accounts.set_hash_cost(1, 8, 1)  # argon2's cheapest: the bench measures IMAP, not argon2
    for user in ("bob", "idle", "stress"):
        accounts.add_user(f"{user}@{DOMAIN}", PASSWORD)
    accounts.close()
    return inst


DOVECOT_CONF = """\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
instance_name = postier-bench-{port}
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain
mail_location = maildir:~/Maildir
mail_max_userip_connections = {conns}
default_client_limit = {conns2}
default_process_limit = {conns2}
first_valid_uid = 0
{users}
passdb {{
  driver = static
  args = password={password}
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/home/%n
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
  process_limit = 64
  client_limit = {conns2}
  chroot =
}}
service imap {{
  process_limit = {conns2}
}}
service anvil {{
  chroot =
  client_limit = {conns3}
}}
service auth {{
  client_limit = {conns3}
}}
"""


class Dovecot:
    def __init__(self, root: Path, connections: int):
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True)
        for d in ("run", "state", "home"):
            (root / d).mkdir()
        if os.geteuid() == 0:
            uid = gid = 65534  # nobody: Dovecot refuses to serve mail as root
            users = ""
        else:
            uid, gid = os.getuid(), os.getgid()
            me = getpass.getuser()
            users = f"default_internal_user = {me}\ndefault_login_user = {me}\n"
        self.uid, self.gid = uid, gid
        self.conf = root / "dovecot.conf"
        self.conf.write_text(DOVECOT_CONF.format(
            root=root, port=self.port, conns=connections + 100, conns2=connections + 200,
            conns3=3 * connections + 300, uid=uid, gid=gid, users=users, password=PASSWORD))
        self.pid: int | None = None

    def home(self, user: str) -> Path:
        return self.root / "home" / user

    def start(self) -> None:
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", f"{self.uid}:{self.gid}", str(self.root / "home")], check=True)
        subprocess.run(["dovecot", "-c", str(self.conf)], check=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.pid = int((self.root / "run" / "master.pid").read_text())
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            time.sleep(0.1)
        raise RuntimeError("dovecot did not start: " + (self.root / "dovecot.log").read_text()[-2000:])

    def pids(self) -> list[int]:
        return _children(self.pid) if self.pid else []

    def stop(self) -> None:
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and Path(f"/proc/{self.pid}").exists():
                time.sleep(0.1)
            self.pid = None


# -- many clients at once -------------------------------------------------------------------------

STRESS_MESSAGE = (b"From: Stress <stress@example.net>\r\nTo: stress@" + DOMAIN.encode() + b"\r\n"
                  b"Subject: appended\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n\r\n" + b"body line\r\n" * 20)


def _stress_client(port: int, user: str, deadline: float, counts: list[int]) -> None:
    """One client's loop until `deadline`: counts[0] commands answered OK, counts[1] errors (a
    failed command or connection; the client then starts over on a new connection)."""
    while time.monotonic() < deadline:
        c: Client | None = None
        try:
            c = Client(port)
            for text in (f"LOGIN {user} {PASSWORD}", "SELECT INBOX", "UID FETCH 1:* (FLAGS)",
                         "FETCH 1:10 (BODY.PEEK[HEADER])", "STORE 1:5 +FLAGS (\\Seen)"):
                c.cmd(text)
                counts[0] += 1
            _t, data = c.cmd(f"APPEND INBOX {{{len(STRESS_MESSAGE)}+}}\r\n" + STRESS_MESSAGE.decode())
            counts[0] += 1
            i = data.find(b"[APPENDUID ")
            uid = int(data[i:].split(b"]", 1)[0].split()[2])
            for text in (f"UID STORE {uid} +FLAGS.SILENT (\\Deleted)", f"UID EXPUNGE {uid}", "LOGOUT"):
                c.cmd(text)
                counts[0] += 1
        except (OSError, RuntimeError, ValueError, IndexError):
            counts[1] += 1
        finally:
            if c is not None:
                c.close()


def stress(port: int, user: str, clients: int, seconds: float) -> tuple[int, int, float]:
    """(commands answered OK, errors, seconds taken) of `clients` concurrent clients over `seconds`."""
    counts = [[0, 0] for _ in range(clients)]
    t0 = time.monotonic()
    deadline = t0 + seconds
    threads = [threading.Thread(target=_stress_client, args=(port, user, deadline, counts[i]))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return sum(c[0] for c in counts), sum(c[1] for c in counts), elapsed


def tree_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) of a server's processes, their threads and their exited children
    (a process's reaped children count in its cutime/cstime: Dovecot's short-lived imap processes)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / os.sysconf("SC_CLK_TCK")


def stress_rounds(servers: dict[str, tuple[int, Callable[[], list[int]]]], user: str, clients: int,
                  seconds: float, rounds: int) -> dict[str, dict[str, float]]:
    """Each server `seconds` in all, in `rounds` turns interleaved: commands/s, errors, CPU ms per command."""
    totals = {k: [0, 0, 0.0, 0.0] for k in servers}
    for r in range(rounds):
        for server, (port, pids) in servers.items():
            print(f"{server}: stress round {r + 1}/{rounds}, {clients} clients, {seconds / rounds:.0f}s...", flush=True)
            cpu0 = tree_cpu(pids())
            n, errors, elapsed = stress(port, user, clients, seconds / rounds)
            t = totals[server]
            t[0] += n
            t[1] += errors
            t[2] += elapsed
            t[3] += max(0.0, tree_cpu(pids()) - cpu0)
    return {k: {"_stress": n / el, "_stress_errors": e, "_stress_cpu": cpu / n * 1000 if n else 0.0}
            for k, (n, e, el, cpu) in totals.items()}


# -- the run --------------------------------------------------------------------------------------

#: The text searches (the generated mail: every tenth subject says "report"; 97 senders; each
#: body says "Message number N."), timed first and repeated.
TEXT_SEARCHES = {
    "SUBJECT": "UID SEARCH SUBJECT report",
    "FROM": "UID SEARCH FROM sender42@",
    "BODY": 'UID SEARCH BODY "number 4242."',
    "TEXT": 'UID SEARCH TEXT "<4242.bench@"',
}
STEPS = ("first SELECT", "second SELECT", "UID FETCH 1:* (FLAGS)", "UID SEARCH HEADER SUBJECT x",
         *(f"SEARCH {k} first" for k in TEXT_SEARCHES), *(f"SEARCH {k} repeated" for k in TEXT_SEARCHES),
         "FETCH 1:1000 (BODY.PEEK[])")
REPEATABLE = ("second SELECT", "UID FETCH 1:* (FLAGS)", *(f"SEARCH {k} repeated" for k in TEXT_SEARCHES),
              "FETCH 1:1000 (BODY.PEEK[])")


def _hits(data: bytes) -> int:
    line = next(x for x in data.split(b"\r\n") if x.startswith(b"* SEARCH"))  # Dovecot sends
    return len(line.split()) - 2  # progress lines ("* OK Searched 30%") first


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of the processes (all their threads), in seconds (1/CLK_TCK steps)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
    return total / _TICK


def step(name: str, port: int, user: str, out: dict[str, float], pids: Callable[[], list[int]]) -> None:
    """One timed step on a fresh connection (login not timed); the best of repeated runs is kept,
    for the wall-clock time and for the server's CPU time during the timed command."""
    c = login(port, user)
    cpu = 0.0

    def timed(text: str) -> tuple[float, bytes]:
        nonlocal cpu
        procs = pids()  # after the login: Dovecot's imap process of this connection exists
        before = cpu_seconds(procs)
        t, data = c.cmd(text)
        cpu = cpu_seconds(procs) - before
        return t, data

    try:
        if name in ("first SELECT", "second SELECT"):
            t, _ = timed("SELECT INBOX")
        else:
            c.cmd("SELECT INBOX")
            if name == "UID FETCH 1:* (FLAGS)":
                t, data = timed("UID FETCH 1:* (FLAGS)")
                out["_flags_lines"] = data.count(b" FETCH (")
            elif name == "UID SEARCH HEADER SUBJECT x":
                t, data = timed("UID SEARCH HEADER SUBJECT x")
                out["_search_hits"] = _hits(data)
            elif name.startswith("SEARCH "):
                t, data = timed(TEXT_SEARCHES[name.split()[1]])
                out[f"_{name.split()[1].lower()}_hits"] = _hits(data)
            else:
                t, data = timed("FETCH 1:1000 (BODY.PEEK[])")
                out["_bodies"] = data.count(b" FETCH (")
        c.cmd("LOGOUT")
    finally:
        c.close()
    out[name] = min(out.get(name, t), t)
    out["_cpu " + name] = min(out.get("_cpu " + name, cpu), cpu)


def measure(servers: dict[str, tuple[int, str, Callable[[], list[int]]]], repeats: int) -> dict[str, dict[str, float]]:
    """Each step on each server in turn (interleaved, so that a busy moment of the machine hurts
    both alike); repeatable steps run `repeats` times and keep their best time."""
    results: dict[str, dict[str, float]] = {k: {} for k in servers}
    for name in STEPS:
        for _ in range(repeats if name in REPEATABLE else 1):
            for server, (port, user, pids) in servers.items():
                step(name, port, user, results[server], pids)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.imap_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--idle-messages", type=int, default=20, help="messages in the idle user's INBOX")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the repeatable steps (best kept)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--no-dovecot", action="store_true", help="measure postier alone")
    ap.add_argument("--workers", type=int, default=1, help="also time postier with [server] workers = N")
    ap.add_argument("--stress-seconds", type=float, default=30.0, help="duration of the stress run (0: skip)")
    ap.add_argument("--stress-clients", type=int, default=10)
    ap.add_argument("--stress-rounds", type=int, default=3, help="turns the servers take in the stress run")
    ap.add_argument("--stress-only", action="store_true", help="only the stress figure")
    args = ap.parse_args(argv)
    if args.stress_only:
        args.messages = 0
        args.stress_seconds = args.stress_seconds or 30.0
    if not args.no_dovecot and shutil.which("dovecot") is None:
        print("dovecot is not installed (Debian: dovecot-imapd); use --no-dovecot", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="imap-bench-"))
    tmp.chmod(0o755)  # Dovecot's mail processes run as another user and must traverse it
    results: dict[str, dict[str, float]] = {}
    try:
        t0 = time.monotonic()
        inst = start_postier(tmp, args.connections)
        generate(inst.maildir(f"bob@{DOMAIN}"), args.messages)
        generate(inst.maildir(f"idle@{DOMAIN}"), args.idle_messages)
        generate(inst.maildir(f"stress@{DOMAIN}"), 200)
        print(f"generated {args.messages} messages in {time.monotonic() - t0:.1f}s", flush=True)
        t0 = time.monotonic()
        md = inst.maildir(f"bob@{DOMAIN}")
        fts_build = 0.0
        if not args.stress_only:
            indexed = build_file(md.parent / FTS_NAME, [md])
            fts_build = time.monotonic() - t0
            print(f"postier full-text index: {indexed} messages in {fts_build:.1f}s", flush=True)
        dove: Dovecot | None = None
        if not args.no_dovecot:
            dove = Dovecot(tmp / "dovecot", args.connections)
            for user in ("bob", "idle", "stress"):
                dst = dove.home(f"{user}")
                dst.mkdir(parents=True)
                shutil.copytree(inst.maildir(f"{user}@{DOMAIN}"), dst / "Maildir", symlinks=True)
        multi: Instance | None = None
        if args.workers != 1:
            multi = start_postier(tmp, args.connections, args.workers)
            for user in ("bob", "idle", "stress"):
                shutil.copytree(inst.maildir(f"{user}@{DOMAIN}"), multi.maildir(f"{user}@{DOMAIN}"), symlinks=True)
            if not args.stress_only:
                shutil.copy2(md.parent / FTS_NAME, multi.maildir(f"bob@{DOMAIN}").parent / FTS_NAME)  # the same index
        inst.start(wait_role="imap")
        try:
            assert inst.proc is not None
            pid = inst.proc.pid
            servers: dict[str, tuple[int, str, Callable[[], list[int]]]] = {
                "postier": (inst.port("imap"), f"bob@{DOMAIN}", lambda: _children(pid))}
            if multi is not None:
                multi.start(wait_role="imap")
                assert multi.proc is not None
                mpid = multi.proc.pid
                servers["postier-n"] = (multi.port("imap"), f"bob@{DOMAIN}", lambda: _children(mpid))
            if dove is not None:
                dove.start()
                servers["dovecot"] = (dove.port, f"bob@{DOMAIN}", dove.pids)
            results = {k: {} for k in servers}
            if not args.stress_only:
                # Memory first, on fresh processes: a Python process reuses memory freed by earlier
                # large commands, which would hide what the connections cost.
                print("postier: idle connections...", flush=True)
                idle: dict[str, dict[str, float]] = {"postier": {}, "dovecot": {}}
                idle["postier"]["_idle"] = idle_memory(inst.port("imap"), f"idle@{DOMAIN}", args.connections,
                                                      lambda: [pid])[0]
                if dove is not None:
                    print("dovecot: idle connections...", flush=True)
                    rss, pss = idle_memory(dove.port, f"idle@{DOMAIN}", args.connections, dove.pids)
                    idle["dovecot"]["_idle"] = rss
                    idle["dovecot"]["_idle_pss"] = pss
                print("timing (interleaved)...", flush=True)
                results = measure(servers, args.repeats)
                for k, v in results.items():
                    v.update(idle.get(k, {}))
            results["postier"]["_fts_build"] = fts_build
            if args.stress_seconds > 0:
                trees = {k: (port, tree) for k, (port, _user, tree) in servers.items()}
                figures = stress_rounds(trees, f"stress@{DOMAIN}", args.stress_clients, args.stress_seconds,
                                        max(1, args.stress_rounds))
                for k, v in figures.items():
                    results[k].update(v)
        finally:
            inst.stop()
            if multi is not None:
                multi.stop()
            if dove is not None:
                dove.stop()
        report(results, args)
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    p = results["postier"]
    d = results.get("dovecot")
    m = results.get("postier-n")
    print()
    if args.stress_only:
        report_stress(results, args)
        return
    print(f"IMAP benchmark: {args.messages} messages, {args.connections} idle connections")
    many = f"postier {args.workers}w" if m else ""
    print(f"{'':34} {'postier':>12} {many:>12} {'dovecot':>12} {'postier/dovecot':>16}")
    for key in STEPS:
        pv = p[key]
        dv = d[key] if d else None
        mv = f"{m[key] * 1000:>10.1f}ms" if m else ""
        ratio = f"{pv / dv:.2f}" if dv else "-"
        print(f"{key:34} {pv * 1000:>10.1f}ms {mv:>12} {'' if dv is None else f'{dv * 1000:>10.1f}ms':>12} "
              f"{ratio:>16}")
    print(f"server CPU time of the timed command (best run; {1000 / _TICK:.0f} ms steps):")
    for key in STEPS:
        pc = p["_cpu " + key]
        dc = d["_cpu " + key] if d else None
        mc = f"{m['_cpu ' + key] * 1000:>10.0f}ms" if m else ""
        ratio = f"{pc / dc:.2f}" if dc else "-"
        print(f"  {key:32} {pc * 1000:>10.0f}ms {mc:>12} {'' if dc is None else f'{dc * 1000:>10.0f}ms':>12} "
              f"{ratio:>16}")
    pi = p["_idle"]
    di = d["_idle"] if d else None
    print(f"{'memory per idle connection (RSS)':34} {pi:>10.0f}KB {'':>12} "
          f"{'' if di is None else f'{di:>10.0f}KB':>12} {(f'{pi / di:.2f}' if di else '-'):>16}")
    if d:
        print(f"{'  dovecot PSS per connection':34} {'':>12} {'':>12} {d['_idle_pss']:>10.0f}KB")
    if "_stress" in p:
        report_stress(results, args)
    print(f"postier full-text index built from the Maildir before the run: {p['_fts_build']:.1f}s"
          " (Dovecot: no FTS plugin)")
    checks = [(k, p.get(k), d.get(k) if d else None)
              for k in ("_flags_lines", "_search_hits", "_subject_hits", "_from_hits", "_body_hits", "_text_hits",
                        "_bodies")]
    print("sanity (postier, dovecot): " + ", ".join(f"{k[1:]}={a:.0f}/{b if b is None else f'{b:.0f}'}"
                                                   for k, a, b in checks))


def report_stress(results: dict[str, dict[str, float]], args: argparse.Namespace) -> None:
    """The stress figure: each server's commands/s, its ratio to Dovecot's, errors, CPU per command."""
    d = results.get("dovecot")
    print(f"stress: {args.stress_clients} clients, {args.stress_seconds:.0f}s each in {args.stress_rounds} rounds "
          "(login, select, fetch, store, append, expunge, logout)")
    names = {"postier": "postier 1 worker", "postier-n": f"postier {args.workers} workers", "dovecot": "dovecot"}
    for key, label in names.items():
        r = results.get(key)
        if r is None or "_stress" not in r:
            continue
        ratio = f"{r['_stress'] / d['_stress']:.2f}x dovecot" if d and d.get("_stress") and key != "dovecot" else ""
        print(f"  {label:20} {r['_stress']:>7.0f} commands/s  {ratio:>14}  errors {r['_stress_errors']:.0f}"
              f"  CPU {r['_stress_cpu']:.2f} ms/command")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
