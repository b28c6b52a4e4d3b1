"""Test harness: real postier instances as subprocesses on loopback, free ports, a throwaway CA.

`Instance` writes a data directory with `postier quickstart` (every listener on a free port
offset, on the chosen loopback address), adds domains and users through the real CLI, and runs
`postier serve` as a child process that tests can stop (SIGTERM) or kill (SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx

from postier.config import STANDARD_PORTS

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
#: quickstart run as root sets up a service user and a drop of privileges; test instances live in
#: pytest's private (0700) temporary directories, which that user cannot enter, so they stay root
#: (tests/test_privileges.py covers the drop itself).
STAY_ROOT: tuple[str, ...] = ("--allow-root",) if os.geteuid() == 0 else ()


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_offset(host: str = "127.0.0.1", tries: int = 200) -> int:
    """A port offset N such that every standard port + N is free on host (and on 127.0.0.1 for LMTP over TCP)."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    # Below the kernel's ephemeral range (32768-60999 by default): an outgoing connection elsewhere
    # on the machine cannot take one of our ports while a test restarts the server.
    top = min(_ephemeral_low(), 65536) - max(STANDARD_PORTS.values()) - 1
    lo, hi = 10000, max(top, 10001)
    # Parallel test workers (pytest-xdist) each get their own band, so that the ports of one worker's
    # instances can never be taken by another's between the check below and the server's bind.
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if worker.startswith("gw") and worker[2:].isdigit() and count > 1:
        span = max(STANDARD_PORTS.values()) + 10
        width = (hi - lo) // count
        if width > span + 500:
            lo += int(worker[2:]) % count * width
            hi = lo + width - span
    for _ in range(tries):
        off = rng.randrange(lo, hi)
        if all(port_free(host, p + off) for p in STANDARD_PORTS.values()) and port_free(
                "127.0.0.1", STANDARD_PORTS["lmtp"] + off):
            return off
    raise RuntimeError("no free port offset found")


def start_all(instances: Sequence[Instance], wait_role: str = "smtp") -> None:
    """Start several servers at once (their start-ups overlap), then wait for each."""
    served = [inst.launch() for inst in instances]
    try:
        for inst, n in zip(instances, served, strict=True):
            inst.wait_ready(n, wait_role)
    except BaseException:
        for inst in instances:
            inst.stop()
        raise


def run_cli(config: Path | None, *args: str, stdin: str | None = None, check: bool = True,
            cwd: Path | None = None, python: str = PY) -> subprocess.CompletedProcess[str]:
    if cwd is None and python != PY:  # not the checkout: `-m postier` would import ./postier from there
        cwd = Path("/")
    cmd = [python, "-m", "postier"]
    if config is not None:
        cmd += ["--config", str(config)]
    cmd += list(args)
    p = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120, cwd=cwd)
    if check and p.returncode != 0:
        raise AssertionError(f"postier {' '.join(args)} failed ({p.returncode}): {p.stderr}{p.stdout}")
    return p


