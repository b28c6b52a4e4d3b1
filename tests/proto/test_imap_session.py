"""Transcript tests of the sans-IO IMAP session core (proto/imap/session.py): states and legal commands,
capabilities per state, SELECT's responses, sequence-set targets, and the update rules between two
sessions over one in-memory folder (RFC 9051 §7.5.1, RFC 7162, RFC 5182)."""

from __future__ import annotations

from array import array

import pytest

from postier.proto.imap.seqset import SequenceSet
from postier.proto.imap.session import (
    NOT_RECENT,
    FlagChange,
    FolderView,
    MailboxGone,
    Refusal,
    SessionCore,
    SessionSettings,
)
from postier.proto.imap.states import State

SETTINGS = SessionSettings(starttls_ok=True, allow_plaintext=False, appendlimit=1000)


class Folder:
    """An in-memory folder with what a store would tell the sessions (UIDs, MODSEQs, flags)."""

    def __init__(self, n: int = 0, uidvalidity: int = 7):
        self.uidvalidity = uidvalidity
        self.uids = array("I")
        self.version = 1
        self.modseq = 1
        self.flags: dict[int, tuple[tuple[str, ...], int]] = {}
        self.next_uid = 1
        self.recent_claimed = 1
        self.append(n)

    def view(self) -> FolderView:
        return FolderView(self.uidvalidity, self.uids, self.version, self.modseq)

    def append(self, n: int) -> None:
        if n:
            a = array("I", self.uids)  # replaced, never changed in place (as the store does)
            a.extend(range(self.next_uid, self.next_uid + n))
            self.uids = a
            self.next_uid += n
            self.version += 1
            self.modseq += 1

    def expunge(self, uids: list[int]) -> None:
        self.uids = array("I", [u for u in self.uids if u not in uids])
        self.version += 1
        self.modseq += 1

    def set_flags(self, uid: int, *names: str) -> int:
        self.modseq += 1
        self.flags[uid] = (names, self.modseq)
        return self.modseq

    def changed_since(self, modseq: int, max_uid: int) -> list[FlagChange]:
        return [FlagChange(u, f, m) for u, (f, m) in sorted(self.flags.items()) if m > modseq and u <= max_uid]

    def claim_recent(self) -> int:
        first, self.recent_claimed = self.recent_claimed, self.next_uid
        return first


def logged_in(rev2: bool = False, qresync: bool = False) -> SessionCore:
    core = SessionCore(SETTINGS, tls=True)
    core.logged_in()
    if rev2:
        core.enable(["IMAP4REV2"])
    if qresync:
        core.enable(["QRESYNC"])
    return core


def select(core: SessionCore, folder: Folder, readonly: bool = False) -> list[bytes]:
    recent_from = folder.claim_recent() if not readonly else folder.recent_claimed
    return core.select("INBOX", readonly, folder.view(), uidnext=folder.next_uid, keywords=("Work",),
                       recent_from=recent_from, first_unseen=None)


def notify(core: SessionCore, folder: Folder, allow_expunge: bool = True) -> list[bytes]:
    """What the driver does at a notification point, against the in-memory folder."""
    res = core.sync(folder.view(), allow_expunge)
    out = list(res.out)
    sel = core.sel
    assert sel is not None
    if res.grew:
        line = core.recent(None if sel.readonly else folder.claim_recent(), res.old_max)
        if line is not None:
            out.append(line)
    if res.flags_since is not None:
        out += core.flag_updates(folder.changed_since(res.flags_since, res.old_max), folder.modseq)
    return out


# -- states, commands, capabilities ------------------------------------------------------------------

def test_capabilities_per_state() -> None:
    core = SessionCore(SETTINGS)
    caps = core.capabilities()
    assert "STARTTLS" in caps and "LOGINDISABLED" in caps and not any(c.startswith("AUTH=") for c in caps)
    assert not core.auth_allowed
    core.tls_started()
    caps = core.capabilities()
    assert "STARTTLS" not in caps and "LOGINDISABLED" not in caps
    assert [c for c in caps if c.startswith("AUTH=")] == ["AUTH=SCRAM-SHA-256", "AUTH=PLAIN", "AUTH=LOGIN"]
    core.logged_in()
    caps = core.capabilities()
    assert "APPENDLIMIT=1000" in caps and "CONDSTORE" in caps and "IDLE" in caps
    assert not any(c.startswith("AUTH=") for c in caps)
    plain = SessionCore(SessionSettings(starttls_ok=False, allow_plaintext=True, appendlimit=1))
    assert "AUTH=PLAIN" in plain.capabilities() and "STARTTLS" not in plain.capabilities()


