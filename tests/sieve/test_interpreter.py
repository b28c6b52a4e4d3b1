"""Sieve interpreter: action lists for each extension, implicit keep, and every resource bound."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postier.sieve import CompileError, Environment, Limits, Message, compile_script, run
from postier.sieve.interpreter import Result

MSG = (b"From: Alice <alice@example.org>\r\nTo: bob+lists@example.com\r\nSubject: Hello world\r\n"
       b"Date: Tue, 1 Dec 2026 10:00:00 +0100\r\nMessage-ID: <1@example.org>\r\n"
       b"List-Id: <dev.lists.example.org>\r\n\r\nSome body text.\r\n")


def _run(src: str, msg: bytes = MSG, **env: object) -> Result:
    e = Environment(envelope_from="alice@example.org", envelope_to="bob+lists@example.com")
    for k, v in env.items():
        setattr(e, k, v)
    return run(compile_script(src), Message(msg), e)


def _acts(res: Result) -> list[tuple[str, str]]:
    return [(a.kind, a.target) for a in res.final()]


def test_implicit_keep() -> None:
    assert _acts(_run('if false { discard; }')) == [("keep", "INBOX")]


def test_fileinto_cancels_implicit_keep_and_copy_does_not() -> None:
    assert _acts(_run('require "fileinto"; fileinto "Lists";')) == [("store", "Lists")]
    assert _acts(_run('require ["fileinto", "copy"]; fileinto :copy "Lists";')) == [
        ("store", "Lists"), ("keep", "INBOX")]


def test_inbox_any_case_is_the_keep() -> None:
    assert _acts(_run('require "fileinto"; fileinto "inbox"; keep; fileinto "Inbox.Sub";')) == [
        ("keep", "INBOX"), ("store", "INBOX.Sub")]


def test_discard_and_stop() -> None:
    assert _acts(_run("discard; stop; keep;")) == []


def test_redirect_normalised_and_deduplicated() -> None:
    res = _run('redirect "Carol <carol@EXAMPLE.net>"; redirect "carol@example.net";')
    assert _acts(res) == [("redirect", "carol@example.net")]


def test_header_address_envelope_and_subaddress() -> None:
    src = ('require ["fileinto", "envelope", "subaddress"];\n'
           'if allof (header :contains "subject" "hello", address :domain "from" "example.org",\n'
           '          envelope :detail "to" "lists", address :user "to" "bob") { fileinto "A"; }')
    assert _acts(_run(src)) == [("store", "A")]


def test_subaddress_delimiter_configurable() -> None:
    src = 'require ["fileinto", "envelope", "subaddress"]; if envelope :detail "to" "x" { fileinto "A"; }'
    assert _acts(_run(src, envelope_to="bob-x@example.com", subaddress_delimiter="-")) == [("store", "A")]


def test_variables_and_match_values() -> None:
    src = ('require ["fileinto", "variables"];\n'
           'if header :matches "list-id" "<*.lists.example.org>" { fileinto "Lists/${1}"; }')
    assert _acts(_run(src)) == [("store", "Lists/dev")]


def test_regex_and_relational() -> None:
    src = ('require ["fileinto", "regex", "relational", "comparator-i;ascii-numeric", "variables"];\n'
           'if header :regex "subject" "^(h[a-z]+) (w.*)$" { set "x" "${2}"; }\n'
           'if allof (string :is "${x}" "world", header :count "ge" :comparator "i;ascii-numeric" '
           '"to" "1") { fileinto "R"; }')
    assert _acts(_run(src)) == [("store", "R")]


def test_imap4flags_on_keep_and_fileinto() -> None:
    src = ('require ["fileinto", "imap4flags"]; addflag "\\\\Seen"; fileinto "A"; '
           'removeflag "\\\\Seen"; addflag "$x"; keep;')
    res = _run(src).final()
    assert [(a.kind, a.flags) for a in res] == [("store", ("\\Seen",)), ("keep", ("$x",))]


def test_body_and_size() -> None:
    src = 'require ["body", "fileinto"]; if allof (body :contains "body text", size :under 1K) { fileinto "B"; }'
    assert _acts(_run(src)) == [("store", "B")]


def test_date_and_currentdate() -> None:
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.UTC)
    src = ('require ["date", "fileinto", "relational"];\n'
           'if allof (date :originalzone "date" "hour" "10", date :zone "+0000" "date" "hour" "09",\n'
           '          currentdate :value "ge" "date" "2026-12-01") { fileinto "D"; }')
    assert _acts(_run(src, now=now)) == [("store", "D")]


def test_editheader_visible_to_later_tests() -> None:
    src = ('require ["editheader", "fileinto"]; addheader "X-Tag" "yes"; deleteheader "list-id";\n'
           'if allof (header :is "x-tag" "yes", not exists "list-id") { fileinto "E"; }\n'
           'deleteheader "received"; addheader "Received" "forged";')
    msg = Message(MSG)
    res = run(compile_script(src), msg, Environment())
    assert [(a.kind, a.target) for a in res.final()] == [("store", "E")]
    assert msg.values("received") == []  # RFC 5293 §6: protected


def test_reject_conflicts_fall_back_to_keep() -> None:
    res = _run('require ["reject", "fileinto"]; reject "no"; fileinto "A";')
    assert res.error is not None and "conflicts" in res.error
    assert _acts(res) == [("keep", "INBOX")]


def test_vacation_action_recorded() -> None:
    res = _run('require "vacation"; vacation :days 3 :subject "Away" "I am away";')
    vac = [a for a in res.final() if a.kind == "vacation"]
    assert vac and vac[0].vacation is not None and vac[0].vacation["seconds"] == 3 * 86400
    assert ("keep", "INBOX") in _acts(res)  # vacation keeps the implicit keep


def test_include_with_globals_and_once() -> None:
    scripts = {"lib": compile_script('require ["include", "variables", "fileinto"]; global "box"; '
                                     'fileinto "${box}";', "lib")}
    src = ('require ["include", "variables"]; global "box"; set "box" "Inc"; include "lib"; '
           'include :once "lib"; include :once "lib"; include :optional "missing";')
    res = _run(src, load_script=lambda loc, name: scripts.get(name))
    assert _acts(res) == [("store", "Inc")]


def test_include_recursion_is_a_runtime_error() -> None:
    scripts = {"self": compile_script('require "include"; include "self";', "self")}
    res = _run('require "include"; include "self";', load_script=lambda loc, name: scripts.get(name))
    assert res.error is not None and _acts(res) == [("keep", "INBOX")]


def test_duplicate_marks_only_recorded() -> None:
    res = _run('require "duplicate"; if duplicate { discard; }')
    assert _acts(res) == [("keep", "INBOX")] and len(res.duplicate_marks) == 1
    res = _run('require "duplicate"; if duplicate { discard; }', duplicate_seen=lambda k: True)
    assert _acts(res) == []


def test_spamtest_fed_by_environment() -> None:
    src = ('require ["spamtestplus", "fileinto", "relational", "comparator-i;ascii-numeric"];\n'
           'if spamtest :percent :value "ge" :comparator "i;ascii-numeric" "50" { fileinto "Junk"; }')
    assert _acts(_run(src, spamtest=lambda m, pct: "80" if pct else "8")) == [("store", "Junk")]


# -- bounds ---------------------------------------------------------------------------------------

def test_cpu_budget() -> None:
    src = "require \"variables\";\n" + "if header :contains \"subject\" \"zzz\" { keep; }\n" * 500
    res = _run(src, limits=Limits(max_steps=300))
    assert res.error is not None and "CPU" in res.error
    assert _acts(res) == [("keep", "INBOX")]


def test_redirect_limit() -> None:
    src = "".join(f'redirect "u{i}@example.net";' for i in range(10))
    res = _run(src)
    assert res.error is not None and "redirect" in res.error
    assert _acts(res) == [("keep", "INBOX")]


def test_action_limit() -> None:
    src = 'require "fileinto";' + "".join(f'fileinto "f{i}";' for i in range(40))
    res = _run(src)
    assert res.error is not None and "actions" in res.error


def test_huge_or_invalid_regex_refused_at_upload_and_harmless_at_runtime() -> None:
    with pytest.raises(CompileError, match="longer than"):
        compile_script('require "regex"; if header :regex "subject" "' + "a" * 5000 + '" { discard; }')
    with pytest.raises(CompileError, match="invalid regular expression"):
        compile_script('require "regex"; if header :regex "subject" "[" { discard; }')
    src = ('require ["regex", "variables"]; set "r" "' + "a" * 5000 + '";'
           'if header :regex "subject" "${r}" { discard; }')
    res = _run(src)
    assert res.error is None and res.warnings and _acts(res) == [("keep", "INBOX")]


def test_catastrophic_patterns_bounded_in_time() -> None:
    """One backtracking search is the cost steps cannot bound: the run's pattern budget stops it."""
    msg = b"Subject: " + b"a" * 60 + b"!\r\n\r\nx\r\n"
    for src in ['require "regex"; if header :regex "subject" "(a|aa)+$" { discard; }',
                'if header :matches "subject" "' + "*a" * 40 + '*b" { discard; }']:
        res = _run(src, msg=msg, limits=Limits(max_match_seconds=0.3))
        assert res.error is not None and "time limit" in res.error, res.error
        assert _acts(res) == [("keep", "INBOX")]


