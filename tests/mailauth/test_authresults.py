"""Authentication-Results (RFC 8601): our header parses back with authres; forged ones are removed."""

from __future__ import annotations

import authres
import pytest

from postier.mailauth.authresults import authentication_results, authserv_id_of, strip_forged
from postier.mailauth.dkim import DKIMResult, DKIMStatus
from postier.mailauth.dmarc import DMARCPolicy, DMARCResult, DMARCStatus
from postier.mailauth.spf import SPFResult, SPFStatus


def parse(header: bytes) -> authres.AuthenticationResultsHeader:
    unfolded = header.decode().replace("\r\n\t", " ").rstrip("\r\n")
    return authres.FeatureContext(authres.dmarc).parse(unfolded)


def test_full_header_round_trips() -> None:
    header = authentication_results(
        "MX.Example.test",
        spf=SPFResult(SPFStatus.PASS, "", "a.test", "mailfrom", "alice@a.test"),
        helo=SPFResult(SPFStatus.NONE, "", "mx.a.test", "helo", "postmaster@mx.a.test"),
        dkim=[DKIMResult("a.test", "sel", DKIMStatus.PASS, "good", "ed25519-sha256", "@a.test", "/gCrinpcQOoI"),
              DKIMResult("b.test", "s2", DKIMStatus.FAIL, 'body hash "mismatch"\x07', "rsa-sha256", "", "AbC")],
        dmarc=DMARCResult(DMARCStatus.PASS, DMARCPolicy.REJECT, DMARCPolicy.NONE, domain="a.test"))
    assert header.startswith(b"Authentication-Results: mx.example.test;\r\n\tspf=pass smtp.mailfrom=alice@a.test;")
    assert header.endswith(b"\r\n") and all(len(line) < 200 for line in header.split(b"\r\n"))
    parsed = parse(header)
    assert parsed.authserv_id == "mx.example.test"
    methods = [(r.method, r.result) for r in parsed.results]
    assert methods == [("spf", "pass"), ("spf", "none"), ("dkim", "pass"), ("dkim", "fail"), ("dmarc", "pass")]
    dkim_fail = parsed.results[3]
    assert dkim_fail.header_d == "b.test" and "mismatch" in dkim_fail.reason
    assert b"(p=reject dis=none) header.from=a.test" in header


def test_null_sender_and_unsigned() -> None:
    header = authentication_results(
        "mx.test", spf=SPFResult(SPFStatus.FAIL, "", "mx.b.test", "helo", "postmaster@mx.b.test"), dkim=[])
    assert b"spf=fail smtp.helo=mx.b.test" in header and b"dkim=none" in header
    assert authentication_results("mx.test") == b"Authentication-Results: mx.test;\r\n\tnone\r\n"


def test_odd_sender_address_keeps_syntax() -> None:
    header = authentication_results(
        "mx.test", spf=SPFResult(SPFStatus.PASS, "", "a.test", "mailfrom", '"odd; local"@a.test'))
    assert b"smtp.mailfrom=a.test" in header
    parse(header)


def test_bad_authserv_id() -> None:
    for bad in ("", "mx test", "mx;test", "mx\r\ntest"):
        with pytest.raises(ValueError):
            authentication_results(bad)


@pytest.mark.parametrize(("value", "expected"), [
    (" mx.test; spf=pass", "mx.test"),
    ("MX.Test 1; none", "mx.test"),
    (" (comment (nested)) mx.test;", "mx.test"),
    ('"mx.test"; none', "mx.test"),
    ("\r\n\tmx.test;", "mx.test"),
    ("", ""),
])
def test_authserv_id_of(value: str, expected: str) -> None:
    assert authserv_id_of(value) == expected


def test_strip_forged() -> None:
    message = (b"Received: from x\r\n"
               b"Authentication-Results: mx.test; spf=pass\r\n"
               b"authentication-results :  (c) MX.TEST;\r\n\tdkim=pass header.d=evil.test\r\n"
               b"Authentication-Results: other.test; spf=fail\r\n"
               b"Authentication-Results: mx.test.evil; none\r\n"
               b"Authentication-Results: mx.test; garbage ((( that does not parse\r\n"
               b"Subject: hi\r\n"
               b"\r\n"
               b"Authentication-Results: mx.test; in the body stays\r\n")
    out = strip_forged(message, "mx.test")
    assert out == (b"Received: from x\r\n"
                   b"Authentication-Results: other.test; spf=fail\r\n"
                   b"Authentication-Results: mx.test.evil; none\r\n"
                   b"Subject: hi\r\n"
                   b"\r\n"
                   b"Authentication-Results: mx.test; in the body stays\r\n")
    lf = strip_forged(b"Authentication-Results: mx.test; x\nA: b\n\nbody\n", "mx.test")
    assert lf == b"A: b\n\nbody\n"
    assert strip_forged(b"A: b\r\n", "mx.test") == b"A: b\r\n"  # header section only, no body
