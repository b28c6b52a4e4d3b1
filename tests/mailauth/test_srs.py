"""SRS addresses (postier/mailauth/srs.py): forward, reverse, SRS1 through a second forwarder, forged,
expired and malformed addresses refused, the key file made 0600."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postier.mailauth.srs import SRS, SRSError, is_srs, load_secret

NOW = 1_780_000_000.0
A = SRS(b"key-of-forwarder-a-0123456789")
B = SRS(b"key-of-forwarder-b-0123456789")


def test_forward_and_reverse() -> None:
    fwd = A.forward("alice@orig.test", "a.test", NOW)
    assert fwd.startswith("SRS0=") and fwd.endswith("@a.test") and is_srs(fwd.split("@")[0])
    assert A.reverse(fwd, NOW) == "alice@orig.test"
    assert A.reverse(fwd.upper().replace("@A.TEST", "@a.test"), NOW).lower() == "alice@orig.test"  # case-folded


def test_null_and_own_senders_unchanged() -> None:
    assert A.forward("", "a.test", NOW) == ""
    assert A.forward("bob@a.test", "a.test", NOW) == "bob@a.test"


def test_srs1_through_two_forwarders() -> None:
    first = A.forward("alice@orig.test", "a.test", NOW)
    second = B.forward(first, "b.test", NOW)
    assert second.startswith("SRS1=") and second.endswith("@b.test")
    back = B.reverse(second, NOW)
    assert back.endswith("@a.test") and back.startswith("SRS0=")
    assert A.reverse(back, NOW) == "alice@orig.test"
    third = SRS(b"key-of-forwarder-c-0123456789").forward(second, "c.test", NOW)
    assert third.startswith("SRS1=") and "=a.test==" in third


def test_forged_and_expired_refused() -> None:
    fwd = A.forward("alice@orig.test", "a.test", NOW)
    with pytest.raises(SRSError):
        B.reverse(fwd, NOW)  # another key
    forged = fwd.replace("alice@", "mallory@").replace("=alice", "=mallory")
    with pytest.raises(SRSError):
        A.reverse(forged, NOW)
    with pytest.raises(SRSError, match="expired"):
        A.reverse(fwd, NOW + 30 * 86400)
    assert A.reverse(fwd, NOW + 20 * 86400) == "alice@orig.test"
    for bad in ("SRS0=x@a.test", "SRS0==a=b=c@a.test", "SRS1=abcd=x@a.test", "plain@a.test", "SRS0=@a.test"):
        with pytest.raises(SRSError):
            A.reverse(bad, NOW)


def test_old_keys_still_verify() -> None:
    fwd = A.forward("alice@orig.test", "a.test", NOW)
    rotated = SRS(b"a-brand-new-key-0123456789", old_keys=(b"key-of-forwarder-a-0123456789",))
    assert rotated.reverse(fwd, NOW) == "alice@orig.test"


def test_secret_made_once_0600(tmp_path: Path) -> None:
    p = tmp_path / "data" / "srs.key"
    k = load_secret(p)
    assert len(k) >= 32 and p.stat().st_mode & 0o777 == 0o600
    assert load_secret(p) == k


@given(st.text(min_size=0, max_size=80))
def test_reverse_never_crashes(addr: str) -> None:
    try:
        A.reverse(addr, NOW)
    except SRSError:
        pass


@given(st.from_regex(r"[a-z0-9._+-]{1,20}", fullmatch=True), st.from_regex(r"[a-z0-9-]{1,10}\.example", fullmatch=True))
def test_round_trip(local: str, domain: str) -> None:
    assert A.reverse(A.forward(f"{local}@{domain}", "a.test", NOW), NOW) == f"{local}@{domain}"
