"""scripts/install-test-deps installs every Debian package the tests name (tests/programs.py)."""

from __future__ import annotations

import subprocess

from tests.harness import REPO
from tests.programs import PACKAGES, PERL_MODULES


def test_install_script_lists_every_package_tests_need() -> None:
    listed = set(subprocess.run([str(REPO / "scripts" / "install-test-deps"), "--list"], capture_output=True,
                                text=True, check=True, timeout=30).stdout.split())
    needed = set(PACKAGES.values()) | set(PERL_MODULES.values())
    assert needed <= listed, needed - listed
