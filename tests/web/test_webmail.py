"""The webmail of a real `postier serve` over real TLS, driven by httpx: login and sessions, CSRF,
isolation between users, id validation, HTML sanitizing, actions, and sending through submission.
Mail arrives over SMTP and sent mail is read back over IMAP.
"""

from __future__ import annotations

import base64
import imaplib
import re
import smtplib
import ssl
from collections.abc import Iterator
from email.message import EmailMessage

import httpx
import pytest

from tests.concurrency import together
from tests.harness import Instance, csrf_token

DOMAIN = "web.test"
HOST = f"mail.{DOMAIN}"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PW = "password123"

XSS_HTML = """<html><head><title>t</title><base href="http://evil.invalid/"><meta http-equiv="refresh"
content="0;url=http://evil.invalid/"><style>body{background:url(http://evil.invalid/css)}</style></head>
<body onload="alert(1)"><p>Hello <b>world</b></p>
<script>alert('x')</script><img src="http://evil.invalid/pixel.png" onerror="alert(2)">
<a href="javascript:alert(3)">js</a><a href="data:text/html,<script>alert(4)</script>">data</a>
<a href="JaVaScRiPt:alert(5)">mixed</a><svg onload="alert(6)"><script>alert(7)</script></svg>
<form action="http://evil.invalid/"><input name=x></form><iframe src="http://evil.invalid/"></iframe>
<div style="width: expression(alert(8)); background-image: url(http://evil.invalid/bg)">css</div>
<img src="cid:logo@web.test"><img src=x onerror=alert(9)><math><mi xlink:href="javascript:alert(10)">m</mi></math>
<a href="https://example.org/ok">fine link</a><p>unclosed <b><i>tags
"""


def deliver(inst: Instance, to: str, msg: EmailMessage) -> None:
    with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
        s.send_message(msg, from_addr="sender@elsewhere.invalid", to_addrs=[to])


def plain(to: str, subject: str, text: str = "hello") -> EmailMessage:
    m = EmailMessage()
    m["From"] = "Sender <sender@elsewhere.invalid>"
    m["To"] = to
    m["Subject"] = subject
    m.set_content(text)
    return m


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("webmail"), DOMAIN, extra_config="[auth]\nfailure_delay = 0.0\n")
    i.add_user(ALICE, PW)
    i.add_user(BOB, PW)
    i.start()
    deliver(i, ALICE, plain(ALICE, "first message", "plain <b>text</b> & more"))
    html = EmailMessage()
    html["From"] = "=?utf-8?q?=3Cscript=3Ealert(1)=3C/script=3E?= <sender@elsewhere.invalid>"
    html["To"] = ALICE
    html["Subject"] = "<img src=x onerror=alert(1)> html message"
    html.set_content("text version")
    html.add_alternative(XSS_HTML, subtype="html")
    alternative = html.get_payload()
    assert isinstance(alternative, list)
    html_part = alternative[1]
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(b"\x89PNG\r\n\x1a\n" + b"\0" * 16, maintype="image", subtype="png",
                                     cid="<logo@web.test>")
    html.add_attachment(b"<html><script>alert(1)</script></html>", maintype="text", subtype="html",
                        filename="../../evil.html")
    deliver(i, ALICE, html)
    yield i
    i.stop()


def client(inst: Instance) -> httpx.Client:
    return inst.web(HOST, timeout=20)


def login(c: httpx.Client, address: str = ALICE, password: str = PW) -> httpx.Response:
    return c.post("/mail/login", data={"address": address, "password": password})


def csrf(c: httpx.Client, path: str = "/mail/folder?f=INBOX") -> str:
    return csrf_token(c, path)


def uids(c: httpx.Client, folder: str = "INBOX") -> dict[str, int]:
    """subject -> uid of the folder's first page."""
    r = c.get("/mail/folder", params={"f": folder})
    assert r.status_code == 200
    out = {}
    for m in re.finditer(r'href="/mail/msg\?f=[^&]+&amp;u=(\d+)">([^<]*)</a>', r.text):
        out[m.group(2)] = int(m.group(1))
    return out


