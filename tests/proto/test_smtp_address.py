"""RFC 5321 §4.1.2 Path/Mailbox/parameter parsing, RFC 6531 addresses, RFC 3461 xtext."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postier.proto.smtp.address import (
    NULL_PATH,
    Address,
    parse_params,
    parse_path,
    xtext_decode,
    xtext_encode,
)
from postier.proto.smtp.errors import AddressError


@pytest.mark.parametrize(
    ("text", "local", "domain", "rest"),
    [
        ("<user@example.org>", "user", "example.org", ""),
        ("<first.last+tag@sub.example.org> SIZE=10", "first.last+tag", "sub.example.org", " SIZE=10"),
        ("<!#$%&'*+/=?^_`{|}~-@x.example>", "!#$%&'*+/=?^_`{|}~-", "x.example", ""),
        ('<"john doe"@example.org>', "john doe", "example.org", ""),
        ('<"a\\"b\\\\c"@example.org>', 'a"b\\c', "example.org", ""),
        ("<u@[192.0.2.1]>", "u", "[192.0.2.1]", ""),
        ("<u@[IPv6:2001:db8::1]>", "u", "[IPv6:2001:db8::1]", ""),
        ("<jöran@bücher.example>", "jöran", "bücher.example", ""),
        ("<u@x-y.example>", "u", "x-y.example", ""),
    ],
)
def test_valid_paths(text: str, local: str, domain: str, rest: str) -> None:
    addr, tail = parse_path(text)
    assert (addr.local, addr.domain, tail) == (local, domain, rest)
    assert addr.raw == text[: len(text) - len(rest)]


@pytest.mark.parametrize(
    "text",
    [
        "user@example.org",
        "<user@example.org",
        "<user>",
        "<@example.org>",
        "<user@>",
        "<.user@example.org>",
        "<us..er@example.org>",
        "<user.@example.org>",
        "<user@-example.org>",
        "<user@example-.org>",
        "<user@example..org>",
        "<user@example.org.>",
        "<user@[192.0.2.256]>",
        "<user@[010.0.0.1]>",
        "<user@[IPv6:fe80::1%eth0]>",
        "<user@[Foo:bar]>",
        "<us er@example.org>",
        '<"unterminated@example.org>',
        '<"ctl\x01"@example.org>',
        "<user@exa mple.org>",
        "<>",
        "<postmaster>",
        "<user@" + "a" * 64 + ".org>",
        "<" + "a" * 250 + "@example.org>",
        "<user@example.org\x00>",
    ],
)
def test_invalid_paths(text: str) -> None:
    with pytest.raises(AddressError):
        parse_path(text)


def test_null_postmaster_and_source_route() -> None:
    assert parse_path("<> BODY=8BITMIME", null_ok=True) == (NULL_PATH, " BODY=8BITMIME")
    assert NULL_PATH.is_null and NULL_PATH.mailbox == ""
    pm, _ = parse_path("<PostMaster>", postmaster_ok=True)
    assert pm.is_postmaster and pm.mailbox == "PostMaster"
    routed, _ = parse_path("<@a.example,@b.example:u@c.example>")
    assert routed.source_route == ("a.example", "b.example") and routed.mailbox == "u@c.example"
    with pytest.raises(AddressError):
        parse_path("<@a_b.example:u@c.example>")


def test_utf8_needs_opt_in_and_policy_helpers() -> None:
    with pytest.raises(AddressError):
        parse_path("<jöran@example.org>", utf8=False)
    with pytest.raises(AddressError):
        parse_path("<u@bücher.example>", utf8=False)
    addr, _ = parse_path("<jöran@example.org>")
    assert addr.is_utf8
    assert parse_path("<a%b@relay.example>")[0].percent_hack
    assert parse_path("<host!user@relay.example>")[0].bang_path
    quoted, _ = parse_path('<"user@other.example"@relay.example>')
    assert quoted.quoted_at and quoted.mailbox == '"user@other.example"@relay.example'
    # RFC 5321 §4.1.2: a quoted local part that needs no quoting is the same mailbox
    assert parse_path('<"plain"@example.org>')[0].mailbox == "plain@example.org"
    assert str(Address("a b", "x.example", "")) == '"a b"@x.example'


def test_params() -> None:
    assert parse_params("") == {}
    assert parse_params(" size=10 SMTPUTF8  BODY=8BITMIME") == {
        "SIZE": "10",
        "SMTPUTF8": None,
        "BODY": "8BITMIME",
    }
    for bad in ("SIZE=10", " SIZE=", " SIZE=1=2", " -X=1", " SIZE=1 size=2", " K=a\x00"):
        with pytest.raises(AddressError):
            parse_params(bad)


def test_xtext() -> None:
    assert xtext_decode("a+2Bb+3D") == "a+b="
    assert xtext_encode("a+b= é") == "a+2Bb+3D+20+C3+A9"
    for bad in ("a+2b", "a+", "a=b", "a b"):
        with pytest.raises(AddressError):
            xtext_decode(bad)


@settings(max_examples=500, deadline=None)
@given(
    st.text(max_size=300)
    | st.lists(
        st.sampled_from(
            ["<", ">", "@", ".", '"', "\\", "[", "]", ":", ",", "a", "IPv6:", "1", "-", " ", "é"]
        ),
        max_size=40,
    ).map("".join),
    st.booleans(),
)
def test_fuzz_parse_or_address_error(text: str, utf8: bool) -> None:
    try:
        addr, rest = parse_path(text, null_ok=True, postmaster_ok=True, utf8=utf8)
    except AddressError:
        return
    assert text.endswith(rest) and addr.raw + rest == text
    try:
        parse_params(rest, utf8=utf8)
    except AddressError:
        pass
