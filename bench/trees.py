"""Running one measurement on another checkout of postier (`--tree DIR`, e.g. a `git archive` of an
earlier commit), so a bench prints before and after figures from the same driver."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_in_tree(module: str, args: list[str], tree: Path | None) -> str:
    """The standard output of `bench.<module>.main(args)` run in a child process that imports
    postier from `tree` (this checkout when None) and the bench module from this checkout."""
    tree = (tree or ROOT).resolve()
    env = dict(os.environ, PYTHONPATH=f"{tree}{os.pathsep}{ROOT}")
    # `tree` first on the path; run from "/", since `-c` puts the working directory before it
    code = f"import sys; from bench.{module} import main; sys.exit(main({args!r}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", check=True, capture_output=True, text=True)
    return f"{tree}: {out.stdout.strip()}"