class Instance:
    """One postier server with its own data directory."""

    def __init__(self, root: Path, domain: str, address: str = "127.0.0.1", hostname: str | None = None,
                 extra_config: str = "", mailauth: bool | None = None, python: str = PY,
                 offset: int | None = None, quickstart_args: tuple[str, ...] = (), workers: int | None = None):
        self.python = python  # the interpreter running postier (a test may use an installed wheel's venv)
        self.root = root
        self.domain = domain
        self.address = address
        self.offset = free_offset(address) if offset is None else offset
        self.hostname = hostname or f"mail.{domain}"
        run_cli(None, "quickstart", "--domain", domain, "--data-dir", str(root), "--hostname", self.hostname,
                "--listen", address, "--port-offset", str(self.offset), "--quiet",
                *(quickstart_args or STAY_ROOT), python=python)
        self.config = root / "postier.toml"
        # Tests run without Internet DNS: SPF/DKIM/DMARC would all be temperrors (451). They are
        # off unless the test asks for them or brings its own DNS ([dns] / [mailauth] in extra_config).
        if mailauth is None:
            mailauth = "[mailauth]" in extra_config or "[dns]" in extra_config
        if not mailauth and "[mailauth]" not in extra_config:
            extra_config += "\n[mailauth]\nspf = false\ndkim_verify = false\ndmarc = false\n"
        # Tests store argon2's cheapest hashes to keep logins fast (`[auth] argon2_*`: a login with
        # the default parameters costs 0.14 s on two cores): the server must not upgrade a hash a
        # test wrote itself; tests/test_login_cache.py covers the defaults and the rehashing.
        cheap = "[auth]\nrehash_passwords = false\nargon2_time_cost = 1\nargon2_memory_kib = 8\nargon2_parallelism = 1\n"
        if "[auth]" in extra_config:
            extra_config = extra_config.replace("[auth]\n", cheap, 1)
        else:
            extra_config += "\n" + cheap
        self.add_config(extra_config)
        # `[server] workers`, always written (the default, one per core, would make each test's server
        # depend on the machine): 1 unless the test asks; POSTIER_TEST_WORKERS=2 runs every instance
        # as a supervisor and two workers.
        self.workers = workers if workers is not None else int(os.environ.get("POSTIER_TEST_WORKERS", "1") or 1)
        text = self.config.read_text()
        if "\n[server]\n" in text:
            text = text.replace("\n[server]\n", f"\n[server]\nworkers = {self.workers}\n", 1)
        else:
            text += f"\n[server]\nworkers = {self.workers}\n"
        self.config.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "server.log"

    def add_config(self, text: str) -> None:
        """Append TOML (top-level keys must come first: use tables)."""
        with open(self.config, "a") as f:
            f.write("\n" + text + "\n")

    def port(self, role: str) -> int:
        return STANDARD_PORTS[role] + self.offset

    def addr(self, role: str) -> tuple[str, int]:
        """(host, port) of a TCP listener; LMTP is on TCP only after `lmtp_over_tcp()`."""
        return ("127.0.0.1" if role == "lmtp" else self.address, self.port(role))

    @property
    def lmtp_path(self) -> Path:
        """LMTP's Unix socket (quickstart's default)."""
        return self.root / "run" / "lmtp"

    def lmtp_over_tcp(self) -> None:
        """Move LMTP from its Unix socket to 127.0.0.1:24+offset (before `start()`)."""
        text = self.config.read_text()
        old = '[listeners.lmtp]\npath = "run/lmtp"\n'
        assert old in text
        self.config.write_text(text.replace(old, f'[listeners.lmtp]\naddress = "127.0.0.1"\nport = {self.port("lmtp")}\n'))

    def cli(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run_cli(self.config, *args, stdin=stdin, check=check, python=self.python)

    def add_user(self, address: str, password: str = "password123", fmt: str | None = None) -> None:
        args = ["user", "add", address, "--password-stdin"]
        if fmt:
            args += ["--format", fmt]
        self.cli(*args, stdin=password + "\n")

    def maildir(self, address: str) -> Path:
        local, domain = address.lower().rsplit("@", 1)
        return self.root / "mail" / domain / local / "Maildir"

    def messages(self, address: str, folder: str = "") -> list[bytes]:
        md = self.maildir(address) / (f".{folder}" if folder else "")
        out = []
        for sub in ("new", "cur"):
            d = md / sub
            if d.is_dir():
                for f in sorted(d.iterdir()):
                    out.append(f.read_bytes())
        return out

    def wait_message(self, address: str, marker: bytes, timeout: float = 30.0,
                     log: Callable[[], str] | None = None) -> bytes:
        """The first message of `address` containing `marker`, polled until `timeout`; then the test
        fails with the end of `log()` (default: this instance's log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.messages(address):
                if marker in m:
                    return m
            time.sleep(0.05)
        text = log() if log is not None else self.log.read_text()
        raise AssertionError(f"{marker!r} not delivered to {address}; log:\n{text[-4000:]}")

    def start(self, wait_role: str = "smtp", timeout: float = 20.0) -> None:
        self.wait_ready(self.launch(), wait_role, timeout)

    def launch(self) -> int:
        """Start the server without waiting for it (`wait_ready`); returns the log's count of
        "workers serve" lines before it, which `wait_ready` needs."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        served = self._served()
        self.logf = open(self.log, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([self.python, "-m", "postier", "--config", str(self.config), "serve"],
                                     stdout=self.logf, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        return served

    def wait_ready(self, served: int, wait_role: str = "smtp", timeout: float = 20.0) -> None:
        """Wait until the launched server accepts connections on `wait_role` (every worker serves)."""
        assert self.proc is not None
        host, port = self.addr(wait_role)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"postier exited with {self.proc.returncode}: {self.log.read_text()}")
            if self.workers > 1:
                # The supervisor's word that every worker serves is enough, and a probe would be an
                # extra connection counted (by a worker, later) in the metrics tests' exact totals.
                if self._served() > served:
                    return
                time.sleep(0.05)
                continue
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.05)
                continue
            return
        raise AssertionError(f"postier did not listen on {host}:{port}: {self.log.read_text()}")

    def _served(self) -> int:
        """How many times the log says every worker of a supervisor serves."""
        try:
            return self.log.read_text(errors="replace").count(" workers serve")
        except FileNotFoundError:
            return 0

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        workers = list(self.worker_pids().values())
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self.logf.close()
        self._wait_gone(workers)  # a supervisor that crashed: its workers die after it
        return rc

    def kill(self) -> None:
        if self.proc is not None:
            workers = list(self.worker_pids().values())
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            self.logf.close()
            self._wait_gone(workers)

    @staticmethod
    def _wait_gone(pids: list[int], timeout: float = 10.0) -> None:
        """Wait (bounded) until the workers of a supervisor that was killed are gone too: they die
        by their parent-death signal, and until their exit is over the kernel still completes
        connections on the listening sockets they hold, which a restart would take for its own."""
        deadline = time.monotonic() + timeout
        for pid in pids:
            while time.monotonic() < deadline:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    break
                if "\nState:\tZ" in status:
                    break
                time.sleep(0.02)

    def worker_pids(self) -> dict[int, int]:
        """Worker index -> pid, from DATA_DIR/run/workers (empty with one process)."""
        try:
            text = (self.root / "run" / "workers").read_text()
        except FileNotFoundError:
            return {}
        return {int(i): int(p) for i, p in (ln.split() for ln in text.splitlines() if ln.strip())}

    def worker_of(self, sock: socket.socket) -> int | None:
        """The pid of the worker process holding the server side of the client socket `sock`
        (found through /proc: the connection's socket inode among each worker's descriptors)."""
        cport = sock.getsockname()[1]
        sport = sock.getpeername()[1]
        inode = None
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            with contextlib.suppress(OSError):
                for ln in Path(table).read_text().splitlines()[1:]:
                    f = ln.split()
                    if int(f[1].rsplit(":", 1)[1], 16) == sport and int(f[2].rsplit(":", 1)[1], 16) == cport:
                        inode = f[9]
        if inode is None:
            return None
        want = f"socket:[{inode}]"
        for pid in self.worker_pids().values():
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{pid}/fd/{fd}") == want:
                            return pid
        return None

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts this instance's self-signed certificate."""
        ctx = ssl.create_default_context(cafile=str(self.root / "tls" / "cert.pem"))
        ctx.check_hostname = False
        return ctx

    def web(self, host: str | None = None, tls: bool = True, timeout: float = 20.0) -> httpx.Client:
        """An HTTP client for this instance's https (or http) listener, naming `host` in Host:."""
        headers = {"Host": host} if host else {}
        if tls:
            return httpx.Client(base_url=f"https://{self.address}:{self.port('https')}", verify=self.client_ssl_context(),
                                timeout=timeout, follow_redirects=False, headers=headers)
        return httpx.Client(base_url=f"http://{self.address}:{self.port('http')}", timeout=timeout,
                            follow_redirects=False, headers=headers)

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def csrf_token(c: httpx.Client, path: str) -> str:
    """The CSRF token of the form on the page at `path` (webmail and admin pages)."""
    r = c.get(path)
    assert r.status_code == 200, r.text
    m = re.search(r'name="csrf" value="([^"]+)"', r.text)
    assert m, r.text
    return m.group(1)
