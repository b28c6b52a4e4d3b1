"""Sieve's flags and the default script, end to end: a running postier with mail authentication on and
the in-process DNS server, scripts installed with `postier sieve put`, mail over real SMTP, flags read
over IMAP and from the Maildir file names.

imap4flags (RFC 5232 §5): the flags a script gives (addflag, :flags) are those of the stored message,
keywords included (registered in the folder's dovecot-keywords), invalid names dropped (§3); two
sessions at once give each message its own keyword. `[sieve] default_script` runs for users without
an active script (a DMARC-quarantined message is spam to spamtest), `[sieve.domain_scripts]` in its
place for a domain's users; a user's own script replaces either.
"""

from __future__ import annotations

import imaplib
import re
import smtplib
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from tests.concurrency import together
from tests.dnsserver import DNSServer
from tests.harness import Instance

pytestmark = pytest.mark.timeout(120)

ADDRESS = "127.0.0.6"
DEFAULT = (b'require ["spamtest", "relational", "comparator-i;ascii-numeric", "fileinto", "imap4flags"];\n'
           b'if spamtest :value "ge" :comparator "i;ascii-numeric" "5" {\n'
           b'  fileinto :flags ["$DefaultJunk"] "Junk";\n}\n')
DOMAIN_DEFAULT = b'require ["imap4flags"];\nkeep :flags ["$DomainDefault"];\n'
SCRIPTS = {
    "ivy@d.test": 'require ["fileinto", "imap4flags"];\naddflag "\\\\Flagged";\naddflag "$Work";\n'
                  'addflag "bad(name";\nfileinto "Work";\n',
    "jack@d.test": 'require ["imap4flags"];\nkeep :flags ["\\\\Seen", "\\\\Recent"];\n',
    "kim@d.test": 'require ["imap4flags", "variables"];\n'
                  'if header :matches "subject" "*" { addflag "${1}"; }\naddflag "\\\\Answered";\n',
}


@pytest.fixture(scope="module")
def mx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    with DNSServer() as dns:
        root: Path = tmp_path_factory.mktemp("flags")
        (root / "default.sieve").write_bytes(DEFAULT)
        (root / "e.sieve").write_bytes(DOMAIN_DEFAULT)
        inst = Instance(root, "d.test", address=ADDRESS, extra_config=(
            f'[dns]\nnameservers = ["{dns.nameserver}"]\ntimeout = 2.0\n'
            '[mailauth]\ndkim_verify = false\n'
            f'[sieve]\ndefault_script = "{root / "default.sieve"}"\n'
            f'[sieve.domain_scripts]\n"e.test" = "{root / "e.sieve"}"\n'))
        inst.cli("domain", "add", "e.test")
        inst.add_user("max@e.test")
        dns.add("evil.test", "TXT", "v=spf1 -all")  # spam: SPF fails, DMARC says quarantine
        dns.add("_dmarc.evil.test", "TXT", "v=DMARC1; p=quarantine")
        dns.add("good.test", "TXT", "v=spf1 ip4:127.0.0.0/8 -all")
        for user in ("ivy", "jack", "kim", "lena"):
            inst.add_user(f"{user}@d.test")
        for addr, text in SCRIPTS.items():
            inst.cli("sieve", "put", addr, "main", "-", stdin=text)
            inst.cli("sieve", "activate", addr, "main")
        inst.start()
        try:
            yield inst
        finally:
            inst.stop()


def send(inst: Instance, frm: str, to: str, subject: str) -> None:
    data = (f"From: <{frm}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{subject}@x.test>\r\n"
            f"\r\nbody\r\n").encode()
    with smtplib.SMTP(*inst.addr("smtp"), timeout=30) as s:
        s.sendmail(frm, [to], data)


def wait_files(inst: Instance, address: str, n: int, folder: str = "") -> list[str]:
    md = inst.maildir(address) / (f".{folder}" if folder else "")
    deadline = time.monotonic() + 20
    while True:
        names = sorted(p.name for sub in ("new", "cur") if (md / sub).is_dir() for p in (md / sub).iterdir())
        if len(names) >= n or time.monotonic() > deadline:
            return names
        time.sleep(0.05)


def imap_flags(inst: Instance, address: str, folder: str) -> dict[str, set[str]]:
    """Subject -> FLAGS of every message in the folder (without \\Recent)."""
    with imaplib.IMAP4(*inst.addr("imap")) as im:
        im.starttls(inst.client_ssl_context())
        im.login(address, "password123")
        typ, _ = im.select(folder, readonly=True)
        assert typ == "OK", folder
        typ, data = im.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK"
        out: dict[str, set[str]] = {}
        for item in data:
            if not isinstance(item, tuple):
                continue
            flags = re.search(rb"FLAGS \(([^)]*)\)", item[0])
            subject = re.search(rb"Subject: (.*)", item[1])
            assert flags is not None and subject is not None
            out[subject.group(1).strip().decode()] = {f for f in flags.group(1).decode().split() if f != "\\Recent"}
        return out


