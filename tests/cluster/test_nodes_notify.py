"""IMAP NOTIFY across cluster nodes (RFC 5465 §5.4): a mailbox created, renamed or deleted on node A
reaches a NOTIFY session on node B as the LIST a session on A gets, a rename as one LIST with OLDNAME
(RFC 5258 §3.4), not as a deletion and a creation."""

from __future__ import annotations

import imaplib
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("psycopg")

from tests.harness import Instance  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import _nodes, imap  # noqa: E402


@pytest.fixture
def nodes(tmp_path: Path, pg: PgServer, s3: S3Server) -> Iterator[list[Instance]]:
    ns = _nodes(tmp_path, pg.create_db(), s3)
    yield ns
    for n in ns:
        n.stop()


def _ok(c: imaplib.IMAP4, command: str) -> None:
    """Run one command by hand (imaplib knows no NOTIFY): its untagged responses must be none."""
    tag = c._new_tag()
    c.send(tag + b" " + command.encode() + b"\r\n")
    line = c.readline()
    assert line.startswith(tag + b" OK"), line


def test_rename_on_node_a_is_one_list_with_oldname_on_node_b(nodes: list[Instance]) -> None:
    a, b = nodes
    writer, watcher = imap(a), imap(b)
    try:
        watcher.sock.settimeout(20)
        _ok(watcher, "NOTIFY SET (PERSONAL (MailboxName))")
        _ok(writer, "CREATE Alt")
        _ok(writer, "CREATE Alt.Kind")
        assert watcher.readline() == b'* LIST () "." "Alt"\r\n'
        assert watcher.readline() == b'* LIST () "." "Alt.Kind"\r\n'
        _ok(writer, "RENAME Alt Neu")
        assert watcher.readline() == b'* LIST () "." "Neu" ("OLDNAME" ("Alt"))\r\n'
        assert watcher.readline() == b'* LIST () "." "Neu.Kind" ("OLDNAME" ("Alt.Kind"))\r\n'
        _ok(writer, "DELETE Neu.Kind")
        assert watcher.readline() == b'* LIST (\\NonExistent) "." "Neu.Kind"\r\n'
        _ok(watcher, "NOOP")
    finally:
        writer.logout()
        watcher.logout()
