"""Hypothesis fuzzing of the parsers not already fuzzed next to their own tests, with one invariant:
a clean result or the parser's own error, never another exception, in bounded time and memory.

Already fuzzed elsewhere (docs/security.md lists them): SMTP commands (tests/proto/test_smtp_server.py),
envelope addresses (tests/proto/test_smtp_address.py), the SMTP client (tests/proto/test_smtp_client.py),
the IMAP reader and parser on random bytes and grammar fragments (tests/proto/test_imap_fuzz.py),
POP3 (tests/proto/test_pop3.py, test_pop3_framing.py), SASL (tests/proto/test_sasl.py), MIME
(tests/message/test_mime_fuzz.py), DMARC aggregate reports (tests/deliverability/test_reports.py).
Here: the configuration file, DKIM-Signature/SPF/DMARC records, trace and address headers, IMAP
commands with nested lists and literals, and the hard MIME bounds.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postier.config import Config, ConfigError, load_config
from postier.mailauth.authresults import authserv_id_of, strip_forged
from postier.mailauth.dkim import DKIMResult, DKIMStatus, generate_key, sign, verify_all
from postier.mailauth.dmarc import DMARCRecord, DMARCRecordError, FromProblem, from_domain, parse_record
from postier.mailauth.spf import SPFResult, SPFStatus, check_host
from postier.message.envelope import parse_addresses
from postier.message.mime import MAX_DEPTH, MAX_HEADER_FIELDS, MAX_PARTS, parse_message
from postier.message.received import count_received, received_header
from postier.pipeline.submission import header_fields, header_mailboxes
from postier.proto.imap import Command, ParseError
from postier.proto.imap.parser import parse_command
from postier.resolver.fake import FakeResolver

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                         HealthCheck.function_scoped_fixture])


class Bounded:
    """Time and peak traced memory of a block (the "bounded" half of the invariant)."""

    def __init__(self, seconds: float = 2.0, megabytes: float = 64.0) -> None:
        self.seconds, self.bytes = seconds, megabytes * 1024 * 1024

    def __enter__(self) -> Bounded:
        tracemalloc.start()
        self.t = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        elapsed = time.monotonic() - self.t
        if exc[0] is None:
            assert elapsed < self.seconds, f"took {elapsed:.2f}s"
            assert peak < self.bytes, f"peak memory {peak / 1e6:.1f} MB"


# -- the configuration file ----------------------------------------------------------------------

SECTIONS = {
    "limits": ["max_message_size", "max_errors", "idle_timeout", "command_timeout", "min_data_rate",
               "max_connections", "tls_handshake_timeout", "greet_pause", "bogus"],
    "auth": ["failure_delay", "max_failures", "allow_plaintext"],
    "listeners.smtp": ["address", "port", "starttls"],
    "listeners.imaps": ["address", "port"],
    "listeners.nonsense": ["port"],
    "tls": ["cert", "key"],
    "dns": ["nameservers", "timeout"],
    "submission": ["sender_policy", "max_messages_per_day"],
    "pop3": ["expire", "login_delay"],
    "mailauth": ["dmarc_policy", "spf_record", "dnsbl"],
    "queue": ["retry_initial", "concurrency_total"],
}
TOML_VALUES = st.sampled_from([
    "0", "1", "-1", "25", "65536", "99999999999999999999", "1.5", "-0.0", "nan", "inf", "-inf", "1e308",
    "true", "false", '""', '"x"', '"127.0.0.1"', '"::1"', '"*"', '"/nonexistent/cert.pem"', '"NEVER"',
    '"v=spf1 -all"', '"reject"', '"any"', "[]", '["127.0.0.1:53"]', '["[::1]:5353", 1]', "{}", "{ a = 1 }",
    "1979-05-27T07:32:00Z", '"\\u0000"', "'''multi\nline'''",
])


@st.composite
def toml_documents(draw: st.DrawFn) -> str:
    lines = []
    if draw(st.booleans()):
        lines.append(f"hostname = {draw(st.sampled_from(['\"mail.x.test\"', '\"-bad-\"', '1', '\"\"']))}")
    if draw(st.booleans()):
        lines.append(f"data_dir = {draw(st.sampled_from(['\".\"', '\"\"', '3', '\"~/x\"']))}")
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=6)):
        lines.append(f"[{section}]")
        for key in draw(st.lists(st.sampled_from(SECTIONS[section]), max_size=4, unique=True)):
            lines.append(f"{key} = {draw(TOML_VALUES)}")
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(
            ["[limits", "= 1", "x = ", "[[listeners]]", "\x00", "a.b.c = 1", "[limits]"])))
    return "\n".join(lines) + "\n"


def _load(path: Path, text: str | bytes) -> None:
    path.write_bytes(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg.strip() or "invalid TOML" in msg, msg
        return
    assert isinstance(cfg, Config)


@FUZZ
@given(doc=toml_documents())
def test_config_structured(tmp_path: Path, doc: str) -> None:
    with Bounded():
        _load(tmp_path / "p.toml", doc)


@FUZZ
@given(raw=st.binary(max_size=300))
def test_config_random_bytes(tmp_path: Path, raw: bytes) -> None:
    with Bounded():
        _load(tmp_path / "p.toml", raw)


def test_config_refuses_non_finite_numbers(tmp_path: Path) -> None:
    base = 'hostname = "m.x.test"\ndata_dir = "."\n[listeners.smtp]\nport = 2525\n[limits]\n'
    for value in ("nan", "inf"):
        p = tmp_path / "c.toml"
        p.write_text(base + f"idle_timeout = {value}\n")
        with pytest.raises(ConfigError, match=r"^limits\.idle_timeout: must be a finite number"):
            load_config(p)


# -- DMARC, SPF, DKIM records ---------------------------------------------------------------------

DMARC_PARTS = st.sampled_from([
    "v=DMARC1", "p=reject", "p=none", "p=quarantine", "p=bogus", "sp=reject", "np=reject", "pct=50",
    "pct=-1", "pct=999999999999999999999", "adkim=s", "aspf=r", "adkim=x", "rua=mailto:a@b.test",
    "ruf=mailto:x", "fo=1:d:s", "ri=86400", "ri=x", "t=y", "psd=y", " ", "", "=", "v", "p=", ";", "\x00",
    "é", "p=reject;p=none",
])


@FUZZ
@given(parts=st.lists(DMARC_PARTS, max_size=12), sep=st.sampled_from([";", "; ", " ;", ";;"]),
       raw=st.binary(max_size=60))
def test_dmarc_record(parts: list[str], sep: str, raw: bytes) -> None:
    for text in (sep.join(parts), raw, sep.join(parts).encode() + raw):
        try:
            rec = parse_record(text)
        except DMARCRecordError:
            continue
        assert isinstance(rec, DMARCRecord)


@FUZZ
@given(head=st.binary(max_size=300) | st.lists(st.sampled_from([
    b"From: a@b.test\r\n", b"From: <a@b.test>, c@d.test\r\n", b"From: x\r\n", b"From:\r\n", b"FROM: a@[1.2.3.4]\r\n",
    b"From: \"a@evil.test\" <a@good.test>\r\n", b"From: a@b.test\r\n\tc@d.test\r\n", b"Subject: x\r\n",
    b"From: =?utf-8?b?w6k=?= <a@\xc3\xa9.test>\r\n", b"From: group: a@b.test;\r\n", b"\r\n"]), max_size=6).map(b"".join))
def test_from_domain(head: bytes) -> None:
    r = from_domain(head)
    assert isinstance(r, (str, FromProblem))


SPF_TERMS = st.sampled_from([
    "v=spf1", "-all", "~all", "+all", "?all", "all", "a", "mx", "ptr", "ip4:127.0.0.1", "ip4:1.2.3.4/33",
    "ip6:::1/129", "include:inc.test", "include:loop.test", "exists:%{i}.x.test", "redirect=r.test",
    "redirect=loop.test", "exp=e.test", "a:%{l1r-}.test", "%{", "%{z}", "mx/24", "a//64", "ip4:",
    "include:", "unknown=x", "v=spf2", "\x00", "é",
])


@FUZZ
@given(terms=st.lists(SPF_TERMS, max_size=12), ip=st.sampled_from(["127.0.0.1", "::1", "1.2.3.4", "x"]),
       sender=st.sampled_from(["a@spf.test", "", "spf.test", "\"q\"@spf.test", "a@"]))
def test_spf_record(terms: list[str], ip: str, sender: str) -> None:
    r = FakeResolver()
    record = " ".join(terms)
    for name in ("spf.test", "inc.test", "r.test"):
        r.add(name, "TXT", record)
    r.add("loop.test", "TXT", "v=spf1 include:loop.test redirect=loop.test")
    r.add("spf.test", "A", "127.0.0.1")
    r.add("spf.test", "MX", "10 spf.test")
    with Bounded(seconds=5):
        res = check_host(ip, sender, "helo.test", r)
    assert isinstance(res, SPFResult) and isinstance(res.status, SPFStatus)


DKIM_TAGS = st.sampled_from([
    "v=1", "v=2", "a=rsa-sha256", "a=ed25519-sha256", "a=rsa-sha1", "a=x", "d=k.test", "d=", "s=sel", "s=",
    "h=from:subject", "h=subject", "h=", "bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", "bh=!!",
    "b=AAAA", "b=", "c=relaxed/relaxed", "c=simple", "c=bogus/x", "l=0", "l=99999999999999999999", "l=-1",
    "t=1", "x=0", "x=1", "i=@k.test", "i=a@other.test", "q=dns/txt", "q=x", "z=a|b", "=", ";", "\x00",
])
KEY_TXT = st.sampled_from([b"v=DKIM1; p=", b"v=DKIM1; k=rsa; p=AAAA", b"p=!!", b"v=DKIM1; k=ed25519; p=MCowBQ",
                           b"", b"v=DKIM2", b"\xff\x00"])


@FUZZ
@given(tags=st.lists(DKIM_TAGS, max_size=14), key=KEY_TXT, n=st.integers(1, 3))
def test_dkim_signature_header(tags: list[str], key: bytes, n: int) -> None:
    value = "; ".join(tags).encode()
    msg = b"".join(b"DKIM-Signature: " + value + b"\r\n" for _ in range(n))
    msg += b"From: a@k.test\r\nSubject: s\r\n\r\nbody\r\n"
    with Bounded(seconds=5):
        results = verify_all(msg, lambda name, timeout=5: key or None)
    assert len(results) == n and all(isinstance(r, DKIMResult) for r in results)
    assert all(r.status is not DKIMStatus.PASS for r in results)  # garbage never verifies


@pytest.fixture(scope="module")
def ed_key() -> tuple[bytes, str]:
    return generate_key("ed25519-sha256")


@FUZZ
@given(extra=st.lists(st.sampled_from([
    b"From: b@evil.test\r\n", b"Subject: changed\r\n", b"Authentication-Results: k.test; dkim=pass\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=evil.test; s=x; h=from; bh=; b=\r\n"]), max_size=3))
def test_dkim_tampering_never_passes(ed_key: tuple[bytes, str], extra: list[bytes]) -> None:
    """Headers added on top of a signed message (a second From, a forged A-R) do not turn a
    signature into a pass for another author, and the original signature still verifies or fails."""
    pem, dns_txt = ed_key
    msg = b"From: a@k.test\r\nSubject: s\r\n\r\nbody\r\n"
    sig = sign(msg, "k.test", "sel", pem, algorithm="ed25519-sha256")
    signed = sig + b"".join(extra) + msg
    results = verify_all(signed, lambda name, timeout=5: dns_txt.encode() if name.startswith(b"sel.") else None)
    passing = {r.domain for r in results if r.status is DKIMStatus.PASS}
    assert passing <= {"k.test"}
    if b"From: b@evil.test\r\n" in extra:  # h=from covers every From instance: the added one breaks it
        assert "k.test" not in passing


@FUZZ
@given(value=st.text(max_size=200), message=st.binary(max_size=400))
def test_authentication_results_parsing(value: str, message: bytes) -> None:
    assert isinstance(authserv_id_of(value), str)
    out = strip_forged(message, "mail.x.test")
    assert isinstance(out, bytes) and len(out) <= len(message)


def test_forged_authentication_results_are_removed() -> None:
    msg = (b"Authentication-Results: mail.x.test; dmarc=pass header.from=bank.test\r\n"
           b"Authentication-Results: MAIL.X.TEST;\r\n\tdkim=pass\r\n"
           b"Authentication-Results: other.test; spf=pass\r\nSubject: s\r\n\r\nAuthentication-Results: body\r\n")
    out = strip_forged(msg, "mail.x.test")
    assert out == (b"Authentication-Results: other.test; spf=pass\r\nSubject: s\r\n\r\n"
                   b"Authentication-Results: body\r\n")


# -- trace and address headers ------------------------------------------------------------------

@FUZZ
@given(helo=st.text(max_size=80), ip=st.ip_addresses().map(str), name=st.none() | st.text(max_size=40),
       rcpt=st.none() | st.text(max_size=80), tls=st.none() | st.text(max_size=40))
def test_received_header_cannot_be_injected(helo: str, ip: str, name: str | None, rcpt: str | None,
                                            tls: str | None) -> None:
    """Client-supplied HELO names, addresses and TLS strings never break out of the Received field
    (the peer IP comes from the socket, not from the client)."""
    h = received_header(helo=helo, peer_ip=ip, peer_name=name, by_host="mx.x.test", protocol="ESMTP",
                        qid="Q1", tls=tls, recipient=rcpt)
    assert h.startswith(b"Received: ") and h.endswith(b"\r\n")
    lines = h[:-2].split(b"\r\n")
    assert all(ln[:1] in (b"\t", b" ") for ln in lines[1:]), h  # continuation lines only
    assert b"\r" not in b"".join(lines) and b"\n" not in b"".join(lines) and b"\x00" not in h
    assert count_received(h + b"\r\n") == 1


@FUZZ
@given(head=st.binary(max_size=500))
def test_header_helpers(head: bytes) -> None:
    fields, complete = header_fields(head)
    assert isinstance(complete, bool)
    for name, value in fields:
        assert name == name.lower() and b"\r\n" not in value
        r = header_mailboxes(value)
        assert r is None or all(isinstance(a, str) for a in r)
    assert count_received(head) >= 0
    assert isinstance(parse_addresses(head), tuple)


# -- IMAP commands with nested lists and literals -----------------------------------------------

ATOMS = st.sampled_from([b"NIL", b"ALL", b"FLAGS", b"\\Seen", b"BODY[]", b"1:*", b"\"q\"", b"UID", b"OR",
                         b"NOT", b"HEADER", b"x", b"{3}\r\nabc", b"{0}\r\n", b"~{2}\r\n\x00\x01", b"\"\\\"\""])
NESTED = st.recursive(ATOMS, lambda inner: st.lists(inner, max_size=4).map(
    lambda xs: b"(" + b" ".join(xs) + b")"), max_leaves=40)
COMMANDS = st.sampled_from([b"FETCH 1:* ", b"UID FETCH 1 ", b"SEARCH ", b"UID SEARCH RETURN (ALL) ",
                            b"STORE 1 +FLAGS ", b"APPEND INBOX ", b"LIST ", b"STATUS INBOX ",
                            b"SELECT INBOX ", b"ENABLE ", b"ID ", b"LOGIN "])


@FUZZ
@given(cmd=COMMANDS, args=st.lists(NESTED, min_size=1, max_size=4), utf8=st.booleans())
def test_imap_nested_arguments(cmd: bytes, args: list[bytes], utf8: bool) -> None:
    data = b"t1 " + cmd + b" ".join(args) + b"\r\n"
    with Bounded():
        try:
            c = parse_command(data, utf8=utf8)
        except ParseError as exc:
            assert exc.tag in (None, "t1") and isinstance(exc.message, str)
            return
    assert isinstance(c, Command) and c.tag == "t1"


@pytest.mark.parametrize("depth", [10, 33, 1000, 100_000])
def test_imap_nesting_depth_is_capped(depth: int) -> None:
    for body in (b"(" * depth + b"ALL" + b")" * depth, b"NOT " * depth + b"ALL", b"OR ALL " * depth + b"ALL"):
        with Bounded():
            try:
                parse_command(b"t1 SEARCH " + body + b"\r\n")
            except ParseError as exc:
                assert depth > 30 and exc.tag == "t1"


# -- MIME bounds -----------------------------------------------------------------------------------

def _depth(p) -> int:  # noqa: ANN001
    kids = list(p.children) + ([p.message] if p.message is not None else [])
    return 1 + max((_depth(k) for k in kids), default=0)


def test_mime_depth_part_and_field_caps() -> None:
    deep = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(5000))
    with Bounded(seconds=5, megabytes=200):
        tree = parse_message(b"Subject: deep\r\n" + deep + b"\r\nend\r\n")
    assert _depth(tree) <= MAX_DEPTH + 2
    rfc822 = b"Subject: x\r\n" + b"Content-Type: message/rfc822\r\n\r\n" * 5000 + b"\r\nend\r\n"
    with Bounded(seconds=5, megabytes=200):
        tree = parse_message(rfc822)
    assert _depth(tree) <= MAX_DEPTH + 2
    wide = b"Content-Type: multipart/mixed; boundary=w\r\n\r\n" + b"--w\r\n\r\nx\r\n" * (MAX_PARTS + 500) + b"--w--\r\n"
    with Bounded(seconds=10, megabytes=400):
        tree = parse_message(wide)
    assert sum(1 for _ in tree.walk()) <= MAX_PARTS + 2
    many = b"".join(b"X-F%d: v\r\n" % i for i in range(MAX_HEADER_FIELDS + 1000)) + b"\r\nbody\r\n"
    with Bounded(seconds=5, megabytes=200):
        tree = parse_message(many)
    assert len(tree.fields) <= MAX_HEADER_FIELDS