def test_login_cookie_and_security_headers(inst: Instance) -> None:
    with client(inst) as c:
        r = c.get("/mail/")
        assert r.status_code == 303 and r.headers["location"] == "/mail/login"
        r = c.get("/mail/login")
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert "<script>" not in r.text  # only the static file
        assert login(c, ALICE, "wrong").status_code == 401
        assert login(c, "nobody@web.test", PW).status_code == 401
        r = login(c)
        assert r.status_code == 303
        cookie = r.headers["set-cookie"]
        for attr in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/mail/"):
            assert attr in cookie
        r = c.get("/mail/folder?f=INBOX")
        assert r.status_code == 200
        assert "first message" in r.text
        # headers are shown as text, never as markup
        assert "<img src=x" not in r.text and "&lt;img src=x onerror=alert(1)&gt;" in r.text
        assert "<script>alert" not in r.text
        token = csrf(c)
        r = c.post("/mail/logout", data={"csrf": token})
        assert r.status_code == 303
        assert c.get("/mail/folder?f=INBOX").status_code == 303  # back to the login page


def test_logout_everywhere_ends_every_session(inst: Instance) -> None:
    with client(inst) as a, client(inst) as b:
        assert login(a).status_code == 303 and login(b).status_code == 303
        assert b.get("/mail/folder?f=INBOX").status_code == 200
        assert a.post("/mail/logout-all", data={"csrf": csrf(a)}).status_code == 303
        assert b.get("/mail/folder?f=INBOX").status_code == 303
        assert a.get("/mail/folder?f=INBOX").status_code == 303


def test_state_changes_need_the_csrf_token(inst: Instance) -> None:
    with client(inst) as c:
        login(c)
        uid = uids(c)["first message"]
        assert c.post("/mail/act", data={"f": "INBOX", "u": str(uid), "op": "flag"}).status_code == 403
        assert c.post("/mail/act", data={"f": "INBOX", "u": str(uid), "op": "flag", "csrf": "x" * 43}).status_code == 403
        token = csrf(c)
        r = c.post("/mail/act", data={"f": "INBOX", "u": str(uid), "op": "flag", "csrf": token},
                   headers={"Origin": "https://evil.invalid"})
        assert r.status_code == 403
        r = c.post("/mail/act", data={"f": "INBOX", "u": str(uid), "op": "flag", "csrf": token},
                   headers={"Sec-Fetch-Site": "cross-site"})
        assert r.status_code == 403
        assert c.get("/mail/act").status_code == 405  # changes are POST only
        assert c.post("/mail/logout").status_code == 403
        r = c.post("/mail/act", data={"f": "INBOX", "u": str(uid), "op": "flag", "csrf": token})
        assert r.status_code == 303
        assert re.search(r'class="msg[^"]* flagged"', c.get("/mail/folder?f=INBOX").text)


def test_sessions_are_isolated_between_users(inst: Instance) -> None:
    with client(inst) as a, client(inst) as b:
        login(a)
        login(b, BOB)
        ids = uids(a)
        assert ids
        for uid in ids.values():
            r = b.get("/mail/msg", params={"f": "INBOX", "u": str(uid)})
            assert r.status_code == 404 and "first message" not in r.text
            assert b.get("/mail/part", params={"f": "INBOX", "u": str(uid), "p": "1"}).status_code == 404
            assert b.get("/mail/body", params={"f": "INBOX", "u": str(uid), "p": "1.1"}).status_code == 404


@pytest.mark.parametrize("params", [
    {"f": "../../bob@web.test/Maildir", "u": "1"}, {"f": "INBOX/../..", "u": "1"}, {"f": "/etc", "u": "1"},
    {"f": "INBOX", "u": "-1"}, {"f": "INBOX", "u": "1e3"}, {"f": "INBOX", "u": "99999999999"},
    {"f": "INBOX", "u": "../1"}, {"f": "." + "x" * 2000, "u": "1"},
])
def test_bad_folder_and_message_ids_are_refused(inst: Instance, params: dict[str, str]) -> None:
    with client(inst) as c:
        login(c)
        r = c.get("/mail/msg", params=params)
        assert r.status_code in (400, 404)
        r = c.get("/mail/part", params={**params, "p": "1"})
        assert r.status_code in (400, 404)


