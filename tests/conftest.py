"""Suite-wide guards."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _same_user_after_each_test() -> Iterator[None]:
    """A test that runs an admin command in-process as root must not drop the test process to the
    service user (every later test in the worker would then fail with EACCES): caught at the culprit."""
    uid = os.geteuid()
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    # The server's own umask (0077, server/privileges.py), set by a test that runs it in-process, would
    # make every later directory of this worker private: Postfix's queue (postsuper: EACCES), for one.
    os.umask(umask)
    assert os.geteuid() == uid, "this test changed the test process's user (run the CLI in a subprocess " \
                                "or quickstart with tests.harness.STAY_ROOT)"
