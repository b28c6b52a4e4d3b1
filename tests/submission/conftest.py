"""One running postier with the submission listeners, and a test DNS server for its outbound queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dnsserver import DNSServer
from tests.harness import Instance

PASSWORD = "password123"


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSServer]:
    with DNSServer() as server:
        server.servfail("defer.test")
        yield server


@pytest.fixture(scope="module")
def msa(tmp_path_factory: pytest.TempPathFactory, dns: DNSServer) -> Iterator[Instance]:
    root: Path = tmp_path_factory.mktemp("msa")
    inst = Instance(root, "a.test", extra_config=(
        f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 2.0\n'
        "[submission]\nmax_messages_per_day = 3\n"
        "[auth]\nfailure_delay = 0.0\n"))
    for user in ("alice@a.test", "bob@a.test", "carol@a.test", "dave@a.test"):
        inst.add_user(user, PASSWORD)
    inst.cli("alias", "add", "sales@a.test", "alice@a.test")
    inst.start(wait_role="submission")
    yield inst
    inst.stop()
