"""The mail-store boundary (docs/architecture.md): the access protocols use the store through its
interface only (no lock, index or SQL), and the store knows nothing of IMAP."""

from __future__ import annotations

import ast
from pathlib import Path

import postier
from postier.store.api import Mailboxes, MailStoreAPI
from postier.store.mailbox import MailStore, UserMailbox

ROOT = Path(postier.__file__).parent
DRIVERS = ("server/imap.py", "server/imapfetch.py", "server/pop3.py")


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add("." * node.level + node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_drivers_do_not_reach_into_the_store() -> None:
    for rel in DRIVERS:
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in ("lock", "index", "states", "execute"):
                raise AssertionError(f"{rel}:{node.lineno} uses the store's .{node.attr}")
        mods = _imports(ROOT / rel)
        assert "sqlite3" not in mods, rel
        assert "..store.index" not in mods or rel != "server/pop3.py"


def test_store_does_not_import_imap() -> None:
    for path in (ROOT / "store").glob("*.py"):
        for mod in _imports(path):
            assert "proto.imap" not in mod and "server" not in mod, (path.name, mod)


def test_maildir_store_implements_the_interface(tmp_path: Path) -> None:
    # Every method the protocols name exists on the Maildir store (mypy checks the signatures where
    # the drivers use them; this catches a method renamed on one side only).
    store = MailStore(tmp_path)
    try:
        check: list[tuple[type, object]] = [(Mailboxes, UserMailbox), (MailStoreAPI, store)]
        for proto, impl in check:
            for name in dir(proto):
                if not name.startswith("_"):
                    assert hasattr(impl, name), (impl, name)
    finally:
        store.close()
