"""Webmail views and per-user choices of a real `postier serve` over TLS (httpx): conversations
(RFC 5256 THREAD=REFERENCES) as a list option, remote content remembered per sender, junk learning
from the web, and rich-text compose.
"""

from __future__ import annotations

import contextlib
import email
import email.message
import email.policy
import imaplib
import re
import sqlite3
from collections.abc import Iterator
from email.message import EmailMessage

import httpx
import pytest

from postier.antispam.learning import verdict
from tests.harness import Instance, csrf_token
from tests.web.test_webmail import deliver

DOMAIN = "views.test"
HOST = f"mail.{DOMAIN}"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PW = "password123"


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    # Rspamd configured but down (nothing listens on port 9): delivery fails open, and training requests
    # stay on the learning queue, where the test reads them.
    i = Instance(tmp_path_factory.mktemp("views"), DOMAIN, extra_config=(
        "[auth]\nfailure_delay = 0.0\n[antispam]\nrspamd = \"http://127.0.0.1:9\"\n"
        "rspamd_controller = \"http://127.0.0.1:9\"\nrspamd_timeout = 2\n"))
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


def html_message(sender: str, subject: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = f"News <{sender}>"
    m["To"] = ALICE
    m["Subject"] = subject
    m.set_content("text")
    m.add_alternative('<p>hi</p><img src="https://images.elsewhere.invalid/p.png">', subtype="html")
    return m


def uid_of(c: httpx.Client, subject: str, folder: str = "INBOX") -> int:
    r = c.get("/mail/folder", params={"f": folder})
    m = re.search(r'href="/mail/msg\?f=[^&]+&amp;u=(\d+)">' + re.escape(subject) + "</a>", r.text)
    assert m, r.text
    return int(m.group(1))


def test_remote_content_remembered_per_sender(inst: Instance) -> None:
    deliver(inst, ALICE, html_message("news@elsewhere.invalid", "news one"))
    deliver(inst, ALICE, html_message("news@elsewhere.invalid", "news two"))
    deliver(inst, ALICE, html_message("other@elsewhere.invalid", "other news"))
    with client(inst) as c:
        token = csrf(c)
        one, two, other = (uid_of(c, s) for s in ("news one", "news two", "other news"))
        page = c.get("/mail/msg", params={"f": "INBOX", "u": one}).text
        assert "remote image(s) blocked" in page and "Always show from news@elsewhere.invalid" in page
        assert c.post("/mail/remote", data={"f": "INBOX", "u": one, "always": "1"}).status_code == 403  # CSRF
        r = c.post("/mail/remote", data={"csrf": token, "f": "INBOX", "u": one, "always": "1"})
        assert r.status_code == 303
        page = c.get("/mail/msg", params={"f": "INBOX", "u": two}).text
        assert "remote image(s) blocked" not in page  # the same sender's other message
        body = c.get("/mail/body", params={"f": "INBOX", "u": two, "p": "2"})
        assert "https:" in body.headers["content-security-policy"]
        assert "images.elsewhere.invalid" in body.text
        assert "remote image(s) blocked" in c.get("/mail/msg", params={"f": "INBOX", "u": other}).text
        assert "news@elsewhere.invalid" in c.get("/mail/settings").text
    with client(inst, BOB) as b:  # another user's choice is their own
        assert "Always show" not in b.get("/mail/settings").text
    with client(inst) as c:  # a new session: still remembered, until removed in the settings
        token = csrf(c)
        assert "remote image(s) blocked" not in c.get("/mail/msg", params={"f": "INBOX", "u": two}).text
        r = c.post("/mail/senders", data={"csrf": token, "remove": "news@elsewhere.invalid"})
        assert r.status_code == 200
        assert "remote image(s) blocked" in c.get("/mail/msg", params={"f": "INBOX", "u": two}).text
        body = c.get("/mail/body", params={"f": "INBOX", "u": two, "p": "2"})
        assert "https:" not in body.headers["content-security-policy"]


def test_remembered_sender_with_failing_dmarc_stays_blocked(inst: Instance) -> None:
    """A From address can be forged: when our own Authentication-Results say DMARC failed, the
    sender's remembered choice does not apply (the message was added over IMAP, as delivery would
    have stamped it)."""
    m = html_message("trusted@elsewhere.invalid", "forged trusted")
    m["Authentication-Results"] = f"mail.{DOMAIN}; dmarc=fail header.from=elsewhere.invalid"
    m2 = html_message("trusted@elsewhere.invalid", "real trusted")
    m2["Authentication-Results"] = f"mail.{DOMAIN}; dmarc=pass header.from=elsewhere.invalid"
    with imaplib.IMAP4_SSL(inst.address, inst.port("imaps"), ssl_context=inst.client_ssl_context()) as imap:
        imap.login(ALICE, PW)
        for msg in (m, m2):
            typ, _ = imap.append("INBOX", "", imaplib.Time2Internaldate(1.7e9), msg.as_bytes())
            assert typ == "OK"
    with client(inst) as c:
        token = csrf(c)
        real, forged = uid_of(c, "real trusted"), uid_of(c, "forged trusted")
        assert c.post("/mail/remote", data={"csrf": token, "f": "INBOX", "u": real, "always": "1"}).status_code == 303
    with client(inst) as c:
        assert "remote image(s) blocked" not in c.get("/mail/msg", params={"f": "INBOX", "u": real}).text
        assert "remote image(s) blocked" in c.get("/mail/msg", params={"f": "INBOX", "u": forged}).text
        body = c.get("/mail/body", params={"f": "INBOX", "u": forged, "p": "2"})
        assert "https:" not in body.headers["content-security-policy"]


def learn_requests(inst: Instance) -> list[tuple[str, int]]:
    (db,) = list(inst.root.rglob("learn.sqlite"))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [(u, s) for u, s in conn.execute("SELECT user, spam FROM requests ORDER BY id")]


def test_junk_and_not_junk_feed_the_learning_queue(inst: Instance) -> None:
    deliver(inst, ALICE, message(ALICE, "cheap meds", "<spam1@t>", "Mon, 01 Jun 2026 10:00:00 +0000"))
    before = len(learn_requests(inst))
    with client(inst) as c:
        token = csrf(c)
        uid = uid_of(c, "cheap meds")
        r = c.post("/mail/act", data={"csrf": token, "f": "INBOX", "op": "junk", "u": str(uid)})
        assert r.status_code == 303
        assert learn_requests(inst)[before:] == [(ALICE, 1)]
        uid = uid_of(c, "cheap meds", "Junk")
        r = c.post("/mail/act", data={"csrf": token, "f": "Junk", "op": "notjunk", "u": str(uid)})
        assert r.status_code == 303
        assert learn_requests(inst)[before:] == [(ALICE, 1), (ALICE, 0)]
        # a move that is no verdict (INBOX to Archive) trains nothing
        uid = uid_of(c, "cheap meds")
        c.post("/mail/act", data={"csrf": token, "f": "INBOX", "op": "move", "dest": "Archive", "u": str(uid)})
        assert len(learn_requests(inst)) == before + 2


def test_rich_text_is_sanitized_and_sent_with_a_text_part(inst: Instance) -> None:
    evil = ('<p>Hello <b>bold</b> <i>it</i></p><ul><li>one</li></ul><a href="https://example.org/" onclick="x()">'
            'link</a><a href="javascript:alert(1)">js</a><script>alert(2)</script><img src="https://t.invalid/p">'
            '<span style="color:red">plain</span><iframe src="https://t.invalid/"></iframe>')
    with client(inst) as c:
        token = csrf(c, "/mail/compose")
        r = c.post("/mail/send", data={"csrf": token, "to": BOB, "subject": "rich one", "text": "Hello bold it",
                                       "html": evil, "action": "send"})
        assert r.status_code == 303, r.text
    msg = fetch(inst, BOB, "INBOX", "rich one")
    assert msg.get_content_type() == "multipart/alternative"
    text, html = (p for p in msg.iter_parts())
    assert text.get_content_type() == "text/plain" and "Hello bold it" in text.get_content()
    body = html.get_content()
    assert html.get_content_type() == "text/html"
    for good in ("<b>bold</b>", "<i>it</i>", "<li>one</li>", 'href="https://example.org/"', "plain"):
        assert good in body, body
    for bad in ("onclick", "javascript:", "<script", "alert(2)", "<img", "style=", "<iframe", "t.invalid"):
        assert bad not in body, body


def fetch(inst: Instance, user: str, folder: str, subject: str) -> email.message.EmailMessage:
    with imaplib.IMAP4_SSL(inst.address, inst.port("imaps"), ssl_context=inst.client_ssl_context()) as imap:
        imap.login(user, PW)
        imap.select(folder)
        typ, data = imap.search(None, "SUBJECT", f'"{subject}"')
        assert typ == "OK" and data[0]
        typ, got = imap.fetch(data[0].split()[-1], "(BODY[])")
        first = got[0]
        assert isinstance(first, tuple)
        msg = email.message_from_bytes(first[1], policy=email.policy.default)
        assert isinstance(msg, email.message.EmailMessage)
        return msg


def test_plain_compose_stays_single_part(inst: Instance) -> None:
    with client(inst) as c:
        token = csrf(c, "/mail/compose")
        r = c.post("/mail/send", data={"csrf": token, "to": BOB, "subject": "plain one", "text": "just text",
                                       "html": "", "action": "send"})
        assert r.status_code == 303
    msg = fetch(inst, ALICE, "Sent", "plain one")
    assert msg.get_content_type() == "text/plain" and "just text" in msg.get_content()


def test_which_moves_are_a_verdict() -> None:
    assert verdict("INBOX", "Junk", "Junk") is True
    assert verdict("Junk", "INBOX", "Junk") is False and verdict("Junk", "Archive", "Junk") is False
    assert verdict("Junk", "Trash", "Junk") is None  # deleting spam is no "not spam"
    assert verdict("INBOX", "Archive", "Junk") is None and verdict("Junk", "Junk", "Junk") is None
    assert verdict("INBOX", "Junk", None) is None  # no learning configured
