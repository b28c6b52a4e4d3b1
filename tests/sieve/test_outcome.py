"""Planning delivery from a Sieve result: stores, redirects (loops kept), rejects in and out of SMTP,
vacation replies once, duplicate marks."""

from __future__ import annotations

from postier.sieve import Environment, Message, compile_script, run
from postier.sieve.outcome import Delivery, Plan, plan
from postier.sieve.vacation import MemoryVacationStore

MSG = (b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: Hi\r\n"
       b"Message-ID: <1@example.org>\r\n\r\nbody\r\n")
D = Delivery(sender="alice@example.org", recipient="bob@example.com")


def _plan(src: str, msg: bytes = MSG, d: Delivery = D, store: MemoryVacationStore | None = None) -> Plan:
    m = Message(msg)
    res = run(compile_script(src), m, Environment(envelope_from=d.sender, envelope_to=d.recipient))
    return plan(res, m, d, store or MemoryVacationStore(), now=1000.0)


def test_stores_with_flags_and_edited_header() -> None:
    p = _plan('require ["fileinto", "imap4flags", "editheader"]; addheader "X-Seen-By" "sieve"; '
              'fileinto :flags "\\\\Seen" "Lists"; keep;')
    assert [(s.mailbox, s.flags) for s in p.stores] == [("Lists", ("\\Seen",)), ("INBOX", ())]
    assert all(bytes(s.message).startswith(b"X-Seen-By: sieve\r\n") for s in p.stores)
    assert p.sends == [] and p.refuse is None


def test_an_edit_reaches_only_the_actions_after_it() -> None:
    # RFC 5293 §7: a copy filed before the addheader is the original; the implicit keep takes the
    # header as the script left it; an unedited copy is the message as received (no copy made)
    p = _plan('require ["fileinto", "editheader"]; fileinto "Before"; addheader "X-A" "1"; '
              'fileinto "After"; deleteheader "X-A"; addheader "X-B" "2";')
    got = {s.mailbox: bytes(s.message) for s in p.stores}
    assert list(got) == ["Before", "After"]
    assert got["Before"] == MSG and p.stores[0].message.original
    assert got["After"] == b"X-A: 1\r\n" + MSG
    kept = _plan('require ["fileinto", "editheader"]; fileinto "Before"; addheader "X-A" "1"; keep;')
    assert [bytes(s.message).startswith(b"X-A: 1\r\n") for s in kept.stores] == [False, True]
    implicit = _plan('require ["editheader"]; addheader "X-A" "1";')
    assert [bytes(s.message) for s in implicit.stores] == [b"X-A: 1\r\n" + MSG]


def test_redirect_and_loop_kept() -> None:
    p = _plan('redirect "carol@example.net";')
    assert [(s.kind, s.mail_from, s.rcpt_to) for s in p.sends] == [
        ("redirect", "alice@example.org", "carol@example.net")]
    assert bytes(p.sends[0].message).startswith(b"X-Sieve-Redirected-From: bob@example.com\r\n")
    looped = _plan('redirect "carol@example.net";', b"X-Sieve-Redirected-From: bob@example.com\r\n" + MSG)
    assert looped.sends == [] and [s.mailbox for s in looped.stores] == ["INBOX"]


def test_reject_in_smtp_refuses_else_notifies() -> None:
    in_smtp = _plan('require "ereject"; ereject "no thanks";',
                    d=Delivery(sender="alice@example.org", recipient="bob@example.com", in_smtp=True))
    assert in_smtp.refuse == "no thanks" and in_smtp.sends == [] and in_smtp.stores == []
    later = _plan('require "reject"; reject "no thanks";')
    assert later.refuse is None and [(s.kind, s.mail_from, s.rcpt_to) for s in later.sends] == [
        ("reject", "", "alice@example.org")]
    assert b"disposition-notification" in later.sends[0].message and b"no thanks" in later.sends[0].message
    bounce = _plan('require "reject"; reject "no";', d=Delivery(sender="", recipient="bob@example.com"))
    assert bounce.sends == []  # never to the null sender


def test_vacation_once_with_null_sender() -> None:
    store = MemoryVacationStore()
    src = 'require "vacation"; vacation :days 2 "Away.";'
    first = _plan(src, store=store)
    assert [(s.kind, s.mail_from, s.rcpt_to) for s in first.sends] == [("vacation", "", "alice@example.org")]
    assert [s.mailbox for s in first.stores] == ["INBOX"]
    assert _plan(src, store=store).sends == []


def test_runtime_error_keeps_and_marks_nothing() -> None:
    p = _plan('require ["duplicate", "reject", "fileinto"]; if duplicate { stop; } fileinto "A"; reject "x";')
    assert [s.mailbox for s in p.stores] == ["INBOX"] and p.duplicate_marks == [] and p.sends == []


def test_vacation_from_and_addresses_limited_to_own() -> None:
    d = Delivery(sender="alice@example.org", recipient="bob@example.com",
                 own_addresses=("bob@example.com", "robert@example.com"))
    msg = MSG.replace(b"To: bob@example.com", b"To: boss@example.com")
    foreign = _plan('require "vacation"; vacation :addresses ["boss@example.com"] "Away.";', msg, d)
    assert foreign.sends == []  # boss@ is not one of bob's addresses
    spoof = _plan('require "vacation"; vacation :from "ceo@example.com" "Away.";', d=d)
    assert b"From: bob@example.com" in spoof.sends[0].message
    mine = _plan('require "vacation"; vacation :from "Robert <robert@example.com>" "Away.";', d=d)
    assert b"From: Robert <robert@example.com>" in mine.sends[0].message
