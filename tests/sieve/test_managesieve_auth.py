"""ManageSieve SASL through the shared mechanism, on a running postier's port-4190 listener (STARTTLS,
real TLS): SCRAM-SHA-256 succeeds with the server signature in the OK (RFC 5804 §2.1) and its
failures count in the login throttle like PLAIN's; the throttle is the one IMAP uses, so an address
refused on 4190 is refused by IMAP too, and the other way round.
"""

from __future__ import annotations

import base64
import imaplib
import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.proto.sasl import ScramClient
from tests.harness import Instance

pytestmark = pytest.mark.timeout(120)


def _instance(root: Path, address: str) -> Instance:
    inst = Instance(root, "m.test", address=address,
                    extra_config="[auth]\nfailure_delay = 0.0\nmax_failures = 3\n")
    inst.add_user("sue@m.test")
    return inst


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Instance]:
    inst = _instance(tmp_path / "m", "127.0.0.7")
    inst.start()
    try:
        yield inst
    finally:
        inst.stop()


class Client:
    def __init__(self, inst: Instance) -> None:
        raw = socket.create_connection(inst.addr("managesieve"), timeout=30)
        self.buf = b""
        self.sock: socket.socket | ssl.SSLSocket = raw
        self.until(b'OK "postier ready"\r\n')
        raw.sendall(b"STARTTLS\r\n")
        assert self.line().startswith(b"OK")
        self.sock = inst.client_ssl_context().wrap_socket(raw, server_hostname=inst.hostname)
        self.until(b'OK "TLS active"\r\n')

    def until(self, end: bytes) -> bytes:
        while end not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            self.buf += chunk
        data, _, self.buf = self.buf.partition(end)
        return data + end

    def line(self) -> bytes:
        return self.until(b"\r\n")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def scram(c: Client, user: str, password: str) -> bytes:
    """One SCRAM-SHA-256 AUTHENTICATE; the server's last line."""
    sc = ScramClient(user, password)
    c.send(b'AUTHENTICATE "SCRAM-SHA-256" "' + base64.b64encode(sc.first_message()) + b'"\r\n')
    challenge = c.line()
    if not challenge.startswith(b'"'):
        return challenge
    final = sc.final_message(base64.b64decode(challenge.strip().strip(b'"')))
    c.send(b'"' + base64.b64encode(final) + b'"\r\n')
    last = c.line()
    m = re.match(rb'OK \(SASL "([^"]*)"\)', last)
    if m is not None:
        assert sc.verify_server_final(base64.b64decode(m.group(1)))
    return last


def plain(c: Client, user: str, password: str) -> bytes:
    c.send(b'AUTHENTICATE "PLAIN" "' + base64.b64encode(f"\0{user}\0{password}".encode()) + b'"\r\n')
    return c.line()


def imap_login(inst: Instance, password: str) -> str:
    """"OK", or the refusal (a blocked address gets BYE in the greeting or at LOGIN)."""
    try:
        with imaplib.IMAP4(*inst.addr("imap")) as im:
            im.starttls(inst.client_ssl_context())
            im.login("sue@m.test", password)
            return "OK"
    except (imaplib.IMAP4.error, imaplib.IMAP4.abort) as e:
        return str(e)


def test_scram_success_and_failures_throttled_shared_with_imap(server: Instance) -> None:
    c = Client(server)
    assert scram(c, "sue@m.test", "password123").startswith(b'OK (SASL "')
    c.send(b"LISTSCRIPTS\r\n")
    assert c.line() == b"OK\r\n"
    c.close()
    c = Client(server)
    assert scram(c, "sue@m.test", "wrong") == b'NO "Authentication failed"\r\n'
    assert plain(c, "sue@m.test", "wrong") == b'NO "Authentication failed"\r\n'
    assert scram(c, "sue@m.test", "wrong").startswith(b'BYE "Too many failed logins')  # the third
    c.close()
    c = Client(server)  # a new session from the same address: refused before any check
    assert scram(c, "sue@m.test", "password123").startswith(b"BYE")
    c.close()
    assert "Too many failed logins" in imap_login(server, "password123")


def test_imap_failures_count_on_4190(tmp_path: Path) -> None:
    inst = _instance(tmp_path / "n", "127.0.0.8")
    inst.start()
    try:
        for _ in range(3):
            assert imap_login(inst, "wrong") != "OK"
        c = Client(inst)
        assert plain(c, "sue@m.test", "password123").startswith(b"BYE")
        c.close()
    finally:
        inst.stop()
