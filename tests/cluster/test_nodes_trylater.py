"""A cluster node whose PostgreSQL is stopped says "try later" on the logins not covered by
test_nodes.py: ManageSieve AUTHENTICATE answers NO (TRYLATER) (RFC 5804 §1.3), the webmail and admin
logins and a logged-in page answer HTTP 503 with Retry-After and a message (JSON when asked), never
"wrong password" nor a 500; nothing is counted against the client, and the same logins work again
once PostgreSQL is back."""

from __future__ import annotations

import base64
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from tests.harness import Instance  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import ALICE, PASSWORD, make_nodes  # noqa: E402


def sieve_auth(inst: Instance, user: str, password: str) -> bytes:
    """STARTTLS, then AUTHENTICATE PLAIN: the server's answer line."""
    with socket.create_connection(inst.addr("managesieve"), timeout=20) as raw:
        f = raw.makefile("rb")
        while not f.readline().startswith(b"OK"):  # the capabilities, then OK
            pass
        raw.sendall(b"STARTTLS\r\n")
        assert f.readline().startswith(b"OK")
        with inst.client_ssl_context().wrap_socket(raw, server_hostname=inst.hostname) as tls:
            g = tls.makefile("rb")
            while not g.readline().startswith(b"OK"):  # RFC 5804 §2.2: the capabilities again
                pass
            token = base64.b64encode(f"\0{user}\0{password}".encode())
            tls.sendall(b'AUTHENTICATE "PLAIN" "' + token + b'"\r\n')
            line = g.readline()
            tls.sendall(b"LOGOUT\r\n")
            return line


def test_managesieve_and_web_logins_say_try_later_while_postgresql_is_down(
        tmp_path: Path, pg_own: PgServer, s3: S3Server) -> None:
    (n,) = make_nodes(tmp_path, pg_own.create_db(), s3, count=1)
    n.cli("user", "add", f"boss@{n.domain}", "--admin", "--password-stdin", stdin=PASSWORD + "\n")
    n.start()
    try:
        assert sieve_auth(n, ALICE, PASSWORD) == b'OK "Authenticated"\r\n'
        with n.web(n.hostname) as web:
            assert web.post("/mail/login", data={"address": ALICE, "password": PASSWORD}).status_code == 303
            pg_own.stop()
            for _ in range(3):  # not counted as failures: the throttle would refuse logins after a few
                assert sieve_auth(n, ALICE, PASSWORD).startswith(b'NO (TRYLATER) "')
                assert sieve_auth(n, ALICE, "wrong-password").startswith(b'NO (TRYLATER) "')
                for path, who in (("/mail/login", ALICE), ("/admin/login", f"boss@{n.domain}")):
                    r = web.post(path, data={"address": who, "password": PASSWORD})
                    assert r.status_code == 503 and r.headers["Retry-After"], (path, r.status_code, r.text)
                    assert "cannot be reached" in r.text and "Wrong address" not in r.text
            r = web.get("/mail/folder")  # logged in before: the session's account cannot be read
            assert r.status_code == 503 and "cannot be reached" in r.text, r.status_code
            r = web.get("/mail/folder", headers={"Accept": "application/json"})
            assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
            r = web.get("/mail.mobileconfig", auth=(ALICE, PASSWORD))
            assert r.status_code == 503, r.status_code
        pg_own.start()
        for _ in range(60):  # the node connects again at the next use
            line = sieve_auth(n, ALICE, PASSWORD)
            if line.startswith(b"OK"):
                break
            assert line.startswith(b"NO (TRYLATER)"), line
            time.sleep(0.5)
        assert line == b'OK "Authenticated"\r\n'
        assert sieve_auth(n, ALICE, "wrong-password") == b'NO "Authentication failed"\r\n'
        with n.web(n.hostname) as web:
            assert web.post("/mail/login", data={"address": ALICE, "password": PASSWORD}).status_code == 303
            r = web.post("/admin/login", data={"address": f"boss@{n.domain}", "password": PASSWORD})
            assert r.status_code == 303, r.text
    finally:
        n.stop()
    assert "Traceback" not in n.log.read_text()
