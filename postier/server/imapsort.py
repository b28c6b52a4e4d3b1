"""SORT and THREAD over the mail store for the IMAP driver (RFC 5256, RFC 5957, RFC 5267).

Blocking (files, SQLite): the driver runs `sort_items` in the store's worker threads. It turns the
messages that matched the search criteria into `message.sorting.SortItem`s: the header fields come
from the store's view cache (kind "sort" + VIEWS_VERSION) or from the header block, parsed once and
cached. The ordering and threading themselves are the pure functions of `message.sorting` and
`message.threading`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from ..message import VIEWS_VERSION
from ..message.sorting import SortItem, decode_fields, encode_fields, sort_item
from ..store.api import Mailboxes
from ..store.errors import StoreError, StoreUnavailable
from .imapfetch import PEEK_AHEAD

__all__ = ["sort_items"]

_KIND = "sort" + VIEWS_VERSION


def sort_items(mb: Mailboxes, name: str, matches: Sequence[tuple[int, int]], use_uid: bool) -> list[SortItem]:
    """SortItems for ``matches`` ((seq, uid) in mailbox order); ``id`` is the UID or the sequence
    number. Messages expunged meanwhile are left out."""
    uids = [u for _s, u in matches]
    rows = mb.rows(name, uids)
    cached = mb.cache_get(name, [u for u in uids if u in rows], _KIND)
    out: list[SortItem] = []
    new: list[tuple[int, str, bytes]] = []
    peeked: dict[int, bytes] = {}
    for i, (seq, uid) in enumerate(matches):
        if i % PEEK_AHEAD == 0:  # the uncached ones' header blocks, PEEK_AHEAD at once (cluster mode:
            # one query); as read_header gives them for CRLF files
            peeked = mb.peek_headers(name, [r for u in uids[i:i + PEEK_AHEAD]
                                            if u not in cached and (r := rows.get(u)) is not None and r.lf == 0])
        row = rows.get(uid)
        if row is None:
            continue
        ident = uid if use_uid else seq
        try:
            when = mb.internal_date(name, row)
            hit = cached.get(uid)
            fields = decode_fields(hit) if hit is not None else None
            if fields is None:
                head = peeked.get(uid) if row.lf == 0 else None
                item = sort_item(ident, seq, when, row.size, head if head is not None else mb.read_header(name, row))
                new.append((uid, _KIND, encode_fields(item.fields)))
            else:
                item = SortItem(ident, seq, dt.datetime.fromtimestamp(when, dt.UTC), row.size, fields)
        except StoreUnavailable:  # the storage is out of reach (cluster mode): NO [UNAVAILABLE], not "expunged"
            raise
        except StoreError:
            continue
        out.append(item)
    if new:
        mb.cache_put(name, new)
    mb.flush_meta()
    return out
