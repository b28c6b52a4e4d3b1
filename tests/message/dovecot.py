"""Dovecot 2.3 as a reference for the IMAP message views: a throwaway Maildir served by Dovecot's
``imap`` binary in pre-authenticated mode over a pipe (no listener, no password), and a small IMAP
response reader that turns both servers' answers into comparable values.

Used by the differential test (``test_dovecot_diff.py``); skipped when Dovecot is not installed,
unless POSTIER_REQUIRE_INTEROP=1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from typing import IO
from pathlib import Path

IMAP_BINARY = next((p for p in ("/usr/lib/dovecot/imap", "/usr/libexec/dovecot/imap") if os.path.exists(p)), None)

CONF = """\
mail_location = maildir:{root}/Maildir
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
first_valid_uid = 0
first_valid_gid = 0
mail_uid = {uid}
mail_gid = {gid}
imap_max_line_length = 1M
"""

# A parsed IMAP value: None (NIL), bytes (atom, quoted string or literal), int never (numbers stay
# atoms as bytes), or a list of values.
type Value = bytes | None | list[Value]


def available() -> bool:
    return IMAP_BINARY is not None


class DovecotMaildir:
    """Messages written as Maildir files (in order: UIDs 1..n), served by ``imap`` on a pipe."""

    def __init__(self, root: Path, messages: Sequence[bytes]):
        assert IMAP_BINARY is not None
        self.root = root
        md = root / "Maildir"
        for d in ("cur", "new", "tmp"):
            (md / d).mkdir(parents=True)
        for d in ("run", "state"):
            (root / d).mkdir()
        for i, raw in enumerate(messages, 1):
            # one second apart so that Dovecot's UIDs follow our order
            path = md / "cur" / f"{1_700_000_000 + i}.M{i}P1.test:2,"
            path.write_bytes(raw)
            os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
        if os.geteuid() == 0:
            uid = gid = 65534  # Dovecot refuses mail access as root
            root.chmod(0o755)
            for parent in root.parents:  # the mail process (another user) must traverse them
                if parent == Path(tempfile.gettempdir()) or parent == parent.parent:
                    break
                parent.chmod(parent.stat().st_mode | 0o011)
            subprocess.run(["chown", "-R", f"{uid}:{gid}", str(root)], check=True)
        else:
            uid, gid = os.getuid(), os.getgid()
        self.conf = root / "dovecot.conf"
        self.conf.write_text(CONF.format(root=root, uid=uid, gid=gid))

    def run(self, commands: Sequence[bytes]) -> list[list[bytes]]:
        """SELECT INBOX, then each of ``commands`` one at a time (Dovecot runs pipelined commands
        in parallel, so their untagged answers could interleave); returns for each command its
        untagged responses (literals inline) followed by its tagged line."""
        out: list[list[bytes]] = []
        proc = self._start()
        try:
            for i, cmd in enumerate(commands):
                assert proc.stdin is not None and proc.stdout is not None
                tag = b"t%d" % i
                proc.stdin.write(tag + b" " + cmd + b"\r\n")
                proc.stdin.flush()
                try:
                    out.append(self._read_response(proc.stdout, tag))
                except ConnectionError:  # Dovecot gave up (BYE): note it and start again
                    out.append([b"BYE"])
                    self._stop(proc)
                    proc = self._start()
            assert proc.stdin is not None
            proc.stdin.write(b"z LOGOUT\r\n")
            proc.stdin.close()
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return out

    @staticmethod
    def _stop(proc: subprocess.Popen[bytes]) -> None:
        """Let a process that said BYE finish writing its index before it is gone."""
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _start(self, retry: bool = True) -> subprocess.Popen[bytes]:
        env = {"HOME": str(self.root), "USER": "test", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        assert IMAP_BINARY is not None
        proc = subprocess.Popen([IMAP_BINARY, "-c", str(self.conf)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        assert proc.stdin is not None and proc.stdout is not None
        self._read_response(proc.stdout, None)  # greeting
        proc.stdin.write(b"s SELECT INBOX\r\n")
        proc.stdin.flush()
        resps = self._read_response(proc.stdout, b"s")
        if not resps[-1].startswith(b"s OK"):
            self._stop(proc)
            if not retry:
                raise RuntimeError(f"dovecot SELECT failed: {resps[-1]!r} {self.log()}")
            # an index left broken by a process that failed: Dovecot rebuilds it from the Maildir
            for f in (self.root / "Maildir").glob("dovecot.index*"):
                f.unlink()
            return self._start(retry=False)
        return proc

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    @staticmethod
    def _read_response(stream: IO[bytes], tag: bytes | None) -> list[bytes]:
        resps: list[bytes] = []
        while True:
            line = b""
            while True:
                chunk = stream.readline()
                if not chunk:
                    raise ConnectionError(f"dovecot closed the connection after {resps!r}")
                line += chunk
                m = _LITERAL_END.search(chunk)
                if m is None:
                    break
                line += stream.read(int(m.group(1)))
            line = line.removesuffix(b"\r\n")
            resps.append(line)
            if tag is None or line.startswith(tag + b" "):
                return resps

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_LITERAL_END = re.compile(rb"~?\{(\d+)\+?\}\r\n$")


class Reader:
    """Values of one response line (NIL, atoms, quoted strings, literals, lists)."""

    def __init__(self, data: bytes):
        self.s = data
        self.i = 0

    def skip_sp(self) -> None:
        while self.i < len(self.s) and self.s[self.i] == 0x20:
            self.i += 1

    def value(self) -> Value:
        self.skip_sp()
        c = self.s[self.i : self.i + 1]
        if c == b"(":
            self.i += 1
            items: list[Value] = []
            while True:
                self.skip_sp()
                if self.s[self.i : self.i + 1] == b")":
                    self.i += 1
                    return items
                items.append(self.value())
        if c == b'"':
            out = bytearray()
            self.i += 1
            while self.s[self.i] != 0x22:
                if self.s[self.i] == 0x5C:
                    self.i += 1
                out.append(self.s[self.i])
                self.i += 1
            self.i += 1
            return bytes(out)
        m = re.compile(rb"~?\{(\d+)\+?\}\r\n").match(self.s, self.i)
        if m:
            n = int(m.group(1))
            self.i = m.end() + n
            return self.s[m.end() : self.i]
        m = re.compile(rb"[^ ()\[\]]+(\[[^\]]*\](<\d+>)?)?").match(self.s, self.i)
        assert m, self.s[self.i : self.i + 40]
        self.i = m.end()
        atom = m.group()
        return None if atom.upper() == b"NIL" else atom


def parse_value(data: bytes) -> Value:
    return Reader(data).value()


def fetch_items(response: bytes) -> dict[bytes, Value]:
    """``* n FETCH (NAME value ...)`` -> {NAME (upper-cased): value}."""
    m = re.match(rb"\* \d+ FETCH ", response)
    assert m, response[:80]
    lst = Reader(response[m.end() :]).value()
    assert isinstance(lst, list)
    out: dict[bytes, Value] = {}
    for k in range(0, len(lst) - 1, 2):
        name = lst[k]
        assert isinstance(name, bytes)
        out[name.upper()] = lst[k + 1]
    return out
