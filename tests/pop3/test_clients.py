"""Real POP3 clients from Debian against postier: fetchmail and getmail6 download a maildrop over TLS,
with and without keeping the mail on the server, and what they deliver locally is byte for byte what
postier stored (line ends aside: both write local files with LF, and fetchmail adds one Received
header of its own, which is checked and removed exactly)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Instance
from tests.programs import require
from tests.pop3.conftest import PASSWORD, deliver, maildir_files, new_user, subject_of

pytestmark = pytest.mark.slow

# fetchmail's own trace header (fetchmail 6.x, single-drop mode), inserted among the header fields.
FETCHMAIL_RECEIVED = re.compile(
    rb"^Received: from 127\.0\.0\.1 \[127\.0\.0\.1\]\n"
    rb"\tby \S+ with POP3 \(fetchmail-[0-9][0-9.]*\)\n"
    rb"\tfor <[^>\n]+> \(single-drop\); [^\n]+\n", re.MULTILINE)


def need(program: str) -> str:
    return require(program)


def maildrop(inst: Instance, user: str) -> dict[str, bytes]:
    """Deliver a small mailbox: dot lines, "From " lines, a message large enough to be streamed in
    many chunks, one without a final line end. Returns subject -> the stored bytes."""
    big = b"".join(b"%05d %s\r\n" % (i, b"." * (i % 2) + b"y" * 60) for i in range(5000))
    bodies = {
        "plain": b"hello\r\n",
        "dots": b".\r\n..\r\n.leading dot\r\nFrom the start of a line\r\n",
        "big": big,
        "unterminated": b"no final line end",
    }
    return {s: deliver(inst, user, s, body) for s, body in bodies.items()}


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A scratch directory readable by an unprivileged user (getmail refuses to deliver as root)."""
    path = Path(tempfile.mkdtemp(prefix="postier-pop3-client-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- fetchmail --------------------------------------------------------------------------------------

def fetchmail(inst: Instance, work: Path, user: str, keep: bool) -> subprocess.CompletedProcess[str]:
    out = work / "out"
    out.mkdir(exist_ok=True)
    rc = work / "fetchmailrc"
    rc.write_text(
        "set no syslog\n"
        f"poll 127.0.0.1 service {inst.port('pop3s')} protocol pop3 uidl\n"
        f'  user "{user}" there with password "{PASSWORD}" is "localuser" here\n'
        f'  ssl sslcertfile "{inst.root / "tls" / "cert.pem"}" sslcertck sslcommonname "{inst.hostname}"\n'
        f"  {'keep' if keep else 'nokeep'} norewrite\n"
        f"  mda \"/bin/sh -c 'cat > {out}/msg.$$'\"\n")
    rc.chmod(0o600)
    return subprocess.run(
        [need("fetchmail"), "-f", str(rc), "--idfile", str(work / "fetchids"), "--pidfile", str(work / "pid"),
         "--nodetach", "-v"], env=dict(os.environ, HOME=str(work)), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("keep", [True, False], ids=["keep", "nokeep"])
def test_fetchmail(pop: Instance, workdir: Path, keep: bool) -> None:
    need("fetchmail")
    user = new_user(pop)
    sent = maildrop(pop, user)
    r = fetchmail(pop, workdir, user, keep)
    assert r.returncode == 0, r.stdout + r.stderr
    got = {}
    for f in (workdir / "out").iterdir():
        data = f.read_bytes()
        trace = FETCHMAIL_RECEIVED.findall(data)
        assert len(trace) == 1, data[:600]
        header_end = data.index(b"\n\n")
        assert data.index(trace[0]) < header_end  # fetchmail puts it among the header fields
        original = data.replace(trace[0], b"", 1)
        got[subject_of(original)] = original
    assert got == {s: lf(raw) for s, raw in sent.items()}
    left = len(maildir_files(pop, user))
    assert left == (len(sent) if keep else 0)
    if keep:  # fetchmail remembers the UIDLs: a second run finds nothing new
        for f in (workdir / "out").iterdir():
            f.unlink()
        r = fetchmail(pop, workdir, user, keep)
        assert r.returncode == 1, r.stdout + r.stderr  # fetchmail's "no mail"
        assert not list((workdir / "out").iterdir())


# -- getmail6 ---------------------------------------------------------------------------------------

def getmail(inst: Instance, work: Path, user: str, delete: bool) -> subprocess.CompletedProcess[str]:
    md = work / "Maildir"
    for sub in ("", "new", "cur", "tmp"):
        (md / sub).mkdir(exist_ok=True)
    as_user = ""
    if os.geteuid() == 0:  # getmail delivers as this user instead, and it must own the Maildir
        as_user = "user = nobody\n"
        for sub in ("", "new", "cur", "tmp"):
            os.chown(md / sub, 65534, 65534)
    (work / "getmailrc").write_text(
        "[retriever]\n"
        "type = SimplePOP3SSLRetriever\n"
        "server = 127.0.0.1\n"
        f"port = {inst.port('pop3s')}\n"
        f"username = {user}\n"
        f"password = {PASSWORD}\n"
        f"ca_certs = {inst.root / 'tls' / 'cert.pem'}\n"
        "[destination]\n"
        "type = Maildir\n"
        f"path = {md}/\n"
        f"{as_user}"
        "[options]\n"
        "read_all = false\n"
        f"delete = {'true' if delete else 'false'}\n"
        "received = false\n"
        "delivered_to = false\n"
        "verbose = 1\n")
    return subprocess.run([need("getmail"), "--getmaildir", str(work), "--rcfile", str(work / "getmailrc")],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("delete", [False, True], ids=["keep", "delete"])
def test_getmail(pop: Instance, workdir: Path, delete: bool) -> None:
    need("getmail")
    user = new_user(pop)
    sent = maildrop(pop, user)
    r = getmail(pop, workdir, user, delete)
    assert r.returncode == 0, r.stdout + r.stderr
    got = {}
    for f in (workdir / "Maildir" / "new").iterdir():
        data = f.read_bytes()
        got[subject_of(data)] = data
    assert got == {s: lf(raw) for s, raw in sent.items()}
    files = maildir_files(pop, user)
    if delete:
        assert files == []
        return
    # Left on the server, and now \Seen there (getmail RETRieves), for IMAP clients to see.
    assert len(files) == len(sent) and all(f.name.endswith(":2,S") for f in files)
    r = getmail(pop, workdir, user, delete)  # getmail remembers the UIDLs: nothing new
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 messages" in r.stdout
    assert len(list((workdir / "Maildir" / "new").iterdir())) == len(sent)
