"""web.render without a server: part ids, the authentication badge, and the HTML sanitizer's corpus."""

from __future__ import annotations

import datetime as dt
import re

import pytest

from postier.message.sorting import SortFields, SortItem
from postier.message.threading import thread_references
from postier.web.mail import MAX_DEPTH, _thread_rows
from postier.web import render

HOST = "mail.example.test"
LOCAL = {"example.test"}


def head(ar: str, sender: str = "boss@example.test") -> bytes:
    return (f"Authentication-Results: {ar}\r\nFrom: Boss <{sender}>\r\nSubject: x\r\n\r\nbody\r\n").encode()


def test_part_ids() -> None:
    assert render.parse_part_id("1") == (1,)
    assert render.parse_part_id("1.2.10") == (1, 2, 10)
    for bad in (None, "", "0", "01", "1.", ".1", "1..2", "../1", "1/2", "a", "1.2.3.4.5.6.7.8.9", "9" * 40):
        assert render.parse_part_id(bad) is None


def test_badge_from_our_results() -> None:
    b = render.auth_badge(head(f"{HOST}; spf=fail smtp.mailfrom=boss@example.test; dkim=none; "
                               "dmarc=fail header.from=example.test"), HOST, LOCAL)
    assert b is not None and b.own_domain_forged and not b.ok
    assert ("dmarc", "fail") in b.results
    b = render.auth_badge(head(f"{HOST}; spf=pass smtp.mailfrom=a@b.test; dkim=pass header.d=b.test; "
                               "dmarc=pass header.from=b.test", "a@b.test"), HOST, LOCAL)
    assert b is not None and b.ok and not b.own_domain_forged


def test_badge_ignores_other_servers_and_none() -> None:
    assert render.auth_badge(head("other.test; dmarc=pass"), HOST, LOCAL) is None
    assert render.auth_badge(head(f"{HOST}; none"), HOST, LOCAL) is None
    assert render.auth_badge(head(f"{HOST}; ((("), HOST, LOCAL) is None


CORPUS = [
    "<script>alert(1)</script>",
    "<SCRIPT SRC=//evil.invalid/x.js></SCRIPT>",
    "<img src=x onerror=alert(1)>",
    "<img src=\"javascript:alert(1)\">",
    "<a href=\"java&#x09;script:alert(1)\">x</a>",
    "<a href=\" javascript:alert(1)\">x</a>",
    "<a href=\"data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==\">x</a>",
    "<svg/onload=alert(1)>",
    "<svg><script>alert(1)</script></svg>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "<body onload=alert(1)>",
    "<iframe src=javascript:alert(1)></iframe>",
    "<object data=javascript:alert(1)></object><embed src=x.swf>",
    "<form action=javascript:alert(1)><button>x</button></form>",
    "<meta http-equiv=refresh content=\"0;url=javascript:alert(1)\">",
    "<base href=javascript:alert(1)//>",
    "<link rel=stylesheet href=//evil.invalid/x.css>",
    "<style>@import 'http://evil.invalid/x.css';</style>",
    "<div style=\"background:url(javascript:alert(1))\">x</div>",
    "<div style=\"width:expression(alert(1))\">x</div>",
    "<p style=\"behavior:url(x.htc)\">x</p>",
    "<img src=\"data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+\">",
    "<a href=x onmouseover=alert(1)>x</a>",
    "<<script>script>alert(1)<</script>/script>",
    "<img \"\"\"><script>alert(1)</script>\">",
    "<noscript><p title=\"</noscript><img src=x onerror=alert(1)>\"></noscript>",
    "<table background=javascript:alert(1)><td background=x>",
    "<video><source onerror=alert(1)></video><audio src=x onerror=alert(1)>",
    "<details open ontoggle=alert(1)>",
    "<input autofocus onfocus=alert(1)>",
    "<isindex action=javascript:alert(1) type=image>",
    "<template><script>alert(1)</script></template>",
]


@pytest.mark.parametrize("html", CORPUS)
def test_sanitizer_corpus(html: str) -> None:
    clean, _blocked = render.sanitize_html(html, lambda cid: "/mail/cid?c=" + cid, remote=False)
    low = clean.lower()
    assert "<script" not in low
    assert not re.search(r"<[^>]*\son[a-z]+\s*=", low)  # no event handler attribute on any tag
    assert "javascript:" not in low and "data:text" not in low and "data:image/svg" not in low
    assert "evil.invalid" not in low
    for tag in ("<iframe", "<object", "<embed", "<form", "<meta", "<base", "<link", "<style", "<svg", "<math",
                "<input", "<video", "<audio", "<template"):
        assert tag not in low
    assert "expression(" not in low and "url(" not in low


def test_remote_images_are_replaced_until_allowed() -> None:
    html = '<img src="https://tracker.invalid/p.gif"><img src="//cdn.invalid/a.png"><img src="cid:a@b">'
    clean, blocked = render.sanitize_html(html, lambda cid: "/mail/cid?c=" + cid, remote=False)
    assert blocked == 2 and "tracker.invalid" not in clean and clean.count(render.BLOCKED_IMAGE) == 2
    assert "/mail/cid?c=a@b" in clean
    clean, blocked = render.sanitize_html(html, lambda cid: "", remote=True)
    assert blocked == 0 and "https://tracker.invalid/p.gif" in clean


def test_harmless_styles_are_kept() -> None:
    clean, _ = render.sanitize_html('<p style="color: red; font-weight: bold; position: fixed">x</p>', str, False)
    assert "color:red" in clean.replace(" ", "") and "position" not in clean


def _item(uid: int, msgid: str, refs: tuple[str, ...], minute: int) -> SortItem:
    when = dt.datetime(2026, 6, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=minute)
    f = SortFields(when, msgid[0], bool(refs), "a@x", "b@x", "", "a@x", "b@x", msgid, refs)
    return SortItem(uid, uid, when, 100, f)


def test_thread_rows_order_and_depth_without_recursion() -> None:
    # a chain of 3000 replies (deeper than Python's recursion limit) and a newer thread of two
    chain = [_item(i + 1, f"c{i}@x", (f"c{i - 1}@x",) if i else (), i) for i in range(3000)]
    other = [_item(3001, "o0@x", (), 5000), _item(3002, "o1@x", ("o0@x",), 5001)]
    rows = _thread_rows(thread_references(chain + other), 0, 50)
    assert rows[:2] == [(3001, 0), (3002, 1)]  # the thread with the newest message first
    assert rows[2:5] == [(1, 0), (2, 1), (3, 2)] and rows[-1] == (3000, MAX_DEPTH)
    assert len(rows) == 3002
    assert _thread_rows(thread_references(chain + other), 1, 1) == rows[2:]  # the second page: one thread
    # same dates: the later arrival (higher UID) decides
    a, b = _item(1, "a@x", (), 0), _item(2, "b@x", (), 0)
    assert _thread_rows(thread_references([a, b]), 0, 50) == [(2, 0), (1, 0)]
