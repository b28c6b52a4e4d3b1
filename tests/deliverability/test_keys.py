"""The DKIM key store and signer: files and modes, selectors, rotation, dual signatures that verify."""

from __future__ import annotations

import asyncio
import calendar
import stat
from pathlib import Path

import pytest

from postier.mailauth.dkim import DKIMStatus, verify_all
from postier.mailauth.keys import DKIMSigner, KeyError_, KeyStore, default_selector
from postier.resolver.fake import FakeResolver

MSG = (b"From: Alice <alice@a.test>\r\nTo: bob@b.test\r\nSubject: hello\r\n"
       b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <k1@a.test>\r\n\r\nHi Bob.\r\n")
Y2026 = calendar.timegm((2026, 6, 1, 0, 0, 0))


def test_generate_files_modes_and_states(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "dkim")
    rsa = store.generate("A.Test", "rsa-sha256", now=Y2026)
    assert (rsa.domain, rsa.selector, rsa.state) == ("a.test", "p2026a", "active")
    ed = store.generate("a.test", "ed25519-sha256", now=Y2026)
    assert (ed.selector, ed.state) == ("e2026a", "active")
    for k in (rsa, ed):
        mode = stat.S_IMODE((tmp_path / "dkim" / "a.test" / f"{k.selector}.key").stat().st_mode)
        assert mode == 0o600
    assert stat.S_IMODE((tmp_path / "dkim").stat().st_mode) == 0o700
    assert rsa.txt.startswith("v=DKIM1; k=rsa; p=") and ed.txt.startswith("v=DKIM1; k=ed25519; p=")
    # a second RSA key waits in "published" until activated: rotation with two selectors
    new = store.generate("a.test", "rsa-sha256", now=Y2026)
    assert (new.selector, new.state) == ("p2026b", "published")
    assert {k.selector for k in store.active("a.test")} == {"p2026a", "e2026a"}
    store.set_state("a.test", "p2026b", "active")
    states = {k.selector: k.state for k in store.keys("a.test")}
    assert states == {"p2026a": "published", "e2026a": "active", "p2026b": "active"}
    store.set_state("a.test", "p2026a", "retired")
    assert {k.selector: k.state for k in store.keys("a.test")}["p2026a"] == "retired"
    assert store.domains() == ["a.test"]


def test_selector_names_and_bad_input(tmp_path: Path) -> None:
    assert default_selector("rsa-sha256", Y2026, {"p2026a"}) == "p2026b"
    assert default_selector("ed25519-sha256", Y2026) == "e2026a"
    store = KeyStore(tmp_path / "dkim")
    store.generate("a.test", "ed25519-sha256", selector="Custom-1")
    with pytest.raises(KeyError_, match="exists already"):
        store.generate("a.test", "ed25519-sha256", selector="custom-1")
    for bad in ("../x", "a/b", "a.b", "-x", "x" * 64, "ü"):
        with pytest.raises(KeyError_):
            store.generate("a.test", "ed25519-sha256", selector=bad)
    for bad_domain in ("../etc", "a/../../b", "", "a..b", ".."):
        with pytest.raises(KeyError_):
            store.generate(bad_domain, "ed25519-sha256")
    with pytest.raises(KeyError_, match="no selector"):
        store.set_state("a.test", "nope", "active")
    assert not any(p.name != "a.test" for p in (tmp_path / "dkim").iterdir())


def test_signer_dual_signs_and_signatures_verify(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "dkim")
    keys = [store.generate("a.test", "rsa-sha256", now=Y2026), store.generate("a.test", "ed25519-sha256", now=Y2026)]
    dns = FakeResolver()
    for k in keys:
        dns.add(k.dns_name, "TXT", k.txt)
    signer = DKIMSigner(store)
    headers = asyncio.run(signer.sign_bytes(MSG))
    assert headers.count(b"DKIM-Signature:") == 2
    assert b"a=rsa-sha256" in headers and b"a=ed25519-sha256" in headers
    assert b"c=relaxed/relaxed" in headers and b" l=" not in headers
    results = verify_all(headers + MSG, dns)
    assert [r.status for r in results] == [DKIMStatus.PASS, DKIMStatus.PASS]
    assert {r.selector for r in results} == {"p2026a", "e2026a"}


def test_signer_domain_choice(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "dkim")
    store.generate("a.test", "ed25519-sha256")
    signer = DKIMSigner(store)
    sub = MSG.replace(b"alice@a.test", b"news@lists.a.test")
    assert b"d=a.test" in asyncio.run(signer.sign_bytes(sub))  # parent domain: relaxed alignment
    assert asyncio.run(signer.sign_bytes(MSG.replace(b"alice@a.test", b"x@other.test"))) == b""
    two_from = b"From: x@a.test\r\n" + MSG
    assert asyncio.run(signer.sign_bytes(two_from)) == b""
    store.set_state("a.test", store.keys("a.test")[0].selector, "retired")
    assert asyncio.run(signer.sign_bytes(MSG)) == b""
