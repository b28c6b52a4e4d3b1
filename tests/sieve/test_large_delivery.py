"""A Sieve user's delivery of a large message (pipeline/sieve.py, sieve/interpreter.py `Message.at`,
`Copy`): the script sees the header section only, a body test reads a bounded copy
(message/textscan.py `sparse_part`), and what the plan stores or redirects is delivered from the
spooled body or written into a new spool a piece at a time.

In process, with a real Maildir store, the real queue (its spool and SQLite) and real script storage:
a 12 MiB spooled message to a user whose script files it (unedited), edits its header, tests its
body (:text, :raw) or redirects it; the bytes stored or queued are exact and tracemalloc's peak in
the delivering process stays a small fraction of the message. Small messages go the same way (their
behaviour is the rest of tests/sieve). End to end over SMTP: tests/sieve/test_large_smtp.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from bench.fts_large import large_message
from bench.sieve_large import deliver_through_script
from postier.message.matching import TEXT_LIMIT
from postier.message.types import MEMORY_DATA_LIMIT, User
from postier.pipeline.sieve import SieveFilter
from postier.store.delivery import LocalDelivery
from tests.queue.conftest import queue_env

SIZE = 12 << 20
PEAK = 3 << 20  # what the delivering process may allocate at most, for a 12 MiB message
USER = User("alice@a.test", "alice", "a.test", "maildir")
PREFIX = b"Return-Path: <x@remote.test>\r\nReceived: from remote.test; Sat, 5 Dec 2026 02:00:00 +0000\r\n"
DATA = large_message(SIZE, "aardvark", "zebrafinch")


def maildir_files(root: Path, folder: str = "") -> list[bytes]:
    md = root / "mail" / "a.test" / "alice" / "Maildir" / (f".{folder}" if folder else "")
    return [p.read_bytes() for sub in ("new", "cur") if (md / sub).is_dir() for p in sorted((md / sub).iterdir())]


async def deliver(root: Path, script: str, data: bytes = DATA) -> tuple[int, list[tuple[str, bytes]]]:
    """Deliver `data` to alice through `script`; tracemalloc's peak of the delivery and the queued
    messages (recipient, octets)."""
    async with queue_env(root) as q:
        mda = LocalDelivery(q.config.mail_root, agent=False)  # written in this process: measured here
        sieve = SieveFilter(q.config, mda, q.queue, None)
        try:
            got, peak = await deliver_through_script(sieve, USER, script, PREFIX, data, q.config.spool_dir)
        finally:
            mda.close()
        assert got.local.delivered == {USER.address} and not got.refused
        queued = [(r.address, q.queue.spool.read_file(info.id))
                  for info, recipients in q.queue.spool.list_messages() for r in recipients]
        return peak, queued


def test_header_only_script_files_the_spooled_body(tmp_path: Path) -> None:
    script = 'require "fileinto";\nif allof (header :contains "subject" "large", size :over 11M) { fileinto "Big"; }\n'
    peak, queued = asyncio.run(deliver(tmp_path, script))
    assert maildir_files(tmp_path, "Big") == [PREFIX + DATA] and maildir_files(tmp_path) == []
    assert queued == [] and peak < PEAK, peak


def test_size_is_the_real_size(tmp_path: Path) -> None:
    exact = len(PREFIX + DATA)
    script = (f'require "fileinto";\nif size :under {exact + 1} {{ if size :over {exact - 1} '
              '{ fileinto "Exact"; } }\n')
    asyncio.run(deliver(tmp_path, script))
    assert maildir_files(tmp_path, "Exact") == [PREFIX + DATA]


def test_edited_header_is_written_before_the_body_in_pieces(tmp_path: Path) -> None:
    script = ('require ["editheader", "fileinto"];\naddheader "X-Tag" "large one";\n'
              'deleteheader "subject";\nfileinto "Tagged";\n')
    peak, _ = asyncio.run(deliver(tmp_path, script))
    want = b"X-Tag: large one\r\n" + (PREFIX + DATA).replace(b"Subject: large\r\n", b"", 1)
    assert maildir_files(tmp_path, "Tagged") == [want]
    assert peak < PEAK, peak


def test_body_text_finds_the_text_before_and_after_the_attachment(tmp_path: Path) -> None:
    script = ('require ["body", "fileinto", "copy"];\n'
              'if body :text :contains "aardvark" { fileinto "Before"; }\n'
              'if body :text :contains "zebrafinch" { fileinto :copy "After"; }\n'
              'if body :text :contains "AAECAwQF" { fileinto :copy "Attachment"; }\n')
    peak, _ = asyncio.run(deliver(tmp_path, script))
    assert maildir_files(tmp_path, "Before") == [PREFIX + DATA]
    assert maildir_files(tmp_path, "After") == [PREFIX + DATA]
    assert maildir_files(tmp_path, "Attachment") == []  # an attachment is no text (RFC 5173 §5.2)
    assert peak < PEAK, peak


def test_body_content_and_raw_are_bounded(tmp_path: Path) -> None:
    """:content "application/octet-stream" reads the attachment's part: the copy cannot leave it out,
    so the first TEXT_LIMIT octets are parsed (the attachment decoded); :raw reads the first max_body octets of the body."""
    script = ('require ["body", "fileinto", "copy"];\n'
              'if body :content "application/octet-stream" :contains "012345678" { fileinto :copy "Content"; }\n'
              'if body :raw :contains "aardvark" { fileinto :copy "RawStart"; }\n'
              'if body :raw :contains "zebrafinch" { fileinto :copy "RawEnd"; }\n')
    peak, _ = asyncio.run(deliver(tmp_path, script))
    assert maildir_files(tmp_path, "Content") == [PREFIX + DATA]
    assert maildir_files(tmp_path, "RawStart") == [PREFIX + DATA]
    assert maildir_files(tmp_path, "RawEnd") == []  # beyond the first max_body (1 MiB) of the body
    assert maildir_files(tmp_path) == [PREFIX + DATA]  # the implicit keep
    assert peak < 5 * TEXT_LIMIT // 2, peak  # TEXT_LIMIT parsed, 2 MiB of the part decoded: not the message size


def test_redirect_queues_from_the_file(tmp_path: Path) -> None:
    peak, queued = asyncio.run(deliver(tmp_path, 'redirect "carol@b.test";\n'))
    assert queued == [("carol@b.test", b"X-Sieve-Redirected-From: alice@a.test\r\n" + PREFIX + DATA)]
    assert maildir_files(tmp_path) == []
    assert peak < PEAK, peak


def test_header_section_too_long_is_kept(tmp_path: Path) -> None:
    """A header section that does not end within HEADER_LIMIT (the pipelines refuse one before this):
    the script is not run, the message is kept whole (RFC 5228 §2.10.6)."""
    data = b"X-Long: " + b"a" * (SIZE // 2) + b"\r\n\r\nbody\r\n"
    asyncio.run(deliver(tmp_path, 'discard;\n', data))
    assert maildir_files(tmp_path) == [PREFIX + data]


@pytest.mark.parametrize("size", [0, 1, 100, MEMORY_DATA_LIMIT + 1])
def test_copy_reads_by_offset_as_joined(size: int) -> None:
    from postier.sieve.interpreter import Copy, Message
    raw = b"Subject: s\r\nTo: t@x\r\n\r\n" + bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    m = Message.at(lambda o, n: raw[o:o + n], len(raw), 1 << 10)
    assert m.raw == raw and m.size == len(raw)
    m.add("X-A", b" 1", False)
    edited = b"X-A: 1\r\n" + raw
    assert m.raw == edited and m.size == len(edited)
    c = Copy(m, m.head, b"T: 1\r\n")
    assert bytes(c) == b"T: 1\r\n" + edited and b"".join(c.pieces(7)) == bytes(c) and c.size == len(bytes(c))
    assert bytes(Copy(m)) == raw and Copy(m).original


def test_a_script_without_body_test_reads_the_header_only() -> None:
    """Only the piece holding the header section is read, whatever the script does with the header;
    a body test reads more (a bounded copy), :raw only the start of the body."""
    from postier.sieve import Environment, compile_script, run
    from postier.sieve.interpreter import Message
    from postier.sieve.outcome import Delivery, plan
    from postier.sieve.vacation import MemoryVacationStore

    def reads_of(script: str) -> int:
        """How far into the message the run and its plan read."""
        furthest = 0

        def read_at(offset: int, n: int) -> bytes:
            nonlocal furthest
            got = DATA[offset:offset + n]
            furthest = max(furthest, offset + len(got))
            return got

        m = Message.at(read_at, len(DATA), 1 << 18)
        res = run(compile_script(script.encode()), m, Environment(envelope_from="x@remote.test"))
        plan(res, m, Delivery(sender="x@remote.test", recipient="alice@a.test"), MemoryVacationStore())
        return furthest

    headers = ('require ["fileinto", "editheader", "vacation", "copy"];\n'
               'if anyof (header :contains "subject" "large", size :over 1M, exists "to") '
               '{ addheader "X-A" "1"; fileinto :copy "Big"; redirect "c@b.test"; vacation "away"; }\n')
    assert reads_of(headers) <= 64 << 10  # the first piece read looking for the blank line
    assert reads_of('require "body";\nif body :raw :contains "x" { keep; }\n') <= (1 << 20) + (64 << 10)
    assert reads_of('require "body";\nif body :text :contains "x" { keep; }\n') == len(DATA)  # pieces
