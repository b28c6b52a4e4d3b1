"""The webmail in a real browser: Debian's Chromium, headless, driven by selenium through chromium-driver.

Skipped when Chromium or its driver is missing, unless POSTIER_REQUIRE_INTEROP=1 (then it fails).
Log in, read a message delivered over SMTP, open an HTML message full of scripts and remote
references (no script runs, no connection reaches the "canary" listener they point to), use the
keyboard shortcuts, and compose a message that another user then reads over IMAP.
"""

from __future__ import annotations

import email
import email.policy
import imaplib
import os
import re
import shutil
import smtplib
import socket
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.harness import Instance

pytestmark = pytest.mark.slow

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as EC  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    if os.environ.get("POSTIER_REQUIRE_INTEROP") == "1":
        pytest.fail("chromium and chromium-driver are required (POSTIER_REQUIRE_INTEROP=1) but not installed",
                    pytrace=False)
    pytest.skip("chromium and chromium-driver are not installed (scripts/install-test-deps)",
                allow_module_level=True)

DOMAIN = "browser.test"
HOST = f"mail.{DOMAIN}"
ALICE, BOB = f"alice@{DOMAIN}", f"bob@{DOMAIN}"
PW = "password123"


class Canary:
    """A TCP listener that counts every connection: any request to it means remote content loaded."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.hits = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def evil_html(port: int) -> str:
    u = f"http://127.0.0.1:{port}"
    return f"""<html><head><link rel="stylesheet" href="{u}/css"><style>@import url({u}/import);
