"""The webmail's settings of a real `postier serve` over TLS (httpx): the filter form and vacation (a
Sieve script run at delivery over SMTP), the raw script editor (errors with line and column, never
saved when invalid), signatures in compose, CSRF on every change, two sessions at once.
"""

from __future__ import annotations

import contextlib
import html
import re
from collections.abc import Iterator

import httpx
import pytest

from tests.concurrency import together
from tests.harness import Instance, csrf_token
from tests.web.test_webmail import deliver, plain

DOMAIN = "settings.test"
HOST = f"mail.{DOMAIN}"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PW = "password123"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("settings"), DOMAIN, extra_config="[auth]\nfailure_delay = 0.0\n")
    i.add_user(ALICE, PW)
    i.add_user(BOB, PW)
    i.start()
    yield i
    i.stop()


@contextlib.contextmanager
def client(inst: Instance, address: str = ALICE) -> Iterator[httpx.Client]:
    with inst.web(HOST) as c:
        assert c.post("/mail/login", data={"address": address, "password": PW}).status_code == 303
        yield c


def csrf(c: httpx.Client, path: str = "/mail/settings") -> str:
    return csrf_token(c, path)


def subjects(c: httpx.Client, folder: str) -> list[str]:
    r = c.get("/mail/folder", params={"f": folder})
    assert r.status_code == 200
    return [html.unescape(m.group(1)) for m in re.finditer(r'href="/mail/msg\?[^"]+">([^<]*)</a>', r.text)]


def test_every_settings_change_needs_the_csrf_token(inst: Instance) -> None:
    with client(inst) as c:
        for path in ("/mail/rules", "/mail/sieve", "/mail/signature", "/mail/senders"):
            assert c.post(path, data={"script": "keep;"}).status_code == 403, path
            assert c.post(path, data={"script": "keep;", "csrf": "wrong"}).status_code == 403, path
    with inst.web(HOST) as anon:
        assert anon.post("/mail/rules", data={}).status_code == 403  # not logged in


def test_rules_form_writes_a_script_that_files_mail(inst: Instance) -> None:
    with client(inst) as c:
        token = csrf(c)
        r = c.post("/mail/rules", data={
            "csrf": token, "field": ["subject", "from"], "value": ["[invoices]", ""],
            "action": ["fileinto", "fileinto"], "folder": ["Archive", "INBOX"], "days": "7"})
        assert r.status_code == 200 and "Filters saved." in r.text, r.text
        assert 'value="[invoices]"' in r.text  # the form shows its rule again
        assert "fileinto &#34;Archive&#34;" in r.text or "fileinto &quot;Archive&quot;" in r.text
        deliver(inst, ALICE, plain(ALICE, "[invoices] March"))
        deliver(inst, ALICE, plain(ALICE, "other mail"))
        assert "[invoices] March" in subjects(c, "Archive")
        inbox = subjects(c, "INBOX")
        assert "other mail" in inbox and "[invoices] March" not in inbox
        # a folder that is not the user's, and a bad field, are refused
        r = c.post("/mail/rules", data={"csrf": token, "field": "subject", "value": "x", "action": "fileinto",
                                        "folder": "../../bob", "days": "7"})
        assert r.status_code == 400
        r = c.post("/mail/rules", data={"csrf": token, "field": "body", "value": "x", "action": "read",
                                        "folder": "INBOX", "days": "7"})
        assert r.status_code == 400
        # quotes and backslashes in a value stay one Sieve string
        r = c.post("/mail/rules", data={"csrf": token, "field": "subject", "value": 'a"b\\c";discard;',
                                        "action": "read", "folder": "INBOX", "days": "7"})
        assert r.status_code == 200 and "Filters saved." in r.text
        deliver(inst, ALICE, plain(ALICE, 'x a"b\\c";discard; y'))
        assert 'x a"b\\c";discard; y' in subjects(c, "INBOX")


def test_raw_script_errors_have_line_and_column_and_are_not_saved(inst: Instance) -> None:
    with client(inst, BOB) as c:
        token = csrf(c)
        good = 'require "fileinto";\nif header :contains "subject" "raw" { fileinto "Archive"; }\n'
        r = c.post("/mail/sieve", data={"csrf": token, "script": good})
        assert r.status_code == 200 and "Script saved." in r.text
        bad = 'require "fileinto";\nif header :contains "subject" "x" {\n  fileinto;\n  bogus "y";\n}\n'
        r = c.post("/mail/sieve", data={"csrf": token, "script": bad})
        assert r.status_code == 400 and "it was not saved" in r.text
        errors = re.findall(r"<li>line (\d+), column (\d+): ([^<]*)</li>", r.text)
        assert [(e[0], e[1]) for e in errors] == [("3", "3"), ("4", "3")], errors
        assert "bogus" in errors[1][2]
        syntax = c.post("/mail/sieve", data={"csrf": token, "script": 'keep;\nif true {\n  stop;\n'})
        assert syntax.status_code == 400 and re.search(r"<li>line [34], column \d+:", syntax.text)
        # the stored script is still the good one, and it still runs
        page = c.get("/mail/settings").text
        assert "raw" in page and "bogus" not in page
        assert "written by hand" in page
        deliver(inst, BOB, plain(BOB, "raw filter"))
        assert "raw filter" in subjects(c, "Archive")


def test_signature_per_identity_in_compose(inst: Instance) -> None:
    with client(inst) as c:
        token = csrf(c)
        r = c.post("/mail/signature", data={"csrf": token, "identity": ALICE, "signature": "Alice\n<b>Team</b>"})
        assert r.status_code == 200 and "Signature saved." in r.text
        r = c.get("/mail/compose")
        assert "\n-- \nAlice\n&lt;b&gt;Team&lt;/b&gt;" in r.text
        assert c.post("/mail/signature", data={"csrf": token, "identity": BOB, "signature": "x"}).status_code == 403


def test_two_sessions_change_preferences_at_once(inst: Instance) -> None:
    with client(inst) as c1, client(inst) as c2:
        t1, t2 = csrf(c1), csrf(c2)
        errors: list[str] = []

        def sign(c: httpx.Client, token: str, text: str) -> None:
            for i in range(5):
                r = c.post("/mail/signature", data={"csrf": token, "identity": ALICE, "signature": f"{text} {i}"})
                if r.status_code != 200:
                    errors.append(r.text)

        def senders(c: httpx.Client, token: str) -> None:
            for _ in range(5):
                r = c.post("/mail/senders", data={"csrf": token, "remove": "nobody@x.invalid"})
                if r.status_code != 200:
                    errors.append(r.text)
        together(lambda: sign(c1, t1, "one"), lambda: senders(c2, t2), timeout=60)
        assert not errors
        assert "one 4" in c1.get("/mail/settings").text


def test_mark_read_rule_delivers_the_message_seen(inst: Instance) -> None:
    with client(inst, BOB) as c:
        token = csrf(c)
        r = c.post("/mail/rules", data={"csrf": token, "field": "from", "value": "robot@", "action": "read",
                                        "folder": "INBOX", "days": "7"})
        assert r.status_code == 200 and "Filters saved." in r.text
        m = plain(BOB, "from the robot")
        m.replace_header("From", "robot@elsewhere.invalid")
        deliver(inst, BOB, m)
        page = c.get("/mail/folder", params={"f": "INBOX"}).text
        row = re.search(r'<tr class="([^"]*)"[^>]*>(?:(?!</tr>).)*from the robot', page, re.S)
        assert row and "unread" not in row.group(1)
