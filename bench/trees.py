"""Running one measurement on another checkout of postier (`--tree DIR`, e.g. a `git archive` of an
earlier commit), so a bench prints before and after figures from the same driver."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def size_bench(argv: list[str], module: str, description: str, child: Callable[[int], dict[str, Any]]) -> int:
    """The command line of a bench measuring one message of `--size` MiB in a child process
    (`--tree DIR`: postier from that checkout): `child(size)`'s figures printed as JSON."""
    ap = argparse.ArgumentParser(prog=f"python -m bench {module.replace('_', '-')}", description=description)
    ap.add_argument("--size", type=int, default=30, help="message size in MiB")
    ap.add_argument("--tree", type=Path, default=None, help="another checkout of postier to run on")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.size)))
    else:
        print(child_in_tree(module, ["--child", "--size", str(a.size)], a.tree))
    return 0
