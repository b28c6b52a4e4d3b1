"""IMAP connection limits and failed-login throttling (each test connects from its own loopback IP)."""

from __future__ import annotations

import base64
import socket
import ssl
from collections.abc import Iterator

import pytest

from postier.proto import sasl

from .conftest import PASSWORD, IMAPServer, start_instance


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IMAPServer]:
    inst = start_instance(tmp_path_factory.mktemp("limits"),
                          "[limits]\nmax_connections_per_ip = 3\n"
                          "[auth]\nfailure_delay = 0.05\nmax_failures = 3\n")
    try:
        yield IMAPServer(inst)
    finally:
        inst.stop()
        assert "Traceback" not in inst.log.read_text()


def connect(server: IMAPServer, source_ip: str) -> tuple[ssl.SSLSocket, bytes]:
    raw = socket.create_connection(server.inst.addr("imaps"), timeout=10, source_address=(source_ip, 0))
    s = server.inst.client_ssl_context().wrap_socket(raw)
    return s, read_line(s)


def read_line(s: ssl.SSLSocket) -> bytes:
    buf = b""
    while not buf.endswith(b"\r\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        buf += chunk
    return buf


def test_per_ip_connection_limit(server: IMAPServer) -> None:
    socks = []
    try:
        for _ in range(3):
            s, greeting = connect(server, "127.0.0.11")
            assert greeting.startswith(b"* OK")
            socks.append(s)
        s, greeting = connect(server, "127.0.0.11")
        assert greeting.startswith(b"* BYE [UNAVAILABLE]")
        s.close()
        s, greeting = connect(server, "127.0.0.12")  # another address is not affected
        assert greeting.startswith(b"* OK")
        s.close()
    finally:
        for s in socks:
            s.close()


def test_failed_logins_are_throttled(server: IMAPServer) -> None:
    addr = server.user()
    s, _g = connect(server, "127.0.0.21")
    replies = []
    for i in range(3):
        s.sendall(b"a%d LOGIN %s wrong-password\r\n" % (i, addr.encode()))
        replies.append(read_line(s))
    assert b"AUTHENTICATIONFAILED" in replies[0] and b"AUTHENTICATIONFAILED" in replies[1]
    assert replies[2].startswith(b"* BYE")  # the third failure ends the session
    s.close()
    s, greeting = connect(server, "127.0.0.21")
    assert greeting.startswith(b"* BYE")  # and the address is refused for a while
    s.close()
    s, greeting = connect(server, "127.0.0.22")
    assert greeting.startswith(b"* OK")
    s.sendall(b"a LOGIN %s %s\r\n" % (addr.encode(), PASSWORD.encode()))
    assert read_line(s).startswith(b"a OK")
    s.close()


def test_failed_scram_counts_in_the_throttle(server: IMAPServer) -> None:
    addr = server.user()
    s, _g = connect(server, "127.0.0.23")
    replies = []
    for i in range(3):
        scram = sasl.ScramClient(addr, "wrong-password")
        s.sendall(b"a%d AUTHENTICATE SCRAM-SHA-256 %s\r\n" % (i, base64.b64encode(scram.first_message())))
        first = read_line(s)
        assert first.startswith(b"+ "), first
        s.sendall(base64.b64encode(scram.final_message(base64.b64decode(first[2:].strip()))) + b"\r\n")
        replies.append(read_line(s))
    assert b"AUTHENTICATIONFAILED" in replies[0] and b"AUTHENTICATIONFAILED" in replies[1]
    assert replies[2].startswith(b"* BYE")  # the third failure ends the session
    s.close()
    s, greeting = connect(server, "127.0.0.23")
    assert greeting.startswith(b"* BYE")
    s.close()
