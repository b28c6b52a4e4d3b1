"""The SMTP listener driver (server/smtp.py) against a real postier: timeouts, slowloris deadlines,
pipelined batches, connection limits, a client leaving mid-message, recipient cache invalidation."""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.accounts import CACHE_CHECK, Accounts

from tests.harness import Instance

MSG = b"Subject: driver\r\n\r\nbody\r\n"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    inst = Instance(tmp_path_factory.mktemp("drv"), "d.test", extra_config=(
        "[limits]\nidle_timeout = 2.0\ncommand_timeout = 1.0\nmin_data_rate = 2000\n"
        "max_connections_per_ip = 6\n"))
    inst.add_user("u@d.test")
    inst.start()
    yield inst
    inst.stop()


class Client:
    def __init__(self, inst: Instance, role: str = "smtp") -> None:
        self.sock = socket.create_connection(inst.addr(role), timeout=10)
        self.buf = b""

    def reply(self) -> bytes:
        """One whole reply (every line), CRLFs included."""
        out = b""
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {out!r}")
                self.buf += chunk
            line, _, self.buf = self.buf.partition(b"\r\n")
            out += line + b"\r\n"
            if line[3:4] != b"-":
                return out

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def closed(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.sock.close()


def test_idle_timeout(srv: Instance) -> None:
    c = Client(srv)
    try:
        assert c.reply().startswith(b"220")
        assert c.cmd(b"EHLO idle.test").startswith(b"250-")
        t0 = time.monotonic()
        c.sock.settimeout(10)
        assert c.reply().startswith(b"421 4.4.2")
        assert 1.5 < time.monotonic() - t0 < 6
        assert c.closed()
    finally:
        c.close()


def test_command_line_deadline(srv: Instance) -> None:
    """A started line must be finished within command_timeout, however often bytes trickle in."""
    c = Client(srv)
    try:
        c.reply()
        t0 = time.monotonic()
        for b in b"EHLO slow.loris.test":  # one byte every 0.3 s: never idle for 2 s
            try:
                c.sock.sendall(bytes([b]))
            except OSError:
                break
            if select.select([c.sock], [], [], 0.3)[0]:
                break
        elapsed = time.monotonic() - t0
        data = c.buf + _drain(c.sock)
    finally:
        c.close()
    assert data.startswith(b"421 4.4.2"), data
    assert 0.8 < elapsed < 4


def _drain(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


def test_slow_message_transfer(srv: Instance) -> None:
    """DATA gets command_timeout + bytes/min_data_rate: 100 bytes every 0.4 s is too slow."""
    before = len(srv.messages("u@d.test"))
    c = Client(srv)
    try:
        c.reply()
        c.cmd(b"EHLO slow.test")
        assert c.cmd(b"MAIL FROM:<a@remote.test>").startswith(b"250")
        assert c.cmd(b"RCPT TO:<u@d.test>").startswith(b"250")
        assert c.cmd(b"DATA").startswith(b"354")
        t0 = time.monotonic()
        try:
            for _ in range(30):
                c.sock.sendall(b"x" * 98 + b"\r\n")
                time.sleep(0.4)
        except OSError:
            pass
        data = c.buf + _drain(c.sock)
        assert data.startswith(b"421 4.4.2"), data
        assert time.monotonic() - t0 < 8
    finally:
        c.close()
    time.sleep(0.2)
    assert len(srv.messages("u@d.test")) == before


def test_fast_transfer_of_a_large_message_is_not_cut(srv: Instance) -> None:
    """1 MB in one go: well within command_timeout + size/min_data_rate."""
    before = len(srv.messages("u@d.test"))
    c = Client(srv)
    try:
        c.reply()
        c.cmd(b"EHLO big.test")
        c.cmd(b"MAIL FROM:<a@remote.test>")
        c.cmd(b"RCPT TO:<u@d.test>")
        assert c.cmd(b"DATA").startswith(b"354")
        c.sock.sendall(b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1000 + b".\r\n")
        assert c.reply().startswith(b"250 2.0.0")
        assert c.cmd(b"QUIT").startswith(b"221")
    finally:
        c.close()
    assert len(srv.messages("u@d.test")) == before + 1


def test_pipelined_transactions_in_one_write(srv: Instance) -> None:
    """RFC 2920: a whole transaction in one segment is answered reply by reply, in order."""
    before = len(srv.messages("u@d.test"))
    c = Client(srv)
    try:
        c.reply()
        c.cmd(b"EHLO pipe.test")
        c.sock.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@d.test>\r\nRCPT TO:<nobody@d.test>\r\n"
                       b"RCPT TO:<u+tag@d.test>\r\nDATA\r\n")
        replies = [c.reply()[:3] for _ in range(5)]
        assert replies == [b"250", b"250", b"550", b"250", b"354"]
        c.sock.sendall(MSG + b".\r\nRSET\r\nNOOP\r\n")
        assert c.reply().startswith(b"250 2.0.0")
        assert c.reply().startswith(b"250")
        assert c.reply().startswith(b"250")
        assert c.cmd(b"QUIT").startswith(b"221")
        assert c.closed()
    finally:
        c.close()
    assert len(srv.messages("u@d.test")) == before + 1  # two RCPTs, one user: one copy


def test_client_leaving_mid_message_delivers_nothing(srv: Instance) -> None:
    before = len(srv.messages("u@d.test"))
    c = Client(srv)
    c.reply()
    c.cmd(b"EHLO gone.test")
    c.cmd(b"MAIL FROM:<a@remote.test>")
    c.cmd(b"RCPT TO:<u@d.test>")
    c.cmd(b"DATA")
    c.sock.sendall(b"Subject: cut\r\n\r\nhalf a mess")
    c.close()
    time.sleep(0.3)
    c = Client(srv)  # the server is fine
    try:
        assert c.reply().startswith(b"220")
        assert c.cmd(b"NOOP").startswith(b"250")
    finally:
        c.close()
    assert len(srv.messages("u@d.test")) == before


def test_recipients_follow_account_changes(srv: Instance) -> None:
    """The RCPT cache sees users added and removed by another process while the server runs.

    The changes are made through the accounts database from this process (what the CLI does), with
    argon2's cheapest parameters: a CLI run with real ones can outlast the 2 s idle timeout here."""
    accounts = Accounts(srv.root / "accounts.sqlite")
    accounts.set_hash_cost(1, 8, 1)
    c = Client(srv)
    try:
        c.reply()
        c.cmd(b"EHLO cache.test")
        c.cmd(b"MAIL FROM:<a@remote.test>")
        assert c.cmd(b"RCPT TO:<late@d.test>").startswith(b"550 5.1.1")
        accounts.add_user("late@d.test", "password123")
        time.sleep(CACHE_CHECK + 0.05)  # the documented staleness bound of the server's cache
        assert c.cmd(b"RCPT TO:<late@d.test>").startswith(b"250")
        accounts.add_alias("alias-late@d.test", ["late@d.test"])
        time.sleep(CACHE_CHECK + 0.05)  # the documented staleness bound of the server's cache
        assert c.cmd(b"RCPT TO:<alias-late@d.test>").startswith(b"250")
        accounts.remove_user("late@d.test")
        time.sleep(CACHE_CHECK + 0.05)  # the documented staleness bound of the server's cache
        assert c.cmd(b"RCPT TO:<late@d.test>").startswith(b"550 5.1.1")
        assert c.cmd(b"RCPT TO:<alias-late@d.test>").startswith(b"550 5.1.1")
    finally:
        c.close()
        accounts.close()


def test_connection_limit_per_ip(srv: Instance) -> None:
    clients = []
    try:
        for _ in range(6):
            c = Client(srv)
            clients.append(c)
            assert c.reply().startswith(b"220")
        extra = Client(srv)
        clients.append(extra)
        assert extra.reply().startswith(b"421 4.7.0")
        assert extra.closed()
    finally:
        for c in clients:
            c.close()
    deadline = time.monotonic() + 5
    while True:  # the slots are given back when the connections end
        c = Client(srv)
        try:
            if c.reply().startswith(b"220"):
                break
        finally:
            c.close()
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_graceful_shutdown_after_a_delivery(tmp_path: Path) -> None:
    """SIGTERM: a session that just got its 250 and one still waiting for EHLO both get 421 4.3.2."""
    inst = Instance(tmp_path / "g", "g.test")
    inst.add_user("u@g.test")
    inst.start()
    c = Client(inst)
    try:
        c.reply()
        c.cmd(b"EHLO g.test")
        c.cmd(b"MAIL FROM:<a@remote.test>")
        c.cmd(b"RCPT TO:<u@g.test>")
        c.cmd(b"DATA")
        idle = Client(inst)
        assert idle.reply().startswith(b"220")
        c.sock.sendall(MSG + b".\r\n")
        assert c.reply().startswith(b"250 2.0.0")
        assert inst.proc is not None
        inst.proc.terminate()
        assert idle.reply().startswith(b"421 4.3.2")
        assert c.reply().startswith(b"421 4.3.2")
        assert inst.proc.wait(20) == 0
    finally:
        c.close()
        inst.stop()
    assert len(inst.messages("u@g.test")) == 1


def test_session_timeout_even_when_busy_talking(tmp_path: Path) -> None:
    """limits.session_timeout bounds the whole session, however active the client."""
    inst = Instance(tmp_path / "s", "s.test", extra_config="[limits]\nsession_timeout = 1.5\nidle_timeout = 10.0\n")
    inst.start()
    c = Client(inst)
    try:
        c.reply()
        t0 = time.monotonic()
        got = b""
        for _ in range(40):
            try:
                got = c.cmd(b"NOOP")
            except (ConnectionError, OSError):
                break
            if got.startswith(b"421"):
                break
            time.sleep(0.2)
        assert got.startswith(b"421 4.4.2"), got
        assert 1.2 < time.monotonic() - t0 < 5
    finally:
        c.close()
        inst.stop()


def test_starttls_then_pipelined_transaction(srv: Instance) -> None:
    """After STARTTLS the Protocol runs on the TLS transport: a pipelined transaction goes through."""
    before = len(srv.messages("u@d.test"))
    c = Client(srv)
    try:
        c.reply()
        c.cmd(b"EHLO tls.test")
        assert c.cmd(b"STARTTLS").startswith(b"220")
        c.sock = srv.client_ssl_context().wrap_socket(c.sock, server_hostname="mail.d.test")
        assert b"250 CHUNKING" in c.cmd(b"EHLO tls.test")
        c.sock.sendall(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<u@d.test>\r\nDATA\r\n")
        assert [c.reply()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        c.sock.sendall(MSG + b".\r\n")
        assert c.reply().startswith(b"250 2.0.0")
        assert c.cmd(b"QUIT").startswith(b"221")
    finally:
        c.close()
    got = srv.messages("u@d.test")
    assert len(got) == before + 1 and b"with ESMTPS" in got[-1]
