"""Shared fixtures for the IMAP tests: a running postier instance, users, and a raw IMAP client."""

from __future__ import annotations

import itertools
import re
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.accounts import Accounts
from tests.harness import Instance

PASSWORD = "password123"
_LITERAL_END = re.compile(rb"\{(\d+)\+?\}\r\n$")
_users = itertools.count(1)


class IMAPServer:
    def __init__(self, inst: Instance):
        self.inst = inst
        self.accounts = Accounts(inst.root / "accounts.sqlite")
        # argon2's cheapest parameters (they travel in the hash): logins cost milliseconds, which keeps
        # these many-login tests fast; the real parameters are tested with the accounts.
        self.accounts.set_hash_cost(1, 8, 1)

    def user(self, prefix: str = "u") -> str:
        """A fresh user (added straight to the accounts database, which the server reads live)."""
        addr = f"{prefix}{next(_users)}@{self.inst.domain}"
        self.accounts.add_user(addr, PASSWORD)
        return addr

    def maildir(self, addr: str) -> Path:
        return self.inst.maildir(addr)

    def client(self, addr: str | None = None, tls: str = "implicit") -> RawIMAP:
        c = RawIMAP(self.inst, tls)
        if addr is not None:
            c.ok(f"LOGIN {addr} {PASSWORD}")
        return c


class RawIMAP:
    """A byte-level IMAP client: commands in, (untagged lines, tagged line) out."""

    def __init__(self, inst: Instance, tls: str = "implicit", timeout: float = 10.0, rcvbuf: int = 0):
        self.inst = inst
        role = "imaps" if tls == "implicit" else "imap"
        if rcvbuf:  # a small receive window: a client that stops reading holds up the server soon
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.settimeout(timeout)
            sock.connect(inst.addr(role))
        else:
            sock = socket.create_connection(inst.addr(role), timeout=timeout)
        self.sock: socket.socket | ssl.SSLSocket = sock
        if tls == "implicit":
            self.sock = inst.client_ssl_context().wrap_socket(sock)
        self.buf = b""
        self.last_untagged: list[bytes] = []
        self.tags = (f"t{i}" for i in itertools.count(1))
        self.greeting = self.line()
        if tls == "starttls":
            _u, tagged = self.cmd("STARTTLS")
            assert b"OK" in tagged, tagged
            self.starttls()

    def starttls(self) -> None:
        self.sock = self.inst.client_ssl_context().wrap_socket(self.sock)
        self.buf = b""

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk

    def line(self) -> bytes:
        """One response line, with any literal it announces appended (CRLF kept)."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            i = self.buf.index(b"\r\n") + 2
            part, self.buf = self.buf[:i], self.buf[i:]
            out += part
            m = _LITERAL_END.search(part)
            if not m:
                return out
            n = int(m.group(1))
            while len(self.buf) < n:
                self._fill()
            out += self.buf[:n]
            self.buf = self.buf[n:]

    def cmd(self, text: str | bytes, tag: str | None = None) -> tuple[list[bytes], bytes]:
        tag = tag or next(self.tags)
        data = text.encode() if isinstance(text, str) else text
        self.send(tag.encode() + b" " + data + b"\r\n")
        return self.until(tag)

    def until(self, tag: str) -> tuple[list[bytes], bytes]:
        untagged: list[bytes] = []
        while True:
            ln = self.line()
            if ln.startswith(tag.encode() + b" "):
                return untagged, ln
            untagged.append(ln)

    def ok(self, text: str | bytes) -> list[bytes]:
        u, t = self.cmd(text)
        assert t.split(b" ")[1] == b"OK", (text, u, t)
        return u

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawIMAP:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_instance(root: Path, extra: str = "") -> Instance:
    inst = Instance(root, "example.org", extra_config=extra)
    inst.start(wait_role="imaps")
    return inst


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IMAPServer]:
    inst = start_instance(tmp_path_factory.mktemp("imap"),
                          "[imap]\nmax_connections_per_user = 6\nidle_poll_interval = 0.2\n"
                          "[auth]\nfailure_delay = 0.01\nmax_failures = 1000\n")
    try:
        yield IMAPServer(inst)
    finally:
        rc = inst.stop()
        log = inst.log.read_text()
        assert "Traceback" not in log, log[-4000:]
        assert rc == 0, log[-2000:]


def wait_for(pred, timeout: float = 5.0, step: float = 0.02) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False
