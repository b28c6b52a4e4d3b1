"""Real IMAP clients from Debian against postier: mbsync (isync) both ways, mutt scripted.

Skipped when the program is missing, unless POSTIER_REQUIRE_INTEROP=1 (then they fail).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.store.maildir import deliver_maildir

from tests.programs import mbsync, mbsync_config, require

from .conftest import PASSWORD, IMAPServer, start_instance

pytestmark = pytest.mark.slow


def need(program: str) -> str:
    return require(program)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IMAPServer]:
    inst = start_instance(tmp_path_factory.mktemp("interop"))
    try:
        yield IMAPServer(inst)
    finally:
        inst.stop()
        log = inst.log.read_text()
        assert "Traceback" not in log, log[-4000:]


def msg(subject: str, body: str = "hello") -> bytes:
    return f"From: alice@example.net\r\nTo: bob@example.org\r\nSubject: {subject}\r\n" \
           f"Message-ID: <{subject.replace(' ', '.')}@example.net>\r\n\r\n{body}\r\n".encode()


def files(d: Path) -> dict[str, str]:
    """subject -> maildir info flags of every message in a Maildir folder."""
    out = {}
    for sub in ("new", "cur"):
        p = d / sub
        if not p.is_dir():
            continue
        for f in p.iterdir():
            subj = next((ln[9:] for ln in f.read_bytes().decode().splitlines() if ln.startswith("Subject: ")), "?")
            out[subj] = f.name.split(":2,")[1] if ":2," in f.name else ""
    return out


def test_mbsync_both_ways(server: IMAPServer, tmp_path: Path) -> None:
    addr = server.user("sync")
    md = server.maildir(addr)
    for i in range(3):
        deliver_maildir(md, b"", msg(f"server {i}"))
    local = tmp_path / "local"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    mbsync_config(rc, local, server.inst.port("imap"), addr, PASSWORD, server.inst.root / "tls" / "cert.pem",
                  ssl_type="STARTTLS")

    def sync() -> None:
        mbsync(rc)

    sync()
    assert set(files(local / "INBOX")) == {"server 0", "server 1", "server 2"}
    assert {"Sent", "Trash", "Drafts", "Junk", "Archive"} <= {p.name for p in local.iterdir()}

    # Near side changes: flag one, delete one, add one, and a new folder with a message.
    inbox = local / "INBOX"
    by_subject = {}
    for sub in ("new", "cur"):
        for f in (inbox / sub).iterdir():
            by_subject[f.read_bytes().split(b"Subject: ")[1].splitlines()[0].decode()] = f
    f0 = by_subject["server 0"]
    os.rename(f0, inbox / "cur" / (f0.name.split(":2,")[0] + ":2,FS"))
    os.unlink(by_subject["server 1"])
    deliver_maildir(inbox, b"", msg("local new"))
    for sub in ("cur", "new", "tmp"):
        (local / "FromLocal" / sub).mkdir(parents=True)
    deliver_maildir(local / "FromLocal", b"", msg("in new folder"))
    # Far side changes: a new message, a flag, a new folder.
    with server.client(addr) as c:
        c.ok("SELECT INBOX")
        c.ok("UID STORE 3 +FLAGS (\\Answered)")
        c.ok("CREATE FromServer")
    deliver_maildir(md, b"", msg("server new"))
    deliver_maildir(md / ".FromServer", b"", msg("server folder msg"))

    sync()
    with server.client(addr) as c:
        c.ok("SELECT INBOX")
        fetched = b"".join(c.ok("FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
        assert b"server 1" not in fetched  # deleted near side, expunged far side
        assert b"local new" in fetched and b"server new" in fetched
        line0 = next(x for x in c.ok("FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])") if b"server 0" in x)
        assert b"\\Seen" in line0 and b"\\Flagged" in line0
        u = c.ok('STATUS FromLocal (MESSAGES)')
        assert b"MESSAGES 1" in u[0]
    near = files(local / "INBOX")
    assert "server new" in near and "server 1" not in near
    assert "R" in near["server 2"]
    assert files(local / "FromServer") == {"server folder msg": ""} or "server folder msg" in files(local / "FromServer")

    # A second run with no changes is a no-op both ways.
    sync()
    assert files(local / "INBOX") == near


def test_mutt_reads_over_imaps_and_starttls(server: IMAPServer, tmp_path: Path) -> None:
    mutt = need("mutt")
    script = need("script")
    addr = server.user("mutt")
    deliver_maildir(server.maildir(addr), b"", msg("mutt test", "secret body 42"))
    certs = tmp_path / "certs.pem"
    shutil.copy(server.inst.root / "tls" / "cert.pem", certs)
    user = addr.replace("@", "%40")
    for scheme, port, extra, keys in (
            ("imaps", server.inst.port("imaps"), "", "<flag-message><sync-mailbox>"),
            ("imap", server.inst.port("imap"), "set ssl_starttls=yes\nset ssl_force_tls=yes\n", "")):
        out = tmp_path / f"out-{scheme}.txt"
        rc = tmp_path / f"muttrc-{scheme}"
        rc.write_text(f"""set folder="{scheme}://{user}@127.0.0.1:{port}/"
set imap_pass="{PASSWORD}"
set spoolfile="+INBOX"
set certificate_file="{certs}"
set ssl_ca_certificates_file="{certs}"
set quit=yes
set wait_key=no
set move=no
set header_cache=""
set message_cachedir=""
set timeout=5
{extra}""")
        env = dict(os.environ, TERM="vt100", HOME=str(tmp_path))
        # read the message into a file (and flag it, the first time), quit: mutt syncs the flag back
        cmd = f"{mutt} -n -F {rc} -e 'push \"<pipe-message>cat > {out}<enter>{keys}<quit>\"'"
        p = subprocess.run([script, "-qec", cmd, "/dev/null"], capture_output=True, timeout=60, env=env,
                           stdin=subprocess.DEVNULL)
        assert out.exists(), p.stdout[-2000:]
        assert "secret body 42" in out.read_text()
    with server.client(addr) as c:
        c.ok("SELECT INBOX")
        u = c.ok("FETCH 1 (FLAGS)")
        assert b"\\Flagged" in u[0]
    assert any(":2," in f.name and "F" in f.name.split(":2,")[1] for f in (server.maildir(addr) / "cur").iterdir())
