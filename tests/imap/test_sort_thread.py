"""SORT, THREAD and ESORT on a real server with imaplib's sort() and thread() (RFC 5256, RFC 5957,
RFC 5267); the orderings themselves are tested in tests/message against Dovecot's."""

from __future__ import annotations

import imaplib
import time

from tests.concurrency import together

from .conftest import PASSWORD, IMAPServer

MESSAGES = [
    (b"From: Carol <c@x.org>\r\nTo: z@x.org\r\nSubject: Planning\r\nDate: Mon, 1 Jan 2024 09:00:00 +0000\r\n"
     b"Message-ID: <p1@x>\r\n\r\nroot\r\n"),
    (b"From: alice@x.org\r\nTo: y@x.org\r\nSubject: Re: Planning\r\nDate: Mon, 1 Jan 2024 11:00:00 +0000\r\n"
     b"Message-ID: <p2@x>\r\nReferences: <p1@x>\r\n\r\nreply\r\n"),
    (b"From: Bob <b@x.org>\r\nTo: a@x.org\r\nSubject: another topic\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000\r\n"
     b"Message-ID: <o1@x>\r\n\r\nother\r\n"),
]


def test_sort_thread_esort_with_imaplib(server: IMAPServer) -> None:
    addr = server.user("st")
    m = imaplib.IMAP4_SSL(*server.inst.addr("imaps"), ssl_context=server.inst.client_ssl_context())
    try:
        m.login(addr, PASSWORD)
        caps = m.capability()[1][0].split()
        for cap in (b"SORT", b"SORT=DISPLAY", b"THREAD=ORDEREDSUBJECT", b"THREAD=REFERENCES", b"ESORT"):
            assert cap in caps
        for raw in MESSAGES:
            m.append("INBOX", None, imaplib.Time2Internaldate(time.time()), raw)
        m.select("INBOX")
        assert m.sort("(DATE)", "UTF-8", "ALL") == ("OK", [b"1 3 2"])
        assert m.sort("(REVERSE DATE)", "UTF-8", "ALL") == ("OK", [b"2 3 1"])
        assert m.sort("(SUBJECT FROM)", "UTF-8", "ALL") == ("OK", [b"3 2 1"])  # "another", then Planning by from
        assert m.sort("(DISPLAYFROM)", "UTF-8", "NOT FROM bob") == ("OK", [b"2 1"])  # alice@x.org, Carol
        typ, data = m.uid("SORT", "(ARRIVAL)", "UTF-8", "ALL")
        assert typ == "OK" and len(data[0].split()) == 3
        assert m.thread("REFERENCES", "UTF-8", "ALL") == ("OK", [b"(1 2)(3)"])
        assert m.thread("ORDEREDSUBJECT", "UTF-8", "ALL") == ("OK", [b"(1 2)(3)"])  # by the first date
        typ, data = m._simple_command("SORT", "RETURN", "(MIN MAX COUNT ALL)", "(DATE)", "UTF-8", "ALL")
        assert typ == "OK"
        esearch = m.untagged_responses.pop("ESEARCH")[0]
        assert b"MIN 1 MAX 2 ALL 1,3,2 COUNT 3" in esearch
        typ, _ = m._simple_command("SORT", "RETURN", "(SAVE)", "(REVERSE DATE)", "UTF-8", "ALL")
        assert typ == "OK"
        typ, data = m.search(None, "$")  # RFC 5182: the saved result of the SORT
        assert typ == "OK" and sorted(data[0].split()) == [b"1", b"2", b"3"]
    finally:
        m.logout()


def test_two_sessions_sort_at_once(server: IMAPServer) -> None:
    """Both fill and read the sort-field cache of one mailbox at the same time."""
    import threading

    addr = server.user("st")
    with server.client(addr) as c:
        for k in range(40):
            raw = b"Subject: s%02d\r\nDate: Mon, 1 Jan 2024 %02d:00:00 +0000\r\n\r\nx\r\n" % (39 - k, k % 24)
            c.ok(b"APPEND INBOX {%d+}\r\n" % len(raw) + raw)
    answers: list[bytes] = []
    barrier = threading.Barrier(2)

    def sort() -> None:
        with server.client(addr) as c:
            c.ok("SELECT INBOX")
            barrier.wait(timeout=10)
            for _ in range(3):
                answers.append(c.ok("SORT (SUBJECT) UTF-8 ALL")[0])

    together(sort, sort, timeout=60)
    expected = b"* SORT " + b" ".join(b"%d" % n for n in range(40, 0, -1)) + b"\r\n"
    assert answers == [expected] * 6