def test_bad_part_ids_are_refused(inst: Instance) -> None:
    with client(inst) as c:
        login(c)
        uid = uids(c)["&lt;img src=x onerror=alert(1)&gt; html message"]
        for p in ("../1", "0", "1..2", "a", "1.2.3.4.5.6.7.8.9", "", "/etc/passwd", "9"):
            assert c.get("/mail/part", params={"f": "INBOX", "u": str(uid), "p": p}).status_code == 404
        assert c.get("/mail/static/../../mail.py").status_code == 404
        assert c.get("/mail/static/sessions.py").status_code == 404


def test_html_is_sanitized_and_remote_images_blocked(inst: Instance) -> None:
    with client(inst) as c:
        login(c)
        uid = uids(c)["&lt;img src=x onerror=alert(1)&gt; html message"]
        page = c.get("/mail/msg", params={"f": "INBOX", "u": str(uid)})
        assert page.status_code == 200
        assert "<script>" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text  # the encoded-word From, as text
        m = re.search(r'<iframe[^>]*sandbox="([^"]*)"[^>]*src="([^"]+)"', page.text)
        assert m and "allow-scripts" not in m.group(1)
        assert "remote image(s) blocked" in page.text
        body = c.get(m.group(2).replace("&amp;", "&"))
        assert body.status_code == 200
        csp = body.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script" not in csp and "http" not in csp
        html = body.text.lower()
        assert "<script" not in html.replace("<script>", "") and "<script>" not in html
        assert not re.search(r"\son\w+\s*=", html)
        assert "javascript:" not in html and "data:text" not in html
        assert "evil.invalid" not in html  # no remote URL survives (images, base, form, meta, css)
        assert "<form" not in html and "<iframe" not in html and "<meta http-equiv" not in html
        assert "/mail/static/blocked.svg" in html
        assert "https://example.org/ok" in html and 'rel="noopener noreferrer"' in html
        # the cid: image is served from the message, as an image
        cid = re.search(r'src="(/mail/cid\?[^"]+)"', body.text)
        assert cid
        img = c.get(cid.group(1).replace("&amp;", "&"))
        assert img.status_code == 200 and img.headers["content-type"] == "image/png"
        assert img.content.startswith(b"\x89PNG")
        # asking for remote content (a POST with the token) lets the images through for this message
        r = c.post("/mail/remote", data={"f": "INBOX", "u": str(uid), "csrf": csrf(c)})
        assert r.status_code == 303
        body = c.get(m.group(2).replace("&amp;", "&"))
        assert "http://evil.invalid/pixel.png" in body.text
        assert "https:" in body.headers["content-security-policy"]
        assert "<script" not in body.text.lower()


def test_attachments_download_as_octet_stream(inst: Instance) -> None:
    with client(inst) as c:
        login(c)
        uid = uids(c)["&lt;img src=x onerror=alert(1)&gt; html message"]
        page = c.get("/mail/msg", params={"f": "INBOX", "u": str(uid)}).text
        m = next(x for x in re.finditer(r'href="(/mail/part\?[^"]+)" download>([^<]+)<', page)
                 if "evil.html" in x.group(2))
        r = c.get(m.group(1).replace("&amp;", "&"))
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/octet-stream"
        assert r.headers["content-disposition"].startswith("attachment;")
        assert "/" not in r.headers["content-disposition"].split('filename="')[1].split('"')[0]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.content == b"<html><script>alert(1)</script></html>"


def unread(c: httpx.Client, folder: str = "INBOX") -> int:
    page = c.get("/mail/folder", params={"f": folder}).text
    m = re.search(r'f=' + folder + r'"[^>]*>' + folder + r'</a> <span class="count" aria-label="(\d+) unread"', page)
    return int(m.group(1)) if m else 0


