"""Helpers for the hardening tests: raw line clients bound to chosen loopback source addresses,
cheap users, waiting for a killed server, and a tiny threaded SMTP sink standing in for remote MXs."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from postier.accounts import Accounts
from tests.harness import Instance

PASSWORD = "password123"
_accounts: dict[Path, Accounts] = {}


def add_cheap_user(inst: Instance, address: str, password: str = PASSWORD) -> str:
    """A user whose argon2 hash uses the cheapest parameters (logins cost milliseconds); the
    running server reads the accounts database live."""
    acc = _accounts.get(inst.root)
    if acc is None:
        acc = _accounts[inst.root] = Accounts(inst.root / "accounts.sqlite")
        acc.set_hash_cost(1, 8, 1)
    acc.add_user(address, password)
    return address


def wait_for(pred: Callable[[], object], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(step)


def wait_dead(inst: Instance, timeout: float = 30.0) -> None:
    """The fault point killed the server: reap it so that it can be started again."""
    assert inst.proc is not None
    try:
        inst.proc.wait(timeout)
    except Exception as exc:
        raise AssertionError("the fault point was not reached (server still running): "
                             + inst.log.read_text()[-2000:]) from exc
    assert inst.proc.returncode == -9, f"expected SIGKILL, got {inst.proc.returncode}"
    inst.kill()  # reaps and closes the log


class Line:
    """A raw line-oriented client (SMTP, IMAP, POP3), optionally from a chosen source address."""

    def __init__(self, addr: tuple[str, int], source: str | None = None, timeout: float = 10.0,
                 tls: ssl.SSLContext | None = None):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if source:
            s.bind((source, 0))
        s.settimeout(timeout)
        s.connect(addr)
        self.sock: socket.socket = tls.wrap_socket(s) if tls is not None else s
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        out, _, self.buf = self.buf.partition(b"\r\n")
        return out

    def reply(self) -> bytes:
        """An SMTP reply (the last line of a multi-line one)."""
        while True:
            ln = self.line()
            if len(ln) < 4 or ln[3:4] != b"-":
                return ln

    def cmd(self, data: bytes) -> bytes:
        self.send(data + b"\r\n")
        return self.line()

    def smtp(self, data: bytes) -> bytes:
        self.send(data + b"\r\n")
        return self.reply()

    def imap(self, tag: bytes, data: bytes) -> tuple[list[bytes], bytes]:
        self.send(tag + b" " + data + b"\r\n")
        untagged = []
        while True:
            ln = self.line()
            if ln.startswith(tag + b" "):
                return untagged, ln
            untagged.append(ln)

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock)
        self.buf = b""

    def closed_within(self, seconds: float) -> tuple[float | None, bytes]:
        """Read until the server closes; (elapsed seconds or None if still open, bytes read)."""
        start = time.monotonic()
        got = self.buf
        self.buf = b""
        while time.monotonic() - start < seconds:
            self.sock.settimeout(max(0.01, seconds - (time.monotonic() - start)))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None, got
            except (ConnectionError, ssl.SSLError, OSError):
                return time.monotonic() - start, got
            if not chunk:
                return time.monotonic() - start, got
            got += chunk
        return None, got

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Line:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Sink:
    """A minimal SMTP server in a thread (the remote MX of queue tests): records each message,
    answers 250 to everything; `hold` pauses before the final reply."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((host, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.messages: list[bytes] = []
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._main = threading.Thread(target=self._accept, daemon=True)
        self._main.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        f = conn.makefile("rb")
        try:
            conn.sendall(b"220 sink.test ESMTP\r\n")
            for _ in range(10_000):  # bounded: a test sends a handful of commands
                line = f.readline(4096)
                if not line or self._stop.is_set():
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-sink.test\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go\r\n")
                    data = b""
                    while True:
                        ln = f.readline(65536)
                        if not ln or ln == b".\r\n":
                            break
                        data += ln[1:] if ln.startswith(b"..") else ln
                    self.messages.append(data)
                    conn.sendall(b"250 2.0.0 Ok\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")
        except OSError:
            return
        finally:
            f.close()
            conn.close()

    def count(self, marker: bytes) -> int:
        return sum(1 for m in list(self.messages) if marker in m)

    def stop(self) -> None:
        self._stop.set()
        self.listener.close()
        self._main.join(2)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    yield s
    s.stop()


def require(program: str) -> str | None:
    """The path of an external program, or skip (fail under POSTIER_REQUIRE_INTEROP=1)."""
    from tests.programs import require as _require

    return _require(program)
