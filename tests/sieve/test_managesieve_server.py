"""ManageSieve over real sockets and real TLS (trustme), driven by a real client: sieve-connect uploads,
lists, activates, downloads and deletes scripts over STARTTLS; a parse error comes back with its line.

The driver is served by a plain asyncio server on loopback (the port-4190 listener role is mounted by
the server's composition root); a Python client checks that plaintext pipelined after STARTTLS is
dropped and that AUTHENTICATE is refused before TLS.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from postier.message.types import User
from postier.proto import sasl
from postier.proto.managesieve import ManageSieveSettings
from postier.server.managesieve import ManageSieveBackend, serve
from postier.sieve import CAPABILITIES
from postier.store.sieve import ScriptStore

SIEVE_CONNECT = shutil.which("sieve-connect")
PASSWORD = "correct horse battery"


class OneAccount:
    """The accounts `server/auth.settle` asks: one user, one password, no SCRAM keys."""

    user = User("bob@example.com", "bob", "example.com", "maildir")

    async def verify_password_async(self, address: str, password: str) -> User | None:
        return self.user if (address, password) == (self.user.address, PASSWORD) else None

    def scram_credentials(self, address: str) -> sasl.ScramCredentials | None:
        return None

    def get_user(self, address: str) -> User | None:
        return self.user if address == self.user.address else None


class Server:
    def __init__(self, root: Path, ca: trustme.CA) -> None:
        cert = ca.issue_cert("localhost", "127.0.0.1")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)

        self.backend = ManageSieveBackend(
            accounts=OneAccount(),
            store_for=lambda user: ScriptStore(root / user / "sieve", max_script_size=4096), tls_context=ctx,
            settings=ManageSieveSettings(sieve_extensions=tuple(sorted(CAPABILITIES)), mechanisms=("PLAIN",)),
            idle_timeout=30)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)

            async def start() -> None:
                srv = await asyncio.start_server(lambda r, w: serve(r, w, self.backend), "127.0.0.1", 0)
                self.port = srv.sockets[0].getsockname()[1]
                ready.set()

            self.loop.run_until_complete(start())
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    s = Server(tmp_path / "homes", ca)
    yield s, ca_file
    s.stop()


def _sc(server: Server, ca_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert SIEVE_CONNECT is not None
    r, w = os.pipe()
    os.write(w, PASSWORD.encode() + b"\n")
    os.close(w)
    try:
        return subprocess.run(
            [SIEVE_CONNECT, "--server", "127.0.0.1", "--port", str(server.port), "--user", "bob@example.com",
             "--passwordfd", str(r), "--tlscafile", str(ca_file), "--tlshostname", "localhost",
             "--authmech", "PLAIN", *args],
            capture_output=True, text=True, timeout=60, pass_fds=(r,))
    finally:
        os.close(r)


@pytest.mark.skipif(SIEVE_CONNECT is None and os.environ.get("POSTIER_REQUIRE_INTEROP") != "1",
                    reason="sieve-connect not installed")
def test_sieve_connect_round_trip(server: tuple[Server, Path], tmp_path: Path) -> None:
    srv, ca_file = server
    good = tmp_path / "vacation.sieve"
    good.write_text('require ["fileinto", "vacation"];\nif header :contains "subject" "[dev]" '
                    '{ fileinto "Lists"; }\nvacation :days 3 "Away until Monday.";\n')
    up = _sc(srv, ca_file, "--upload", "--localsieve", str(good), "--remotesieve", "main")
    assert up.returncode == 0, up.stderr
    assert _sc(srv, ca_file, "--activate", "--remotesieve", "main").returncode == 0
    listing = _sc(srv, ca_file, "--list")
    assert listing.returncode == 0 and "main" in listing.stdout and "ACTIVE" in listing.stdout.upper()
    out = tmp_path / "back.sieve"
    down = _sc(srv, ca_file, "--download", "--remotesieve", "main", "--localsieve", str(out))
    assert down.returncode == 0, down.stderr
    assert out.read_bytes() == good.read_bytes()
    bad = tmp_path / "bad.sieve"
    bad.write_text('require "fileinto";\nkeep;\nfileinto "x"\n')
    refused = _sc(srv, ca_file, "--upload", "--localsieve", str(bad), "--remotesieve", "bad")
    assert refused.returncode != 0 and "line 4" in refused.stdout + refused.stderr
    assert _sc(srv, ca_file, "--delete", "--remotesieve", "main").returncode != 0  # active
    assert _sc(srv, ca_file, "--deactivate").returncode == 0
    assert _sc(srv, ca_file, "--delete", "--remotesieve", "main").returncode == 0
    assert "main" not in _sc(srv, ca_file, "--list").stdout


def _read_until(sock: ssl.SSLSocket | socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_plaintext_after_starttls_dropped_and_no_auth_before_tls(server: tuple[Server, Path]) -> None:
    srv, ca_file = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
        greeting = _read_until(raw, b'OK "postier ready"\r\n')
        assert b'"STARTTLS"' in greeting and b'"SASL" ""' in greeting
        raw.sendall(b'AUTHENTICATE "PLAIN" "AGJvYkBleGFtcGxlLmNvbQBjb3JyZWN0IGhvcnNlIGJhdHRlcnk="\r\n')
        assert _read_until(raw, b"\r\n") == b'NO (ENCRYPT-NEEDED) "authentication needs TLS"\r\n'
        raw.sendall(b"STARTTLS\r\nLISTSCRIPTS\r\n")  # the second line must never be answered
        assert _read_until(raw, b"\r\n") == b'OK "Begin TLS negotiation"\r\n'
        ctx = ssl.create_default_context(cafile=str(ca_file))
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            caps = _read_until(tls, b'OK "TLS active"\r\n')
            assert b'"SASL" "PLAIN"' in caps and b"STARTTLS" not in caps
            tls.sendall(b"NOOP\r\n")
            assert _read_until(tls, b"\r\n") == b'OK "Done"\r\n'
            tls.sendall(b"LOGOUT\r\n")
            assert _read_until(tls, b"\r\n") == b'OK "Logout completed"\r\n'
