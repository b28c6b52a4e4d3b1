"""The layer rule, checked on the source: imports point down, and no two modules import each other.

Layers, lowest first (docs/architecture.md): durable < proto < message < config, accounts, resolver < mailauth
< store < queue < pipeline (and antispam, sieve) < server (and http, web) < cli. A module may import its own layer and the
layers below it. The sans-IO protocol cores do no I/O: proto imports neither asyncio nor socket.
Every import counts, also one inside a function; an import under `if TYPE_CHECKING:` counts for the
layer rule but not for cycles (it never runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "postier"

#: (layer name, module prefixes), lowest first. Sub-command modules (`postier/*/cli.py`) are cli.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("durable, logsetup", ("postier.durable", "postier.logsetup")),
    ("proto", ("postier.proto",)),
    ("message", ("postier.message", "postier.faults")),
    ("config, accounts, resolver", ("postier.config", "postier.accounts", "postier.resolver", "postier.certs",
                                    "postier.tlsreload", "postier.autoconfig", "postier.mtasts",
                                    "postier.tlsprofile", "postier.metrics")),
    ("mailauth", ("postier.mailauth",)),
    ("store", ("postier.store",)),
    ("queue", ("postier.queue", "postier.acme")),
    ("pipeline", ("postier.pipeline", "postier.antispam", "postier.sieve")),
    ("server", ("postier.server", "postier.http", "postier.web")),
    ("cli", ("postier.cli", "postier.__main__", "postier.backup", "postier.status", "postier.systemd",
             "postier.adminlog")),
]
NO_IO_IN_PROTO = ("asyncio", "socket")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    if module == "postier":  # the package's __init__: imports nothing
        return 0
    if module.endswith(".cli"):
        return len(LAYERS) - 1
    best: tuple[int, int] | None = None  # (prefix length, layer): the longest prefix decides
    for i, (_name, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), i)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")
    return best[1]


def _type_checking_block(node: ast.AST) -> bool:
    if not isinstance(node, ast.If):
        return False
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, runs at run time) for every import in the file."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, runtime: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                assert isinstance(child, ast.If)
                for sub in child.body:
                    visit_one(sub, False)
                for sub in child.orelse:
                    visit_one(sub, runtime)
            else:
                visit_one(child, runtime)

    def visit_one(node: ast.AST, runtime: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, runtime) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno, runtime))
            for a in node.names:  # `from . import throttle` imports a module
                sub = f"{target}.{a.name}"
                if (ROOT.parent / Path(*sub.split("."))).with_suffix(".py").exists():
                    out.append((sub, node.lineno, runtime))
        visit(node, runtime)

    visit(ast.parse(path.read_text(), str(path)), True)
    return out


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_module_has_a_layer() -> None:
    for path in MODULES:
        layer_of(module_name(path))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path: Path) -> None:
    module = module_name(path)
    mine = layer_of(module)
    bad = []
    for target, line, _runtime in imports(path):
        if module.startswith("postier.proto") and target.split(".")[0] in NO_IO_IN_PROTO:
            bad.append(f"line {line}: {target} (the protocol cores do no I/O)")
        if not target.startswith("postier.") and target != "postier":
            continue
        theirs = layer_of(target)
        if theirs > mine:
            bad.append(f"line {line}: {target} ({LAYERS[theirs][0]}) from {LAYERS[mine][0]}")
    assert not bad, f"{module} imports upwards:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        module = module_name(path)
        # a submodule's import of its own package (`from postier.x import y` in postier/x/z.py) is not a
        # cycle: Python has initialised (or is initialising) that package already
        graph[module] = {t for t, _line, runtime in imports(path)
                         if runtime and t.startswith("postier.") and not (module == t or module.startswith(t + "."))}
    cycles = []
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def walk(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n not in graph:
                continue
            if state.get(n) == 1:
                cycles.append(" -> ".join([*stack[stack.index(n):], n]))
            elif n not in state:
                walk(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            walk(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
