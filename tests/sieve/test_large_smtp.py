"""A large message (12 MiB, a text part, a base64 attachment, a text part) to Sieve users, end to end:
a running postier, scripts installed with `postier sieve put`, mail over real SMTP, the results read
from the Maildir. Each copy is exact: the server's trace fields, then the octets sent (with a header
field added before them for editheader, the redirect trace field for a redirect).

Covers a header-only fileinto, editheader, body :text finding the word of the text part before the
attachment, redirect to another local user through the queue, and two sessions at once to the same
Sieve user (one large message, one small): each lands once, exact. The memory bound is measured in
process (tests/sieve/test_large_delivery.py).
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.fts_large import large_message
from tests.concurrency import together
from tests.harness import Instance

pytestmark = pytest.mark.timeout(180)

DATA = large_message(12 << 20, "aardvark", "zebrafinch")
SCRIPTS = {
    "alice@a.test": 'require "fileinto";\nif allof (header :contains "subject" "large", size :over 10M) '
                    '{ fileinto "Big"; }\n',
    "bob@a.test": 'require ["editheader", "fileinto"];\naddheader "X-Tag" "tagged";\nfileinto "Tagged";\n',
    "carol@a.test": 'require ["body", "fileinto"];\nif body :text :contains "aardvark" { fileinto "Found"; }\n',
    "dave@a.test": 'redirect "erin@a.test";\n',
}


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    root: Path = tmp_path_factory.mktemp("sieve-large")
    inst = Instance(root, "a.test")
    for user in ("alice", "bob", "carol", "dave", "erin"):
        inst.add_user(f"{user}@a.test")
    for addr, text in SCRIPTS.items():
        inst.cli("sieve", "put", addr, "main", "-", stdin=text)
        inst.cli("sieve", "activate", addr, "main")
    inst.start()
    yield inst
    inst.stop()


def send(inst: Instance, to: str, data: bytes) -> None:
    with smtplib.SMTP(*inst.addr("smtp"), timeout=120) as s:
        assert s.sendmail("x@remote.test", [to], data) == {}


def wait_messages(inst: Instance, address: str, n: int, folder: str = "") -> list[bytes]:
    deadline = time.monotonic() + 60
    while len(found := inst.messages(address, folder)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def trace_then(stored: bytes, data: bytes) -> bytes:
    """What comes before `data` in a stored copy (asserting it ends with `data` exactly)."""
    assert stored.endswith(data) and len(stored) - len(data) < 4096
    return stored[:len(stored) - len(data)]


def test_header_only_script_files_it_exactly(mx: Instance) -> None:
    send(mx, "alice@a.test", DATA)
    (got,) = wait_messages(mx, "alice@a.test", 1, "Big")
    assert trace_then(got, DATA).startswith(b"Return-Path: <x@remote.test>\r\n")
    assert mx.messages("alice@a.test") == []


def test_editheader_writes_the_new_header_before_the_body(mx: Instance) -> None:
    send(mx, "bob@a.test", DATA)
    (got,) = wait_messages(mx, "bob@a.test", 1, "Tagged")
    assert trace_then(got, DATA).startswith(b"X-Tag: tagged\r\nReturn-Path: <x@remote.test>\r\n")


def test_body_text_finds_the_word_before_the_attachment(mx: Instance) -> None:
    send(mx, "carol@a.test", DATA)
    (got,) = wait_messages(mx, "carol@a.test", 1, "Found")
    trace_then(got, DATA)


def test_redirect_goes_through_the_queue_exactly(mx: Instance) -> None:
    send(mx, "dave@a.test", DATA)
    (got,) = wait_messages(mx, "erin@a.test", 1)
    assert b"X-Sieve-Redirected-From: dave@a.test\r\n" in trace_then(got, DATA)
    assert mx.messages("dave@a.test") == []


def test_two_sessions_at_once_to_the_same_sieve_user(mx: Instance) -> None:
    small = b"From: <y@remote.test>\r\nSubject: large too, but small\r\nMessage-ID: <small@x.test>\r\n\r\nhi\r\n"
    before_big = len(mx.messages("alice@a.test", "Big"))
    before_inbox = len(mx.messages("alice@a.test"))
    together(lambda: send(mx, "alice@a.test", DATA), lambda: send(mx, "alice@a.test", small))
    big = wait_messages(mx, "alice@a.test", before_big + 1, "Big")[before_big:]
    inbox = wait_messages(mx, "alice@a.test", before_inbox + 1)[before_inbox:]
    assert len(big) == 1 and len(inbox) == 1  # the small one is not over 10M: implicit keep
    trace_then(big[0], DATA)
    trace_then(inbox[0], small)
