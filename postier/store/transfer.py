"""Migration in and out of a user's mail store: IMAP, Maildir and mbox import, Maildir and mbox export.

Everything goes through the mail-store interface (`store.api.Mailboxes`): an imported message is
appended like an IMAP APPEND (durable before it counts), with its flags, keywords and internal date.
A Maildir folder with a `dovecot-uidlist` (an export's, or Dovecot's) imported into a folder that
never held mail keeps its UIDVALIDITY and UIDs (`Mailboxes.import_with_uids`, in both modes): the
round trip between the modes is then UID-exact.

Import is resumable and idempotent. A state database in the user's home
(`postier-import.sqlite`) records, per source and folder, the SHA-256 of every message copied, and
for IMAP the highest UID copied under the source folder's UIDVALIDITY: a second run fetches only
UIDs above the checkpoint and copies only messages it has not copied before, so interrupting an
import and running it again never duplicates mail. `--verify` compares, per folder, the multiset of
message hashes on both sides and prints what differs.

Folder names: the source's hierarchy separator becomes "." (ours; a "." inside a source level
becomes "_"); source folders carrying a special-use attribute (RFC 6154: \\Sent, \\Drafts,
\\Trash, \\Junk, \\Archive) go into our folder with that attribute, whatever their name
("[Gmail]/Sent Mail" -> "Sent").

Export writes a standard Maildir++ that Dovecot serves with the same UIDs (its `dovecot-uidlist`,
version 3, maps each UID to the file's base name; UIDVALIDITY and UIDNEXT are kept; keywords go to
`dovecot-keywords`), or mboxrd files (one per folder, `>From ` quoting, flags in
Status/X-Status/X-Keywords headers as Dovecot and mutt write them) that `import mbox` reads back to
the same messages, flags and dates.

Large messages are never held whole: a Maildir file above MEMORY_DATA_LIMIT is copied into the
store's spool in pieces (`LargeFile`), an mbox file is read a line at a time, a message above
MEMORY_DATA_LIMIT written on to a spool file as it is read (`_mbox_messages`), and a fetched IMAP
literal above MEMORY_DATA_LIMIT goes on to a spool file as it arrives (`_spooling_literals`).

Written here (not with an external sync tool) because the round trip must keep postier's own
guarantees: durable appends, UIDs kept on export, idempotent resumption.
"""

from __future__ import annotations

import hashlib
import imaplib
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, BinaryIO

from ..durable import use_wal
from ..message.mime import header_section
from ..message.types import MEMORY_DATA_LIMIT
from ..proto.mutf7 import Mutf7Error, mutf7_decode, mutf7_encode
from ..proto.crlf import to_crlf
from .api import Mailboxes
from .errors import StoreError
from .index import KEYWORDS_FILE
from .mailbox import INBOX, SEPARATOR, folder_dir_name
from .maildir import SpoolFile

STATE_NAME = "postier-import.sqlite"
BATCH = 50
MAX_MESSAGE = 256 * 1024 * 1024
VERIFY_BYTES = 8 * 1024 * 1024  # --verify: literal bytes one source UID FETCH holds in memory at most
_PIECE = 1 << 20  # a large message file is read this much at a time
_SYSTEM = {"\\seen": "\\Seen", "\\answered": "\\Answered", "\\flagged": "\\Flagged", "\\deleted": "\\Deleted",
           "\\draft": "\\Draft"}
_LETTER_FLAGS = {"S": "\\Seen", "R": "\\Answered", "F": "\\Flagged", "T": "\\Deleted", "D": "\\Draft"}
_SPECIAL = ("\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive")
_FROM_LINE = re.compile(rb"^>*From ")


class TransferError(Exception):
    """An import or export failed; str() names the folder or file."""


