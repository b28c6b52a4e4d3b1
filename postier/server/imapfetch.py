"""FETCH and SEARCH over the mailbox store for the IMAP driver (RFC 9051 §6.4.4, §6.4.5, §7.5.2).

These functions block (files, SQLite): the IMAP session runs them in the store's worker threads, one
batch at a time, so a FETCH of a whole large mailbox neither holds the event loop nor builds its
whole answer in memory. They turn index rows and message files into response bytes with the
`proto.imap.response` serializer and the `message` views; ENVELOPE, BODYSTRUCTURE and BODY are
cached in the index after their first computation (RFC 9051 makes them immutable per message).
Work is kept proportional to what was asked: FLAGS/UID/MODSEQ/RFC822.SIZE come from the index alone,
header-only items read only the header block, and BODY[] of a whole message is sent without parsing.
A message above STREAM_FROM is not read whole here at all (`_Large`): its content items are ranges
of its file (found from its top-level header, or for a section from `textscan.layout_at`, which
also gives BODYSTRUCTURE), the batch holds a `StreamedAnswer` (the line's bytes around them), and
the session sends each range from the file a piece at a time (`IMAPSession._send_streamed`;
BINARY decoded while sent, of a multipart too), as Dovecot does, so a FETCH of a 30 MiB attachment
holds one piece of it, not two copies. The layout is kept in the view cache (`textscan.LAYOUT_KIND`),
and an answer reading at most half the message opens it with `partial` (cluster mode: ranged GETs of
the spans instead of a download of the whole body).
"""

from __future__ import annotations

import datetime as dt
import re
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO

from ..message import VIEWS_VERSION
from ..message.bodystructure import body_structure
from ..message.envelope import envelope_bytes
from ..message.matching import CHUNK_SEP, INDEXED_FIELDS, SearchContext, evaluate
from ..message.mime import Decoder, Part, UnknownCTE, no_nul, parse_message
from ..message.sections import binary_section, body_section, find_part, partial, section_octets, section_span
from ..message import textscan
from ..message.textscan import Layout, layout_at
from ..proto.imap.commands import FetchAttr, Section
from ..message.types import MEMORY_DATA_LIMIT
from ..proto.imap.response import Atom, Literal, Literal8, Raw, fetch, fetch_split, format_date_time
from ..proto.imap.search import (
    AllKey,
    AndKey,
    DateKey,
    HeaderKey,
    NotKey,
    OrKey,
    SearchKey,
    SeqSetKey,
    TextKey,
)
from ..proto.imap.seqset import SequenceSet
from ..store.api import FlagTable, Mailboxes
from ..store.errors import MessageGone, StoreError, StoreUnavailable
from ..store.index import FLAG_SEEN, MessageRow, flags_to_names

__all__ = ["STREAM_FROM", "FetchBatch", "FetchOptions", "FetchPace", "DecodedSpan", "EntitySpan", "FileSpan", "Spliced", "StreamedAnswer", "UidSet", "changed_targets", "content_need", "narrow",
           "render_fetch", "run_search", "url_copy"]

BATCH_BYTES = 2 * 1024 * 1024  # stop a batch once this much response is built
PEEK_AHEAD = 200  # header SEARCH and FETCH: header blocks asked for at once (Mailboxes.peek_headers)
BATCH_SLICE = 2000  # FETCH of content or parsed views: messages whose rows one batch reads at most
FIRST_SLICE = 64  # ... and while no batch of the command has answered yet (doubled after each that did not)
FIRST_PEEK = 16  # header blocks asked for at once while nothing tells how large the answers are
FILES_HELD = 8  # stop a batch once this many answers hold their message's file (cluster mode: a download each)
STREAM_FROM = MEMORY_DATA_LIMIT  # a message larger than this is answered from its file (FetchOptions.stream)
_LOCAL_TZ = dt.datetime.now().astimezone().tzinfo


class FetchError(Exception):
    """A FETCH item could not be produced (UNKNOWN-CTE): the command answers NO with `code`."""

    def __init__(self, text: str, code: str):
        super().__init__(text)
        self.code = code


@dataclass(frozen=True, slots=True)
class FetchOptions:
    utf8: bool = False
    add_uid: bool = False  # UID FETCH: UID is always returned (RFC 9051 §6.4.9)
    add_modseq: bool = False  # CHANGEDSINCE or CONDSTORE-enabled MODSEQ reporting (RFC 7162 §3.1.4.1)
    changedsince: int | None = None
    set_seen: bool = True  # False in a read-only (EXAMINE) mailbox
    recent_from: int = 1 << 32  # UIDs at or above it get \\Recent (IMAP4rev1 sessions)
    stream: bool = False  # the caller sends StreamedAnswers (the content of a message above STREAM_FROM)


class Spliced:
    """A literal of a `StreamedAnswer`, sent by the session from the message's file: `prefix` (its
    ``{n}`` CRLF, in a file of `size` octets), then `pieces` (`length` octets in all)."""

    __slots__ = ()

    def length(self, size: int) -> int:
        raise NotImplementedError

    def prefix(self, size: int) -> bytes:
        raise NotImplementedError

    def pieces(self, f: IO[bytes], size: int) -> Iterator[bytes]:
        raise NotImplementedError

    def reads(self, size: int) -> int:
        """At most how many octets of the file `pieces` reads."""
        raise NotImplementedError


@dataclass(frozen=True, slots=True)
class FileSpan(Spliced):
    """A FETCH item's literal sent from the message's file by the session: ``{n}`` CRLF and the
    octets from `start` to `end` (None: the file's end), `end` cut to the file's size. `nul`: NUL
    octets sent as 0x80 (`mime.no_nul`: every BODY[section] but BODY[], as `body_section` does)."""

    start: int
    end: int | None = None
    nul: bool = False

    def cut(self, spec: tuple[int, int] | None) -> FileSpan:
        """``<offset.length>`` of it (`sections.partial`: past the end, nothing)."""
        if spec is None:
            return self
        start = self.start + spec[0]
        end = start + spec[1] if self.end is None else min(self.end, start + spec[1])
        return FileSpan(start, end, self.nul)

    def length(self, size: int) -> int:
        """Its octets in a file of `size` octets."""
        return max(0, (size if self.end is None else min(self.end, size)) - self.start)

    def prefix(self, size: int) -> bytes:
        return b"{%d}\r\n" % self.length(size)  # RFC 9051 §4.3: the literal's octet count

    def reads(self, size: int) -> int:
        return self.length(size)

    def pieces(self, f: IO[bytes], size: int) -> Iterator[bytes]:
        """Its octets, textscan.PIECE at a time (fewer only if the file ends early)."""
        left = self.length(size)
        f.seek(self.start)
        while left and (piece := f.read(min(textscan.PIECE, left))):
            left -= len(piece)
            yield no_nul(piece) if self.nul else piece


