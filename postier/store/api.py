"""The mail-store interface: what the access protocols (IMAP, POP3, later the webmail) may ask of
the store, as `typing.Protocol`s, and the values that cross it.

`Mailboxes` is one user's folders; `MailStoreAPI` hands them out per user and runs their blocking
calls in its worker threads. Callers never see the store's lock, index or SQL: every method is one
consistent step (it takes the user lock itself), and failures are `store.errors` exceptions. The
Maildir implementation is `store.mailbox` (`UserMailbox`, `MailStore`); a test may drive a
protocol core with any other object that has these methods.
"""

from __future__ import annotations

from array import array
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple, Protocol

from .index import MessageRow
from .quota import Usage
from .maildir import SpoolFile

if TYPE_CHECKING:
    from ..message.types import User

__all__ = [
    "RENAMES_KEPT", "CopyResult", "FlagTable", "FolderInfo", "FolderSnapshot", "MailStoreAPI", "Mailboxes",
    "MessageRow", "NamesView", "PopMessage", "StatusInfo", "StoreResult", "renames_after",
]

#: Renames kept per user in the store's rename log (`Mailboxes.names_since`); older ones are pruned.
RENAMES_KEPT = 64


@dataclass
class FlagTable:
    """Flags of every message of a folder, aligned with `uids` (FETCH 1:* FLAGS without SQL rows)."""

    uids: array[int]
    flags: array[int]  # system-flag bits
    keywords: dict[int, str]  # uid -> space-separated keywords, only where there are some
    modseq: array[int] | None  # built on first need


@dataclass(frozen=True, slots=True)
class FolderSnapshot:
    """A consistent copy of a FolderState's fields, safe to read in the event loop."""

    name: str
    uidvalidity: int
    uidnext: int
    highestmodseq: int
    uids: array[int]
    version: int
    special_use: str
    keywords: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class FolderInfo:
    name: str
    special_use: str  # "" or an RFC 6154 attribute


@dataclass(frozen=True, slots=True)
class NamesView:
    """A user's mailbox names and subscriptions, and the renames that led to them, read at one
    moment (`Mailboxes.names_since`): IMAP NOTIFY's MailboxName events (RFC 5465 §5.4) compare two.

    `cursor` is the rename log's position at that moment, to pass to the next call. `renames` are the
    renames (old, new; a mailbox's children moved with it) made after the cursor given, oldest first,
    every one of them and no other: so the two views' difference is exactly explained. None when that
    is not known (no cursor given, or the log no longer holds them all: pruned, or rebuilt); the
    caller then has only the difference of the names (a rename looks like a deletion and a creation)."""

    cursor: int
    folders: list[str]
    subscriptions: list[str]
    renames: list[tuple[str, str]] | None


def renames_after(cursor: int | None, head: int, rows: Sequence[tuple[int, str, str]]) -> list[tuple[str, str]] | None:
    """`NamesView.renames` from a rename log numbered 1, 2, 3... without gaps: the log's last number
    `head` and its kept rows (number, old, new) after `cursor`, in order. None when they are not all
    there: the rows from cursor + 1 were pruned (`RENAMES_KEPT`), or the log is behind the cursor
    (rebuilt: a number no longer names the same rename)."""
    if cursor is None or cursor > head:
        return None
    if cursor == head:
        return []
    if not rows or rows[0][0] != cursor + 1 or rows[-1][0] != head or len(rows) != head - cursor:
        return None
    return [(old, new) for _n, old, new in rows]


@dataclass(frozen=True, slots=True)
class StatusInfo:
    messages: int
    unseen: int
    deleted: int
    size: int
    uidnext: int
    uidvalidity: int
    highestmodseq: int
    recent: int
    deleted_size: int = 0  # octets of the \\Deleted messages (RFC 9208 §4.2 DELETED-STORAGE)


@dataclass(frozen=True, slots=True)
class StoreResult:
    modseq: int
    changed: dict[int, MessageRow]  # uid -> row after the change (only messages that changed)
    unchanged: dict[int, MessageRow] = field(default_factory=dict)  # uid -> row: matched, flags already so
    conflicts: list[int] = field(default_factory=list)  # RFC 7162 UNCHANGEDSINCE failures
    keywords: tuple[str, ...] = ()  # every keyword the folder knows after the change


@dataclass(frozen=True, slots=True)
class CopyResult:
    uidvalidity: int  # of the destination
    source_uids: list[int]
    dest_uids: list[int]


class PopMessage(NamedTuple):
    """One INBOX message for POP3: `uidl` is stable across sessions and index rebuilds."""

    uid: int
    size: int
    path: Path
    uidl: str