@dataclass
class Progress:
    """Counts, bytes, rate and ETA on a terminal (one rewritten line), nothing in scripts."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    out: Callable[[str], None] | None = None
    _last: float = 0.0

    def __post_init__(self) -> None:
        if self.out is None and sys.stderr.isatty():
            self.out = lambda s: print("\r" + s, end="", file=sys.stderr, flush=True)

    def tick(self, size: int, copied: bool = True, folder: str = "") -> None:
        if copied:
            self.done += 1
            self.bytes += size
        else:
            self.skipped += 1
        now = time.monotonic()
        if self.out is not None and now - self._last > 0.2:
            self._last = now
            rate = self.done / max(now - self.started, 1e-6)
            left = max(self.total - self.done - self.skipped, 0)
            eta = f", ETA {left / rate:.0f} s" if rate > 0 and self.total else ""
            self.out(f"{folder}: {self.done} copied, {self.skipped} already there, "
                     f"{self.bytes / 1e6:.1f} MB, {rate:.0f} msg/s{eta}   ")

    def finish(self) -> None:
        if self.out is not None:
            self.out("")
            print(file=sys.stderr)


class ImportState:
    """What was copied already: message hashes per (source, folder), IMAP UID checkpoints."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        use_wal(self.db)
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript("""
            CREATE TABLE IF NOT EXISTS copied (source TEXT, folder TEXT, sha256 TEXT, n INTEGER,
                                               PRIMARY KEY (source, folder, sha256));
            CREATE TABLE IF NOT EXISTS checkpoints (source TEXT, folder TEXT, uidvalidity INTEGER,
                                                    last_uid INTEGER, PRIMARY KEY (source, folder));
        """)

    def close(self) -> None:
        self.db.close()

    def count(self, source: str, folder: str, digest: str) -> int:
        row = self.db.execute("SELECT n FROM copied WHERE source=? AND folder=? AND sha256=?",
                              (source, folder, digest)).fetchone()
        return int(row[0]) if row else 0

    def add(self, source: str, folder: str, digest: str) -> None:
        self.db.execute("INSERT INTO copied VALUES (?,?,?,1) ON CONFLICT DO UPDATE SET n=n+1",
                        (source, folder, digest))

    def checkpoint(self, source: str, folder: str) -> tuple[int, int]:
        row = self.db.execute("SELECT uidvalidity, last_uid FROM checkpoints WHERE source=? AND folder=?",
                              (source, folder)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def set_checkpoint(self, source: str, folder: str, uidvalidity: int, last_uid: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO checkpoints VALUES (?,?,?,?)", (source, folder, uidvalidity, last_uid))


@dataclass
class Stats:
    folders: int = 0
    copied: int = 0
    skipped: int = 0
    bytes: int = 0
    differences: list[str] = field(default_factory=list)


# -- folder names -----------------------------------------------------------------------------------

def map_folder(source_name: str, delimiter: str | None, special: str | None, ours: dict[str, str]) -> str:
    """Our folder for a source folder: by special-use attribute first, else its path with "." levels."""
    if special and special in ours:
        return ours[special]
    if source_name.upper() == "INBOX":
        return INBOX
    parts = source_name.split(delimiter) if delimiter else [source_name]
    clean = [p.replace(SEPARATOR, "_").strip() or "_" for p in parts if p != ""]
    if clean and clean[0].upper() == "INBOX" and len(clean) > 1:
        clean[0] = INBOX
    return SEPARATOR.join(clean) or INBOX


def _special_map(mb: Mailboxes) -> dict[str, str]:
    return {f.special_use: f.name for f in mb.list_folders() if f.special_use}


def _ensure(mb: Mailboxes, name: str, existing: set[str]) -> None:
    if name != INBOX and name not in existing:
        parts = name.split(SEPARATOR)
        for i in range(1, len(parts) + 1):
            sub = SEPARATOR.join(parts[:i])
            if sub not in existing:
                try:
                    mb.create(sub)
                except StoreError as exc:
                    if "exists" not in str(exc).lower():
                        raise TransferError(f"{sub}: cannot create the folder: {exc}") from None
                existing.add(sub)


def _copy_one(mb: Mailboxes, state: ImportState, source: str, folder: str, data: bytes | LargeFile | Spooled,
              flags: Sequence[str], idate: float | None, seen: dict[str, int], stats: Stats, progress: Progress) -> None:
    """Append one message unless this run or an earlier one already copied it (same bytes, same folder)."""
    digest, size = (data.digest, data.size) if isinstance(data, LargeFile | Spooled) else (
        hashlib.sha256(data).hexdigest(), len(data))
    seen[digest] = seen.get(digest, 0) + 1
    if seen[digest] <= state.count(source, folder, digest):
        if isinstance(data, Spooled):
            data.spool.discard()
        stats.skipped += 1
        progress.tick(size, copied=False, folder=folder)
        return
    try:
        if isinstance(data, LargeFile):
            mb.append_many(folder, [(data.spool(mb), flags, idate)])
        elif isinstance(data, Spooled):
            mb.append_many(folder, [(data.spool, flags, idate)])
        else:
            mb.append(folder, data, flags, idate)
    except StoreError as exc:
        if isinstance(data, Spooled):
            data.spool.discard()  # (when the store refused it before taking it)
        raise TransferError(f"{folder}: message not stored: {exc}") from None
    state.add(source, folder, digest)
    stats.copied += 1
    stats.bytes += size
    progress.tick(size, folder=folder)


# -- IMAP -------------------------------------------------------------------------------------------

_LIST_RE = re.compile(rb'\((?P<flags>[^)]*)\) (?P<delim>"[^"]*"|NIL) (?P<name>.+)$')


def _parse_list(line: bytes | tuple[bytes, bytes]) -> tuple[list[str], str | None, str] | None:
    if isinstance(line, tuple):  # the name came as a literal
        head, lit = line
        m = _LIST_RE.match(head.rstrip() + b" x")
        if m is None:
            return None
        raw = lit
    else:
        m = _LIST_RE.match(line)
        if m is None:
            return None
        raw = m.group("name")
        if raw.startswith(b'"') and raw.endswith(b'"'):
            raw = raw[1:-1].replace(b'\\"', b'"').replace(b"\\\\", b"\\")
    flags = m.group("flags").decode(errors="replace").split()
    d = m.group("delim")
    delim = None if d == b"NIL" else d[1:-1].replace(b"\\\\", b"\\").decode()
    try:
        name = mutf7_decode(raw.decode("ascii"))
    except (UnicodeDecodeError, Mutf7Error):
        name = raw.decode("utf-8", "replace")
    return flags, delim, name


def _quote(name: str) -> str:
    enc = mutf7_encode(name)
    return '"' + enc.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _imap_ok(typ: str, data: object, what: str) -> None:
    if typ != "OK":
        raise TransferError(f"{what}: the source server said {typ} {data!r}"[:300])


def import_imap(mb: Mailboxes, client: imaplib.IMAP4, source: str, state: ImportState,
                progress: Progress | None = None, verify: bool = False) -> Stats:
    """Copy every folder of a logged-in IMAP client into mb (see the module docstring)."""
    progress = progress or Progress()
    stats = Stats()
    typ, listing = client.list('""', "*")
    _imap_ok(typ, listing, "LIST")
    folders = []
    for item in listing:
        if item is None:
            continue
        parsed = _parse_list(item)
        if parsed is not None and not any(f.lower() == "\\noselect" for f in parsed[0]):
            folders.append(parsed)
    ours = _special_map(mb)
    existing = {f.name for f in mb.list_folders()}
    for flags, delim, name in folders:
        special = next((s for s in _SPECIAL if any(f.lower() == s.lower() for f in flags)), None)
        target = map_folder(name, delim, special, ours)
        _ensure(mb, target, existing)
        typ, data = client.select(_quote(name), readonly=True)
        _imap_ok(typ, data, f"SELECT {name}")
        uidvalidity = int((client.response("UIDVALIDITY")[1] or [b"0"])[0] or 0)
        key = f"{source}/{name}"
        cp_validity, last = state.checkpoint(key, target)
        if cp_validity != uidvalidity:
            last = 0  # a new UIDVALIDITY: fetch everything again; hashes still prevent duplicates
        typ, data = client.uid("SEARCH", f"UID {last + 1}:*")
        _imap_ok(typ, data, f"UID SEARCH {name}")
        uids = [int(u) for u in (data[0] or b"").split() if int(u) > last]
        progress.total += len(uids)
        seen: dict[str, int] = {}
        for i in range(0, len(uids), BATCH):
            batch = uids[i:i + BATCH]
            with _spooling_literals(mb, client, name):
                typ, data = client.uid("FETCH", ",".join(map(str, batch)), "(UID FLAGS INTERNALDATE BODY.PEEK[])")
                _imap_ok(typ, data, f"UID FETCH {name}")
                for item in data:
                    if not isinstance(item, tuple):
                        continue
                    head, body = item
                    fl = re.search(rb"FLAGS \(([^)]*)\)", head)
                    flag_names = [_SYSTEM.get(f.lower(), f) for f in (fl.group(1).decode().split() if fl else [])
                                  if f.lower() != "\\recent"]
                    idate = imaplib.Internaldate2tuple(head)
                    ts = time.mktime(idate) if idate else None
                    _copy_one(mb, state, key, target, body, flag_names, ts, seen, stats, progress)
            state.set_checkpoint(key, target, uidvalidity, batch[-1])
        stats.folders += 1
        if verify:
            stats.differences += _verify_imap(mb, client, name, target)
    progress.finish()
    return stats


@contextmanager
def _spooling_literals(mb: Mailboxes, client: imaplib.IMAP4, name: str) -> Iterator[None]:
    """For one command: imaplib reads each literal of a response whole (`IMAP4.read(size)`) and keeps
    it until the command completes; here a literal above MEMORY_DATA_LIMIT is written on to a spool
    file of `mb` in pieces as it arrives, and imaplib keeps a `Spooled` instead. A literal above
    MAX_MESSAGE stops the import (TransferError) before it is read. Spool files the store did not
    take are removed at the end."""
    made: list[SpoolFile] = []
    plain = client.read

    def read(size: int) -> bytes | Spooled:
        if size <= MEMORY_DATA_LIMIT:
            return plain(size)
        if size > MAX_MESSAGE:
            raise TransferError(f"{name}: a message of {size} bytes is over the limit")
        spool = mb.spool()
        made.append(spool)
        sha, left = hashlib.sha256(), size
        while left:
            piece = plain(min(_PIECE, left))
            if not piece:
                raise imaplib.IMAP4.abort("the connection closed inside a literal")
            sha.update(piece)
            spool.write(piece)
            left -= len(piece)
        return Spooled(spool, sha.hexdigest(), size)

    client.read = read  # type: ignore[assignment,method-assign]
    try:
        yield
    finally:
        vars(client).pop("read", None)
        for spool in made:
            spool.discard()  # (nothing to do for one the store took)


def _verify_imap(mb: Mailboxes, client: imaplib.IMAP4, name: str, target: str) -> list[str]:
    """--verify of one folder: the multiset of SHA-256 of the source's messages (bare LF made CRLF, as
    the store keeps them) against the target's. The source is fetched in UID ranges of at most BATCH
    messages and VERIFY_BYTES of literals held in memory (judged by RFC822.SIZE); a literal above
    MEMORY_DATA_LIMIT goes to a spool file as it arrives (`_spooling_literals`, as the import does) and
    is never held whole."""
    typ, data = client.uid("FETCH", "1:*", "(UID RFC822.SIZE)")
    if typ != "OK":  # (a server may refuse 1:* in an empty folder): the source holds nothing
        data = []
    sizes = sorted((int(u.group(1)), int(z.group(1))) for item in data if isinstance(item, bytes)
                   and (u := re.search(rb"UID (\d+)", item)) and (z := re.search(rb"RFC822\.SIZE (\d+)", item)))
    src: dict[str, int] = {}
    for lo, hi in _verify_ranges(sizes):
        with _spooling_literals(mb, client, name):
            typ, data = client.uid("FETCH", f"{lo}:{hi}", "(BODY.PEEK[])")
            if typ != "OK":
                return [f"{name} -> {target}: the source's UID FETCH {lo}:{hi} failed: {typ}"]
            for item in data:
                if isinstance(item, tuple):
                    d = _crlf_digest(item[1], name)
                    src[d] = src.get(d, 0) + 1
            del data  # the batch's literals, before the next batch is read
    return _compare(name, target, src, _hashes(mb, target))


def _verify_ranges(sizes: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """UID ranges lo:hi of the (uid, size) pairs, in order, each of at most BATCH messages whose
    literals held in memory (those up to MEMORY_DATA_LIMIT; larger ones are spooled) stay within
    VERIFY_BYTES (a single message may pass it)."""
    count = held = 0
    lo = hi = 0
    for uid, size in sizes:
        mem = size if size <= MEMORY_DATA_LIMIT else 0
        if count and (count == BATCH or held + mem > VERIFY_BYTES):
            yield lo, hi
            count = held = 0
        if not count:
            lo = uid
        hi = uid
        count += 1
        held += mem
    if count:
        yield lo, hi


class _CrlfHash:
    """SHA-256 of a message given in pieces, each bare LF made CRLF as `SpoolFile.write` does (a CRLF
    split between two pieces kept as it is)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self._prev_cr = False

    def update(self, data: bytes) -> None:
        if not data:
            return
        if self._prev_cr and data[:1] == b"\n":
            self.sha.update(b"\n")
            data = data[1:]
        data = to_crlf(data)
        self._prev_cr = data[-1:] == b"\r"
        self.sha.update(data)

    def of(self, f: IO[bytes]) -> str:
        while piece := f.read(_PIECE):
            self.update(piece)
        return self.sha.hexdigest()


def _crlf_digest(item: bytes | Spooled, name: str) -> str:
    """The SHA-256 of a fetched literal with bare LF made CRLF. A spooled one was hashed as it arrived,
    and its spool file holds it with CRLF: when nothing was converted, that hash is the answer, else
    the file is hashed in pieces."""
    if not isinstance(item, Spooled):
        return hashlib.sha256(to_crlf(item)).hexdigest()
    spool = item.spool
    if spool.failed is not None:
        raise TransferError(f"{name}: a spool file could not be written: {spool.failed}")
    if spool.size == spool.received:
        return item.digest
    with open(spool.path, "rb") as f:
        return _CrlfHash().of(f)


def _hashes(mb: Mailboxes, folder: str) -> dict[str, int]:
    """The target's side of --verify: each message above MEMORY_DATA_LIMIT is hashed in pieces."""
    snap = mb.snapshot(folder)
    out: dict[str, int] = {}
    rows = mb.rows(folder, list(snap.uids))
    for uid in snap.uids:
        row = rows.get(uid)
        if row is None:
            continue
        if row.size > MEMORY_DATA_LIMIT:
            f = mb.open_message(folder, uid)
            if f is None:
                continue
            with f:
                d = _CrlfHash().of(f)
        else:
            d = hashlib.sha256(mb.read(folder, row)).hexdigest()
        out[d] = out.get(d, 0) + 1
    return out


def _compare(src_name: str, target: str, src: dict[str, int], dst: dict[str, int]) -> list[str]:
    diffs = []
    missing = sum(max(n - dst.get(d, 0), 0) for d, n in src.items())
    extra = sum(max(n - src.get(d, 0), 0) for d, n in dst.items())
    if missing:
        diffs.append(f"{src_name} -> {target}: {missing} source message(s) missing here")
    if extra:
        diffs.append(f"{src_name} -> {target}: {extra} message(s) here that the source does not have")
    return diffs


# -- Maildir ----------------------------------------------------------------------------------------

def _maildir_folders(root: Path) -> Iterator[tuple[str, Path]]:
    if (root / "cur").is_dir() or (root / "new").is_dir():
        yield INBOX, root
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name.startswith(".") and d.name not in (".", "..") and (d / "cur").is_dir():
            try:
                name = mutf7_decode(d.name[1:])
            except Mutf7Error:
                name = d.name[1:]
            yield name, d


def _read_keywords(folder: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in (folder / KEYWORDS_FILE).read_text(errors="replace").splitlines():
            idx, _, kw = line.partition(" ")
            if idx.isdigit() and kw and int(idx) < 26:
                out[chr(97 + int(idx))] = kw
    except OSError:
        pass
    return out


@dataclass(frozen=True)
class LargeFile:
    """A message file above MEMORY_DATA_LIMIT, never read whole: its SHA-256 (for the import state)
    is computed reading it 1 MiB at a time, and the store gets it as a file of its own spool
    (`Mailboxes.spool`, bare LF made CRLF on the way), copied in the same pieces, as a large APPEND
    literal: renamed into the Maildir, or in cluster mode uploaded from the file
    (`BodyStore.put_stream`)."""

    path: Path
    digest: str
    size: int

    @classmethod
    def of(cls, path: Path) -> LargeFile:
        sha, size = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while piece := f.read(_PIECE):
                sha.update(piece)
                size += len(piece)
        return cls(path, sha.hexdigest(), size)

    def spool(self, mb: Mailboxes) -> SpoolFile:
        """The message in a new spool file of `mb` (the caller hands it to the store, which
        discards it); TransferError when the file cannot be read."""
        spool = mb.spool()
        try:
            with open(self.path, "rb") as f:
                while piece := f.read(_PIECE):
                    spool.write(piece)
        except OSError as exc:
            spool.discard()
            raise TransferError(f"{self.path}: {exc.strerror}") from None
        return spool


def _read_message(f: Path, keywords: dict[str, str]) -> tuple[bytes | LargeFile, list[str], float]:
    """A Maildir file's bytes (a `LargeFile` above MEMORY_DATA_LIMIT), flags (from its name's info)
    and mtime (the internal date)."""
    info = f.name.partition(":2,")[2]
    flags = [_LETTER_FLAGS[c] for c in info if c in _LETTER_FLAGS]
    flags += [keywords[c] for c in info if c in keywords]
    try:
        st = f.stat()
        data = LargeFile.of(f) if st.st_size > MEMORY_DATA_LIMIT else f.read_bytes()
        return data, flags, st.st_mtime
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TransferError(f"{f}: {exc.strerror}") from None


def read_uidlist(folder: Path) -> tuple[int, int, dict[str, int]] | None:
    """(UIDVALIDITY, UIDNEXT, base name -> UID) of a folder's dovecot-uidlist, version 3 (what
    `export_maildir` and Dovecot write), or None when there is none or it cannot be read."""
    try:
        lines = (folder / "dovecot-uidlist").read_text(errors="replace").splitlines()
    except OSError:
        return None
    if not lines:
        return None
    head = lines[0].split()
    fields = {h[0]: h[1:] for h in head[1:] if h}
    if head[0] != "3" or not fields.get("V", "").isdigit():
        return None
    validity, uidnext = int(fields["V"]), int(fields["N"]) if fields.get("N", "").isdigit() else 1
    uids: dict[str, int] = {}
    for line in lines[1:]:
        num, sep, base = line.partition(" :")  # "<uid> [extension fields] :<base name>"
        num = num.split(" ", 1)[0]
        if sep and num.isdigit() and base:
            uids[base] = int(num)
    return validity, uidnext, uids


def _restore_uids(mb: Mailboxes, state: ImportState, source: str, target: str, folder: Path, files: list[Path],
                  keywords: dict[str, str], seen: dict[str, int], stats: Stats, progress: Progress) -> list[Path]:
    """Import the messages a dovecot-uidlist names with their UIDs and the folder's UIDVALIDITY, when
    the store can (`Mailboxes.import_with_uids`: into a folder that never held mail).
    Returns the files still to append (all of them when it could not)."""
    listed = read_uidlist(folder)
    if listed is None:
        return files
    validity, uidnext, uids = listed
    keep = [f for f in files if f.name.partition(":")[0] in uids]
    if not keep:
        return files
    digests: list[tuple[str, int]] = []

    def messages() -> Iterator[tuple[int, bytes | SpoolFile, Sequence[str], float | None]]:
        for f in keep:
            try:
                data, flags, mtime = _read_message(f, keywords)
            except FileNotFoundError:
                continue
            uid = uids[f.name.partition(":")[0]]
            if isinstance(data, LargeFile):
                digests.append((data.digest, data.size))
                yield uid, data.spool(mb), flags, mtime
            else:
                digests.append((hashlib.sha256(data).hexdigest(), len(data)))
                yield uid, data, flags, mtime

    try:
        done = mb.import_with_uids(target, validity, uidnext, messages())
    except StoreError as exc:
        raise TransferError(f"{target}: messages not stored: {exc}") from None
    if not done:
        return files
    for digest, size in digests:  # a second run finds them copied (and this folder no longer new)
        seen[digest] = seen.get(digest, 0) + 1
        state.add(source, target, digest)
        stats.copied += 1
        stats.bytes += size
        progress.tick(size, folder=target)
    kept = set(keep)
    return [f for f in files if f not in kept]


def import_maildir(mb: Mailboxes, root: Path, state: ImportState, progress: Progress | None = None) -> Stats:
    """A Maildir or Maildir++ tree (Dovecot's layout, its keyword file honoured) into mb."""
    progress = progress or Progress()
    stats = Stats()
    if not root.is_dir():
        raise TransferError(f"{root}: not a directory")
    ours = _special_map(mb)
    existing = {f.name for f in mb.list_folders()}
    source = f"maildir:{root.resolve()}"
    for name, folder in _maildir_folders(root):
        special = {"sent": "\\Sent", "drafts": "\\Drafts", "trash": "\\Trash", "junk": "\\Junk",
                   "spam": "\\Junk", "archive": "\\Archive"}.get(name.lower())
        target = map_folder(name, SEPARATOR, special, ours)
        _ensure(mb, target, existing)
        keywords = _read_keywords(folder)
        files = sorted((f for sub in ("new", "cur") if (folder / sub).is_dir() for f in (folder / sub).iterdir()
                        if f.is_file()), key=lambda f: f.name)
        progress.total += len(files)
        seen: dict[str, int] = {}
        files = _restore_uids(mb, state, source, target, folder, files, keywords, seen, stats, progress)
        for f in files:
            try:
                data, flags, mtime = _read_message(f, keywords)
            except FileNotFoundError:
                continue
            _copy_one(mb, state, source, target, data, flags, mtime, seen, stats, progress)
        stats.folders += 1
    progress.finish()
    return stats


# -- mbox -------------------------------------------------------------------------------------------
#
# Our own reader rather than the standard library's `mailbox.mbox`: that one does not undo mboxrd
# quoting (">>From " -> ">From "), rewrites line ends and reads each message whole. This one reads
# the file a line at a time (a line over _MBOX_LINE in pieces) through a 256 KiB buffer, and keeps a
# message in memory up to MEMORY_DATA_LIMIT, then writes it on to a spool file of the store: the
# memory held stays a few MiB whatever the size of the file or of its messages.

_MBOX_READ = 256 * 1024  # the file is read this much at a time
_MBOX_LINE = 256 * 1024  # a longer line arrives in pieces of this size


@dataclass(frozen=True)
class Spooled:
    """A message already written to a spool file of the store (a large one of an mbox file, or a large
    IMAP literal), with the SHA-256 and size of the bytes written."""

    spool: SpoolFile
    digest: str
    size: int


def _flag_field(field_: bytes) -> list[str] | None:
    """The flags a Status/X-Status/X-Keywords header field (as mutt and Dovecot write them) carries,
    or None for any other field (kept in the message)."""
    name, _, value = field_.partition(b":")
    low = name.strip().lower()
    v = value.strip().decode("ascii", "replace")
    if low == b"status":
        return ["\\Seen"] if "R" in v else []
    if low == b"x-status":
        return [f for c, f in (("A", "\\Answered"), ("F", "\\Flagged"), ("T", "\\Draft"), ("D", "\\Deleted"))
                if c in v]
    if low == b"x-keywords":
        return [k for k in re.split(r"[\s,]+", v) if k]
    return None


class _MboxMessage:
    """One message of an mbox file as it is read: its lines (mboxrd quoting undone by the reader)
    joined with CRLF, the empty line before the next From_ line left out, the flag fields of its
    header section (`_flag_field`) taken out as flags (a message whose fields were all taken out,
    or whose header section is empty, gets an empty line for them). Held in memory up to
    MEMORY_DATA_LIMIT, then in a spool file of `mb`. A header section with a field above
    MEMORY_DATA_LIMIT or a line above _MBOX_LINE is kept as it is from there on."""

    def __init__(self, mb: Mailboxes, from_line: bytes):
        self.mb, self.from_line = mb, from_line
        self.flags: list[str] = []
        self.raw_lines = 0  # lines of the file given, the empty ones included
        self._lines = 0  # lines written out
        self._empty = False  # an empty line held back: the last one of the message is left out
        self._cr = 0  # CRs held back at the end of a piece of a long line (a line's last CRs go)
        self._start = False  # with them, the start of the line
        self._mem = bytearray()
        self._spool: SpoolFile | None = None
        self._sha = hashlib.sha256()
        self._size = 0
        self._header = True
        self._field: bytearray | None = None
        self._kept = False  # a header field was kept

    def add(self, piece: bytes, start: bool, end: bool) -> None:
        """A line of the file (`start` and `end`), or a piece of a long one, without its LF."""
        if start:
            self.raw_lines += 1
            if self._empty:
                self._empty = False
                self._line(b"", True, True)
            if end and piece == b"":
                self._empty = True
                return
        stripped = piece.rstrip(b"\r")  # a line's last CRs go, CRs inside it stay
        held = len(piece) - len(stripped)
        if self._cr and stripped:
            stripped, self._cr = b"\r" * self._cr + stripped, 0
        self._cr = 0 if end else self._cr + held
        if not stripped and not end:  # only CRs so far: the line may still be an empty one
            self._start = self._start or start
            return
        start, self._start = start or self._start, False
        self._line(stripped, start, end)

    def _line(self, piece: bytes, start: bool, end: bool) -> None:
        if start:
            self._lines += 1
        if not self._header:
            self._out(piece)
            if end:
                self._out(b"\r\n")
            return
        if not (start and end):  # a line too long for a header section: kept as it is from here
            if self._field is None or piece[:1] not in (b" ", b"\t"):
                self._end_field()
            self._end_header(kept=True)
            self._out(piece)
            if end:
                self._out(b"\r\n")
            return
        if piece == b"":  # RFC 5322 §2.1: the empty line ends the header section
            self._end_header()
            self._out(b"\r\n")
        elif self._field is not None and piece[:1] in (b" ", b"\t"):  # RFC 5322 §2.2.3 continuation line
            self._field += b"\r\n" + piece
            if len(self._field) > MEMORY_DATA_LIMIT:
                self._end_header(kept=True)
        else:
            self._end_field()
            self._field = bytearray(piece)

    def _end_field(self) -> None:
        if self._field is None:
            return
        field_, self._field = bytes(self._field), None
        flags = _flag_field(field_)
        if flags is None:
            self._out(field_ + b"\r\n")
            self._kept = True
        else:
            self.flags += flags

    def _end_header(self, kept: bool = False) -> None:
        if kept:
            if self._field is not None:
                self._out(bytes(self._field) + b"\r\n")
                self._field = None
            self._kept = True
        self._end_field()
        if not self._kept:
            self._out(b"\r\n")
        self._header = False

    def _out(self, data: bytes) -> None:
        self._mem += data
        if self._spool is None and len(self._mem) > MEMORY_DATA_LIMIT:
            self._spool = self.mb.spool()
        if self._spool is not None and len(self._mem) >= _MBOX_READ:
            self._flush()

    def _flush(self) -> None:
        """Written on to the spool file in pieces of about _MBOX_READ (one write per line would cost
        a system call each)."""
        assert self._spool is not None
        piece = bytes(self._mem)
        self._sha.update(piece)
        self._size += len(piece)
        self._spool.write(piece)
        self._mem.clear()

    def finish(self) -> bytes | Spooled:
        """The message's bytes (in memory, or `Spooled` above MEMORY_DATA_LIMIT)."""
        if self._lines == 0:  # no line at all: an empty one
            self._empty = False
            self._line(b"", True, True)
        if self._header:
            self._end_header()
        if self._spool is None:
            return bytes(self._mem)
        self._flush()
        return Spooled(self._spool, self._sha.hexdigest(), self._size)

    def discard(self) -> None:
        if self._spool is not None:
            self._spool.discard()


def _mbox_messages(mb: Mailboxes, f: BinaryIO) -> Iterator[tuple[bytes, bytes | Spooled, list[str]]]:
    """(From_ line, message, flags) for each message of an mbox file (mboxrd and mboxo): a message
    starts at a "From " line that follows an empty line (or opens the file or comes right after the
    previous From_ line); a line of ">From ", ">>From " ... loses one ">"; what comes before the
    first From_ line is skipped."""
    msg: _MboxMessage | None = None
    prev_empty = False
    try:
        while (got := _mbox_piece(f)) is not None:
            line, end = got
            if line.startswith(b"From ") and (msg is None or msg.raw_lines == 0 or prev_empty):
                if msg is not None:
                    done, msg = msg, None
                    yield done.from_line, done.finish(), done.flags
                while not end:  # (a From_ line above 4 pieces loses the rest)
                    piece, end = _mbox_piece(f) or (b"", True)
                    if len(line) < 4 * _MBOX_LINE:
                        line += piece
                msg, prev_empty = _MboxMessage(mb, line), False
                continue
            prev_empty = end and line == b""
            if msg is None:  # junk before the first From_ line
                while not end:
                    _piece, end = _mbox_piece(f) or (b"", True)
                continue
            msg.add(line[1:] if _FROM_LINE.match(line) and line.startswith(b">") else line, True, end)
            while not end:
                piece, end = _mbox_piece(f) or (b"", True)
                msg.add(piece, False, end)
        if msg is not None:
            done, msg = msg, None
            yield done.from_line, done.finish(), done.flags
    finally:
        if msg is not None:
            msg.discard()


def _mbox_piece(f: BinaryIO) -> tuple[bytes, bool] | None:
    """The next piece of a line of an mbox file (at most _MBOX_LINE octets, without its LF) and
    whether it ends the line (True also for the file's last line without LF); None at the end of
    the file (a line cut exactly there ends with it: the callers read None as an end)."""
    piece = f.readline(_MBOX_LINE)
    if not piece:
        return None
    if piece.endswith(b"\n"):
        return piece[:-1], True
    return piece, len(piece) < _MBOX_LINE


def _from_date(line: bytes) -> float | None:
    parts = line.decode("ascii", "replace").split()
    for n in (5, 6):
        try:
            return datetime.strptime(" ".join(parts[-n:][:5]), "%a %b %d %H:%M:%S %Y").replace(tzinfo=UTC).timestamp()
        except (ValueError, IndexError):
            continue
    return None


def import_mbox(mb: Mailboxes, path: Path, state: ImportState, progress: Progress | None = None) -> Stats:
    """An mbox file (into the folder named after it; "inbox" -> INBOX) or a directory of them."""
    progress = progress or Progress()
    stats = Stats()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    existing = {f.name for f in mb.list_folders()}
    ours = _special_map(mb)
    for f in files:
        stem = f.name[:-5] if f.name.endswith(".mbox") else f.name
        target = map_folder(stem, "/", None, ours)
        _ensure(mb, target, existing)
        source = f"mbox:{f.resolve()}"
        seen: dict[str, int] = {}
        try:
            with open(f, "rb", buffering=_MBOX_READ) as fh:
                for from_line, msg, flags in _mbox_messages(mb, fh):
                    _copy_one(mb, state, source, target, msg, flags, _from_date(from_line), seen, stats, progress)
        except OSError as exc:
            raise TransferError(f"{f}: {exc.strerror}") from None
        stats.folders += 1
    progress.finish()
    return stats


# -- export -----------------------------------------------------------------------------------------

def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_maildir(mb: Mailboxes, dest: Path) -> Stats:
    """A Maildir++ tree Dovecot serves with the same UIDVALIDITY and UIDs (dovecot-uidlist v3)."""
    stats = Stats()
    if dest.exists() and any(dest.iterdir()):
        raise TransferError(f"{dest}: not empty")
    for info in mb.list_folders():
        name = info.name
        d = dest if name == INBOX else dest / folder_dir_name(name)
        for sub in ("cur", "new", "tmp"):
            (d / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        snap = mb.snapshot(name)
        rows = mb.rows(name, list(snap.uids))
        letters = list(snap.keywords)[:26]
        lines = [f"3 V{snap.uidvalidity} N{snap.uidnext} G{os.urandom(16).hex()}"]
        used: set[str] = set()
        for uid in snap.uids:
            row = rows.get(uid)
            if row is None:
                continue
            data = mb.read(name, row)
            flag_letters = "".join(sorted(c for c, f in _LETTER_FLAGS.items() if f in row.flag_names))
            kw = "".join(sorted(chr(97 + letters.index(k)) for k in row.keywords.split() if k in letters))
            # cluster mode names a body by its hash: two copies of one body in a folder need two files
            base = row.base if row.base not in used else f"{row.base}.{uid}"
            used.add(base)
            target = d / "cur" / f"{base}:2,{flag_letters}{kw}"
            with open(target, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            if row.idate:
                os.utime(target, (row.idate, row.idate))
            lines.append(f"{uid} :{base}")
            stats.copied += 1
            stats.bytes += len(data)
        (d / "dovecot-uidlist").write_text("\n".join(lines) + "\n")
        if letters:
            (d / KEYWORDS_FILE).write_text("".join(f"{i} {k}\n" for i, k in enumerate(letters)))
        stats.folders += 1
    subs = mb.subscriptions()
    if subs:
        (dest / "subscriptions").write_text("".join(f"{mutf7_encode(s)}\n" for s in subs))
    return stats


def export_mbox(mb: Mailboxes, dest: Path) -> Stats:
    """One mboxrd file per folder (`NAME.mbox`), flags in Status/X-Status/X-Keywords."""
    stats = Stats()
    dest.mkdir(parents=True, exist_ok=True, mode=0o700)
    for info in mb.list_folders():
        name = info.name
        snap = mb.snapshot(name)
        rows = mb.rows(name, list(snap.uids))
        target = dest / (name.replace("/", "_") + ".mbox")
        with open(target, "wb") as out:
            for uid in snap.uids:
                row = rows.get(uid)
                if row is None:
                    continue
                data = mb.read(name, row)
                out.write(_mbox_entry(data, row.flag_names, row.idate))
                stats.copied += 1
                stats.bytes += len(data)
            out.flush()
            os.fsync(out.fileno())
        stats.folders += 1
    return stats


def _mbox_entry(data: bytes, flags: Sequence[str], idate: int | None) -> bytes:
    when = datetime.fromtimestamp(idate or 0, UTC)
    from_line = b"From MAILER-DAEMON " + when.strftime("%a %b %d %H:%M:%S %Y").encode() + b"\n"
    head = header_section(data, empty_line=False)
    body = data[len(head):] or b"\r\n"
    extra = b""
    if "\\Seen" in flags:
        extra += b"Status: RO\r\n"
    xs = "".join(c for c, f in (("A", "\\Answered"), ("F", "\\Flagged"), ("T", "\\Draft"), ("D", "\\Deleted"))
                 if f in flags)
    if xs:
        extra += b"X-Status: " + xs.encode() + b"\r\n"
    kws = [f for f in flags if not f.startswith("\\")]
    if kws:
        extra += b"X-Keywords: " + " ".join(kws).encode() + b"\r\n"
    msg = head + extra + body
    lines = msg.replace(b"\r\n", b"\n").split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    quoted = [b">" + ln if _FROM_LINE.match(ln) else ln for ln in lines]  # mboxrd
    return from_line + b"\n".join(quoted) + b"\n\n"