def test_plain_text_is_escaped_and_reading_marks_read(inst: Instance) -> None:
    with client(inst) as c:
        login(c)
        uid = uids(c)["first message"]
        token = csrf(c)
        assert c.post("/mail/act", data={"f": "INBOX", "u": str(uid), "op": "unread", "csrf": token}).status_code == 303
        count = unread(c)
        assert count >= 1
        r = c.get("/mail/msg", params={"f": "INBOX", "u": str(uid)})
        assert "plain &lt;b&gt;text&lt;/b&gt; &amp; more" in r.text
        assert unread(c) == count - 1  # the unread count follows flag changes (cached per folder state)
        assert c.post("/mail/act", data={"f": "INBOX", "u": str(uid), "op": "unread", "csrf": token}).status_code == 303
        assert unread(c) == count


def test_forged_authentication_results_never_make_a_badge(inst: Instance) -> None:
    m = EmailMessage()
    m["Authentication-Results"] = f"{HOST}; spf=pass smtp.mailfrom={DOMAIN}; dkim=pass; dmarc=pass header.from={DOMAIN}"
    m["From"] = f"The Boss <boss@{DOMAIN}>"
    m["To"] = BOB
    m["Subject"] = "forged results"
    m.set_content("pay this invoice")
    deliver(inst, BOB, m)  # RFC 8601 §5: a field claiming our authserv-id is removed at delivery
    with client(inst) as c:
        login(c, BOB)
        page = c.get("/mail/msg", params={"f": "INBOX", "u": str(uids(c)["forged results"])}).text
        assert "DMARC pass" not in page and "SPF pass" not in page


def test_move_delete_junk(inst: Instance) -> None:
    deliver(inst, BOB, plain(BOB, "to move"))
    deliver(inst, BOB, plain(BOB, "to delete"))
    with client(inst) as c:
        login(c, BOB)
        ids = uids(c)
        token = csrf(c)
        act = {"f": "INBOX", "csrf": token}
        assert c.post("/mail/act", data={**act, "u": str(ids["to move"]), "op": "move", "dest": "Archive"}
                      ).status_code == 303
        assert "to move" in uids(c, "Archive")
        assert c.post("/mail/act", data={**act, "u": str(ids["to delete"]), "op": "junk"}).status_code == 303
        junk = uids(c, "Junk")
        assert "to delete" in junk
        assert c.post("/mail/act", data={"f": "Junk", "csrf": token, "u": str(junk["to delete"]), "op": "notjunk"}
                      ).status_code == 303
        ids = uids(c)
        assert c.post("/mail/act", data={**act, "u": str(ids["to delete"]), "op": "delete"}).status_code == 303
        assert "to delete" in uids(c, "Trash") and "to delete" not in uids(c)
        r = c.post("/mail/act", data={**act, "u": "1", "op": "move", "dest": "../../x"})
        assert r.status_code == 404


def test_send_goes_through_submission_and_is_kept_in_sent(inst: Instance) -> None:
    with client(inst) as c:
        login(c)
        token = csrf(c, "/mail/compose")
        big = bytes(range(256)) * 800  # 200 KiB: over the HTTP app's small-body limit, under the upload bound
        files = [("attach", ("notes.txt", b"attached bytes\n", "text/plain")),
                 ("attach", ("big.bin", big, "application/octet-stream"))]
        r = c.post("/mail/send", data={"csrf": token, "to": BOB, "subject": "hello from the web", "text": "hi bob",
                                       "action": "send"}, files=files)
        assert r.status_code == 303, r.text
        assert "hello from the web" in uids(c, "Sent")
        # sender rights are the submission pipeline's: a forged Bcc-only send to a non-local domain works,
        # but a recipient that does not exist locally is refused (550 5.1.1)
        r = c.post("/mail/send", data={"csrf": token, "to": f"nobody@{DOMAIN}", "subject": "x", "text": "x",
                                       "action": "send"})
        assert r.status_code == 422
        r = c.post("/mail/send", data={"csrf": token, "to": BOB, "subject": "a draft", "text": "later",
                                       "action": "draft"})
        assert r.status_code == 303
        assert "a draft" in uids(c, "Drafts")
    ctx = ssl.create_default_context(cafile=str(inst.root / "tls" / "cert.pem"))
    ctx.check_hostname = False
    with imaplib.IMAP4_SSL(inst.address, inst.port("imaps"), ssl_context=ctx) as imap:
        imap.login(BOB, PW)
        imap.select("INBOX")
        typ, data = imap.search(None, "SUBJECT", '"hello from the web"')
        assert typ == "OK" and data[0]
        typ, msg = imap.fetch(data[0].split()[-1], "(RFC822)")
        first = msg[0]
        assert isinstance(first, tuple)
        raw = first[1]
        assert isinstance(raw, bytes)
        assert b"From: alice@web.test" in raw and b"hi bob" in raw and b"notes.txt" in raw
        assert b"Received:" in raw  # added by the submission pipeline
        assert b"big.bin" in raw and base64.b64encode(big[:57]) in raw