@pytest.mark.parametrize(("state", "command", "hint"), [
    (State.NOT_AUTHENTICATED, "SELECT", "log in first"),
    (State.NOT_AUTHENTICATED, "LOGIN", None),
    (State.NOT_AUTHENTICATED, "CAPABILITY", None),
    (State.AUTHENTICATED, "FETCH", "select a mailbox first"),
    (State.AUTHENTICATED, "LOGIN", "select a mailbox first"),
    (State.AUTHENTICATED, "ENABLE", None),
    (State.SELECTED, "ENABLE", "not allowed now"),  # RFC 5161 §3.1: authenticated state only
    (State.SELECTED, "STARTTLS", "not allowed now"),
    (State.SELECTED, "STORE", None),
    (State.SELECTED, "SELECT", None),
])
def test_legal_commands_per_state(state: State, command: str, hint: str | None) -> None:
    core = SessionCore(SETTINGS)
    core.state = state
    assert core.refusal(command) == hint


def test_enable_reports_only_what_is_new() -> None:
    core = logged_in()
    assert core.enable(["QRESYNC"]) == b"* ENABLED QRESYNC\r\n"
    assert core.condstore and core.qresync  # RFC 7162 §3.2.3
    assert core.enable(["CONDSTORE", "QRESYNC", "X-UNKNOWN"]) == b"* ENABLED\r\n"
    assert core.enable(["IMAP4REV2"]) == b"* ENABLED IMAP4rev2\r\n" and core.rev2


# -- SELECT --------------------------------------------------------------------------------------------

def test_select_transcript_rev1() -> None:
    folder = Folder(3)
    core = logged_in()
    out = core.select("INBOX", False, folder.view(), uidnext=4, keywords=("Work",), recent_from=2, first_unseen=3)
    assert out == [
        b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft Work)\r\n",
        b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft Work \\*)] Flags permitted\r\n",
        b"* 3 EXISTS\r\n",
        b"* 2 RECENT\r\n",
        b"* OK [UNSEEN 3] First unseen\r\n",
        b"* OK [UIDVALIDITY 7] UIDs valid\r\n",
        b"* OK [UIDNEXT 4] Predicted next UID\r\n",
        b"* OK [HIGHESTMODSEQ 2] Highest\r\n",
    ]
    assert core.state is State.SELECTED and core.recent_from() == 2


def test_select_rev2_and_readonly() -> None:
    folder = Folder(2)
    core = logged_in(rev2=True)
    out = select(core, folder, readonly=True)
    assert b"* OK [PERMANENTFLAGS ()] No permanent flags\r\n" in out
    assert not any(b"RECENT" in x or b"UNSEEN" in x for x in out)  # IMAP4rev2: no \Recent
    assert core.recent_from() == NOT_RECENT
    with pytest.raises(Refusal) as r:
        core.writable()
    assert r.value.status == "NO" and r.value.code is not None and r.value.code.atom == "READ-ONLY"


def test_reselect_sends_closed_only_with_condstore_or_rev2() -> None:
    folder = Folder(1)
    core = logged_in()
    select(core, folder)
    assert core.leave() == []
    core.enable(["CONDSTORE"])
    select(core, folder)
    assert core.leave() == [b"* OK [CLOSED] Previous mailbox closed\r\n"]  # RFC 7162 §3.2.11
    assert core.state is State.AUTHENTICATED


# -- sequence sets -----------------------------------------------------------------------------------

def test_targets() -> None:
    folder = Folder(5)
    folder.expunge([2, 4])  # UIDs 1 3 5
    core = logged_in()
    select(core, folder)
    assert core.targets(SequenceSet.parse("2:*"), uid=False) == [(2, 3), (3, 5)]
    assert core.targets(SequenceSet.parse("2:4"), uid=True) == [(2, 3)]
    assert core.targets(SequenceSet.parse("*"), uid=True) == [(3, 5)]
    assert core.targets(SequenceSet.parse("99:*"), uid=True) == [(3, 5)]  # RFC 9051 §9: n:* with n > max
    with pytest.raises(Refusal) as r:
        core.targets(SequenceSet.parse("4"), uid=False)
    assert r.value.status == "BAD"
    assert core.targets(SequenceSet.parse("$"), uid=False) == []  # nothing saved yet
    core.save([5, 1])
    assert core.targets(SequenceSet.parse("$"), uid=True) == [(3, 5), (1, 1)]
    assert core.covers_all(SequenceSet.parse("1:*"), uid=False)
    assert not core.covers_all(SequenceSet.parse("2:*"), uid=False)


def test_targets_in_an_empty_mailbox() -> None:
    core = logged_in()
    select(core, Folder(0))
    assert core.targets(SequenceSet.parse("1:*"), uid=True) == []
    with pytest.raises(Refusal):
        core.targets(SequenceSet.parse("1"), uid=False)


