"""Webmail views and per-user choices of a real `postier serve` over TLS (httpx): conversations
(RFC 5256 THREAD=REFERENCES) as a list option, remote content remembered per sender, junk learning
from the web, and rich-text compose.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from email.message import EmailMessage

import httpx
import pytest

from tests.harness import Instance
from tests.web.test_webmail import deliver

DOMAIN = "views.test"
HOST = f"mail.{DOMAIN}"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PW = "password123"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("views"), DOMAIN, extra_config="[auth]\nfailure_delay = 0.0\n")
    i.add_user(ALICE, PW)
    i.add_user(BOB, PW)
    i.start()
    yield i
    i.stop()


@contextlib.contextmanager
def client(inst: Instance, address: str = ALICE) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"https://127.0.0.1:{inst.port('https')}", verify=inst.client_ssl_context(),
                      timeout=20, follow_redirects=False, headers={"Host": HOST}) as c:
        assert c.post("/mail/login", data={"address": address, "password": PW}).status_code == 303
        yield c


def csrf(c: httpx.Client, path: str = "/mail/settings") -> str:
    r = c.get(path)
    assert r.status_code == 200, r.text
    m = re.search(r'name="csrf" value="([^"]+)"', r.text)
    assert m
    return m.group(1)


def message(to: str, subject: str, msgid: str, date: str, parent: str = "", sender: str = "x@elsewhere.invalid"
            ) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = to
    m["Subject"] = subject
    m["Message-ID"] = msgid
    m["Date"] = date
    if parent:
        m["In-Reply-To"] = parent
        m["References"] = parent
    m.set_content("text")
    return m


def test_conversations_view_groups_replies(inst: Instance) -> None:
    deliver(inst, BOB, message(BOB, "plan", "<a@t>", "Mon, 01 Jun 2026 10:00:00 +0000"))
    deliver(inst, BOB, message(BOB, "other topic", "<c@t>", "Mon, 01 Jun 2026 11:00:00 +0000"))
    deliver(inst, BOB, message(BOB, "Re: plan", "<b@t>", "Mon, 01 Jun 2026 12:00:00 +0000", "<a@t>"))
    deliver(inst, BOB, message(BOB, "Re: Re: plan", "<d@t>", "Mon, 01 Jun 2026 13:00:00 +0000", "<a@t> <b@t>"))
    deliver(inst, BOB, message(BOB, "Re: lost", "<e@t>", "Mon, 01 Jun 2026 09:00:00 +0000", "<missing@t>"))
    with client(inst, BOB) as c:
        r = c.get("/mail/folder", params={"f": "INBOX", "t": "1"})
        assert r.status_code == 200
        rows = re.findall(r'<tr class="msg depth-(\d+)[^"]*".*?<a href="/mail/msg[^"]*">([^<]*)</a>', r.text, re.S)
        assert rows == [("0", "plan"), ("1", "Re: plan"), ("2", "Re: Re: plan"), ("0", "other topic"),
                        ("0", "Re: lost")], rows
        assert "(3 conversations)" in r.text
        assert 'id="view-list"' in r.text
        plain = c.get("/mail/folder", params={"f": "INBOX"}).text
        assert 'id="view-threads"' in plain and "depth-" not in plain
