"""POP3 on a cluster node for a user whose folders do not exist yet (never logged in over IMAP, no
mail yet): the maildrop is empty, not unavailable (found by an outside cluster stress run, where the
first POP3 logins came before the first delivery and got -ERR [SYS/TEMP])."""

from __future__ import annotations

import pytest

pytest.importorskip("psycopg")

from tests.harness import Instance  # noqa: E402

from .test_nodes import PASSWORD, imap, pop3, send  # noqa: E402


def test_pop3_login_before_any_folder_exists_sees_an_empty_maildrop(nodes: list[Instance]) -> None:
    a, b = nodes
    for inst in (a, b):
        p = pop3(inst)
        assert p.pass_(PASSWORD).startswith(b"+OK")
        assert p.stat() == (0, 0)
        p.quit()
    send(a, "after")  # the INBOX made by the POP3 login is the one mail goes to and IMAP shows
    p = pop3(b)
    p.pass_(PASSWORD)
    assert p.stat()[0] == 1
    p.quit()
    c = imap(b)
    try:
        assert c.select("INBOX")[1] == [b"1"]
    finally:
        c.logout()