def test_addflag_fileinto_stores_flags_and_keywords(mx: Instance) -> None:
    send(mx, "carol@good.test", "ivy@d.test", "work1")
    names = wait_files(mx, "ivy@d.test", 1, "Work")
    assert len(names) == 1 and names[0].endswith(":2,Fa"), names  # \Flagged and the keyword's letter
    assert (mx.maildir("ivy@d.test") / ".Work" / "cur" / names[0]).is_file()
    assert "0 $Work" in (mx.maildir("ivy@d.test") / ".Work" / "dovecot-keywords").read_text()
    assert imap_flags(mx, "ivy@d.test", "Work") == {"work1": {"\\Flagged", "$Work"}}  # "bad(name" dropped


def test_keep_flags_seen(mx: Instance) -> None:
    send(mx, "carol@good.test", "jack@d.test", "seen1")
    names = wait_files(mx, "jack@d.test", 1)
    assert len(names) == 1 and names[0].endswith(":2,S"), names
    assert imap_flags(mx, "jack@d.test", "INBOX") == {"seen1": {"\\Seen"}}
    with imaplib.IMAP4(*mx.addr("imap")) as im:  # \Recent is still the first session's (RFC 3501 §2.3.2)
        im.starttls(mx.client_ssl_context())
        im.login("jack@d.test", "password123")
        im.select("INBOX")
        typ, data = im.fetch("1", "(FLAGS)")
        assert typ == "OK" and b"\\Recent" in data[0]  # type: ignore[operator]


def test_two_sessions_at_once_each_message_its_keyword(mx: Instance) -> None:
    subjects = [f"kw{i}" for i in range(6)]
    together(*(partial(send, mx, "carol@good.test", "kim@d.test", s) for s in subjects), timeout=60)
    assert len(wait_files(mx, "kim@d.test", len(subjects))) == len(subjects)
    got = imap_flags(mx, "kim@d.test", "INBOX")
    assert got == {s: {s, "\\Answered"} for s in subjects}, got


def test_default_script_for_users_without_one(mx: Instance) -> None:
    send(mx, "ceo@evil.test", "lena@d.test", "spam1")  # DMARC quarantine: spamtest says spam
    send(mx, "carol@good.test", "lena@d.test", "ham1")
    assert len(wait_files(mx, "lena@d.test", 1, "Junk")) == 1
    assert len(wait_files(mx, "lena@d.test", 1)) == 1
    assert imap_flags(mx, "lena@d.test", "Junk") == {"spam1": {"$DefaultJunk"}}  # the default script ran
    assert imap_flags(mx, "lena@d.test", "INBOX") == {"ham1": set()}


def test_own_script_replaces_the_default(mx: Instance) -> None:
    send(mx, "ceo@evil.test", "jack@d.test", "spam2")  # jack's own script: keep, flagged \Seen
    assert len(wait_files(mx, "jack@d.test", 1, "Junk")) == 1  # the verdict's Junk is the keep's folder
    assert imap_flags(mx, "jack@d.test", "Junk") == {"spam2": {"\\Seen"}}  # no $DefaultJunk: not run


def test_domain_default_in_place_of_the_servers(mx: Instance) -> None:
    send(mx, "ceo@evil.test", "max@e.test", "spam3")  # e.test's default: keep, flagged; no Junk filing
    assert len(wait_files(mx, "max@e.test", 1, "Junk")) == 1  # the verdict's Junk: the keep's folder
    assert imap_flags(mx, "max@e.test", "Junk") == {"spam3": {"$DomainDefault"}}


def test_a_default_script_that_does_not_compile_is_a_config_error(tmp_path: Path) -> None:
    from postier.config import ConfigError
    from postier.pipeline.sieve import _load

    bad = tmp_path / "bad.sieve"
    bad.write_text("keep\n")
    with pytest.raises(ConfigError, match=r"sieve.default_script: .*line 2"):
        _load("sieve.default_script", bad)
    with pytest.raises(ConfigError, match="cannot read"):
        _load("sieve.default_script", tmp_path / "missing.sieve")
    good = tmp_path / "ok.sieve"
    good.write_text("keep;\n")
    assert _load("sieve.default_script", good).commands