class Mailboxes(Protocol):
    """One user's folders. Every method blocks (disk, SQLite): run it through `MailStoreAPI.call`.
    Names are IMAP mailbox names as Unicode (RFC 9051 §5.1), "." the hierarchy separator."""

    # -- folders
    def ensure_defaults(self) -> None: ...
    def list_folders(self) -> list[FolderInfo]: ...
    def create(self, name: str, special_use: str | None = None) -> None: ...
    def delete(self, name: str) -> None: ...
    def rename(self, old: str, new: str) -> None: ...
    def subscriptions(self) -> list[str]: ...
    def subscribe(self, name: str, on: bool = True) -> None: ...
    def names_since(self, cursor: int | None) -> NamesView:
        """The folder names and subscriptions, and the renames after `cursor`, in one consistent
        read: no rename is half seen (its new name listed but not the rename, or the reverse)."""
        ...
    def status(self, name: str) -> StatusInfo: ...
    def exists(self, name: str) -> bool: ...
    def watch_path(self, name: str) -> Path | None: ...

    # -- the state of one folder
    def snapshot(self, name: str, sync: bool = True) -> FolderSnapshot: ...
    def select(self, name: str, claim_recent: bool, want_unseen: bool) -> tuple[FolderSnapshot, int, int | None]: ...
    def claim_recent(self, name: str) -> int: ...
    def changed_since(self, name: str, modseq: int, max_uid: int | None = None) -> list[tuple[int, int, str, int]]: ...
    def at_once[T](self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` (which calls methods of these mailboxes) as one step: no other session's
        call on them in between (a notification point's snapshot, claim and flag changes)."""
        ...
    def vanished_since(self, name: str, modseq: int) -> list[int] | None: ...

    # -- reading messages
    def rows(self, name: str, uids: Iterable[int]) -> dict[int, MessageRow]: ...
    def rows_between(self, name: str, lo: int, hi: int) -> dict[int, MessageRow]: ...
    def flag_rows(self, name: str, lo: int, hi: int) -> list[tuple[int, int, str, int]]: ...
    def flag_table(self, name: str, view: array[int], need_modseq: bool = False) -> FlagTable | None: ...
    def read(self, name: str, row: MessageRow) -> bytes: ...
    def read_header(self, name: str, row: MessageRow, limit: int = 256 * 1024) -> bytes: ...
    def peek_header(self, name: str, row: MessageRow, limit: int = 16384) -> bytes | None: ...
    def peek_headers(self, name: str, rows: Iterable[MessageRow]) -> dict[int, bytes]:
        """`peek_header` of several messages (uid -> header block, for those it can give) at once."""
        ...
    def open_message(self, name: str, uid: int, partial: bool = False) -> IO[bytes] | None:
        """The message for reading by offset, None when it is gone. `partial`: the caller reads parts
        of it only (a FETCH section or partial range), which a store may then fetch alone."""
        ...
    def internal_date(self, name: str, row: MessageRow) -> int: ...
    def cache_get(self, name: str, uids: Sequence[int], kind: str) -> dict[int, bytes]: ...
    def cache_put(self, name: str, items: Sequence[tuple[int, str, bytes]]) -> None: ...
    def flush_meta(self) -> None: ...
    def text_search(self, name: str, queries: Sequence[tuple[str, str]]
                    ) -> tuple[list[set[int]], set[int]] | None: ...

    # -- writing
    def append(self, name: str, data: bytes, flag_names: Sequence[str] = (),
               internal_date: float | None = None) -> tuple[int, int]: ...
    def spool(self) -> SpoolFile: ...
    def append_many(self, name: str, messages: Sequence[tuple[bytes | SpoolFile, Sequence[str], float | None]]
                    ) -> tuple[int, list[int]]: ...
    def store(self, name: str, uids: Iterable[int], mode: str, flag_names: Sequence[str],
              unchangedsince: int | None = None) -> StoreResult: ...
    def expunge(self, name: str, uids: Iterable[int] | None = None) -> list[int]: ...
    def copy(self, src: str, uids: Iterable[int], dst: str) -> CopyResult: ...
    def move(self, src: str, uids: Iterable[int], dst: str) -> CopyResult: ...
    def delivery_suffix(self, name: str, flag_names: Sequence[str]) -> str: ...
    def import_with_uids(self, name: str, uidvalidity: int, uidnext: int,
                         messages: Iterable[tuple[int, bytes | SpoolFile, Sequence[str], float | None]]) -> bool: ...
    def quota_usage(self) -> Usage: ...

    # -- POP3 (RFC 1939): the INBOX as a numbered list
    def pop_listing(self) -> tuple[list[PopMessage], int]: ...
    def mark_seen(self, uids: Iterable[int]) -> None: ...
    def pop_delete(self, uids: Sequence[int], uidvalidity: int) -> bool: ...


class Notifier(Protocol):
    """Change notification between sessions (IMAP IDLE; RFC 2177)."""

    def watch(self, address: str, folder: str, path: Path | None,
              callback: Callable[[], None]) -> Callable[[], None]: ...
    def notify(self, address: str, folder: str) -> None: ...


class MailStoreAPI(Protocol):
    """Every user's mailboxes for one process."""

    @property
    def notifier(self) -> Notifier: ...
    def acquire(self, user: User) -> Mailboxes: ...
    def release(self, mb: Mailboxes) -> None: ...
    def call[T](self, fn: Callable[..., T], *args: Any) -> Awaitable[T]: ...
    def release_later(self, mb: Mailboxes) -> None: ...
    def lock_maildrop(self, user: User) -> Callable[[], None] | None:
        """POP3's exclusive maildrop lock (blocking): its release function (blocking too), or None
        when another session holds it."""
