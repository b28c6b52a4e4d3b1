"""DMARC (RFC 7489, RFC 9989): record syntax, tree walk, alignment table, policies, temperror."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

import pytest

from postier.mailauth.dmarc import (
    Alignment, DMARCPolicy, DMARCRecordError, DMARCResult, DMARCStatus, FromProblem, discover_policy, evaluate,
    from_domain, organizational_domain, parse_record, psl_organizational_domain, walk_targets,
)
from postier.mailauth.spf import check_host
from postier.resolver import DNSStatus
from postier.resolver.fake import FakeResolver


@dataclass(frozen=True)
class Auth:  # an SPF- or DKIM-like result
    domain: str
    status: str = "pass"


def run_eval(zone: FakeResolver, author: str, spf: Auth | None = None, dkim: tuple[Auth, ...] = (),
             rng: random.Random | None = None) -> DMARCResult:
    return asyncio.run(evaluate(author, spf, list(dkim), zone, rng=rng))


def dmarc_zone(entries: dict[str, str]) -> FakeResolver:
    fake = FakeResolver()
    for domain, txt in entries.items():
        fake.add(f"_dmarc.{domain}", "TXT", txt)
    return fake


# --- record syntax ------------------------------------------------------------------------------

def test_parse_full_record() -> None:
    rec = parse_record("v=DMARC1; p=Reject; sp=quarantine; np=reject; adkim=s; aspf=r; pct=50; "
                       "rua=mailto:a@x.test,mailto:b@x.test!10m; ruf=mailto:f@x.test; fo=1:d; rf=afrf; "
                       "ri=3600; psd=n; t=y; future=whatever;")
    assert rec.policy is DMARCPolicy.REJECT and rec.subdomain_policy is DMARCPolicy.QUARANTINE
    assert rec.nonexistent_policy is DMARCPolicy.REJECT and rec.adkim is Alignment.STRICT
    assert rec.aspf is Alignment.RELAXED and rec.pct == 50 and rec.ri == 3600
    assert rec.rua == ("mailto:a@x.test", "mailto:b@x.test!10m") and rec.ruf == ("mailto:f@x.test",)
    assert rec.fo == ("1", "d") and rec.psd == "n" and rec.testing


@pytest.mark.parametrize("txt", [
    "p=reject; v=DMARC1",            # v must come first (RFC 7489 §6.4)
    "v=DMARC2; p=reject",
    "v=dmarc1; p=reject",            # the version value is case-sensitive
    "v=DMARC1",                      # no p and no rua
    "v=DMARC1; p=bogus",
    "v=DMARC1; p=none; p=reject",    # duplicate tag
    "v=DMARC1; p=none; 1x=y",        # bad tag name
    "v=DMARC1; p=none; junk",
    "v=DMARC1x; p=none",
    b"v=DMARC1; p=none; rua=mailto:\xff@x.test",
])
def test_parse_rejects(txt: str | bytes) -> None:
    with pytest.raises(DMARCRecordError):
        parse_record(txt)


def test_parse_defaults_and_lenient_values() -> None:
    rec = parse_record("v = DMARC1 ;p=none")
    assert (rec.adkim, rec.aspf, rec.pct, rec.psd, rec.testing) == (Alignment.RELAXED, Alignment.RELAXED, 100, "u", False)
    bad = parse_record("v=DMARC1; p=quarantine; pct=150; adkim=x; fo=9; sp=nope; psd=maybe; ri=-1")
    assert (bad.pct, bad.adkim, bad.fo, bad.subdomain_policy, bad.psd, bad.ri) == (
        100, Alignment.RELAXED, ("0",), None, "u", 86400)
    # RFC 7489 §6.6.3: no valid p= but a valid rua= -> p=none
    assert parse_record("v=DMARC1; rua=mailto:r@x.test").policy is DMARCPolicy.NONE


# --- the From domain ------------------------------------------------------------------------------

@pytest.mark.parametrize(("block", "expected"), [
    (b"From: Joe <joe@Example.COM>\r\nTo: x@y.test\r\n\r\nbody", "example.com"),
    (b"From: \"a@evil.test\" <x@good.test>\r\n\r\n", "good.test"),
    (b"From:\r\n  joe@folded.test\r\n\r\n", "folded.test"),
    (b"From: joe@b\xc3\xbccher.test\r\n\r\n", "xn--bcher-kva.test"),
    (b"To: x@y.test\r\n\r\nFrom: late@x.test\r\n", FromProblem.MISSING),
    (b"From: a@x.test\r\nFROM: b@y.test\r\n\r\n", FromProblem.MULTIPLE_FIELDS),
    (b"From: a@x.test, b@y.test\r\n\r\n", FromProblem.MULTIPLE_ADDRESSES),
    (b"From: undisclosed-recipients:;\r\n\r\n", FromProblem.NO_DOMAIN),
    (b"From: joe\r\n\r\n", FromProblem.NO_DOMAIN),
    (b"From: joe@[192.0.2.1]\r\n\r\n", FromProblem.NO_DOMAIN),
    (b"From: joe@bad_domain..test\r\n\r\n", FromProblem.NO_DOMAIN),
])
def test_from_domain(block: bytes, expected: str | FromProblem) -> None:
    assert from_domain(block) == expected


def test_from_domain_pairs() -> None:
    assert from_domain([("Subject", "x"), ("from", "a@b.test")]) == "b.test"


# --- tree walk (RFC 9989 §4.10) --------------------------------------------------------------------

def test_walk_targets() -> None:
    assert walk_targets("a.b.c") == ["a.b.c", "b.c", "c"]
    long = ".".join("abcdefghij") + ".test"  # 11 labels -> itself, then 7 labels down to 1
    targets = walk_targets(long)
    assert len(targets) == 8 and targets[1] == "e.f.g.h.i.j.test"
    assert targets[-1] == "test" and [t.count(".") for t in targets[1:]] == [6, 5, 4, 3, 2, 1, 0]


def test_discovery_queries_at_most_eight_names() -> None:
    fake = dmarc_zone({"example.test": "v=DMARC1; p=reject"})
    author = "1.2.3.4.5.6.7.8.9.example.test"
    found = asyncio.run(discover_policy(author, fake))
    assert found.status is DNSStatus.OK and found.records[0][1] == "example.test"
    assert len(fake.queries) <= 8 and fake.queries[0] == (f"_dmarc.{author}", "TXT")
    none = asyncio.run(discover_policy("a.b.c.d.e.f.g.h.i.j.k.test", FakeResolver()))
    assert none.status is DNSStatus.NODATA


def test_org_domain_rules() -> None:
    fake = dmarc_zone({
        "example.test": "v=DMARC1; p=reject",
        "b.example.test": "v=DMARC1; p=none; psd=n",
        "psd.test": "v=DMARC1; p=reject; psd=y",
        "co.uk": "v=DMARC1; p=none",                 # a stray record at a public suffix
    })

    def org(name: str, method: str = "treewalk") -> str:
        return asyncio.run(organizational_domain(name, fake, method)).records[0]

    assert org("x.y.example.test") == "example.test"          # the highest record on the walk
    assert org("a.b.example.test") == "b.example.test"        # psd=n stops the walk
    assert org("a.b.psd.test") == "b.psd.test"                # one label below a psd=y domain
    assert org("psd.test") == "psd.test"                      # psd=y on the start domain itself: ignored
    assert org("nothing.here.test") == "nothing.here.test"    # no record anywhere: the domain itself
    assert org("mail.x.co.uk") == "x.co.uk"                   # PSL safety net
    assert org("a.b.co.uk", "psl") == "b.co.uk"
    assert psl_organizational_domain("co.uk") == "co.uk"


# --- alignment table --------------------------------------------------------------------------------

BASE = {
    "a.test": "v=DMARC1; p=reject",
    "strict.test": "v=DMARC1; p=reject; adkim=s; aspf=s",
    "x.co.uk": "v=DMARC1; p=reject",
    "y.co.uk": "v=DMARC1; p=none",
}

ALIGNMENT_TABLE = [
    # author, spf, dkim..., expected status, spf_aligned, dkim_aligned
    ("a.test", None, (Auth("a.test"),), DMARCStatus.PASS, False, True),
    ("a.test", None, (Auth("mail.a.test"),), DMARCStatus.PASS, False, True),          # relaxed subdomain
    ("mail.a.test", None, (Auth("a.test"),), DMARCStatus.PASS, False, True),          # author is the subdomain
    ("a.test", Auth("bounce.a.test"), (), DMARCStatus.PASS, True, False),
    ("a.test", None, (Auth("other.test"),), DMARCStatus.FAIL, False, False),
    ("a.test", None, (Auth("a.test", "fail"),), DMARCStatus.FAIL, False, False),      # aligned but not pass
    ("a.test", Auth("a.test", "softfail"), (), DMARCStatus.FAIL, False, False),
    ("strict.test", None, (Auth("strict.test"),), DMARCStatus.PASS, False, True),
    ("strict.test", None, (Auth("mail.strict.test"),), DMARCStatus.FAIL, False, False),
    ("strict.test", Auth("bounce.strict.test"), (), DMARCStatus.FAIL, False, False),
    ("strict.test", Auth("STRICT.test."), (), DMARCStatus.PASS, True, False),         # case, trailing dot
    ("x.co.uk", None, (Auth("mail.x.co.uk"),), DMARCStatus.PASS, False, True),
    ("x.co.uk", None, (Auth("y.co.uk"),), DMARCStatus.FAIL, False, False),            # multi-label suffix
    ("x.co.uk", None, (Auth("co.uk"),), DMARCStatus.FAIL, False, False),
    # every signature counts: a failing aligned one and a passing aligned one
    ("a.test", None, (Auth("a.test", "fail"), Auth("a.test")), DMARCStatus.PASS, False, True),
    ("a.test", None, (Auth("evil.test"), Auth("a.test", "permerror")), DMARCStatus.FAIL, False, False),
    ("a.test", Auth("a.test"), (Auth("a.test"),), DMARCStatus.PASS, True, True),
]


@pytest.mark.parametrize(("author", "spf", "dkim", "status", "spf_al", "dkim_al"), ALIGNMENT_TABLE)
def test_alignment_table(author: str, spf: Auth | None, dkim: tuple[Auth, ...], status: DMARCStatus,
                         spf_al: bool, dkim_al: bool) -> None:
    res = run_eval(dmarc_zone(BASE), author, spf, dkim)
    assert (res.status, res.spf_aligned, res.dkim_aligned) == (status, spf_al, dkim_al), res
    if status is DMARCStatus.FAIL:
        assert res.disposition is res.policy


def test_null_sender_spf_identity_is_helo() -> None:
    fake = dmarc_zone(BASE)
    fake.add("mx.a.test", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    spf = check_host("192.0.2.1", "", "mx.a.test", fake)  # RFC 7208 §2.4: postmaster@HELO
    assert spf.domain == "mx.a.test"
    res = run_eval(fake, "a.test", spf)
    assert res.status is DMARCStatus.PASS and res.spf_aligned


# --- policies -----------------------------------------------------------------------------------------

def test_none_and_subdomain_and_nonexistent_policies() -> None:
    fake = dmarc_zone({"org.test": "v=DMARC1; p=reject; sp=quarantine; np=none"})
    fake.add("real.org.test", "A", "192.0.2.1")
    assert run_eval(fake, "nodmarc.test").status is DMARCStatus.NONE
    assert run_eval(fake, "org.test").policy is DMARCPolicy.REJECT
    sub = run_eval(fake, "real.org.test")
    assert (sub.policy, sub.record_domain) == (DMARCPolicy.QUARANTINE, "org.test")
    assert run_eval(fake, "ghost.org.test").policy is DMARCPolicy.NONE  # np= for a name that does not exist
    plain = dmarc_zone({"p.test": "v=DMARC1; p=reject"})
    assert run_eval(plain, "s.p.test").policy is DMARCPolicy.REJECT      # no sp: p applies


def test_invalid_or_duplicate_records_are_skipped() -> None:
    fake = dmarc_zone({"org.test": "v=DMARC1; p=reject"})
    fake.add("_dmarc.a.org.test", "TXT", "v=DMARC1; p=bogus")
    fake.add("_dmarc.b.org.test", "TXT", "v=DMARC1; p=none")
    fake.add("_dmarc.b.org.test", "TXT", "v=DMARC1; p=quarantine")
    fake.add("_dmarc.c.org.test", "TXT", "unrelated text")
    for author in ("a.org.test", "b.org.test", "c.org.test"):
        res = run_eval(fake, author)
        assert (res.record_domain, res.policy) == ("org.test", DMARCPolicy.REJECT), author


def test_pct_and_testing_mode() -> None:
    fake = dmarc_zone({"zero.test": "v=DMARC1; p=reject; pct=0", "half.test": "v=DMARC1; p=quarantine; pct=50",
                       "t.test": "v=DMARC1; p=reject; t=y"})
    zero = run_eval(fake, "zero.test")
    assert (zero.status, zero.policy, zero.disposition) == (DMARCStatus.FAIL, DMARCPolicy.REJECT, DMARCPolicy.QUARANTINE)
    rng = random.Random(7)
    outcomes = [run_eval(fake, "half.test", rng=rng).disposition for _ in range(60)]
    assert set(outcomes) == {DMARCPolicy.QUARANTINE, DMARCPolicy.NONE}
    assert run_eval(fake, "t.test").disposition is DMARCPolicy.QUARANTINE


class _Fixed(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


def test_pct_sampling_boundary() -> None:
    fake = dmarc_zone({"h.test": "v=DMARC1; p=reject; pct=30"})
    assert run_eval(fake, "h.test", rng=_Fixed(0.29)).disposition is DMARCPolicy.REJECT
    assert run_eval(fake, "h.test", rng=_Fixed(0.30)).disposition is DMARCPolicy.QUARANTINE


# --- temporary failures --------------------------------------------------------------------------------

def test_temperror_propagation() -> None:
    fake = dmarc_zone({"a.test": "v=DMARC1; p=reject"})
    fake.tempfail("_dmarc.down.test")
    assert run_eval(fake, "down.test").status is DMARCStatus.TEMPERROR
    fake.tempfail("_dmarc.mail.a.test")  # needed only for relaxed alignment of d=mail.a.test
    res = run_eval(fake, "a.test", None, (Auth("mail.a.test"),))
    assert res.status is DMARCStatus.TEMPERROR and res.policy is DMARCPolicy.REJECT
    # ... but an exactly aligned pass needs no DNS and wins
    assert run_eval(fake, "a.test", Auth("a.test"), (Auth("mail.a.test"),)).status is DMARCStatus.PASS
    np = dmarc_zone({"o.test": "v=DMARC1; p=reject; np=reject"})
    np.tempfail("x.o.test", "A")
    assert run_eval(np, "x.o.test").status is DMARCStatus.TEMPERROR


def test_invalid_author_domain_is_permerror() -> None:
    assert run_eval(FakeResolver(), "bad domain..test").status is DMARCStatus.PERMERROR