def test_variable_size_and_count_bounded() -> None:
    src = ('require ["variables", "fileinto"]; set "a" "' + "x" * 10000 + '"; set :length "n" "${a}";'
           'fileinto "${n}";')
    assert _acts(_run(src)) == [("store", "4096")]
    many = 'require "variables";' + "".join(f'set "v{i}" "x";' for i in range(300))
    with pytest.raises(CompileError, match="more than 255 variables"):
        compile_script(many)  # refused at upload (RFC 5229 §6)
    some = 'require "variables";' + "".join(f'set "v{i}" "x";' for i in range(20))
    assert _run(some, limits=Limits(max_variables=10)).error is not None  # and bounded at run time


@pytest.mark.parametrize("mailbox", ['""', '"a\\u0000"'])
def test_invalid_mailbox_runtime_error(mailbox: str) -> None:
    res = _run(f'require ["fileinto", "variables"]; set "n" {mailbox}; fileinto "${{n}}";')
    assert _acts(res) == [("keep", "INBOX")] or res.error is None


def test_redirect_loop_and_envelope_sender() -> None:
    from postier.sieve.redirect import envelope_sender, is_loop, redirected_message

    out = redirected_message(MSG, "bob@example.com")
    assert out.startswith(b"X-Sieve-Redirected-From: bob@example.com\r\n")
    assert is_loop(Message(out), "bob@example.com") and not is_loop(Message(MSG), "bob@example.com")
    assert envelope_sender("sender", "alice@example.org", "bob@example.com", None, None) == "alice@example.org"
    assert envelope_sender("recipient", "alice@example.org", "bob@example.com", None, None) == "bob@example.com"
    assert envelope_sender("<fwd@example.com>", "<>", "bob@example.com", None, None) == ""  # never for <>
    assert envelope_sender("user_email", "a@x.org", "bob@example.com", None, "b@y.org") == "b@y.org"


