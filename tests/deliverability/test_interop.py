"""DKIM interoperability with OpenDKIM (RFC 6376, RFC 8463): each side verifies what the other signed.

- postier's signatures (RSA, ed25519, dual) are verified by `opendkim-testmsg` and dkimpy's
  `dkimverify`. Both read /etc/resolv.conf, so they run in private network and mount namespaces
  (`unshare`) with the test DNS server on 127.0.0.1:53 there (see netns_dns.py).
- OpenDKIM-signed mail verifies in postier. `opendkim-testmsg` itself signs only with rsa-sha1,
  which RFC 8301 §3.1 forbids and postier refuses (checked too); rsa-sha256 and ed25519-sha256
  signatures are made by the same OpenDKIM library (libopendkim) called through ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.mailauth.dkim import DKIMStatus, generate_key, sign, verify_all
from postier.mailauth.keys import KeyStore
from postier.mailauth.records import zone_lines
from postier.mailauth.records import Record
from postier.resolver import Resolver
from tests.dnsserver import DNSServer
from tests.harness import REPO
from tests.programs import missing

pytestmark = pytest.mark.slow
TESTMSG = shutil.which("opendkim-testmsg") or ("/usr/sbin/opendkim-testmsg"
                                               if os.path.exists("/usr/sbin/opendkim-testmsg") else None)
DKIMVERIFY = str(Path(sys.executable).parent / "dkimverify")

MSG = (b"From: Alice <alice@a.test>\r\nTo: Bob <bob@b.test>\r\nCc: carol@b.test\r\nSubject: interop\r\n"
       b"Date: Thu, 26 Nov 2026 10:00:00 +0000\r\nMessage-ID: <interop@a.test>\r\n"
       b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
       b"Hello Bob,\r\n\r\nsome   spaces\t and tabs   \r\n.leading dot\r\n\r\n\r\n")


def _unavailable(what: str) -> None:
    missing(what)


def _netns_ok() -> bool:
    if not shutil.which("unshare") or not shutil.which("ip"):
        return False
    try:
        return subprocess.run(["unshare", "--net", "--mount", "true"], timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[KeyStore, Path]:
    root = tmp_path_factory.mktemp("interop")
    store = KeyStore(root / "dkim")
    store.generate("a.test", "rsa-sha256", selector="rsa")
    store.generate("a.test", "ed25519-sha256", selector="ed")
    zone = root / "zone.txt"
    zone.write_text("\n".join(zone_lines([Record(k.dns_name, "TXT", k.txt) for k in store.keys("a.test")])) + "\n")
    return store, zone


def _verify_outside(zone: Path, cmd: list[str], message: bytes) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["unshare", "--net", "--mount", "--", sys.executable, "-m", "tests.deliverability.netns_dns",
                           str(zone), *cmd], input=message, capture_output=True, timeout=60, cwd=REPO)


def _signed(store: KeyStore, which: tuple[str, ...]) -> bytes:
    out = b""
    for k in store.keys("a.test"):
        if k.selector in which:
            out += sign(MSG, "a.test", k.selector, store.private_key(k), k.algorithm)
    return out + MSG


@pytest.mark.parametrize("which", [("rsa",), ("ed",), ("rsa", "ed")])
def test_postier_signatures_verify_with_opendkim_and_dkimpy(keys: tuple[KeyStore, Path], which: tuple[str, ...]
                                                            ) -> None:
    if TESTMSG is None:
        _unavailable("opendkim-testmsg is not installed (Debian opendkim-tools)")
    if not _netns_ok():
        _unavailable("cannot create network namespaces (unshare) for the resolver of opendkim-testmsg")
    store, zone = keys
    message = _signed(store, which)
    for cmd in ([TESTMSG], [DKIMVERIFY]):
        p = _verify_outside(zone, cmd, message)
        assert p.returncode == 0, (cmd, p.stdout, p.stderr)
    # the verifiers do check: a changed body fails
    p = _verify_outside(zone, [TESTMSG], message.replace(b"Hello Bob", b"Hello Eve"))
    assert p.returncode != 0 and b"signature" in p.stderr.lower()


class LibOpenDKIM:
    """Just enough of libopendkim's signing API (dkim.h) through ctypes."""

    SIGN_RSASHA256, SIGN_ED25519SHA256 = 1, 2
    CANON_SIMPLE, CANON_RELAXED = 0, 1

    def __init__(self) -> None:
        name = ctypes.util.find_library("opendkim") or "libopendkim.so.11"
        lib = ctypes.CDLL(name)
        p, s, n = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
        lib.dkim_init.restype, lib.dkim_init.argtypes = p, [p, p]
        lib.dkim_sign.restype = p
        lib.dkim_sign.argtypes = [p, s, p, s, s, s, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_ssize_t,
                                  ctypes.POINTER(ctypes.c_int)]
        lib.dkim_chunk.argtypes = [p, s, n]
        lib.dkim_eom.argtypes = [p, p]
        lib.dkim_getsighdr.argtypes = [p, s, n, n]
        lib.dkim_free.argtypes = [p]
        lib.dkim_close.argtypes = [p]
        self.lib = lib
        self.handle = lib.dkim_init(None, None)

    def sign(self, message: bytes, domain: str, selector: str, key_pem: bytes, alg: int, canon: int) -> bytes:
        status = ctypes.c_int(0)
        dkim = self.lib.dkim_sign(self.handle, b"postier-test", None, key_pem, selector.encode(), domain.encode(),
                                  canon, canon, alg, -1, ctypes.byref(status))
        assert dkim, f"dkim_sign failed: {status.value}"
        try:
            assert self.lib.dkim_chunk(dkim, message, len(message)) == 0
            assert self.lib.dkim_chunk(dkim, None, 0) == 0
            assert self.lib.dkim_eom(dkim, None) == 0
            buf = ctypes.create_string_buffer(8192)
            assert self.lib.dkim_getsighdr(dkim, buf, len(buf), len("DKIM-Signature: ")) == 0
        finally:
            self.lib.dkim_free(dkim)
        # folded with CRLF when the input had CRLF, LF otherwise
        return b"DKIM-Signature: " + buf.value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"

    def close(self) -> None:
        self.lib.dkim_close(self.handle)


