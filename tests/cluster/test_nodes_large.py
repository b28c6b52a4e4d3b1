"""Large messages through running cluster nodes (postier on 127.0.0.2-3, one PostgreSQL, one bucket) and a
remote domain's MX on 127.0.0.4: a submission of 12 MiB to a local and a remote recipient is read back
byte for byte over IMAP on the other node and delivered byte for byte by the shared queue, both
copies (the mailbox's and the queue's) having gone up from the node's spool file in multipart uploads; two sessions on two nodes
submitting the same large message at once are both accepted and both delivered; the object store
failing a part mid-upload makes DATA answer 4xx with nothing queued and no parts left behind; CATENATE of
URLs naming a 20 MiB message on both nodes at once gives what the parts give read whole."""

from __future__ import annotations

import hashlib
import poplib
import smtplib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psycopg")

from tests.concurrency import together
from tests.dnsserver import DNSServer  # noqa: E402
from tests.harness import Instance, start_all  # noqa: E402

from .conftest import PgServer, S3Server  # noqa: E402
from .test_nodes import ALICE, PASSWORD, _can_bind, imap, make_nodes  # noqa: E402

REMOTE = "remote.test"
BOB = f"bob@{REMOTE}"
SIZE = 12 << 20  # above the 8 MiB part: two parts