# -- two sessions, one folder: the update rules -----------------------------------------------------

def test_new_messages_reach_the_other_session_with_recent() -> None:
    folder = Folder(2)
    a, b = logged_in(), logged_in()
    select(a, folder)
    select(b, folder)
    folder.append(2)  # a APPENDs two messages
    assert notify(a, folder) == [b"* 4 EXISTS\r\n", b"* 4 RECENT\r\n"]  # a claims them (and had 1, 2)
    assert notify(b, folder) == [b"* 4 EXISTS\r\n", b"* 0 RECENT\r\n"]  # b sees them, not as \Recent
    assert notify(b, folder) == []  # nothing twice


def test_no_expunge_during_fetch_store_search_by_number() -> None:
    folder = Folder(4)
    a, b = logged_in(), logged_in()
    select(a, folder)
    select(b, folder)
    folder.expunge([2])  # a expunges message 2
    folder.append(1)  # and a new one arrives (UID 5)
    # b answers FETCH 1:* (by number): the expunge waits, the new message is added at the end
    assert notify(b, folder, allow_expunge=False) == [b"* 5 EXISTS\r\n", b"* 1 RECENT\r\n"]  # b saw it first
    assert b.targets(SequenceSet.parse("2"), uid=False) == [(2, 2)]  # still numbered
    # the next notification point where expunges are allowed announces it (seq 2), and only it
    assert notify(b, folder) == [b"* 2 EXPUNGE\r\n"]
    assert b.targets(SequenceSet.parse("*"), uid=False) == [(4, 5)]


def test_expunges_are_sent_from_the_end_and_vanished_under_qresync() -> None:
    folder = Folder(6)
    a, b = logged_in(), logged_in(qresync=True)
    select(a, folder)
    select(b, folder)
    folder.expunge([2, 3, 5])
    assert notify(a, folder) == [b"* 5 EXPUNGE\r\n", b"* 3 EXPUNGE\r\n", b"* 2 EXPUNGE\r\n"]
    assert notify(b, folder) == [b"* VANISHED 2:3,5\r\n"]  # RFC 7162 §3.2.10


def test_flag_changes_of_others_are_announced_own_are_not() -> None:
    folder = Folder(3)
    a, b = logged_in(), logged_in()
    b.enable(["CONDSTORE"])
    select(a, folder)
    select(b, folder)
    m = folder.set_flags(2, "\\Seen")
    a.own_changes({2: m})  # a's STORE already answered with a FETCH
    assert notify(a, folder) == []
    assert notify(b, folder) == [b"* 2 FETCH (UID 2 FLAGS (\\Seen) MODSEQ (%d))\r\n" % m]  # CONDSTORE: MODSEQ
    assert notify(b, folder) == []


def test_flag_update_of_an_expunge_not_yet_announced_is_kept_by_number() -> None:
    folder = Folder(3)
    a, b = logged_in(rev2=True), logged_in(rev2=True)
    select(a, folder)
    select(b, folder)
    folder.set_flags(3, "\\Flagged")
    folder.expunge([1])
    out = notify(b, folder, allow_expunge=False)
    assert out == [b"* 3 FETCH (UID 3 FLAGS (\\Flagged))\r\n"]  # numbered as the client knows it
    assert notify(b, folder) == [b"* 1 EXPUNGE\r\n"]


def test_saved_search_loses_expunged_messages() -> None:
    folder = Folder(4)
    core = logged_in()
    select(core, folder)
    core.save([1, 2, 4])
    folder.expunge([2])
    notify(core, folder)
    assert core.sel is not None and core.sel.saved == [1, 4]


def test_replaced_mailbox_ends_the_session() -> None:
    folder = Folder(2)
    core = logged_in()
    select(core, folder)
    folder.uidvalidity += 1
    with pytest.raises(MailboxGone):
        core.sync(folder.view(), True)


def test_store_answer_and_recent_flag() -> None:
    folder = Folder(2)
    core = logged_in()
    select(core, folder)  # both messages are \Recent for this session
    assert core.flag_fetch(1, 1, ("\\Seen",), 9, with_modseq=False) == b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))\r\n"
    assert core.flag_fetch(1, 1, ("\\Seen",), 9, with_modseq=True, silent_flags=True) == \
        b"* 1 FETCH (UID 1 MODSEQ (9))\r\n"


# -- keywords, CONDSTORE, SEARCH answers -------------------------------------------------------------

