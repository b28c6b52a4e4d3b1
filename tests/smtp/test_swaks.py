"""swaks (Debian) as the client: plain, STARTTLS, a relay probe, pipelining."""

from __future__ import annotations

import subprocess

import pytest

from tests.harness import Instance
from tests.programs import require, require_perl_module

pytestmark = pytest.mark.slow


def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    path = require("swaks")
    if "-tls" in args:
        require_perl_module("Net::SSLeay")  # Debian only recommends it; without it swaks has no TLS
    return subprocess.run([path, "--timeout", "20", *args], capture_output=True, text=True, timeout=60)


def test_swaks_plain_tls_pipelining(mx: Instance) -> None:
    before = len(mx.messages("alice@a.test"))
    host = f"{mx.address}:{mx.port('smtp')}"
    r = swaks("--server", host, "--to", "alice@a.test", "--from", "s@remote.test", "--helo", "swaks.test")
    assert r.returncode == 0, r.stdout
    r = swaks("--server", host, "--to", "alice@a.test", "--from", "s@remote.test", "-tls", "--pipeline")
    assert r.returncode == 0, r.stdout
    assert "TLS started" in r.stdout
    assert len(mx.messages("alice@a.test")) == before + 2


def test_swaks_relay_probe_fails(mx: Instance) -> None:
    r = swaks("--server", f"{mx.address}:{mx.port('smtp')}", "--to", "victim@elsewhere.test",
              "--from", "spammer@elsewhere.test")
    assert r.returncode != 0
    assert "554 5.7.1" in r.stdout
