"""The admin console of a real `postier serve` over TLS (httpx), and the accounts' admin flag."""

from __future__ import annotations

import re
import smtplib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from postier.accounts import Accounts
from tests.harness import Instance, csrf_token

DOMAIN = "admin.test"
HOST = f"mail.{DOMAIN}"
ROOT, USER = f"root@{DOMAIN}", f"user@{DOMAIN}"
PW = "password123"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("admin"), DOMAIN, extra_config="[auth]\nfailure_delay = 0.0\n")
    i.cli("user", "add", ROOT, "--password-stdin", "--admin", stdin=PW + "\n")
    i.add_user(USER, PW)
    i.start()
    yield i
    i.stop()


def client(inst: Instance) -> httpx.Client:
    return inst.web(HOST, timeout=20)


def login(c: httpx.Client, area: str, address: str, password: str = PW) -> httpx.Response:
    return c.post(f"/{area}/login", data={"address": address, "password": password})


def csrf(c: httpx.Client, path: str = "/admin/home") -> str:
    return csrf_token(c, path)


def test_only_admins_log_in(inst: Instance) -> None:
    with client(inst) as c:
        assert c.get("/admin/home").status_code == 303
        assert login(c, "admin", USER).status_code == 401  # a real account, but not an admin
        assert "set-cookie" not in login(c, "admin", USER).headers
        # a webmail session is not an admin session
        assert login(c, "mail", ROOT).status_code == 303
        assert c.get("/admin/home").status_code == 303
        r = login(c, "admin", ROOT)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        assert "postier_admin=" in cookie and "Path=/admin/" in cookie and "HttpOnly" in cookie
        r = c.get("/admin/home")
        assert r.status_code == 200 and USER in r.text and DOMAIN in r.text
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_users_table_shows_storage_against_the_quota(inst: Instance) -> None:
    """The users table shows each user's usage and quota (store/quota.py), as `postier user list` does."""
    quota_user = f"quota@{DOMAIN}"
    inst.cli("user", "add", quota_user, "--password-stdin", "--quota", "10M", stdin=PW + "\n")
    with smtplib.SMTP(*inst.addr("smtp"), timeout=20) as s:
        s.sendmail("a@b.example", [quota_user], b"From: a@b.example\r\nSubject: q\r\n\r\n" + b"x" * 2000 + b"\r\n")
    with client(inst) as c:
        login(c, "admin", ROOT)
        page = c.get("/admin/home").text
    row = re.search(r"<td>" + re.escape(quota_user) + r"</td><td>maildir</td><td>([^<]*)</td>", page)
    assert row and "/10M" in row.group(1), page


def test_admin_changes_need_csrf_and_are_logged(inst: Instance) -> None:
    new = f"new@{DOMAIN}"
    with client(inst) as c:
        login(c, "admin", ROOT)
        assert c.post("/admin/do", data={"op": "user_add", "address": new, "password": PW}).status_code == 403
        token = csrf(c)
        r = c.post("/admin/do", data={"op": "user_add", "address": new, "password": PW, "csrf": token})
        assert r.status_code == 303
        r = c.post("/admin/do", data={"op": "user_add", "address": new, "password": PW, "csrf": token})
        assert r.status_code == 400 and "already exists" in r.text
        r = c.post("/admin/do", data={"op": "alias_add", "alias": f"team@{DOMAIN}", "targets": f"{new}, {USER}",
                                      "csrf": token})
        assert r.status_code == 303
        assert f"team@{DOMAIN}" in c.get("/admin/home").text
        r = c.post("/admin/do", data={"op": "user_remove", "address": ROOT, "csrf": token})
        assert r.status_code == 400  # not your own account
    with client(inst) as w:
        assert login(w, "mail", new).status_code == 303  # the new user reads mail at once
    log = inst.log.read_text()
    assert f"admin: {ROOT} user_add {new}" in log
    assert f"admin: {ROOT} alias_add team@{DOMAIN}" in log


def test_password_reset_and_removal_end_access(inst: Instance) -> None:
    victim = f"victim@{DOMAIN}"
    inst.add_user(victim, PW)
    with client(inst) as a, client(inst) as v:
        assert login(v, "mail", victim).status_code == 303
        assert v.get("/mail/folder?f=INBOX").status_code == 200
        login(a, "admin", ROOT)
        token = csrf(a)
        r = a.post("/admin/do", data={"op": "user_passwd", "address": victim, "password": "another-pass-1",
                                      "csrf": token})
        assert r.status_code == 303
        assert login(v, "mail", victim).status_code == 401
        assert a.post("/admin/do", data={"op": "user_remove", "address": victim, "csrf": token}).status_code == 303
        assert v.get("/mail/folder?f=INBOX").status_code == 303  # the session ended with the account


def test_admin_column_is_added_to_an_old_database(tmp_path: Path) -> None:
    db = tmp_path / "accounts.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE domains (name TEXT PRIMARY KEY, catchall TEXT, created REAL NOT NULL);
        CREATE TABLE users (address TEXT PRIMARY KEY, local TEXT NOT NULL, domain TEXT NOT NULL,
            password TEXT NOT NULL, scram TEXT NOT NULL DEFAULT '', mailbox_format TEXT NOT NULL DEFAULT 'maildir',
            created REAL NOT NULL);
        CREATE TABLE aliases (alias TEXT NOT NULL, target TEXT NOT NULL, PRIMARY KEY (alias, target));
        INSERT INTO domains VALUES ('old.test', NULL, 0);
        INSERT INTO users VALUES ('a@old.test', 'a', 'old.test', 'x', '', 'maildir', 0);
    """)
    conn.close()
    acc = Accounts(db)
    assert acc.get_user("a@old.test") is not None
    assert not acc.is_admin("a@old.test")
    acc.set_console_admin("a@old.test", True)
    assert acc.is_admin("a@old.test")
    acc.close()
    again = Accounts(db)  # opening again changes nothing
    assert again.is_admin("a@old.test") and not again.is_admin("nobody@old.test")
    again.close()
