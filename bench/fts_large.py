"""Peak memory (tracemalloc) of the single-machine full-text index (store/fts.py) indexing one
large delivered message: by the catch-up of the first search, and by `postier reindex`'s rebuild.

The message (--size MiB) is a multipart with a text part before and one after a base64
attachment; it is delivered into a fresh Maildir (as the delivery agent does, bypassing the index),
then a SEARCH BODY for the word after the attachment indexes it, then the index is rebuilt from the
Maildir. Each step prints tracemalloc's peak. `--tree DIR` runs on another checkout of postier
(e.g. `git archive` of an earlier commit into DIR), to compare before and after a change:

    .venv/bin/python -m bench fts-large [--size 30] [--tree DIR]
"""

from __future__ import annotations

import base64
import sys
import tempfile
from pathlib import Path

from bench.trees import size_bench



def large_message(size: int, before: str, after: str) -> bytes:
    """A message of about `size` bytes: text/plain with `before`, a base64 attachment, text/plain with `after`."""
    head = (b"From: c@example.net\r\nTo: bob@example.org\r\nSubject: large\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n"
            + before.encode() + b" opens the message\r\n--b\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n")
    tail = b"\r\n--b\r\nContent-Type: text/plain\r\n\r\n" + after.encode() + b" closes it\r\n--b--\r\n"
    line = base64.b64encode(bytes(range(57)) * 1)  # 76 characters
    n = max(size - len(head) - len(tail), 0) // (len(line) + 2)
    return head + b"\r\n".join([line] * n) + tail


def _child(size: int) -> dict[str, object]:
    import tracemalloc

    from postier.message.types import User
    from postier.store.maildir import deliver_maildir
    from postier.store.mailbox import INBOX, MailStore

    user = User("bob@example.org", "bob", "example.org", "maildir")
    with tempfile.TemporaryDirectory(prefix="fts-large-") as tmp:
        store = MailStore(Path(tmp) / "mail")
        try:
            mb = store.acquire(user)
            try:
                deliver_maildir(mb.root, b"", large_message(size << 20, "aardvark", "zebrafinch"))
                mb.snapshot(INBOX)
                tracemalloc.start()
                got = mb.text_search(INBOX, [("BODY", "zebrafinch")])
                search_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                ti = mb._text_index()
                exact = ti is not None and ti.unchecked(mb.state(INBOX).fid) == set()
                tracemalloc.start()
                mb.rebuild_text_index()
                rebuild_peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
            finally:
                store.release(mb)
        finally:
            store.close()
    import postier

    return {"postier": str(Path(postier.__file__).parent), "size_mib": size, "search_peak_mib": round(search_peak / (1 << 20), 2),
            "reindex_peak_mib": round(rebuild_peak / (1 << 20), 2), "answer": repr(got), "exact_entry": exact}


def main(argv: list[str]) -> int:
    return size_bench(argv, "fts_large", __doc__.splitlines()[0], _child)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