def test_login_throttle_is_shared_with_imap(tmp_path_factory: pytest.TempPathFactory) -> None:
    with Instance(tmp_path_factory.mktemp("webthrottle"), DOMAIN,
                  extra_config="[auth]\nfailure_delay = 0.0\nmax_failures = 3\n") as i:
        i.add_user(ALICE, PW)
        i.start()
        ctx = i.client_ssl_context()
        for _ in range(3):
            with imaplib.IMAP4_SSL(i.address, i.port("imaps"), ssl_context=ctx) as imap, \
                    pytest.raises(imaplib.IMAP4.error):
                imap.login(ALICE, "wrong")
        with client(i) as c:
            r = login(c)  # the right password, but this address has failed too often over IMAP
            assert r.status_code == 429
            assert "set-cookie" not in r.headers


def test_live_updates_when_mail_arrives(inst: Instance) -> None:
    with client(inst) as c:
        login(c, BOB)
        assert c.get("/mail/events", params={"f": "../x"}).status_code == 404
        with c.stream("GET", "/mail/events", params={"f": "INBOX"}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            lines = r.iter_lines()
            assert next(lines).startswith("retry:")
            deliver(inst, BOB, plain(BOB, "live one"))
            for _ in range(10):
                line = next(lines)
                if line == "event: change":
                    break
            else:
                raise AssertionError("no change event")
    with client(inst) as anon:
        assert anon.get("/mail/events", params={"f": "INBOX"}).status_code == 403


def test_search_headers_and_body(inst: Instance) -> None:
    with client(inst) as c:
        login(c)
        r = c.get("/mail/folder", params={"f": "INBOX", "q": "FIRST"})
        assert r.status_code == 200
        assert "first message" in r.text and "html message" not in r.text
        r = c.get("/mail/folder", params={"f": "INBOX", "q": "more"})  # only in a body
        assert "first message" not in r.text
        r = c.get("/mail/folder", params={"f": "INBOX", "q": "more", "b": "1"})
        assert "first message" in r.text
        r = c.get("/mail/folder", params={"f": "INBOX", "q": "<script>" + "x" * 500})
        assert r.status_code == 200 and "<script>x" not in r.text


def test_password_change_needs_the_old_one_and_ends_other_sessions(inst: Instance) -> None:
    carol = f"carol@{DOMAIN}"
    inst.add_user(carol, PW)
    with client(inst) as a, client(inst) as b:
        login(a, carol)
        login(b, carol)
        token = csrf(a, "/mail/settings")
        r = a.post("/mail/password", data={"csrf": token, "old": "wrong-pass", "new": "new-password-1",
                                           "again": "new-password-1"})
        assert r.status_code == 403
        r = a.post("/mail/password", data={"csrf": token, "old": PW, "new": "new-password-1", "again": "other"})
        assert r.status_code == 400
        r = a.post("/mail/password", data={"old": PW, "new": "new-password-1", "again": "new-password-1"})
        assert r.status_code == 403  # no CSRF token
        r = a.post("/mail/password", data={"csrf": token, "old": PW, "new": "new-password-1",
                                           "again": "new-password-1"})
        assert r.status_code == 200 and "Password changed." in r.text
        assert a.get("/mail/folder?f=INBOX").status_code == 200  # this browser stays in (new session id)
        assert b.get("/mail/folder?f=INBOX").status_code == 303  # the other one is logged out
        assert login(b, carol).status_code == 401
        assert login(b, carol, "new-password-1").status_code == 303
    ctx = ssl.create_default_context(cafile=str(inst.root / "tls" / "cert.pem"))
    ctx.check_hostname = False
    with imaplib.IMAP4_SSL(inst.address, inst.port("imaps"), ssl_context=ctx) as imap:
        imap.login(carol, "new-password-1")  # the same account for IMAP


def test_identities_forward_as_attachment_and_completion(inst: Instance) -> None:
    inst.cli("alias", "add", f"info@{DOMAIN}", ALICE)
    with client(inst) as c:
        login(c)
        token = csrf(c, "/mail/compose")
        base = {"csrf": token, "to": BOB, "text": "see attached", "action": "send"}
        r = c.post("/mail/send", data={**base, "from": BOB, "subject": "as bob"})
        assert r.status_code == 403  # not one of alice's addresses
        r = c.post("/mail/send", data={**base, "from": f"info@{DOMAIN}", "subject": "as info"})
        assert r.status_code == 303, r.text
        uid = uids(c)["first message"]
        page = c.get("/mail/compose", params={"m": "fwdatt", "f": "INBOX", "u": str(uid)}).text
        assert "Forwarding as an attachment" in page
        assert f'<option value="info@{DOMAIN}" data-signature="">' in page and f'<option value="{BOB}">' in page  # completion
        r = c.post("/mail/send", data={**base, "subject": "Fwd: first message", "af": "INBOX", "au": str(uid),
                                       "asubject": "first message"})
        assert r.status_code == 303, r.text
        r = c.post("/mail/send", data={**base, "subject": "x", "af": "../../bob@web.test/Maildir", "au": "1"})
        assert r.status_code == 404
    ctx = ssl.create_default_context(cafile=str(inst.root / "tls" / "cert.pem"))
    ctx.check_hostname = False
    with imaplib.IMAP4_SSL(inst.address, inst.port("imaps"), ssl_context=ctx) as imap:
        imap.login(BOB, PW)
        imap.select("INBOX")
        for subject, expect in (("as info", b"From: info@web.test"), ("Fwd: first message", b"message/rfc822")):
            typ, data = imap.search(None, "SUBJECT", f'"{subject}"')
            assert typ == "OK" and data[0]
            typ, msg = imap.fetch(data[0].split()[-1], "(RFC822)")
            first = msg[0]
            assert isinstance(first, tuple) and expect in first[1]


def test_two_sessions_change_the_same_folder_at_once(inst: Instance) -> None:
    dave = f"dave@{DOMAIN}"
    inst.add_user(dave, PW)
    for i in range(6):
        deliver(inst, dave, plain(dave, f"together {i}"))
    with client(inst) as a, client(inst) as b:
        login(a, dave)
        login(b, dave)
        ids = uids(a)
        ta, tb = csrf(a), csrf(b)
        errors: list[str] = []

        def flagger(c: httpx.Client, token: str) -> None:
            for n in range(6):
                op = "flag" if n % 2 == 0 else "unflag"
                r = c.post("/mail/act", data={"f": "INBOX", "csrf": token, "op": op,
                                              "u": [str(u) for u in ids.values()]})
                if r.status_code != 303:
                    errors.append(f"flag: {r.status_code} {r.text}")

        def mover(c: httpx.Client, token: str) -> None:
            for subject in ("together 0", "together 1", "together 2"):
                r = c.post("/mail/act", data={"f": "INBOX", "csrf": token, "op": "move", "dest": "Archive",
                                              "u": str(ids[subject])})
                if r.status_code not in (303, 409):  # 409: the message moved under the other session's feet
                    errors.append(f"move: {r.status_code} {r.text}")

        together(lambda: flagger(a, ta), lambda: mover(b, tb))
        assert not errors
        inbox, archive = uids(a), uids(b, "Archive")
        assert set(archive) == {"together 0", "together 1", "together 2"}
        assert set(inbox) == {"together 3", "together 4", "together 5"}
        assert inst.messages(dave, "Archive") and len(inst.messages(dave)) == 3