def test_first_use_of_a_keyword_is_announced_before_the_fetch() -> None:
    folder = Folder(1)
    a, b = logged_in(), logged_in()
    select(a, folder)
    select(b, folder)
    assert a.keywords_known(("Work",)) == []  # announced at SELECT
    out = a.keywords_known(("Work", "Later"))
    assert out[0] == b"* FLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft Work Later)\r\n"
    assert b"PERMANENTFLAGS (" in out[1] and b"Later \\*)" in out[1]
    folder.set_flags(1, "Later")
    view = FolderView(folder.uidvalidity, folder.uids, folder.version, folder.modseq, ("Work", "Later"))
    res = b.sync(view, True)
    assert res.out[0].startswith(b"* FLAGS (") and b"Later" in res.out[0]  # before b's FETCH update
    assert res.flags_since is not None


def test_condstore_turned_on_while_selected_reports_highestmodseq() -> None:
    folder = Folder(2)
    core = logged_in()
    assert core.use_condstore() == []  # nothing selected: nothing to say
    core = logged_in()
    select(core, folder)
    assert core.use_condstore() == [b"* OK [HIGHESTMODSEQ %d] Highest\r\n" % folder.modseq]
    assert core.use_condstore() == []


MATCHES = [(1, 10, 50), (2, 20, 70), (3, 30, 60)]


@pytest.mark.parametrize(("returns", "expected"), [
    (None, b"* SEARCH 10 20 30 (MODSEQ 70)\r\n"),
    (("MIN",), b'* ESEARCH (TAG "t") UID MIN 10 MODSEQ 50\r\n'),  # RFC 4731 §3.2: MIN's own MODSEQ
    (("MAX",), b'* ESEARCH (TAG "t") UID MAX 30 MODSEQ 60\r\n'),
    (("MIN", "MAX"), b'* ESEARCH (TAG "t") UID MIN 10 MAX 30 MODSEQ 60\r\n'),
    (("COUNT",), b'* ESEARCH (TAG "t") UID COUNT 3 MODSEQ 70\r\n'),
    (("ALL",), b'* ESEARCH (TAG "t") UID ALL 10,20,30 MODSEQ 70\r\n'),
    (("SAVE",), None),  # RFC 5182 §2.4
])
def test_search_responses(returns: tuple[str, ...] | None, expected: bytes | None) -> None:
    core = logged_in()
    select(core, Folder(0))
    out = core.search_responses("t", True, MATCHES, returns, with_modseq=True)
    assert out == ([expected] if expected is not None else [])


def test_search_without_modseq_and_rev2_esearch() -> None:
    core = logged_in(rev2=True)
    select(core, Folder(0))
    assert core.search_responses("t", False, MATCHES, None, with_modseq=False) == [b'* ESEARCH (TAG "t") ALL 1:3\r\n']
    assert core.search_responses("t", False, [], ("MIN", "COUNT"), with_modseq=True) == \
        [b'* ESEARCH (TAG "t") COUNT 0\r\n']
    core.search_responses("t", True, MATCHES, ("SAVE", "MIN"), with_modseq=False)
    assert core.sel is not None and core.sel.saved == [10, 20, 30]


# -- STORE's answer ----------------------------------------------------------------------------------

def test_store_answer_reports_unchanged_messages_too() -> None:
    """Issue 11's crash: messages whose flags were already so are reported like changed ones."""
    folder = Folder(3)
    core = logged_in(rev2=True)
    select(core, folder)
    targets = core.targets(SequenceSet.parse("1:3"), uid=False)
    changed = {1: (("\\Deleted",), 9)}
    unchanged = {2: (("\\Deleted",), 5), 3: (("\\Deleted", "\\Seen"), 4)}
    out, code = core.store_answer(targets, changed, unchanged, [], 9, silent=False, uid=False)
    assert out == [b"* 1 FETCH (UID 1 FLAGS (\\Deleted))\r\n", b"* 2 FETCH (UID 2 FLAGS (\\Deleted))\r\n",
                   b"* 3 FETCH (UID 3 FLAGS (\\Deleted \\Seen))\r\n"]
    assert code is None
    assert core.sel is not None and core.sel.own == {1: 9}  # not echoed at the next notification
    out, _code = core.store_answer(targets, changed, unchanged, [], 9, silent=True, uid=False)
    assert out == []  # .SILENT without CONDSTORE
    core.enable(["CONDSTORE"])
    out, code = core.store_answer(targets, changed, unchanged, [3], 9, silent=True, uid=True)
    assert out == [b"* 1 FETCH (UID 1 MODSEQ (9))\r\n"]  # RFC 7162 §3.1.3: MODSEQ of the changed ones
    assert code is not None and code.encode() == b"[MODIFIED 3]"


def test_store_flags_rules() -> None:
    core = logged_in()
    assert core.store_flags(["\\Seen", "\\Recent", "$Label", "\\deleted"]) == ["\\Seen", "$Label", "\\deleted"]
    with pytest.raises(Refusal) as r:
        core.store_flags(["\\Bogus"])
    assert r.value.status == "BAD"
