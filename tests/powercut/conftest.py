"""Fixtures for the power-cut tests: a cutfs mount (tests/powercut/cutfs.py) per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from .mount import CutMount, unavailable_reason


@pytest.fixture
def cutfs(tmp_path: Path) -> Iterator[CutMount]:
    """A mounted cutfs; skipped where FUSE is missing, a failure under POSTIER_REQUIRE_INTEROP=1."""
    why = unavailable_reason()
    if why is not None:
        if os.environ.get("POSTIER_REQUIRE_INTEROP"):
            pytest.fail(f"FUSE is unavailable: {why}")
        pytest.skip(f"FUSE is unavailable: {why}")
    m = CutMount(tmp_path)
    m.start()
    try:
        yield m
    finally:
        m.close()