def large(tag: str) -> bytes:
    """A message of about SIZE bytes: lines of 100 bytes, varied by `tag`, none starting with a dot."""
    head = (f"From: {ALICE}\r\nTo: {ALICE}, {BOB}\r\nSubject: large {tag}\r\nDate: Sat, 05 Dec 2026 02:00:00 +0000\r\n"
            f"Message-ID: <large-{tag}@example.org>\r\n\r\n").encode()
    line = (f"{tag}-" * 50)[:98].encode() + b"\r\n"
    return head + line * ((SIZE - len(head)) // len(line))


def submit(inst: Instance, data: bytes, to: list[str]) -> tuple[int, bytes]:
    """Submission (587, STARTTLS, AUTH): the reply to the end of DATA."""
    with smtplib.SMTP(*inst.addr("submission"), timeout=120) as s:
        s.starttls(context=inst.client_ssl_context())
        s.login(ALICE, PASSWORD)
        assert s.mail(ALICE)[0] == 250
        for r in to:
            assert s.rcpt(r)[0] == 250
        return s.data(data)


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def uploads_left(s3: S3Server) -> list[Any]:
    import boto3
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
    return [u for b in client.list_buckets()["Buckets"]
            for u in client.list_multipart_uploads(Bucket=b["Name"]).get("Uploads", [])]


@pytest.fixture
def cluster(tmp_path: Path, pg: PgServer, s3: S3Server) -> Iterator[tuple[Instance, Instance, Instance]]:
    """Nodes A and B and the remote MX, started; mail to REMOTE goes to the MX."""
    if not _can_bind("127.0.0.4"):
        pytest.skip("no 127.0.0.2-4 loopback addresses")
    with DNSServer() as dns:
        (tmp_path / "mx").mkdir()
        mx = Instance(tmp_path / "mx", REMOTE, address="127.0.0.4")
        mx.add_user(BOB, PASSWORD)
        dns.add(REMOTE, "MX", f"10 {mx.hostname}")
        dns.add(mx.hostname, "A", "127.0.0.4")
        a, b = make_nodes(tmp_path, pg.create_db(), s3, 2, extra=(
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n[outbound]\nsmtp_port = {mx.port("smtp")}\n'))
        try:
            start_all((mx, a, b))
            yield a, b, mx
        finally:
            a.stop()
            b.stop()
            mx.stop()


def test_a_large_message_is_read_back_and_delivered_byte_exact(cluster: tuple[Instance, Instance, Instance],
                                                               s3: S3Server) -> None:
    a, b, mx = cluster
    data = large("one")
    code, text = submit(a, data, [ALICE, BOB])
    assert code == 250, (code, text)
    wait_for(lambda: mx.messages(BOB), 90, "the queue's delivery to the MX")
    [got] = mx.messages(BOB)
    assert got.endswith(data)  # the MX added its trace header, the rest is byte for byte
    c = imap(b)  # the other node
    try:
        assert c.select("INBOX")[0] == "OK"
        typ, fetched = c.uid("FETCH", "1:*", "(BODY.PEEK[])")
        assert typ == "OK"
        bodies = [item[1] for item in fetched if isinstance(item, tuple)]
        assert len(bodies) == 1 and bodies[0].endswith(data)
    finally:
        c.logout()
    # POP3 RETR on the other node too: the body is downloaded into a file and sent from it in pieces
    p = poplib.POP3(*b.addr("pop3"), timeout=60)
    try:
        p.stls(b.client_ssl_context())
        p.user(ALICE)
        p.pass_(PASSWORD)
        _resp, lines, _octets = p.retr(1)
        assert b"\r\n".join(lines).endswith(data.rstrip(b"\r\n"))
    finally:
        p.quit()
    assert uploads_left(s3) == []
    log = a.log.read_text()
    assert "status=sent" in log, log[-3000:]

    # Two sessions on two nodes submit the same large message at once: both accepted, both sent.
    same = large("two")
    barrier = threading.Barrier(2)

    def run(inst: Instance) -> tuple[int, bytes]:
        barrier.wait(10)
        return submit(inst, same, [BOB])
    replies = together(lambda: run(a), lambda: run(b), timeout=180)
    assert [r[0] for r in replies] == [250, 250], replies
    wait_for(lambda: len(mx.messages(BOB)) == 3, 120, "both copies at the MX")
    copies = [m for m in mx.messages(BOB) if b"Subject: large two" in m]
    assert len(copies) == 2 and all(m.endswith(same) for m in copies)
    wait_for(lambda: "-- 0 messages" in a.cli("queue", "list").stdout, 30, "the queue to empty")
    assert uploads_left(s3) == []


def test_a_part_failing_mid_upload_means_4xx_and_nothing_left(cluster: tuple[Instance, Instance, Instance],
                                                             s3: S3Server) -> None:
    from moto.s3.models import S3Backend
    a, _b, mx = cluster
    part = S3Backend.upload_part

    def failing(self: Any, bucket_name: str, multipart_id: str, part_id: int, value: bytes) -> Any:
        if int(part_id) == 2:  # moto (the object store, in this process) answers 500 for every try
            raise RuntimeError("the object store failed this part")
        return part(self, bucket_name, multipart_id, part_id, value)
    data = large("fails")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S3Backend, "upload_part", failing)
        code, text = submit(a, data, [BOB])
    assert 400 <= code < 500, (code, text)
    assert uploads_left(s3) == []  # the multipart upload was aborted
    assert "-- 0 messages" in a.cli("queue", "list").stdout  # no rows
    code, text = submit(a, data, [BOB])  # the store is back: the same message is taken
    assert code == 250, (code, text)
    wait_for(lambda: mx.messages(BOB), 90, "the delivery to the MX")
    assert mx.messages(BOB)[0].endswith(data) and uploads_left(s3) == []


def test_catenate_of_a_large_message_on_two_nodes_at_once(nodes: list[Instance]) -> None:
    """CATENATE (RFC 4469) on node A and node B at once, of URLs naming a 20 MiB message (the whole
    of it, its attachment, a partial range of a text part): each node copies them from the
    message's download in pieces into its spool file (`imapfetch.url_copy`), which goes up from
    there; what both nodes read back is what the parts give read whole (by hash)."""
    from postier.message.mime import parse_message
    from postier.message.sections import section_octets
    from postier.proto.imap.url import parse_url
    from tests.imap.test_fetch_large import big_mail

    a, b = nodes
    msg = big_mail(20 * (1 << 20) // 78)
    whole = parse_message(msg)

    def sec(tail: str) -> bytes:
        u = parse_url(f"/Drafts/;UID=1{tail}")
        assert u.section is not None
        data = section_octets(whole, u.section)
        return data if u.partial is None else data[u.partial[0]:u.partial[0] + (u.partial[1] or len(data))]

    urls = {a: ['"/Drafts/;UID=1"', '"/Drafts/;UID=1/;SECTION=1"'],
            b: ['"/Drafts/;UID=1/;SECTION=2"', '"/Drafts/;UID=1/;SECTION=3/;PARTIAL=5.20"', '"/Drafts/;UID=1/;SECTION=4.1"']}
    want = sorted(hashlib.sha256(d).hexdigest() for d in (msg + sec("/;SECTION=1"),
                  sec("/;SECTION=2") + sec("/;SECTION=3/;PARTIAL=5.20") + sec("/;SECTION=4.1")))
    c = imap(a)
    try:
        assert c.append("Drafts", None, None, msg)[0] == "OK"
    finally:
        c.logout()
    barrier = threading.Barrier(2)

    def run(inst: Instance) -> tuple[str, list[object]]:
        s = imap(inst)
        try:
            barrier.wait(10)
            reply: tuple[str, list[object]] = s._simple_command(
                "APPEND", "INBOX", "CATENATE (" + " ".join(f"URL {u}" for u in urls[inst]) + ")")
            return reply
        finally:
            s.logout()
    replies = together(lambda: run(a), lambda: run(b), timeout=180)
    assert [r[0] for r in replies] == ["OK", "OK"], replies
    for inst in (a, b):
        c = imap(inst)
        try:
            assert c.select("INBOX", readonly=True)[0] == "OK"
            typ, fetched = c.uid("FETCH", "1:*", "(BODY.PEEK[])")
            assert typ == "OK"
            assert sorted(hashlib.sha256(p[1]).hexdigest() for p in fetched if isinstance(p, tuple)) == want
        finally:
            c.logout()
