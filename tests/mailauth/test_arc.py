"""ARC sealing and chain validation (RFC 8617, postier/mailauth/arc.py) over the in-process DNS server:
a first seal (cv=none, i=1) validates; a second hop that recorded arc=pass seals i=2 with cv=pass and
the chain still validates; a body changed after sealing fails; no Authentication-Results of ours
means no seal; an ed25519-only domain forwards unsealed; the arc= clause of our Authentication-Results."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.mailauth.arc import ARCSealer, has_chain, seal, verify_chain
from postier.mailauth.authresults import authentication_results
from postier.mailauth.dkim import generate_key
from postier.mailauth.keys import KeyStore
from postier.resolver import Resolver, make_resolver
from tests.dnsserver import DNSServer

MESSAGE = (b"From: Carol <carol@c.test>\r\nTo: bob@b.test\r\nSubject: hello\r\n"
           b"Message-ID: <1@c.test>\r\n\r\nbody text\r\n")


@pytest.fixture(scope="module")
def dns() -> Iterator[tuple[DNSServer, Resolver, dict[str, bytes]]]:
    keys = {}
    with DNSServer() as server:
        for domain in ("a.test", "m.test"):
            pem, txt = generate_key("rsa-sha256", bits=1024)
            server.add(f"s1._domainkey.{domain}", "TXT", txt)
            keys[domain] = pem
        yield server, make_resolver([server.nameserver], 2.0, cache=False), keys


def ar(authserv_id: str, extra: str = "") -> bytes:
    return f"Authentication-Results: {authserv_id}; spf=pass smtp.mailfrom=carol@c.test{extra}\r\n".encode()


def test_first_seal_validates_and_a_second_hop_continues_the_chain(
        dns: tuple[DNSServer, Resolver, dict[str, bytes]]) -> None:
    _server, resolver, keys = dns
    first = ar("mx.a.test") + MESSAGE
    arc1 = seal(first, "a.test", "s1", keys["a.test"], "mx.a.test", timestamp=1_700_000_000)
    assert arc1.startswith(b"ARC-Seal: i=1;")  # the seal first, then AMS and AAR
    assert b"cv=none" in arc1 and arc1.endswith(b"\r\n") and has_chain(arc1)
    hop1 = arc1 + first
    r1 = verify_chain(hop1, resolver)
    assert (r1.status, r1.instances) == ("pass", 1), r1
    # the next forwarder recorded arc=pass, and seals on top
    second = ar("mx.m.test", "; arc=pass") + hop1
    arc2 = seal(second, "m.test", "s1", keys["m.test"], "mx.m.test")
    assert b"i=2" in arc2 and b"cv=pass" in arc2
    r2 = verify_chain(arc2 + second, resolver)
    assert (r2.status, r2.instances) == ("pass", 2), r2


def test_changed_body_fails_and_nothing_to_seal_without_our_results(
        dns: tuple[DNSServer, Resolver, dict[str, bytes]]) -> None:
    _server, resolver, keys = dns
    first = ar("mx.a.test") + MESSAGE
    sealed = seal(first, "a.test", "s1", keys["a.test"], "mx.a.test") + first
    assert verify_chain(sealed.replace(b"body text", b"body TEXT"), resolver).status == "fail"
    assert verify_chain(MESSAGE, resolver).status == "none"
    assert seal(ar("someone.else") + MESSAGE, "a.test", "s1", keys["a.test"], "mx.a.test") == b""


def test_sealer_uses_the_domains_rsa_key_only(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "dkim")
    store.generate("e.test", "ed25519-sha256")
    store.generate("r.test", "rsa-sha256")
    sealer = ARCSealer(store, "mx.r.test")
    msg = ar("mx.r.test") + MESSAGE
    assert asyncio.run(sealer.seal(msg, "e.test")) == b""  # RFC 8617: rsa-sha256 only
    assert asyncio.run(sealer.seal(msg, "nokey.test")) == b""
    assert b"d=r.test" in asyncio.run(sealer.seal(msg, "sub.r.test"))  # the parent's key, as DKIM


def test_arc_clause_in_our_authentication_results() -> None:
    assert b"arc=pass" in authentication_results("mx.a.test", arc=("pass", "ignored"))
    got = authentication_results("mx.a.test", arc=("fail", "signature did not verify"))
    assert b'arc=fail reason="signature did not verify"' in got
    assert b"arc=" not in authentication_results("mx.a.test")