body {{ background: url({u}/bg) }}</style><meta http-equiv="refresh" content="0;url={u}/refresh"></head>
<body onload="document.title='pwned'; fetch('{u}/onload')">
<p id="hello">Hello from HTML</p>
<script>document.title = 'pwned'; new Image().src = '{u}/script';</script>
<img src="{u}/pixel.png" onerror="fetch('{u}/onerror')">
<img src="x" onerror="document.title='pwned'">
<svg><script>fetch('{u}/svg')</script></svg>
<iframe src="{u}/iframe"></iframe><object data="{u}/object"></object><video src="{u}/video"></video>
<div style="background-image: url({u}/div)">styled</div>
<a id="js" href="javascript:document.title='pwned'">click</a>
</body></html>"""


def deliver(inst: Instance, to: str, msg: EmailMessage) -> None:
    with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
        s.send_message(msg, from_addr="sender@elsewhere.invalid", to_addrs=[to])


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


@pytest.fixture(scope="module")
def inst(tmp_path_factory: pytest.TempPathFactory, canary: Canary) -> Iterator[Instance]:
    i = Instance(tmp_path_factory.mktemp("browser"), DOMAIN)
    i.add_user(ALICE, PW)
    i.add_user(BOB, PW)
    i.start()
    m = EmailMessage()
    m["From"] = "Sender <sender@elsewhere.invalid>"
    m["To"] = ALICE
    m["Subject"] = "plain hello"
    m.set_content("This arrived over SMTP.")
    deliver(i, ALICE, m)
    h = EmailMessage()
    h["From"] = "Sender <sender@elsewhere.invalid>"
    h["To"] = ALICE
    h["Subject"] = "html with scripts"
    h.set_content("text part")
    h.add_alternative(evil_html(canary.port), subtype="html")
    deliver(i, ALICE, h)
    yield i
    i.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    profile: Path = tmp_path_factory.mktemp("chromium-profile")
    opts = webdriver.ChromeOptions()
    assert CHROMIUM is not None and DRIVER is not None
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}",
                "--ignore-certificate-errors",  # the test instance's self-signed certificate, in tests only
                f"--host-resolver-rules=MAP {HOST} 127.0.0.1"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


def url(inst: Instance, path: str) -> str:
    return f"https://{HOST}:{inst.port('https')}{path}"


def wait(drv: webdriver.Chrome) -> WebDriverWait[webdriver.Chrome]:
    return WebDriverWait(drv, 20)


def logged_in(inst: Instance, browser: webdriver.Chrome) -> None:
    """Log in unless this browser already is (xdist may run any test of this module first)."""
    if browser.get_cookie("postier_mail") is not None:
        return
    browser.get(url(inst, "/mail/"))
    wait(browser).until(EC.presence_of_element_located((By.ID, "address")))
    browser.find_element(By.ID, "address").send_keys(ALICE)
    browser.find_element(By.ID, "password").send_keys(PW)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait(browser).until(EC.presence_of_element_located((By.ID, "folder-name")))


def test_login_and_read_a_message(inst: Instance, browser: webdriver.Chrome) -> None:
    browser.get(url(inst, "/mail/"))
    wait(browser).until(EC.presence_of_element_located((By.ID, "address")))
    browser.find_element(By.ID, "address").send_keys(ALICE)
    browser.find_element(By.ID, "password").send_keys(PW)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    wait(browser).until(EC.presence_of_element_located((By.ID, "folder-name")))
    assert "plain hello" in browser.page_source
    browser.find_element(By.LINK_TEXT, "plain hello").click()
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "pre.text")))
    assert browser.find_element(By.CSS_SELECTOR, "pre.text").text.strip() == "This arrived over SMTP."
    cookie = browser.get_cookie("postier_mail")
    assert cookie is not None and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    assert browser.execute_script("return document.cookie") == ""  # HttpOnly: not visible to scripts


def test_keyboard_shortcuts_open_a_message(inst: Instance, browser: webdriver.Chrome) -> None:
    logged_in(inst, browser)
    browser.get(url(inst, "/mail/folder?f=INBOX"))
    wait(browser).until(EC.presence_of_element_located((By.ID, "folder-name")))
    body = browser.find_element(By.TAG_NAME, "body")
    body.send_keys("j")
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "tr.current")))
    browser.switch_to.active_element.send_keys("\ue007")  # Enter
    wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "article.message")))


def test_html_message_runs_no_script_and_loads_nothing_remote(inst: Instance, browser: webdriver.Chrome,
                                                              canary: Canary) -> None:
    logged_in(inst, browser)
    browser.get(url(inst, "/mail/folder?f=INBOX"))
    wait(browser).until(EC.presence_of_element_located((By.LINK_TEXT, "html with scripts")))
    browser.find_element(By.LINK_TEXT, "html with scripts").click()
    frame = wait(browser).until(EC.presence_of_element_located((By.CSS_SELECTOR, "iframe.body")))
    assert "allow-scripts" not in (frame.get_attribute("sandbox") or "")
    browser.switch_to.frame(frame)
    wait(browser).until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "Hello from HTML"))
    wait(browser).until(lambda d: d.execute_script("return document.readyState") == "complete")
    assert browser.execute_script("return document.title") != "pwned"
    assert not browser.find_elements(By.TAG_NAME, "script")
    assert not browser.find_elements(By.TAG_NAME, "iframe")
    link = browser.find_elements(By.LINK_TEXT, "click")
    assert not link or not (link[0].get_attribute("href") or "").startswith("javascript:")
    browser.switch_to.default_content()
    wait(browser).until(lambda d: d.execute_script("return document.readyState") == "complete")
    assert browser.title != "pwned"
    assert "remote image(s) blocked" in browser.page_source
    assert canary.hits == 0  # nothing reached the remote host: no image, CSS, frame or script fetch


def test_compose_reaches_another_user(inst: Instance, browser: webdriver.Chrome) -> None:
    logged_in(inst, browser)
    browser.get(url(inst, "/mail/compose"))
    wait(browser).until(EC.presence_of_element_located((By.ID, "to")))
    browser.find_element(By.ID, "to").send_keys(BOB)
    browser.find_element(By.ID, "subject").send_keys("from the browser")
    browser.find_element(By.ID, "text").send_keys("Typed in Chromium.")
    browser.find_element(By.CSS_SELECTOR, "button[value=send]").click()
    wait(browser).until(EC.presence_of_element_located((By.ID, "folder-name")))
    with imaplib.IMAP4_SSL(inst.address, inst.port("imaps"), ssl_context=inst.client_ssl_context()) as imap:
        imap.login(BOB, PW)
        imap.select("INBOX")
        typ, data = imap.search(None, "SUBJECT", '"from the browser"')
        assert typ == "OK" and data[0]
        typ, msg = imap.fetch(data[0].split()[-1], "(BODY[TEXT])")
        first = msg[0]
        assert isinstance(first, tuple)
        assert b"Typed in Chromium." in first[1]


def test_new_mail_is_announced_without_reloading(inst: Instance, browser: webdriver.Chrome) -> None:
    logged_in(inst, browser)
    browser.get(url(inst, "/mail/folder?f=INBOX"))
    wait(browser).until(EC.presence_of_element_located((By.ID, "folder-name")))
    live = browser.find_element(By.ID, "live")
    assert not live.is_displayed()
    # the server watches the folder before it answers the page's event stream
    wait(browser).until(lambda d: live.get_attribute("data-stream") == "open")
    m = EmailMessage()
    m["From"] = "Sender <sender@elsewhere.invalid>"
    m["To"] = ALICE
    m["Subject"] = "arrives while looking"
    m.set_content("live")
    deliver(inst, ALICE, m)
    wait(browser).until(EC.visibility_of_element_located((By.ID, "live")))


def test_move_to_a_folder(inst: Instance, browser: webdriver.Chrome) -> None:
    logged_in(inst, browser)
    browser.get(url(inst, "/mail/folder?f=INBOX"))
    wait(browser).until(EC.presence_of_element_located((By.LINK_TEXT, "plain hello")))
    row = browser.find_element(By.XPATH, "//tr[.//a[text()='plain hello']]")
    row.find_element(By.CSS_SELECTOR, "input[type=checkbox]").click()
    Select(browser.find_element(By.ID, "dest")).select_by_visible_text("Archive")
    browser.find_element(By.CSS_SELECTOR, "button[value=move]").click()
    wait(browser).until(EC.staleness_of(row))  # the page before the move is gone (its row with it)
    wait(browser).until(EC.presence_of_element_located((By.ID, "folder-name")))
    assert "plain hello" not in browser.page_source
    browser.get(url(inst, "/mail/folder?f=Archive"))
    wait(browser).until(EC.presence_of_element_located((By.LINK_TEXT, "plain hello")))


def test_vacation_set_in_the_page_answers_mail(inst: Instance, browser: webdriver.Chrome) -> None:
    """Vacation set through the settings form; Bob writes over SMTP; the reply reaches Bob's INBOX."""
    logged_in(inst, browser)
    browser.get(url(inst, "/mail/settings"))
    wait(browser).until(EC.presence_of_element_located((By.ID, "vacation")))
    browser.find_element(By.ID, "vacation").click()
    browser.find_element(By.ID, "vsubject").send_keys("Away this week")
    browser.find_element(By.ID, "vbody").send_keys("Back on Monday.")
    browser.find_element(By.ID, "save-rules").click()
    wait(browser).until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, "p.live"), "Filters saved."))
    assert browser.find_element(By.ID, "vacation").is_selected()
    m = EmailMessage()
    m["From"] = f"Bob <{BOB}>"
    m["To"] = ALICE
    m["Subject"] = "are you there?"
    m["Message-ID"] = "<ask-1@browser.test>"
    m.set_content("question")
    with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
        s.send_message(m, from_addr=BOB, to_addrs=[ALICE])
    deadline = time.monotonic() + 60
    found = b""
    with imaplib.IMAP4_SSL(inst.address, inst.port("imaps"), ssl_context=inst.client_ssl_context()) as imap:
        imap.login(BOB, PW)
        while not found and time.monotonic() < deadline:
            imap.select("INBOX")
            typ, data = imap.search(None, "SUBJECT", '"Away this week"')
            if typ == "OK" and data[0]:
                typ, msg = imap.fetch(data[0].split()[-1], "(BODY[])")
                first = msg[0]
                assert isinstance(first, tuple)
                found = first[1]
            else:
                time.sleep(0.5)
    assert found, "no vacation reply reached Bob"
    assert b"Back on Monday." in found
    assert b"Auto-Submitted: auto-replied" in found
    assert b"<ask-1@browser.test>" in found  # In-Reply-To