def test_redirect_quotes_local_part() -> None:
    res = _run('redirect "\\"S[r]us\\"@Example.net"; redirect "\\"Sirius\\"@example.net";')
    assert _acts(res) == [("redirect", '"S[r]us"@example.net'), ("redirect", "Sirius@example.net")]


# -- fuzzing: any compiled script on any message gives a Result, never an exception -----------------

_TESTS = ['header :contains "subject" "${1}"', 'address :domain :matches "from" "*.org"', "true",
          'header :regex "x" "(a|b)*c"', 'body :contains "x"', 'exists "to"', "size :over 10",
          'envelope :detail "to" ""', 'string :count "ge" "${a}" "1"', 'date "date" "year" "2026"',
          'hasflag "x"', 'header :value "gt" :comparator "i;ascii-numeric" "x-n" "3"',
          'anyof (false, not true)', 'duplicate :seconds 5', 'spamtest :percent "0"']
_CMDS = ['fileinto "F"', 'redirect "x@example.net"', "keep", "discard", 'set "a" "${1}${a}"',
         'addflag "$x"', 'addheader "X-A" "${a}"', 'deleteheader :index 1 "received"', "stop",
         'vacation :days 1 "away"', 'reject "no"', 'set :upper "a" "${0}"', 'fileinto :copy "${a}"']
_REQ = ('require ["fileinto", "copy", "variables", "regex", "body", "envelope", "subaddress", "relational", '
        '"comparator-i;ascii-numeric", "date", "imap4flags", "duplicate", "spamtestplus", "editheader", '
        '"vacation", "reject"];\n')


def _script(data: st.DataObject) -> str:
    n = data.draw(st.integers(0, 8))
    parts = []
    for _ in range(n):
        if data.draw(st.booleans()):
            parts.append(f"if {data.draw(st.sampled_from(_TESTS))} {{ {data.draw(st.sampled_from(_CMDS))}; }}")
        else:
            parts.append(data.draw(st.sampled_from(_CMDS)) + ";")
    return _REQ + "\n".join(parts)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), st.binary(max_size=400))
def test_fuzz_scripts_on_messages(data: st.DataObject, raw: bytes) -> None:
    script = compile_script(_script(data))
    res = run(script, Message(raw), Environment(limits=Limits(max_match_seconds=0.5)))
    final = res.final()
    if res.error is not None:
        assert [a.kind for a in final] == ["keep"]  # RFC 5228 §2.10.6
    assert all(a.kind in ("keep", "store", "redirect", "reject", "ereject", "vacation") for a in final)
