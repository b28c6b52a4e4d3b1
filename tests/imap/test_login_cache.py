"""Logins through the verification cache (accounts.LoginCache) on a real server: two sessions
logging in at once, and a password change that takes effect at the very next login."""

from __future__ import annotations

import threading

from tests.concurrency import together

from .conftest import PASSWORD, IMAPServer


def test_two_sessions_log_in_concurrently(server: IMAPServer) -> None:
    addr = server.user("lc")
    barrier = threading.Barrier(2)

    def login() -> bytes:
        with server.client() as c:
            barrier.wait(timeout=10)
            _u, tagged = c.cmd(f"LOGIN {addr} {PASSWORD}")
            return tagged.split(b" ")[1]

    assert together(login, login, timeout=30) == [b"OK", b"OK"]
    for _ in range(3):  # and again, one after the other (cache hits)
        with server.client(addr) as c:
            c.ok("SELECT INBOX")


def test_password_change_invalidates_the_cached_login(server: IMAPServer) -> None:
    addr = server.user("lc")
    for _ in range(2):
        with server.client(addr):
            pass
    server.accounts.set_password(addr, "another-password")  # as `postier user passwd` does
    with server.client() as c:
        _u, tagged = c.cmd(f"LOGIN {addr} {PASSWORD}")
        assert tagged.split(b" ")[1] == b"NO", tagged
    with server.client() as c:
        c.ok(f"LOGIN {addr} another-password")
