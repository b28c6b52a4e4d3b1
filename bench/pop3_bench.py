"""POP3 benchmark: hold N logged-in POP3 sessions (implicit TLS, one user each, since a maildrop takes
one session at a time) on a real postier and report the server's memory per session, then time a
download of every maildrop (STAT, UIDL, RETR, QUIT) over those sessions.

    .venv/bin/python bench/pop3_bench.py [--sessions 200] [--size 20000]
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import Instance  # noqa: E402
from tests.pop3.conftest import PASSWORD, deliver, new_user  # noqa: E402


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Client:
    def __init__(self, inst: Instance, ctx: ssl.SSLContext):
        raw = socket.create_connection(inst.addr("pop3s"), timeout=30)
        self.sock = ctx.wrap_socket(raw, server_hostname=inst.hostname)
        self.buf = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def cmd(self, command: bytes) -> bytes:
        self.sock.sendall(command + b"\r\n")
        reply = self.line()
        if not reply.startswith(b"+OK"):
            raise RuntimeError(reply)
        return reply

    def multiline(self) -> int:
        size = 0
        while True:
            line = self.line()
            if line == b".":
                return size
            size += len(line) + 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=200)
    ap.add_argument("--size", type=int, default=20000, help="octets of the one message in each maildrop")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        inst = Instance(Path(tmp), "bench.test", extra_config=(
            f"[limits]\nmax_connections = {args.sessions + 10}\nmax_connections_per_ip = {args.sessions + 10}\n"))
        inst.start()
        try:
            assert inst.proc is not None
            users = [new_user(inst) for _ in range(args.sessions)]
            body = b"".join(b"%08d %s\r\n" % (i, b"z" * 60) for i in range(max(1, args.size // 71)))
            for u in users:
                deliver(inst, u, "bench", body)
            ctx = inst.client_ssl_context()
            for round_ in ("first login (creates each user's index)", "second login"):
                time.sleep(0.5)
                base = rss_kib(inst.proc.pid)
                started = time.monotonic()
                clients = []
                for _ in users:
                    c = Client(inst, ctx)
                    c.line()
                    clients.append(c)
                connect_s = time.monotonic() - started
                time.sleep(0.2)
                connected = rss_kib(inst.proc.pid)
                started = time.monotonic()
                for c, u in zip(clients, users, strict=True):
                    c.cmd(b"USER " + u.encode())
                    c.cmd(b"PASS " + PASSWORD.encode())
                login_s = time.monotonic() - started
                time.sleep(0.5)
                held = rss_kib(inst.proc.pid)
                started = time.monotonic()
                octets = 0
                for c in clients:
                    c.cmd(b"STAT")
                    c.cmd(b"UIDL")
                    c.multiline()
                    c.cmd(b"RETR 1")
                    octets += c.multiline()
                    c.cmd(b"QUIT")
                    c.sock.close()
                fetch_s = time.monotonic() - started
                n = args.sessions
                print(f"{round_}:")
                print(f"  server RSS {base} KiB; +{(connected - base) / n:.1f} KiB per TLS connection, "
                      f"+{(held - connected) / n:.1f} KiB per logged-in session")
                print(f"  TLS connects {n / connect_s:.0f}/s, logins {n / login_s:.0f}/s "
                      f"(sequential, cheap password hashes)")
                print(f"  download: {octets / 1e6:.1f} MB in {fetch_s:.2f} s (STAT, UIDL, RETR, QUIT per session)")
        finally:
            inst.stop()


if __name__ == "__main__":
    main()