@pytest.fixture(scope="module")
def opendkim() -> Iterator[LibOpenDKIM]:
    try:
        lib = LibOpenDKIM()
    except OSError:
        _unavailable("libopendkim is not installed (Debian libopendkim11, with opendkim-tools)")
    yield lib
    lib.close()


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[DNSServer, Resolver, dict[str, bytes]]]:
    pems = {}
    with DNSServer() as dns:
        for sel, alg in (("rsa", "rsa-sha256"), ("ed", "ed25519-sha256")):
            pems[sel], txt = generate_key(alg)  # type: ignore[arg-type]
            dns.add(f"{sel}._domainkey.a.test", "TXT", txt)
        yield dns, Resolver([dns.nameserver], timeout=2.0), pems


# ed25519 with simple/simple is left out: libopendkim 2.11.0~beta2 fails to verify its own such
# signatures too (opendkim-testmsg: "Bad signature"), so it is no test of postier.
@pytest.mark.parametrize("sel,alg,canon", [
    ("rsa", LibOpenDKIM.SIGN_RSASHA256, LibOpenDKIM.CANON_RELAXED),
    ("rsa", LibOpenDKIM.SIGN_RSASHA256, LibOpenDKIM.CANON_SIMPLE),
    ("ed", LibOpenDKIM.SIGN_ED25519SHA256, LibOpenDKIM.CANON_RELAXED),
])
def test_opendkim_signed_mail_verifies_in_postier(opendkim: LibOpenDKIM,
                                                  world: tuple[DNSServer, Resolver, dict[str, bytes]],
                                                  sel: str, alg: int, canon: int) -> None:
    _, resolver, pems = world
    header = opendkim.sign(MSG, "a.test", sel, pems[sel], alg, canon)
    [result] = verify_all(header + MSG, resolver)
    assert (result.status, result.domain, result.selector) == (DKIMStatus.PASS, "a.test", sel), result
    [bad] = verify_all(header + MSG.replace(b"Hello Bob", b"Hello Eve"), resolver)
    assert bad.status is DKIMStatus.FAIL


def test_opendkim_testmsg_rsa_sha1_is_refused(world: tuple[DNSServer, Resolver, dict[str, bytes]],
                                              tmp_path: Path) -> None:
    if TESTMSG is None:
        _unavailable("opendkim-testmsg is not installed (Debian opendkim-tools)")
    _, resolver, pems = world
    key = tmp_path / "rsa.pem"
    key.write_bytes(pems["rsa"])
    p = subprocess.run([TESTMSG, "-C", "-d", "a.test", "-s", "rsa", "-k", str(key)], input=MSG,
                       capture_output=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert b"a=rsa-sha1" in p.stdout
    [result] = verify_all(p.stdout.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), resolver)
    assert result.status is DKIMStatus.PERMERROR and "RFC 8301" in result.reason
