"""Pigeonhole's Sieve conformance suite (its .svtest files), one pytest case per file.

Files of extensions postier does not implement are listed in ``UNSUPPORTED`` with the reason; files that
run but do not fully pass yet are in ``KNOWN_FAILING`` (strict xfail: fixing one makes its case fail
until it is taken off the list). Nothing is skipped silently: a file missing from the conformance copy
fails the run when POSTIER_REQUIRE_INTEROP=1.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .harness import Suite, conformance_dir

CONFORMANCE = conformance_dir()
ROOT = CONFORMANCE / "pigeonhole" / "tests" if CONFORMANCE else None

UNSUPPORTED: dict[str, str] = {
    "extensions/enotify/": "enotify (RFC 5435) is not implemented",
    "failures/fuzz4.svtest": "uses enotify (RFC 5435), not implemented",
    "extensions/extlists/": "extlists (RFC 6134) is not implemented",
    "extensions/ihave/": "ihave and error (RFC 5463) are not implemented",
    "extensions/metadata/": "mboxmetadata/servermetadata (RFC 5490 §3) are not implemented",
    "extensions/mime/": "mime, foreverypart, extracttext (RFC 5703) are not implemented",
    "extensions/special-use/": "special-use (RFC 8579) is not implemented",
    "extensions/vnd.dovecot/": "Dovecot vendor extensions (debug, environment, report)",
    "extensions/mailbox/errors.svtest": "requires vnd.dovecot.debug",
    "plugins/extprograms/": "vnd.dovecot.pipe/filter/execute run external programs; not offered",
    "execute/errors-cpu-limit.svtest": "uses foreverypart (RFC 5703), not implemented",
    "execute/examples.svtest": "reads Pigeonhole's examples/ directory, which the conformance copy lacks",
    "multiscript/": "test_multiscript: sieve_before/sieve_after script sequences are not implemented",
    "extensions/imap4flags/multiscript.svtest": "test_multiscript (script sequences) is not implemented",
    "extensions/editheader/execute.svtest": "test_multiscript (script sequences) is not implemented",
}

KNOWN_FAILING: dict[str, str] = {
    "compile/errors.svtest": "error counts and wording: postier stops at the first syntax error and "
                             "words its errors its own way",
    "extensions/editheader/errors.svtest": "field-value and size-limit checks at upload, error wording",
    "extensions/editheader/protected.svtest": "Pigeonhole will not let Subject be protected; postier "
                                              "honours a configured protection of any header",
    "extensions/environment/basic.svtest": 'expects the implementation name "Pigeonhole Sieve"',
    "extensions/imap4flags/errors.svtest": "error counts differ",
    "extensions/imap4flags/execute.svtest": "expects Dovecot's $HasNoAttachment keyword",
    "extensions/imap4flags/flagstore.svtest": "expects Dovecot's $HasNoAttachment keyword",
    "extensions/include/errors.svtest": "includes are resolved at run time; Pigeonhole also checks them at "
                                        "compile time",
}


def _files() -> list[str]:
    if ROOT is None:
        return []
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.svtest"))


def _reason(table: dict[str, str], rel: str) -> str | None:
    return next((r for prefix, r in table.items() if rel == prefix or
                 (prefix.endswith("/") and rel.startswith(prefix))), None)


def test_conformance_suite_present() -> None:
    if ROOT is None:
        if os.environ.get("POSTIER_REQUIRE_INTEROP") == "1":
            pytest.fail("Pigeonhole conformance suite not found (../shared/conformance or "
                        "$POSTIER_CONFORMANCE_DIR)")
        pytest.skip("Pigeonhole conformance suite not found")
    assert len(_files()) == 146


@pytest.mark.parametrize("rel", _files())
def test_svtest(rel: str) -> None:
    assert ROOT is not None
    unsupported = _reason(UNSUPPORTED, rel)
    if unsupported is not None:
        pytest.skip(f"unsupported: {unsupported}")
    failing = _reason(KNOWN_FAILING, rel)
    failures = Suite(Path(ROOT) / rel).run()
    if rel.startswith("failures/"):  # run by Pigeonhole with -F: these must fail, cleanly
        assert failures, f"{rel} was expected to report a failure"
        return
    if failing is not None:
        assert failures, f"{rel} passes now: take it off KNOWN_FAILING"
        pytest.xfail(f"{failing}: " + "; ".join(failures)[:500])
    assert not failures, "\n".join(failures)