class _Decoded(Spliced):
    """A BINARY literal (RFC 3516 §4.2) of `count` decoded octets, as literal8 when they hold NUL."""

    __slots__ = ()
    count: int
    binary: bool

    def length(self, size: int) -> int:
        return self.count

    def prefix(self, size: int) -> bytes:
        return (b"~{%d}\r\n" if self.binary else b"{%d}\r\n") % self.count  # RFC 3516 §4.2: literal8


@dataclass(frozen=True, slots=True)
class DecodedSpan(_Decoded):
    """BINARY[n]<o.l> of a leaf part (RFC 3516 §4.2) sent from the file: the octets `start` to `end`
    (its body) with their Content-Transfer-Encoding undone in pieces (`mime.Decoder`), `skip`
    decoded octets left out, then `count` sent, as literal8 (``~{n}``) when they hold NUL.
    `count` and `binary` come from a first pass over the body (`_Large.decoded`)."""

    start: int
    end: int
    encoding: str
    skip: int
    count: int
    binary: bool

    def reads(self, size: int) -> int:
        return _encoded_reads(self.end - self.start, self.skip + self.count)

    def pieces(self, f: IO[bytes], size: int) -> Iterator[bytes]:
        d = Decoder(self.encoding)
        f.seek(self.start)
        raw_left, skip, left = self.end - self.start, self.skip, self.count
        while left:
            raw = f.read(_encoded_reads(min(textscan.PIECE, raw_left), skip + left, 1024)) if raw_left else b""
            if raw_left and not raw:
                return  # the file ended early
            raw_left -= len(raw)
            out = d.feed(raw) if raw else d.end()
            if skip:
                k = min(skip, len(out))
                out, skip = out[k:], skip - k
            out = out[:left]
            left -= len(out)
            if out:
                yield out
            if not raw:
                return


#: a piece of a BINARY entity (`EntitySpan`): octets as they are, or (start, end, encoding): octets
#: of the file with that Content-Transfer-Encoding undone ("7bit": copied as they are)
type Segment = bytes | tuple[int, int, str]


class _FileEnded(OSError):
    """The message's file ended before an octet its layout placed (it changed under the reader)."""


def _segment_octets(f: IO[bytes], segments: Sequence[Segment]) -> Iterator[bytes]:
    """The octets of `segments` in order, a file piece (textscan.PIECE) decoded at a time
    (`mime.Decoder`; UnknownCTE for an encoding that is not RFC 2045's)."""
    for seg in segments:
        if isinstance(seg, bytes):
            if seg:
                yield seg
            continue
        start, end, encoding = seg
        d = Decoder(encoding)
        f.seek(start)
        left = end - start
        while left:
            raw = f.read(min(textscan.PIECE, left))
            if not raw:
                raise _FileEnded("message file ended early")
            left -= len(raw)
            if out := d.feed(raw):
                yield out
        if out := d.end():
            yield out


@dataclass(frozen=True, slots=True)
class EntitySpan(_Decoded):
    """BINARY[] or BINARY[n] of a multipart or message/rfc822 part (RFC 3516 §4.2) sent from the
    file: `segments` in order (header and delimiter octets as they are, a rewritten
    Content-Transfer-Encoding field, each leaf body decoded in pieces: `sections.binary_section`'s
    octets), `skip` octets left out, then `count` sent, as literal8 when they hold NUL. `count`
    and `binary` come from a first pass (`_Large.entity`)."""

    segments: tuple[Segment, ...]
    skip: int
    count: int
    binary: bool

    def reads(self, size: int) -> int:
        return sum(seg[1] - seg[0] for seg in self.segments if isinstance(seg, tuple))

    def pieces(self, f: IO[bytes], size: int) -> Iterator[bytes]:
        skip, left = self.skip, self.count
        if not left:
            return
        try:
            for out in _segment_octets(f, self.segments):
                if skip >= len(out):
                    skip -= len(out)
                    continue
                out, skip = out[skip:skip + left], 0
                left -= len(out)
                yield out
                if not left:
                    return
        except _FileEnded:
            return  # the sender finds the literal short


@dataclass(frozen=True, slots=True)
class StreamedAnswer:
    """A FETCH answer with literals sent from the message's file: `parts` are the line's bytes and
    its literals (`FileSpan`, `DecodedSpan`) in order (`response.fetch_split`). `file` is the message opened while the
    answer was made (a section's offsets are that file's), else None: the sender opens it
    (`Mailboxes.open_message`, with `partial` when the literals read at most half of it). `size`
    is the answer's size as far as the index tells (the file's, which the sender reads, is
    authoritative)."""

    parts: list[bytes | Spliced]
    uid: int
    size: int
    file: IO[bytes] | None = None
    partial: bool = False

    def __len__(self) -> int:
        return self.size

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


@dataclass(slots=True)
class FetchBatch:
    data: list[bytes | StreamedAnswer] = field(default_factory=list)
    done: int = 0  # how many targets this batch consumed
    missing: int = 0  # targets whose message was expunged meanwhile
    seen_modseq: dict[int, int] = field(default_factory=dict)  # uid -> modseq of an implicit \Seen
    size: int = 0  # bytes of `data`

    @property
    def line_bytes(self) -> int:
        """Bytes per answer in this batch (0: it answered nothing)."""
        return self.size // len(self.data) if self.data else 0


@dataclass(slots=True)
class FetchPace:
    """What one FETCH command's batches so far tell of its answers, for the next batch's read-ahead
    (rows and header blocks): `render_fetch` reads it and updates it. Before any answer, a batch
    reads `blind` rows (FIRST_SLICE, doubled after each batch that answered nothing); after, as
    many as the rest of BATCH_BYTES is likely to take at `line_bytes` per answer."""

    line_bytes: int = 0  # bytes per answer in the last batch that answered, 0: none yet
    blind: int = FIRST_SLICE

    def rows_ahead(self) -> int:
        return _likely(BATCH_SLICE, BATCH_BYTES, self.line_bytes) if self.line_bytes else self.blind

    def took(self, batch: FetchBatch) -> None:
        if batch.data:
            self.line_bytes = batch.line_bytes
        elif not self.line_bytes:
            self.blind = min(2 * self.blind, BATCH_SLICE)


def _flags_value(row: MessageRow, recent_from: int) -> tuple[Atom, ...]:
    names = flags_to_names(row.flags, row.keywords)
    if row.uid >= recent_from:
        names.append("\\Recent")
    return tuple(Atom(n) for n in names)


def _date(t: int) -> Raw:
    return Raw(format_date_time(dt.datetime.fromtimestamp(t, _LOCAL_TZ)))