def test_search_finds_a_word_in_the_body(inst: Instance, browser: webdriver.Chrome) -> None:
    deliver(inst, ALICE, _plain("nothing in the subject", "the parcel code is zanzibar42 today"))
    logged_in(inst, browser)
    browser.get(url(inst, "/mail/folder?f=INBOX"))
    wait(browser).until(EC.presence_of_element_located((By.ID, "folder-name")))
    box = browser.find_element(By.CSS_SELECTOR, "input[name=q]")
    box.send_keys("zanzibar42")
    body = browser.find_elements(By.CSS_SELECTOR, "input[name=b]")
    if body and not body[0].is_selected():
        body[0].click()
    box.submit()
    wait(browser).until(EC.presence_of_element_located((By.LINK_TEXT, "nothing in the subject")))
    assert "plain hello" not in browser.page_source


def _plain(subject: str, text: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = "Sender <sender@elsewhere.invalid>"
    m["To"] = ALICE
    m["Subject"] = subject
    m.set_content(text)
    return m


def test_rich_text_compose_sends_html_and_text(inst: Instance, browser: webdriver.Chrome) -> None:
    logged_in(inst, browser)
    browser.get(url(inst, "/mail/compose"))
    wait(browser).until(EC.presence_of_element_located((By.ID, "rich-toggle")))
    browser.find_element(By.ID, "to").send_keys(BOB)
    browser.find_element(By.ID, "subject").send_keys("rich from the browser")
    browser.find_element(By.ID, "rich-toggle").click()
    editor = wait(browser).until(EC.visibility_of_element_located((By.ID, "editor")))
    editor.click()
    editor.send_keys("normal ")
    browser.find_element(By.CSS_SELECTOR, "button[data-cmd=bold]").click()
    editor.send_keys("strong words")
    browser.find_element(By.CSS_SELECTOR, "button[value=send]").click()
    wait(browser).until(EC.presence_of_element_located((By.ID, "folder-name")))
    with imaplib.IMAP4_SSL(inst.address, inst.port("imaps"), ssl_context=inst.client_ssl_context()) as imap:
        imap.login(BOB, PW)
        imap.select("INBOX")
        typ, data = imap.search(None, "SUBJECT", '"rich from the browser"')
        assert typ == "OK" and data[0]
        typ, msg = imap.fetch(data[0].split()[-1], "(BODY[])")
        first = msg[0]
        assert isinstance(first, tuple)
        raw = first[1]
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage) and msg.get_content_type() == "multipart/alternative"
    text, html = msg.iter_parts()
    assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
    assert "normal strong words" in text.get_content()
    assert re.search(r"<(b|strong)>strong words</(b|strong)>", html.get_content()), raw
