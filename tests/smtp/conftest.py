"""One running postier for the inbound SMTP tests (real process, real sockets, real TLS)."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Instance


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    root: Path = tmp_path_factory.mktemp("mx")
    inst = Instance(root, "a.test", extra_config="[limits]\nmax_message_size = 1048576\nmax_recipients = 5\n"
                    "max_errors = 5\n")
    inst.add_user("alice@a.test")
    inst.add_user("bob@a.test")
    inst.add_user("carol@a.test", fmt="mbox")
    inst.cli("alias", "add", "team@a.test", "alice@a.test", "bob@a.test")
    inst.start()
    yield inst
    inst.stop()