def _header_only(attrs: Sequence[FetchAttr]) -> bool:
    """True when every content item needs only the top-level header block."""
    for a in attrs:
        if a.name == "RFC822.HEADER" or a.name == "ENVELOPE":
            continue
        if a.section is not None and a.name == "BODY" and not a.section.part and a.section.text is not None \
                and a.section.text.startswith("HEADER"):
            continue
        if a.name in ("RFC822", "RFC822.TEXT", "BODYSTRUCTURE", "BINARY", "BINARY.SIZE") or a.section is not None \
                or (a.name == "BODY" and a.section is None):
            return False
    return True


# Cache kinds carry the version of the message views (postier.message.VIEWS_VERSION): views cached
# by an older version are simply not found, and recomputed.
_CACHED = {n: k + VIEWS_VERSION for n, k in (("ENVELOPE", "env"), ("BODYSTRUCTURE", "bs"), ("BODY", "body"))}
_CONTENT = frozenset({"RFC822", "RFC822.HEADER", "RFC822.TEXT", "BINARY", "BINARY.SIZE"})


def render_fetch(mb: Mailboxes, name: str, targets: Sequence[tuple[int, int]], attrs: Sequence[FetchAttr],
                 opts: FetchOptions, pace: FetchPace | None = None) -> FetchBatch:
    """FETCH responses for `targets` ((seq, uid) in order) until about BATCH_BYTES are built.
    `pace`: the command's (one for all its batches; updated here); it bounds how many rows and
    header blocks are read ahead. A command's first batch reads FIRST_SLICE rows and blocks at most
    (nothing tells yet how large its answers are), so that FETCH 1:* of large headers or bodies
    does not read 2,000 rows for the 70 or 2 answers a batch holds."""
    pace = pace if pace is not None else FetchPace()
    out = _render(mb, name, targets, attrs, opts, pace.rows_ahead(), pace.line_bytes)
    pace.took(out)
    return out


def _render(mb: Mailboxes, name: str, targets: Sequence[tuple[int, int]], attrs: Sequence[FetchAttr],  # noqa: PLR0913
            opts: FetchOptions, ahead_rows: int, line_bytes: int) -> FetchBatch:
    out = FetchBatch()
    want_uid = opts.add_uid or any(a.name == "UID" for a in attrs)
    simple = [a for a in attrs if a.name != "UID"]
    needs_seen = opts.set_seen and any(a.sets_seen for a in attrs)
    cached_kinds = {a.name for a in simple if a.section is None and a.name in _CACHED}
    needs_content = any(a.section is not None or a.name in _CONTENT for a in simple)
    header_only = _header_only(simple)
    suffix8 = "8" if opts.utf8 else ""
    # One pass over a slice of targets: rows in one query, cache in one query per kind. The slice is
    # what the batch is likely to answer for, judged by the command's previous batch (a quarter more;
    # FetchPace).
    chunk = list(targets[:ahead_rows]) if (needs_content or cached_kinds) else list(targets)
    rows = mb.rows(name, [u for _s, u in chunk])
    if needs_seen:
        unseen = [u for _s, u in chunk if u in rows and not rows[u].flags & FLAG_SEEN]
        if unseen:
            res = mb.store(name, unseen, "+FLAGS", ["\\Seen"])
            for u, r in res.changed.items():
                rows[u] = r
                out.seen_modseq[u] = res.modseq
    # the messages this FETCH answers for (RFC 7162 §3.1.4.1: with CHANGEDSINCE, those changed since)
    wanted = [u for _s, u in chunk if (m := rows.get(u)) is not None
              and (opts.changedsince is None or m.modseq > opts.changedsince)]
    cache: dict[str, dict[int, bytes]] = {}
    for n in cached_kinds:
        kind = _CACHED[n] + (suffix8 if n != "BODY" else "")
        cache[n] = mb.cache_get(name, wanted, kind) if wanted else {}
    new_cache: list[tuple[int, str, bytes]] = []
    size = 0
    if len(simple) == 1 and _whole_body(simple[0]) and not needs_seen and opts.changedsince is None \
            and not opts.add_modseq:
        return _render_bodies(mb, name, chunk, rows, want_uid, out, opts.stream)
    # Header blocks are peeked at (cluster mode: one query) for the messages that will read one: a
    # header-only content item, or an ENVELOPE not cached. At most PEEK_AHEAD at once, and no more
    # than the rest of the batch is likely to take, judged by the bytes per answer so far (in this
    # batch, else in the command's previous one), with a quarter more; FIRST_PEEK while nothing
    # has been answered yet.
    env_cache = cache.get("ENVELOPE")
    answered = set(wanted)
    head_at = [i for i, (_s, u) in enumerate(chunk) if u in answered and rows[u].lf == 0
               and (needs_content or (env_cache is not None and u not in env_cache))] if header_only else []
    heads: dict[int, bytes] = {}
    ahead = 0

    def header(i: int, row: MessageRow) -> bytes:
        """The header block: peeked at with the next ones of `head_at`, as read_header gives it for
        a CRLF file; otherwise read_header's."""
        nonlocal heads, ahead
        if i >= ahead and row.lf == 0:
            start = bisect_left(head_at, i)
            per = size // len(out.data) if out.data else line_bytes
            window = _likely(PEEK_AHEAD, BATCH_BYTES - size, per) if per else FIRST_PEEK
            take = head_at[start:start + window]
            ahead = take[-1] + 1 if take else i + 1
            heads = mb.peek_headers(name, [rows[chunk[j][1]] for j in take])
        head = heads.get(row.uid) if row.lf == 0 else None
        return head if head is not None else mb.read_header(name, row)

    held = 0  # answers holding their message's file open (a section's offsets are that file's)
    for i, (seq, uid) in enumerate(chunk):
        if size >= BATCH_BYTES or held >= FILES_HELD:
            break
        out.done += 1
        row = rows.get(uid)
        if row is None:
            out.missing += 1
            continue
        if opts.changedsince is not None and row.modseq <= opts.changedsince:
            continue
        items: list[tuple[str, object]] = []
        if want_uid:
            items.append(("UID", uid))
        content: bytes | None = None
        part: Part | None = None
        flags_sent = False
        # a large message: its content items sent from its file, its views made from a bounded scan
        large = _Large(mb, name, row) if opts.stream and not header_only and row.lf == 0 \
            and row.size > STREAM_FROM else None
        try:
            for a in simple:
                n = a.name
                if n == "FLAGS":
                    items.append(("FLAGS", _flags_value(row, opts.recent_from)))
                    flags_sent = True
                elif n == "RFC822.SIZE":
                    items.append(("RFC822.SIZE", row.size))
                elif n == "MODSEQ":
                    items.append(("MODSEQ", Raw(b"(%d)" % row.modseq)))
                elif n == "INTERNALDATE":
                    items.append(("INTERNALDATE", _date(mb.internal_date(name, row))))
                elif n in cached_kinds:
                    hit = cache[n].get(uid)
                    if hit is None:
                        top = large.top() if large is not None and n == "ENVELOPE" else None
                        lay = large.layout() if large is not None and n != "ENVELOPE" else None
                        if part is None and top is None and lay is None:
                            content = content if content is not None else (
                                header(i, row) if n == "ENVELOPE" and header_only else mb.read(name, row))
                            part = parse_message(content)
                        if n == "ENVELOPE":
                            hit = bytes(envelope_bytes(top or part, utf8=opts.utf8))  # type: ignore[arg-type]
                            new_cache.append((uid, _CACHED["ENVELOPE"] + suffix8, hit))
                        else:
                            ext = n == "BODYSTRUCTURE"
                            hit = bytes(body_structure(lay.part, extensible=ext, utf8=opts.utf8, measure=lay.measure)
                                        if lay is not None and part is None else
                                        body_structure(part, extensible=ext, utf8=opts.utf8))  # type: ignore[arg-type]
                            new_cache.append((uid, _CACHED[n] + (suffix8 if n != "BODY" else ""), hit))
                        cache[n][uid] = hit
                    items.append((n, Raw(hit)))
                else:  # content items
                    if large is not None and content is None and (sent := large.item(a)) is not None:
                        items.append(sent if isinstance(sent, tuple) else (a.response_name, sent))
                        continue
                    if content is None:
                        content = header(i, row) if header_only else mb.read(name, row)
                    if n == "BODY" and a.section is not None and not a.section.part and a.section.text is None:
                        data = content  # BODY[]: the whole message, no parsing
                        items.append((a.response_name, Literal(partial(data, a.partial))))
                        continue
                    if part is None:
                        part = parse_message(content)
                    if n == "BODY":
                        assert a.section is not None
                        items.append((a.response_name, Literal(partial(body_section(part, a.section), a.partial))))
                    elif n == "RFC822":
                        items.append(("RFC822", Literal(content)))
                    elif n == "RFC822.HEADER":
                        items.append(("RFC822.HEADER", Literal(part.header_bytes)))
                    elif n == "RFC822.TEXT":
                        items.append(("RFC822.TEXT", Literal(part.body)))
                    elif n in ("BINARY", "BINARY.SIZE"):
                        path = a.section.part if a.section is not None else ()
                        data = binary_section(part, path)
                        if n == "BINARY.SIZE":
                            items.append((f"BINARY.SIZE[{'.'.join(map(str, path))}]", len(data)))
                        else:
                            data = partial(data, a.partial)
                            items.append((a.response_name, Literal8(data) if b"\x00" in data else Literal(data)))
        except StoreUnavailable:  # the storage is out of reach (cluster mode): NO [UNAVAILABLE], not "expunged"
            _close(out, large)
            raise
        except StoreError:
            if large is not None:
                large.close()
            out.missing += 1
            continue
        except UnknownCTE as exc:
            _close(out, large)
            raise FetchError(f"unknown Content-Transfer-Encoding: {exc}", "UNKNOWN-CTE") from None
        except BaseException:
            _close(out, large)
            raise
        if uid in out.seen_modseq and not flags_sent:
            items.append(("FLAGS", _flags_value(row, opts.recent_from)))
        if opts.add_modseq and not any(k == "MODSEQ" for k, _v in items):
            items.append(("MODSEQ", Raw(b"(%d)" % row.modseq)))
        if large is not None and any(isinstance(v, Spliced) for _k, v in items):
            parts = fetch_split(seq, items, Spliced, utf8=opts.utf8)
            reads = sum(p.reads(row.size) for p in parts if not isinstance(p, bytes))
            answer = StreamedAnswer(parts, uid, sum(len(p) if isinstance(p, bytes) else p.length(row.size)
                                                    for p in parts), large.file, _partial(reads, row.size))
            held += answer.file is not None
            size += len(answer)
            out.data.append(answer)
            continue
        if large is not None:
            large.close()
        line = fetch(seq, items, utf8=opts.utf8)  # type: ignore[arg-type]
        size += len(line)
        out.data.append(line)
    out.size = size
    if new_cache:
        mb.cache_put(name, new_cache)
    mb.flush_meta()
    return out


