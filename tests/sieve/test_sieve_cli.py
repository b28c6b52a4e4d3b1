"""`postier sieve ...` over a quickstart data directory: put (with parse errors), list, get, activate,
delete, check."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from postier.cli import main
from tests.harness import STAY_ROOT


@pytest.fixture
def cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    data = tmp_path / "data"
    # STAY_ROOT: run as root, an admin command would drop this test process to the service user
    assert main(["quickstart", "--domain", "example.com", "--data-dir", str(data), "--quiet",
                 "--port-offset", "30000", *STAY_ROOT]) == 0
    path = str(data / "postier.toml")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"correct horse battery\n")))
    assert main(["-c", path, "user", "add", "bob@example.com", "--password-stdin"]) == 0
    return path


def test_sieve_admin_commands(cfg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.sieve"
    good.write_text('require "fileinto";\nfileinto "Lists";\n')
    bad = tmp_path / "bad.sieve"
    bad.write_text("keep;\nif true {\n")
    assert main(["-c", cfg, "sieve", "put", "bob@example.com", "main", str(good)]) == 0
    assert main(["-c", cfg, "sieve", "activate", "bob@example.com", "main"]) == 0
    capsys.readouterr()
    assert main(["-c", cfg, "sieve", "list", "bob@example.com"]) == 0
    assert capsys.readouterr().out == "main  (active)\n"
    assert main(["-c", cfg, "sieve", "put", "bob@example.com", "bad", str(bad)]) != 0
    assert "line 3" in capsys.readouterr().err
    assert main(["-c", cfg, "sieve", "check", "bob@example.com", str(good)]) == 0
    assert main(["-c", cfg, "sieve", "delete", "bob@example.com", "main"]) != 0  # active
    assert "active" in capsys.readouterr().err
    assert main(["-c", cfg, "sieve", "deactivate", "bob@example.com"]) == 0
    assert main(["-c", cfg, "sieve", "delete", "bob@example.com", "main"]) == 0
    capsys.readouterr()
    assert main(["-c", cfg, "sieve", "list", "bob@example.com"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["-c", cfg, "sieve", "list", "nobody@example.com"]) != 0
