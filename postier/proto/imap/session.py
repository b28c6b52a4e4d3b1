"""The IMAP session's rules without sockets or disk (RFC 9051 §3, §5.2, §7.5.1; RFC 7162; RFC 5182).

`SessionCore` holds what one connection has told its client and decides what it may tell next: the
connection state and the commands legal in it (`states.COMMANDS_BY_STATE`), the capabilities per
state, the enabled extensions (IMAP4rev2, CONDSTORE, QRESYNC), and the selected mailbox as this
session announced it (`Selected`: its UID array, so sequence numbers stay stable between notification
points, \\Recent, SEARCHRES's saved result). The driver (`server/imap.py`) asks the mail store for
the facts (a `FolderView`, flag changes) and writes the bytes the core returns; the core never waits.

The update rules: changes made elsewhere reach the client at notification points as EXISTS,
EXPUNGE (VANISHED under QRESYNC, RFC 7162 §3.2.10) and FETCH FLAGS; an EXPUNGE is never sent while
answering FETCH, STORE or SEARCH by sequence number (RFC 9051 §7.5.1; the UID variants allow it),
so then only new messages are added to the view. A session's own flag changes are not echoed back.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from . import response as R
from .response import Atom, Code, ResponseCode
from .seqset import SequenceSet
from .states import State, allowed

__all__ = [
    "BASE_CAPABILITIES", "NOT_RECENT", "PERMANENT_FLAGS", "FlagChange", "FolderView", "MailboxGone", "Refusal",
    "Selected", "SessionCore", "SessionSettings", "Sync",
]

#: UIDs at or above this are \Recent: no message ever is (IMAP4rev2 has no \Recent).
NOT_RECENT = 1 << 32
PERMANENT_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_SYSTEM_UPPER = frozenset(f.upper() for f in PERMANENT_FLAGS)
#: Capabilities after login (RFC 9051 §7.2.2), APPENDLIMIT added with its value.
BASE_CAPABILITIES = (
    "ID", "ENABLE", "IDLE", "NAMESPACE", "UNSELECT", "UIDPLUS", "MOVE", "SPECIAL-USE",
    "CREATE-SPECIAL-USE", "LIST-EXTENDED", "LIST-STATUS", "ESEARCH", "SEARCHRES", "LITERAL+",
    "CHILDREN", "CONDSTORE", "QRESYNC", "BINARY", "STATUS=SIZE", "SASL-IR",
    "SORT", "SORT=DISPLAY", "THREAD=ORDEREDSUBJECT", "THREAD=REFERENCES", "ESORT",  # RFC 5256, 5957, 5267
    "MULTIAPPEND", "CATENATE",  # RFC 3502, RFC 4469
    "UTF8=ACCEPT",  # RFC 6855
    "WITHIN",  # RFC 5032
    "NOTIFY",  # RFC 5465
)

#: RFC 9208 §3.1, §5: the QUOTA extension and the resources counted (store/quota.py).
QUOTA_CAPABILITIES = ("QUOTA", "QUOTA=RES-STORAGE")


class Refusal(Exception):
    """A rule refuses the command: the driver answers `status` (NO or BAD) with `text` and `code`."""

    def __init__(self, status: str, text: str, code: ResponseCode | None = None):
        super().__init__(text)
        self.status = status
        self.text = text
        self.code = code


class MailboxGone(Exception):
    """The selected mailbox was deleted or replaced (UIDVALIDITY changed): the session must end
    with this text in a BYE (RFC 9051 §7.1.5 allows no other way to renumber the client)."""


@dataclass(frozen=True, slots=True)
class SessionSettings:
    starttls_ok: bool  # a certificate is there and this listener offers STARTTLS
    allow_plaintext: bool  # auth.allow_plaintext: log in without TLS (tests, trusted networks)
    appendlimit: int  # RFC 7889
    auth_mechanisms: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN")


@dataclass(frozen=True, slots=True)
class FolderView:
    """What the store says a folder is now; `uids` is shared, never changed in place, and `version`
    changes whenever it is replaced."""

    uidvalidity: int
    uids: array[int]
    version: int
    highestmodseq: int
    keywords: tuple[str, ...] = ()  # every keyword the folder knows (RFC 9051 §7.3.5 FLAGS)


@dataclass(frozen=True, slots=True)
class FlagChange:
    uid: int
    flags: tuple[str, ...]  # flag names, \Recent excluded
    modseq: int


@dataclass(slots=True)
class Selected:
    """The selected mailbox as this session announced it."""

    name: str
    readonly: bool
    uidvalidity: int
    uids: array[int]  # sequence number n is uids[n - 1]
    version: int
    modseq_seen: int
    recent_from: int  # UIDs at or above it are \Recent for this session (IMAP4rev1 only)
    own: dict[int, int] = field(default_factory=dict)  # uid -> modseq of our own flag changes
    saved: list[int] | None = None  # RFC 5182 SEARCHRES, as UIDs
    keywords: tuple[str, ...] = ()  # announced in FLAGS


@dataclass(slots=True)
class Sync:
    """The outcome of `SessionCore.sync`: responses to send and what else the driver must ask."""

    out: list[bytes]
    grew: bool  # new messages were announced (IMAP4rev1: claim \Recent, then `recent()`)
    old_max: int  # the highest UID announced before
    flags_since: int | None  # ask the store for flag changes after this MODSEQ, then `flag_updates()`


class SessionCore:
    """One IMAP connection's state and rules (see the module docstring)."""

    def __init__(self, settings: SessionSettings, tls: bool = False):
        self.settings = settings
        self.tls = tls
        self.state = State.NOT_AUTHENTICATED
        self.rev2 = False  # ENABLE IMAP4rev2 (RFC 9051 §6.3.1): UTF-8 names, no \Recent
        self.utf8_accept = False  # ENABLE UTF8=ACCEPT (RFC 6855 §3): UTF-8 names and strings
        self.condstore = False  # RFC 7162 §3.1: enabled explicitly or by a CONDSTORE-using command
        self.qresync = False
        self.sel: Selected | None = None

    # -- state, legal commands and capabilities -------------------------------------------------

    @property
    def utf8(self) -> bool:
        """Mailbox names and quoted strings are UTF-8, not modified UTF-7 and 7-bit (RFC 9051 §5.1
        once IMAP4rev2 is enabled, RFC 6855 §3 once UTF8=ACCEPT is)."""
        return self.rev2 or self.utf8_accept

    @property
    def auth_allowed(self) -> bool:
        """LOGIN and AUTHENTICATE are possible now (RFC 9051 §6.2.3: not in clear text)."""
        return self.tls or self.settings.allow_plaintext

    def capabilities(self) -> list[str]:
        """RFC 9051 §7.2.2, for the current state: before login only what a client needs to log in."""
        caps = ["IMAP4rev1", "IMAP4rev2"]
        if self.state is State.NOT_AUTHENTICATED:
            if self.settings.starttls_ok and not self.tls:
                caps.append("STARTTLS")
            if self.auth_allowed:
                caps += [f"AUTH={m}" for m in self.settings.auth_mechanisms]
            else:
                caps.append("LOGINDISABLED")  # RFC 9051 §6.2.3
            caps += ["SASL-IR", "ID", "ENABLE", "LITERAL+"]
            return caps
        caps += BASE_CAPABILITIES
        caps.insert(caps.index("CHILDREN") + 1, f"APPENDLIMIT={self.settings.appendlimit}")
        caps += QUOTA_CAPABILITIES
        return caps

    def refusal(self, command_name: str) -> str | None:
        """None when the command is legal in the current state, else why not (for a BAD)."""
        if allowed(self.state, command_name):
            return None
        if self.state is State.NOT_AUTHENTICATED:
            return "log in first"
        return "select a mailbox first" if self.state is State.AUTHENTICATED else "not allowed now"

    def tls_started(self) -> None:
        self.tls = True

    def logged_in(self) -> None:
        self.state = State.AUTHENTICATED

    def enable(self, capabilities: Iterable[str]) -> bytes:
        """RFC 5161 ENABLE: the untagged ENABLED listing what was newly enabled."""
        done = []
        for cap in capabilities:
            if cap == "CONDSTORE" and not self.condstore:
                self.condstore = True
                done.append(cap)
            elif cap == "QRESYNC" and not self.qresync:  # RFC 7162 §3.2.3: implies CONDSTORE
                self.qresync = self.condstore = True
                done.append(cap)
            elif cap == "IMAP4REV2" and not self.rev2:
                self.rev2 = True
                done.append("IMAP4rev2")
            elif cap == "UTF8=ACCEPT" and not self.utf8_accept:  # RFC 6855 §3
                self.utf8_accept = True
                done.append(cap)
        return R.enabled(done)

    # -- selecting ------------------------------------------------------------------------------

    def leave(self) -> list[bytes]:
        """SELECT/EXAMINE while a mailbox is selected closes it first (RFC 7162 §3.2.11 CLOSED)."""
        if self.sel is None:
            return []
        self.deselect()
        return [R.untagged_status("OK", "Previous mailbox closed", Code.CLOSED)] if self.rev2 or self.condstore else []

    def deselect(self) -> None:
        """CLOSE, UNSELECT, or a failed SELECT: back to the authenticated state."""
        self.sel = None
        self.state = State.AUTHENTICATED

    def select(self, name: str, readonly: bool, view: FolderView, *, uidnext: int, keywords: Sequence[str],
               recent_from: int, first_unseen: int | None) -> list[bytes]:
        """Enter the selected state; the untagged responses of SELECT/EXAMINE (RFC 9051 §6.3.2)."""
        if self.rev2:
            recent_from = NOT_RECENT  # IMAP4rev2 has no \Recent
        uids = view.uids
        out = _flags_responses(tuple(keywords), readonly)
        out.append(R.exists(len(uids)))
        if not self.rev2:
            out.append(R.recent(len(uids) - bisect_left(uids, recent_from)))
            if first_unseen is not None:
                i = bisect_left(uids, first_unseen)
                if i < len(uids):
                    out.append(R.untagged_status("OK", "First unseen", Code.unseen(i + 1)))
        out.append(R.untagged_status("OK", "UIDs valid", Code.uidvalidity(view.uidvalidity)))
        out.append(R.untagged_status("OK", "Predicted next UID", Code.uidnext(uidnext)))
        out.append(R.untagged_status("OK", "Highest", Code.highestmodseq(view.highestmodseq)))
        self.sel = Selected(name, readonly, view.uidvalidity, uids, view.version, view.highestmodseq, recent_from,
                            keywords=tuple(keywords))
        self.state = State.SELECTED
        return out

    def use_condstore(self) -> list[bytes]:
        """A CONDSTORE-enabling command (RFC 7162 §3.1: FETCH/SEARCH with MODSEQ, STORE with
        UNCHANGEDSINCE, STATUS HIGHESTMODSEQ...). Turned on while a mailbox is selected, the client
        learns the mailbox's HIGHESTMODSEQ at once (the untagged OK to send)."""
        if self.condstore:
            return []
        self.condstore = True
        if self.sel is None:
            return []
        return [R.untagged_status("OK", "Highest", Code.highestmodseq(self.sel.modseq_seen))]

    def keywords_known(self, keywords: Sequence[str]) -> list[bytes]:
        """The folder's keywords now: a keyword used for the first time is announced in FLAGS (and
        PERMANENTFLAGS) before any FETCH shows it (RFC 9051 §7.3.5, §7.1 PERMANENTFLAGS)."""
        sel = self.selected()
        kws = tuple(keywords)
        if not set(kws) - set(sel.keywords):
            return []
        sel.keywords = tuple(dict.fromkeys((*sel.keywords, *kws)))
        return _flags_responses(sel.keywords, sel.readonly)

    def selected(self) -> Selected:
        sel = self.sel
        if sel is None:  # the state table lets only selected-state commands get here
            raise Refusal("BAD", "No mailbox selected", Code.CLIENTBUG)
        return sel

    def writable(self) -> Selected:
        """The selected mailbox, refusing a read-only one (EXAMINE)."""
        sel = self.selected()
        if sel.readonly:
            raise Refusal("NO", "Mailbox is read-only", Code.READ_ONLY)
        return sel

    # -- \Recent, sequence sets -----------------------------------------------------------------

    def recent_from(self) -> int:
        """UIDs at or above this are \\Recent for this session (never, in IMAP4rev2)."""
        sel = self.sel
        if sel is None or self.rev2:
            return NOT_RECENT
        return sel.recent_from

    def targets(self, sset: SequenceSet, uid: bool) -> list[tuple[int, int]]:
        """(seq, uid) pairs the set names, in order (RFC 9051 §9 sequence-set; RFC 5182 "$")."""
        sel = self.selected()
        view = sel.uids
        if sset.saved:
            if sel.saved is None:
                return []
            out = []
            for u in sel.saved:
                i = bisect_left(view, u)
                if i < len(view) and view[i] == u:
                    out.append((i + 1, u))
            return out
        if not view:
            if not uid and sset.max_number() > 0:
                raise Refusal("BAD", "Invalid message sequence number (the mailbox is empty)", Code.CLIENTBUG)
            return []
        if uid:
            res: list[tuple[int, int]] = []
            for a, b in sset.resolve(view[-1]):
                i, j = bisect_left(view, a), bisect_right(view, b)
                res.extend((k + 1, view[k]) for k in range(i, j))
            return res
        n = len(view)
        if sset.max_number() > n:
            raise Refusal("BAD", "Invalid message sequence number", Code.CLIENTBUG)  # RFC 9051 §7.1.5
        return [(s, view[s - 1]) for a, b in sset.resolve(n) for s in range(max(a, 1), min(b, n) + 1)]

    def covers_all(self, sset: SequenceSet, uid: bool) -> bool:
        """True when the set names every message of the (non-empty) view, e.g. 1:* or UID 1:*."""
        view = self.selected().uids
        if sset.saved or not view:
            return False
        if uid:
            return any(a <= view[0] and b >= view[-1] for a, b in sset.resolve(view[-1]))
        n = len(view)
        return sset.max_number() <= n and any(a <= 1 and b >= n for a, b in sset.resolve(n))

    def save(self, uids: list[int]) -> None:
        """RFC 5182 SEARCH RETURN (SAVE)."""
        self.selected().saved = uids

    def search_responses(self, tag: str, uid: bool, matches: Sequence[tuple[int, int, int]],
                         returns: Sequence[str] | None, with_modseq: bool) -> list[bytes]:
        """SEARCH's answer for `matches` ((seq, uid, modseq) in order): SEARCH for an IMAP4rev1
        client without RETURN, else ESEARCH (RFC 4731, RFC 9051 §7.3.4); RETURN (SAVE) keeps the
        result for "$" (RFC 5182). `with_modseq`: the criteria used MODSEQ (RFC 7162 §3.1.5)."""
        ids = [u if uid else s for s, u, _m in matches]
        if returns is not None and "SAVE" in returns:
            self.save([u for _s, u, _m in matches])
        if returns is None and not self.rev2:
            top = max((m for _s, _u, m in matches), default=None) if with_modseq else None
            return [R.search(ids, top)]
        opts = set(returns or ("ALL",))
        if opts == {"SAVE"}:
            return []  # RFC 5182 §2.4: SAVE alone gives no ESEARCH response
        if not opts - {"SAVE"}:
            opts.add("ALL")
        modseq = None
        if with_modseq and matches:
            if opts & {"ALL", "COUNT"}:
                modseq = max(m for _s, _u, m in matches)
            else:  # RFC 4731 §3.2: MIN/MAX alone: the MODSEQ of the message(s) they return
                picked = [matches[0][2]] if "MIN" in opts else []
                modseq = max(picked + ([matches[-1][2]] if "MAX" in opts else []))
        return [R.esearch(
            tag, uid=uid,
            min=min(ids) if ids and "MIN" in opts else None,
            max=max(ids) if ids and "MAX" in opts else None,
            all=SequenceSet.from_ids(ids) if ids and "ALL" in opts else None,
            count=len(ids) if "COUNT" in opts else None,
            modseq=modseq,
        )]

    def store_flags(self, flags: Iterable[str]) -> list[str]:
        """STORE's flag list as the store takes it: \\Recent dropped (the server sets it, RFC 9051
        §2.3.2), an unknown system flag refused (only keywords may be invented, §2.3.2)."""
        out = [f for f in flags if f.upper() != "\\RECENT"]
        for f in out:
            if f.startswith("\\") and f.upper() not in _SYSTEM_UPPER:
                raise Refusal("BAD", f"Unknown system flag {f}", Code.CLIENTBUG)
        return out

    def store_answer(self, targets: Sequence[tuple[int, int]], changed: Mapping[int, tuple[Sequence[str], int]],
                     unchanged: Mapping[int, tuple[Sequence[str], int]], conflicts: Sequence[int], modseq: int,
                     *, silent: bool, uid: bool) -> tuple[list[bytes], ResponseCode | None]:
        """STORE's untagged FETCHes and tagged code (RFC 9051 §6.4.6, RFC 7162 §3.1.3). `changed` and
        `unchanged` map UID -> (flags, MODSEQ) after the command; a message whose flags were already
        so is reported like a changed one (unless .SILENT). Records the changes as this session's own."""
        self.own_changes(dict.fromkeys(changed, modseq))
        seq_of = {u: s for s, u in targets}
        report = dict(changed)
        if not silent:
            report.update(unchanged)
        out = []
        if not silent or self.condstore:  # .SILENT under CONDSTORE: MODSEQ of the changed ones only
            for u in sorted(report, key=lambda x: seq_of.get(x, 0)):
                names, ms = report[u]
                out.append(self.flag_fetch(seq_of[u], u, names, ms, self.condstore, silent_flags=silent))
        code = None
        if conflicts:
            ids = list(conflicts) if uid else [seq_of[u] for u in conflicts]
            code = Code.modified(SequenceSet.from_ids(ids))
        return out, code

    # -- updates --------------------------------------------------------------------------------

    def flag_fetch(self, seq: int, uid: int, flags: Sequence[str], modseq: int, with_modseq: bool,
                   silent_flags: bool = False) -> bytes:
        """An untagged FETCH of a message's flags (an update, or STORE's answer)."""
        names = list(flags)
        sel = self.sel
        if sel is not None and not self.rev2 and uid >= sel.recent_from:
            names.append("\\Recent")
        items: list[tuple[str, R.Value]] = [("UID", uid)]
        if not silent_flags:
            items.append(("FLAGS", tuple(Atom(n) for n in names)))
        if with_modseq:
            items.append(("MODSEQ", R.Raw(b"(%d)" % modseq)))
        return R.fetch(seq, items)

    def own_changes(self, changes: Mapping[int, int]) -> None:
        """This session changed these messages' flags (uid -> new MODSEQ) and told its client so:
        no update for them at the next notification point."""
        self.selected().own.update(changes)

    def sync(self, view: FolderView, allow_expunge: bool) -> Sync:
        """A notification point: compare the store's view of the folder with what was announced.
        Raises MailboxGone when the folder was replaced."""
        sel = self.selected()
        if view.uidvalidity != sel.uidvalidity:
            raise MailboxGone("Selected mailbox was replaced (UIDVALIDITY changed)")
        out = self.keywords_known(view.keywords)
        old = sel.uids
        old_max = old[-1] if old else 0
        grew = False
        if view.uids is not old and view.version != sel.version:
            cur = view.uids
            n = len(old)
            if len(cur) >= n and cur[:n] == old:
                gone: list[int] = []
            else:
                present = set(cur)
                gone = [u for u in old if u not in present]
            announced = 0
            new = old
            if not gone or allow_expunge:
                if gone:
                    out += self._expunges(old, gone)
                    announced = len(gone)
                new = cur
                sel.version = view.version
            else:  # expunges must wait (RFC 9051 §7.5.1): add only the new messages
                i = bisect_right(cur, old_max)
                if i < len(cur):
                    new = array("I", old)
                    new.extend(cur[i:])
            expected = len(old) - announced
            sel.uids = new
            if len(new) > expected:
                out.append(R.exists(len(new)))
                grew = True
        flags_since = sel.modseq_seen if view.highestmodseq > sel.modseq_seen else None
        return Sync(out, grew, old_max, flags_since)

    def recent(self, claimed_from: int | None, old_max: int) -> bytes | None:
        """After new messages (IMAP4rev1): the RECENT count. `claimed_from` is the lowest UID this
        session claimed as \\Recent (RFC 3501 §2.3.2), None when it claims none (read-only)."""
        sel = self.selected()
        if self.rev2:
            return None
        if claimed_from is not None:
            claimed_from = max(claimed_from, old_max + 1)
            if sel.recent_from > old_max:  # none announced was \Recent: only what we claimed now is
                sel.recent_from = claimed_from
            else:  # one threshold: messages another session claimed in between count too (rare)
                sel.recent_from = min(sel.recent_from, claimed_from)
        return R.recent(len(sel.uids) - bisect_left(sel.uids, sel.recent_from))

    def flag_updates(self, changes: Iterable[FlagChange], highestmodseq: int) -> list[bytes]:
        """FETCH FLAGS for messages changed elsewhere since the last notification point (those still
        in the view; not this session's own changes), MODSEQ added under CONDSTORE."""
        sel = self.selected()
        top = highestmodseq
        out = []
        for c in changes:
            top = max(top, c.modseq)
            if sel.own.get(c.uid) == c.modseq:
                continue
            i = bisect_left(sel.uids, c.uid)
            if i < len(sel.uids) and sel.uids[i] == c.uid:
                out.append(self.flag_fetch(i + 1, c.uid, c.flags, c.modseq, self.condstore))
        sel.modseq_seen = top
        sel.own.clear()
        return out

    def _expunges(self, view: array[int], gone: list[int]) -> list[bytes]:
        sel = self.selected()
        if sel.saved is not None:
            gs = set(gone)
            sel.saved = [u for u in sel.saved if u not in gs]
        if self.qresync:
            return [R.vanished(SequenceSet.from_ids(gone))]  # RFC 7162 §3.2.10
        gone_set = set(gone)
        seqs = [i + 1 for i, u in enumerate(view) if u in gone_set]
        return [R.expunge(s) for s in reversed(seqs)]  # from the end, so earlier numbers stay valid


def _flags_responses(keywords: tuple[str, ...], readonly: bool) -> list[bytes]:
    out = [R.flags((*PERMANENT_FLAGS, *keywords))]
    if readonly:
        out.append(R.untagged_status("OK", "No permanent flags", Code.permanentflags(())))
    else:
        out.append(R.untagged_status("OK", "Flags permitted",
                                     Code.permanentflags((*PERMANENT_FLAGS, *keywords, "\\*"))))
    return out