def changed_targets(mb: Mailboxes, name: str, targets: Sequence[tuple[int, int]],
                    changedsince: int) -> list[tuple[int, int]]:
    """The targets whose MODSEQ passed `changedsince` (RFC 7162 §3.1.4.1: CHANGEDSINCE answers only for
    those), from one read of the store's MODSEQ index (`changed_since`, as FETCH of flags does): a
    FETCH of content with CHANGEDSINCE then reads rows and header blocks of these messages only.
    `render_fetch` still skips a row at or below `changedsince` (none: a MODSEQ only grows)."""
    if not targets:
        return []
    changed = {r[0] for r in mb.changed_since(name, changedsince, targets[-1][1])}
    return [t for t in targets if t[1] in changed]


def _likely(most: int, budget: int, per: int) -> int:
    """How many more answers of about `per` bytes (0: not known) a batch with `budget` bytes left
    will build, with a quarter more; at most `most`."""
    return min(most, 1 + budget * 5 // (per * 4)) if per > 0 else most


def _whole_body(a: FetchAttr) -> bool:
    return a.name == "BODY" and a.section is not None and not a.section.part and a.section.text is None \
        and a.partial is None


def _partial(reads: int, size: int) -> bool:
    """Whether reading `reads` octets of a message of `size` is reading parts of it
    (`Mailboxes.open_message(partial=True)`): at most half of it. A store that fetches parts alone
    (cluster mode: ranged GETs) then does; more is read whole (cluster mode: one download)."""
    return 2 * reads <= size


def _encoded_reads(raw: int, decoded: int, slack: int = textscan.PIECE) -> int:
    """At most how many of `raw` encoded octets are read for `decoded` octets (quoted-printable: 3
    for 1, base64 less), with `slack` more (the decoder's line): a partial BINARY reads no more of a
    large part than it needs (cluster mode: the ranged GETs), a read falling short is followed by
    another."""
    return min(raw, 3 * decoded + slack)


def _close(batch: FetchBatch, large: _Large | None) -> None:
    """Close the files a batch that will not be sent opened."""
    for answer in batch.data:
        if isinstance(answer, StreamedAnswer):
            answer.close()
    if large is not None:
        large.close()


class _Large:
    """A message above STREAM_FROM (CRLF file) whose FETCH items are made without reading it whole:
    a content item is a `FileSpan` of its file (BODY[], RFC822, TEXT and a part's body: their
    offsets from the top-level header, or for a part from the `textscan.Layout` of the file, read
    once in pieces), a `DecodedSpan` (BINARY of a leaf), an `EntitySpan` (BINARY[] and BINARY of a
    multipart or message/rfc822 part: its leaves decoded, their headers rewritten) or bytes of its
    header blocks; BODYSTRUCTURE and BODY are made from the layout, ENVELOPE from the header. None
    where that cannot be had (a layout the scan could not make): the caller reads the message
    whole, as for a smaller one."""

    __slots__ = ("_head", "_layout", "_mb", "_name", "_row", "file")
    # The layout is kept in the view cache (textscan.LAYOUT_KIND; cluster mode writes it at upload
    # too): a later section of the message reads only its span (in cluster mode by ranged GETs)
    # rather than scanning the whole message again.

    def __init__(self, mb: Mailboxes, name: str, row: MessageRow) -> None:
        self._mb, self._name, self._row = mb, name, row
        self.file: IO[bytes] | None = None  # opened for the layout: the answer's spans are this file's
        self._layout: Layout | None | bool = False  # False: not scanned yet
        self._head: Part | None | bool = False

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def opened(self, reads: int) -> IO[bytes]:
        """The message's file, opened for reading `reads` octets of it (`_partial`) if not open yet."""
        if self.file is None:
            f = self._mb.open_message(self._name, self._row.uid, partial=_partial(reads, self._row.size))
            if f is None:
                raise MessageGone("message was expunged")
            self.file = f
        return self.file

    def _read_at(self, offset: int, n: int) -> bytes:
        assert self.file is not None
        self.file.seek(offset)
        return self.file.read(n)

    def layout(self) -> Layout | None:
        if self._layout is False:
            kept = self._mb.cache_get(self._name, [self._row.uid], textscan.LAYOUT_KIND).get(self._row.uid)
            if kept is not None:
                self._layout = Layout.load(kept)
            else:
                f = self.opened(self._row.size)  # the scan reads it all
                self._layout = lay = layout_at(self._read_at, f.seek(0, 2))
                if lay is not None:
                    self._mb.cache_put(self._name, [(self._row.uid, textscan.LAYOUT_KIND, lay.dump())])
        assert not isinstance(self._layout, bool)
        return self._layout

    def top(self) -> Part | None:
        """The top-level entity as far as its header: parsed from the header block alone when that
        is all of it up to the blank line (and within the first 64 KiB, where `row.lf` was judged),
        else the layout's."""
        if self._head is False:
            header = self._mb.read_header(self._name, self._row)
            p = parse_message(header)
            self._head = p if p.has_blank and p.body_start == len(header) <= 1 << 16 else None
        if self._head is not None:
            assert not isinstance(self._head, bool)
            return self._head
        lay = self.layout()
        return lay.part if lay is not None else None

    def _text_start(self, top: Part) -> int:
        """Where the top-level body begins in the file."""
        lay = self._layout
        return lay.at(top.body_start) if isinstance(lay, Layout) and top is lay.part else top.body_start

    def decoded(self, start: int, end: int, encoding: str, spec: tuple[int, int] | None) -> DecodedSpan:
        """BINARY[n]<spec> of the leaf whose body is start..end: how many octets it sends and whether
        they hold NUL, from a first pass decoding the body in pieces (only `spec`'s octets read,
        when there is nothing to decode)."""
        d = Decoder(encoding)  # UnknownCTE: NO [UNKNOWN-CTE] (RFC 3516 §4.3), as read whole
        lo, hi = (0, 1 << 62) if spec is None else (spec[0], spec[0] + spec[1])
        self.opened(min(end - start, hi) if d.identity else _encoded_reads(end - start, hi))
        if d.identity:
            count = max(0, min(hi, end - start) - lo)
            binary = any(b"\x00" in self._read_at(at, min(textscan.PIECE, start + lo + count - at))
                         for at in range(start + lo, start + lo + count, textscan.PIECE))
            return DecodedSpan(start, end, encoding, lo, count, binary)
        total, binary, at = 0, False, start
        while True:
            raw = self._read_at(at, _encoded_reads(min(textscan.PIECE, end - at), hi - total, 1024)) if at < end else b""
            if at < end and not raw:
                raise OSError("message file ended early")
            at += len(raw)
            out = d.feed(raw) if raw else d.end()
            binary = binary or out.find(b"\x00", max(lo - total, 0), max(hi - total, 0)) >= 0
            total += len(out)
            if not raw or total >= hi:  # the octets after `hi` change neither the count nor `binary`
                return DecodedSpan(start, end, encoding, lo, max(0, min(hi, total) - lo), binary)

    def entity(self, lay: Layout, part: Part, whole: bool, spec: tuple[int, int] | None) -> EntitySpan:
        """BINARY[n]<spec> of a multipart or message/rfc822 part of the layout (`whole`: BINARY[],
        the message with its header): how many octets it sends and whether they hold NUL, from a
        first pass decoding its leaves in pieces (up to the end of `spec`)."""
        segments: list[Segment] = []
        _binary_segments(lay, part, whole, segments)
        merged: list[Segment] = []
        for seg in segments:  # octets copied as they are: one read of the file where they follow
            last = merged[-1] if merged else None
            if not isinstance(seg, bytes) and seg[2] == "7bit" and isinstance(last, tuple) and last[2] == "7bit" \
                    and last[1] == seg[0]:
                merged[-1] = (last[0], seg[1], "7bit")
            elif seg:
                merged.append(seg)
        for seg in merged:  # UnknownCTE: NO [UNKNOWN-CTE] (RFC 3516 §4.3) for any leaf, as read whole
            if isinstance(seg, tuple):
                Decoder(seg[2])
        lo, hi = (0, 1 << 62) if spec is None else (spec[0], spec[0] + spec[1])
        f = self.opened(sum(seg[1] - seg[0] for seg in merged if isinstance(seg, tuple)))
        total, binary = 0, False
        for out in _segment_octets(f, merged):
            binary = binary or out.find(b"\x00", max(lo - total, 0), max(hi - total, 0)) >= 0
            total += len(out)
            if total >= hi:
                break
        return EntitySpan(tuple(merged), lo, max(0, min(hi, total) - lo), binary)

    def octets(self, section: Section | None, spec: tuple[int, int] | None) -> FileSpan | bytes | None:
        """The message or its `section` as stored (NUL kept: CATENATE, `url_copy`), cut to `spec`: a
        span of the file, header field lines, or None (no layout: read whole)."""
        if section is None or (not section.part and section.text is None):
            return FileSpan(0).cut(spec)
        lay = self.layout()
        if lay is None:
            return None
        got = section_span(lay.part, section)
        if isinstance(got, bytes):
            return partial(got, spec)
        return FileSpan(lay.at(got[0]), lay.at(got[1])).cut(spec)

    def item(self, a: FetchAttr) -> FileSpan | DecodedSpan | EntitySpan | Literal | tuple[str, int] | None:
        n, sec = a.name, a.section
        if n == "RFC822" or (n == "BODY" and sec is not None and not sec.part and sec.text is None):
            return FileSpan(0).cut(a.partial)  # the whole message as stored (BODY[] is not no_nul'd)
        if n == "RFC822.TEXT" or (n == "BODY" and sec is not None and not sec.part and sec.text == "TEXT"):
            top = self.top()
            if top is None:
                return None
            return FileSpan(self._text_start(top), None, n == "BODY").cut(a.partial)
        if n == "RFC822.HEADER" or (n == "BODY" and sec is not None and not sec.part):
            top = self.top()
            if top is None:
                return None
            return Literal(top.header_bytes if sec is None else partial(body_section(top, sec), a.partial))
        lay = self.layout() if n in ("BINARY", "BINARY.SIZE") or (n == "BODY" and sec is not None and sec.part) \
            else None
        if lay is None:
            return None  # a layout not made: read whole
        if n != "BODY":
            path = sec.part if sec is not None else ()
            p = find_part(lay.part, path)
            if p is None:
                return None  # no such part: the empty string, as read whole
            span: DecodedSpan | EntitySpan = self.entity(lay, p, not path, a.partial) \
                if not path or p.children or p.message is not None else \
                self.decoded(lay.at(p.body_start), lay.at(p.end), p.encoding, a.partial)
            if n == "BINARY.SIZE":
                return f"BINARY.SIZE[{'.'.join(map(str, path))}]", span.count
            return span
        assert sec is not None
        got = section_span(lay.part, sec)
        if isinstance(got, bytes):
            return Literal(partial(no_nul(got), a.partial))
        return FileSpan(lay.at(got[0]), lay.at(got[1]), True).cut(a.partial)


def _binary_segments(lay: Layout, part: Part, whole: bool, out: list[Segment]) -> None:
    """The `Segment`s of BINARY of `part` (`whole`: the entity, header included) in the message of
    `lay`: `sections._binary_entity` and `_binary_body` over the layout, each range of the copy
    placed in the file (`Layout.at`; a header block or delimiter line is never cut)."""
    if whole and not (part.children or part.message is not None or part.encoding in ("7bit", "8bit", "binary")):
        # RFC 3516 §4.2: a leaf's header says its content is now binary
        pos = part.start
        for f in part.headers(b"content-transfer-encoding"):
            out.append((lay.at(pos), lay.at(f.start), "7bit"))
            out.append(f.name.encode("ascii", "replace") + b": binary\r\n")
            pos = f.end
        out.append((lay.at(pos), lay.at(part.body_start), "7bit"))
        out.append((lay.at(part.body_start), lay.at(part.end), part.encoding))
        return
    if whole:
        out.append((lay.at(part.start), lay.at(part.body_start), "7bit"))
    if part.message is not None:
        if part.message.end > part.message.start:
            _binary_segments(lay, part.message, True, out)
        else:  # an opaque (encoded) message/rfc822: its own encoding undone
            out.append((lay.at(part.body_start), lay.at(part.end), part.encoding))
        return
    if not part.children:
        out.append((lay.at(part.body_start), lay.at(part.end), part.encoding))
        return
    pos = part.body_start
    for child in part.children:
        out.append((lay.at(pos), lay.at(child.start), "7bit"))  # preamble / delimiter lines
        _binary_segments(lay, child, True, out)
        pos = child.end
    out.append((lay.at(pos), lay.at(part.end), "7bit"))


def _render_bodies(mb: Mailboxes, name: str, chunk: Sequence[tuple[int, int]], rows: dict[int, MessageRow],  # noqa: PLR0913
                   want_uid: bool, out: FetchBatch, stream: bool) -> FetchBatch:
    """FETCH BODY[] / BODY.PEEK[] of whole messages: file bytes straight into literals (with
    `stream`, a message above STREAM_FROM is left for the session to send from its file)."""
    size = 0
    for seq, uid in chunk:
        if size >= BATCH_BYTES:
            break
        out.done += 1
        row = rows.get(uid)
        if row is None:
            out.missing += 1
            continue
        if stream and row.lf == 0 and row.size > STREAM_FROM:
            head = b"* %d FETCH (UID %d BODY[] " % (seq, uid) if want_uid else b"* %d FETCH (BODY[] " % seq
            answer = StreamedAnswer([head, FileSpan(0), b")\r\n"], uid, len(head) + row.size + 3)
            size += len(answer)
            out.data.append(answer)
            continue
        try:
            data = mb.read(name, row)
        except StoreUnavailable:
            raise
        except StoreError:
            out.missing += 1
            continue
        if want_uid:
            line = b"* %d FETCH (UID %d BODY[] {%d}\r\n%s)\r\n" % (seq, uid, len(data), data)
        else:
            line = b"* %d FETCH (BODY[] {%d}\r\n%s)\r\n" % (seq, len(data), data)
        size += len(line)
        out.data.append(line)
    mb.flush_meta()
    return out


def render_all_flags(mb: Mailboxes, name: str, view: array[int], want_uid: bool, want_modseq: bool,
                     recent_from: int) -> bytes | None:
    """FETCH 1:* (FLAGS [UID] [MODSEQ]) from the folder's in-memory flag table, or None when the
    session's view is not the folder's current UID list (then use `render_flags`)."""
    tab = mb.flag_table(name, view, want_modseq)
    if tab is None:
        return None
    return b"".join(_flags_from_table(tab, want_uid, want_modseq, recent_from))


def render_flags(mb: Mailboxes, name: str, targets: Sequence[tuple[int, int]], want_uid: bool,
                 want_modseq: bool, recent_from: int, changedsince: int | None = None) -> list[bytes]:
    """FETCH (FLAGS [UID] [MODSEQ]) for the given messages, from one query: with CHANGEDSINCE, the
    rows changed since (RFC 7162 §3.1.4.1; the store's MODSEQ index); else the UID range when the
    messages fill most of it, or the messages by UID (FETCH 1,20000 reads two rows, not 20,000)."""
    if not targets:
        return []
    lo, hi = targets[0][1], targets[-1][1]
    if changedsince is not None:
        rows = {r[0]: r for r in mb.changed_since(name, changedsince, hi)}
    elif _dense(lo, hi, len(targets)):
        rows = {r[0]: r for r in mb.flag_rows(name, lo, hi)}
    else:
        rows = {u: (u, r.flags, r.keywords, r.modseq) for u, r in mb.rows(name, [u for _s, u in targets]).items()}
    memo: dict[tuple[int, str], bytes] = {}
    out: list[bytes] = []
    for seq, uid in targets:
        r = rows.get(uid)
        if r is None or (changedsince is not None and r[3] <= changedsince):
            continue
        key = (r[1], r[2])
        fl = memo.get(key)
        if fl is None:
            fl = memo[key] = b"(" + " ".join(flags_to_names(r[1], r[2])).encode() + b")"
        if uid >= recent_from:
            fl = fl[:-1] + (b" \\Recent)" if fl != b"()" else b"\\Recent)")
        parts = b"UID %d FLAGS %s" % (uid, fl) if want_uid else b"FLAGS " + fl
        if want_modseq:
            parts += b" MODSEQ (%d)" % r[3]
        out.append(b"* %d FETCH (%s)\r\n" % (seq, parts))
    return out


def _dense(lo: int, hi: int, count: int) -> bool:
    """Whether `count` UIDs between lo and hi are better read as the range lo..hi than one by one."""
    return hi - lo < 4 * count


def _flag_texts(recent: bool) -> list[bytes]:
    """The FLAGS list for each combination of system-flag bits."""
    out = []
    for bits in range(32):
        names = flags_to_names(bits, "")
        if recent:
            names.append("\\Recent")
        out.append(("(" + " ".join(names) + ")").encode())
    return out


_TEXTS = (_flag_texts(False), _flag_texts(True))


def _flags_from_table(tab: FlagTable, want_uid: bool, want_modseq: bool, recent_from: int) -> list[bytes]:
    uids, flags = tab.uids, tab.flags
    n = len(uids)
    cut = bisect_left(uids, recent_from)  # positions from here on are \Recent
    texts = [_TEXTS[0][f & 31] for f in flags[:cut]] + [_TEXTS[1][f & 31] for f in flags[cut:]]
    for u, kws in tab.keywords.items():  # the few messages with keywords
        i = bisect_left(uids, u)
        if i < n and uids[i] == u:
            names = [*flags_to_names(flags[i], kws), *(["\\Recent"] if i >= cut else [])]
            texts[i] = ("(" + " ".join(names) + ")").encode()
    seqs = range(1, n + 1)
    if want_modseq and tab.modseq is not None:
        if want_uid:
            return [b"* %d FETCH (UID %d FLAGS %s MODSEQ (%d))\r\n" % t
                    for t in zip(seqs, uids, texts, tab.modseq, strict=True)]
        return [b"* %d FETCH (FLAGS %s MODSEQ (%d))\r\n" % t for t in zip(seqs, texts, tab.modseq, strict=True)]
    if want_uid:
        return [b"* %d FETCH (UID %d FLAGS %s)\r\n" % t for t in zip(seqs, uids, texts, strict=True)]
    return [b"* %d FETCH (FLAGS %s)\r\n" % t for t in zip(seqs, texts, strict=True)]


def is_flags_only(attrs: Sequence[FetchAttr]) -> bool:
    return all(a.name in ("UID", "FLAGS", "MODSEQ") for a in attrs) and any(a.name == "FLAGS" for a in attrs)


# -- SEARCH ---------------------------------------------------------------------------------------

def content_need(key: SearchKey) -> str:
    """"" (index only), "header" or "full": how much of each message the criteria must read."""
    match key:
        case TextKey():
            return "full"
        case HeaderKey():
            return "header"
        case DateKey(field=f):
            return "header" if f == "SENT" else ""
        case NotKey(key=k):
            return content_need(k)
        case OrKey(left=a, right=b):
            return max(content_need(a), content_need(b), key=_RANK.__getitem__)
        case AndKey(keys=ks):
            return max((content_need(k) for k in ks), key=_RANK.__getitem__, default="")
    return ""


_RANK = {"": 0, "header": 1, "full": 2}


_ADDRESS_FIELDS = frozenset({"FROM", "TO", "CC", "BCC", "SENDER", "REPLY-TO"})


def _needles(key: SearchKey) -> list[tuple[re.Pattern[bytes], bytes]]:
    """(field pattern, lower-case ASCII value) pairs that a matching message must satisfy (HEADER,
    FROM, SUBJECT... keys joined by AND), to rule out most messages without parsing them. Values
    with whitespace are left out, since header folding may split them."""
    match key:
        case HeaderKey(field=f, value=v) if v and v.isascii() and not any(c.isspace() for c in v) \
                and f.isascii():
            rx = re.compile(rb"(?:^|\n)" + re.escape(f.lower().encode("ascii")) + rb"[ \t]*:(.*(?:\r?\n[ \t].*)*)")
            if f.upper() in _ADDRESS_FIELDS:
                # address fields are searched as parsed addresses (message.envelope.address_text):
                # "a@b.org" also matches "<a (c)@ b . org>", so only its pieces must be there
                return [(rx, t.lower().encode("ascii")) for t in re.split(r'[@.<>"(),:;\\]+', v) if t]
            return [(rx, v.lower().encode("ascii"))]
        case AndKey(keys=ks):
            return [n for k in ks for n in _needles(k)]
    return []


def _ruled_out(header: bytes, needles: list[tuple[re.Pattern[bytes], bytes]]) -> bool:
    """True when some needle's field is absent or lacks the value (encoded words and 8-bit text
    excepted)."""
    low = header.lower()
    for rx, value in needles:
        for m in rx.finditer(low):
            seg = m.group(1)
            # 8-bit text may casefold to the needle ("Straße" holds "strasse"): kept for the matcher
            if value in seg or b"=?" in seg or not seg.isascii():
                break
        else:
            return True
    return False


class _View:
    """One message as `message.matching` sees it (SearchView)."""

    __slots__ = ("_flags", "_mb", "_name", "_need", "_raw", "_row", "seq")

    def __init__(self, mb: Mailboxes, name: str, seq: int, row: MessageRow, need: str, recent: bool,  # noqa: PLR0913
                 raw: bytes | None = None):
        self._mb = mb
        self._name = name
        self.seq = seq
        self._row = row
        self._need = need
        self._raw = raw
        names = flags_to_names(row.flags, row.keywords)
        if recent:
            names.append("\\Recent")
        self._flags = frozenset(names)

    @property
    def uid(self) -> int:
        return self._row.uid

    @property
    def flags(self) -> frozenset[str]:
        return self._flags

    @property
    def internal_date(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._mb.internal_date(self._name, self._row), _LOCAL_TZ)

    @property
    def size(self) -> int:
        return self._row.size

    @property
    def modseq(self) -> int:
        return self._row.modseq

    def raw(self) -> bytes:
        if self._raw is None:
            self._raw = self._mb.read_header(self._name, self._row) if self._need == "header" \
                else self._mb.read(self._name, self._row)
        return self._raw


# -- the full-text index (store.fts) --------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UidSet(SequenceSet):
    """A UID set given by its members (an index answer), for the rewritten criteria."""

    members: frozenset[int] = field(default_factory=frozenset)

    def contains(self, value: int, max_value: int) -> bool:
        return value in self.members


def _uid_key(uids: set[int]) -> SeqSetKey:
    return SeqSetKey(UidSet(members=frozenset(uids)), uid=True)


def _query(key: SearchKey) -> tuple[str, str] | None:
    """The (field, needle) the index could answer for a text key (Mailboxes.text_search)."""
    match key:
        case HeaderKey(field=f, value=v) if f.upper() in INDEXED_FIELDS:
            return (f.upper(), v) if v and CHUNK_SEP not in v else None
        case TextKey(scope=sc, value=v) if sc.upper() in ("BODY", "TEXT"):
            return (sc.upper(), v) if v and CHUNK_SEP not in v else None
    return None


def _leaves(key: SearchKey) -> list[tuple[str, str]]:
    match key:
        case NotKey(key=k):
            return _leaves(k)
        case OrKey(left=a, right=b):
            return _leaves(a) + _leaves(b)
        case AndKey(keys=ks):
            return [q for k in ks for q in _leaves(k)]
    q = _query(key)
    return [q] if q is not None else []


def narrow(mb: Mailboxes, name: str, key: SearchKey) -> tuple[SearchKey, set[int] | None]:
    """The criteria with each text key the full-text index can answer answered from it, and the
    UIDs that may match (None: any): a message matches `key` exactly when its UID is in the set and
    it matches the returned criteria (AllKey: the set is the answer). Each answered key becomes
    "UID in (index hits) or (UID not covered by the index and the key itself)"; a key the index
    answers for every message of the folder becomes the candidate set alone."""
    queries = list(dict.fromkeys(_leaves(key)))
    got = mb.text_search(name, queries) if queries else None
    if got is None:
        return key, None
    hits = dict(zip(queries, got[0], strict=True))
    return _rewrite(key, hits, got[1])


def _within(key: SearchKey, cands: set[int] | None) -> SearchKey:
    """`key` and "UID in cands" as one criterion."""
    if cands is None:
        return key
    return _uid_key(cands) if isinstance(key, AllKey) else AndKey((_uid_key(cands), key))


def _rewrite(key: SearchKey, hits: dict[tuple[str, str], set[int]],
             unchecked: set[int]) -> tuple[SearchKey, set[int] | None]:
    q = _query(key)
    if q is not None:
        sure = hits[q]
        if not unchecked:
            return AllKey(), sure
        return OrKey(_uid_key(sure), AndKey((_uid_key(unchecked), key))), sure | unchecked
    match key:
        case NotKey(key=k):
            return NotKey(_within(*_rewrite(k, hits, unchecked))), None
        case OrKey(left=a, right=b):
            ka, ca = _rewrite(a, hits, unchecked)
            kb, cb = _rewrite(b, hits, unchecked)
            if isinstance(ka, AllKey) and isinstance(kb, AllKey) and ca is not None and cb is not None:
                return AllKey(), ca | cb
            return OrKey(_within(ka, ca), _within(kb, cb)), (ca | cb if ca is not None and cb is not None else None)
        case AndKey(keys=ks):
            parts = [_rewrite(k, hits, unchecked) for k in ks]
            cands: set[int] | None = None
            for _k, c in parts:
                if c is not None:
                    cands = c if cands is None else cands & c
            rest = tuple(k for k, _c in parts if not isinstance(k, AllKey))
            return (AndKey(rest) if rest else AllKey()), cands
    return key, None


def run_search(mb: Mailboxes, name: str, targets: Sequence[tuple[int, int]], key: SearchKey,
               ctx: SearchContext, recent_from: int) -> tuple[list[tuple[int, int, int]], int]:
    """Evaluate `key` on targets ((seq, uid) in order, at most a few thousand per call).
    Returns ([(seq, uid, modseq) of matches], number of targets consumed).

    When the criteria name header fields, headers are peeked at and screened first, PEEK_AHEAD at a
    time (`peek_headers` reads without the user lock, so several batches of one SEARCH read files in
    parallel; in cluster mode, one query for their kept header blocks); only the messages that may
    match are parsed and evaluated."""
    if not targets:
        return [], 0
    need = content_need(key)
    needles = _needles(key) if need == "header" else []
    lo, hi = targets[0][1], targets[-1][1]
    # targets thinned out by the full-text index (store.fts) are fetched by UID, not by range
    rows = mb.rows_between(name, lo, hi) if _dense(lo, hi, len(targets)) else mb.rows(name, [u for _s, u in targets])
    heads: dict[int, bytes] = {}
    if needles:
        kept = []
        for i in range(0, len(targets), PEEK_AHEAD):  # PEEK_AHEAD blocks held at a time
            part = targets[i:i + PEEK_AHEAD]
            peeked = mb.peek_headers(name, [r for _s, u in part if (r := rows.get(u)) is not None])
            for seq, uid in part:
                row = rows.get(uid)
                if row is None:
                    continue
                head = peeked.get(uid)
                if head is not None:
                    if _ruled_out(head, needles):
                        continue  # cannot match: no need to parse it
                    if row.lf == 0:
                        heads[uid] = head
                kept.append((seq, uid))
        targets = kept
    out: list[tuple[int, int, int]] = []
    for seq, uid in targets:
        row = rows.get(uid)
        if row is None:
            continue
        try:
            if evaluate(key, _View(mb, name, seq, row, need, uid >= recent_from, heads.get(uid)), ctx):
                out.append((seq, uid, row.modseq))
        except StoreUnavailable:
            raise
        except StoreError:
            continue
    mb.flush_meta()
    return out, len(targets)


def url_copy(mb: Mailboxes, name: str, uid: int, section: Section | None,  # noqa: PLR0913
             part_range: tuple[int, int | None] | None, write: Callable[[bytes], None], room: int) -> int | None:
    """Copy what an IMAP URL names (RFC 5092 §3, for CATENATE, RFC 4469 §3) to `write`: the message
    `uid` of folder `name`, or its `section` (NUL kept: `section_octets`), cut to `part_range`, a
    piece at a time. Returns its length, nothing written when that is above `room` (the caller
    answers TOOBIG); None when there is no such message. A message above STREAM_FROM is not read
    whole: its octets are a `FileSpan` of its file (the section placed by its layout, `_Large`), as
    for FETCH; one whose layout cannot be made is read whole, as there."""
    row = mb.rows(name, [uid]).get(uid)
    if row is None:
        return None
    spec = None if part_range is None else (part_range[0], 1 << 62 if part_range[1] is None else part_range[1])
    if row.lf == 0 and row.size > STREAM_FROM:
        large = _Large(mb, name, row)
        try:
            got = large.octets(section, spec)
            if isinstance(got, FileSpan):
                try:
                    f = large.opened(got.reads(row.size))
                except MessageGone:
                    return None
                size = f.seek(0, 2)
                if (n := got.length(size)) <= room:
                    left = n
                    for piece in got.pieces(f, size):
                        write(piece)
                        left -= len(piece)
                    if left:
                        raise OSError("message file ended early")
                return n
            if got is not None:
                if len(got) <= room:
                    write(got)
                return len(got)
        finally:
            large.close()
    data = mb.read(name, row)
    if section is not None:
        data = section_octets(parse_message(data), section)
    data = partial(data, spec)  # RFC 5092 §3.4: an offset past the end gives nothing
    if len(data) <= room:
        write(data)
    return len(data)
