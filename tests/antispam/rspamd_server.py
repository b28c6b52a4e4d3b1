"""A real Rspamd (Debian's package) for tests: its own configuration directory and ports on loopback.

Rspamd's DNS goes to the in-process DNS server (its RBL lookups answer NXDOMAIN at once instead of
timing out against the Internet), Bayes keeps its tokens in a throwaway redis-server, and no
proxy or fuzzy worker runs. Start-up compiles Rspamd's regular expressions (tens of seconds on a
busy machine); the compiled cache is kept in the system temporary directory across runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.harness import free_port

CACHE = Path(tempfile.gettempdir()) / "postier-test-rspamd-hs-cache"


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        if os.environ.get("POSTIER_REQUIRE_INTEROP") == "1":
            pytest.fail(f"{program} is required (POSTIER_REQUIRE_INTEROP=1): apt-get install rspamd redis-server")
        pytest.skip(f"{program} not installed")
    return path


class RspamdServer:
    def __init__(self, root: Path, nameserver: str, add_header: float | None = None, milter_port: int | None = None,
                 local: dict[str, str] | None = None):
        self.root = root
        self.nameserver = nameserver
        self.port = free_port()
        self.controller_port = free_port()
        self.redis_port = free_port()
        self.password = "test-controller-secret"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.add_header = add_header  # a lower "add header" threshold, so that tests can make junk
        # A proxy worker speaking the milter protocol, for a Postfix beside postier (bench/smtp_ingest.py);
        # it hands every message to the same normal worker postier uses.
        self.milter_port = milter_port
        self.local = dict(local or {})  # more local.d files: name -> text

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def controller(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def start(self, timeout: float = 240.0) -> None:
        rspamd = need("rspamd")
        redis = need("redis-server")
        conf = self.root / "conf"
        for d in ("local.d", "override.d", "db", "run", "log"):
            (conf / d).mkdir(parents=True, exist_ok=True)
        CACHE.mkdir(exist_ok=True)
        host, _, port = self.nameserver.rpartition(":")
        files = {
            "local.d/worker-normal.inc": f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n',
            "local.d/worker-controller.inc": (f'bind_socket = "127.0.0.1:{self.controller_port}";\n'
                                              f'password = "{self.password}";\n'
                                              f'enable_password = "{self.password}";\ncount = 1;\n'),
            "local.d/worker-proxy.inc": "enabled = false;\n" if self.milter_port is None else (
                f'bind_socket = "127.0.0.1:{self.milter_port}";\nmilter = yes;\ntimeout = 120s;\ncount = 1;\n'
                f'upstream "local" {{ default = yes; hosts = "127.0.0.1:{self.port}"; }}\n'),
            "local.d/worker-fuzzy.inc": "enabled = false;\n",
            "local.d/logging.inc": f'type = "file";\nfilename = "{conf}/log/rspamd.log";\nlevel = "info";\n',
            "local.d/options.inc": (f'dns {{ nameserver = ["{host}:{port}"]; timeout = 1s; retransmits = 1; }}\n'
                                    f'hs_cache_dir = "{CACHE}";\n'),
            # postier greylists itself ([antispam] greylist); Rspamd's own would answer "soft reject".
            "local.d/greylist.conf": "enabled = false;\n",
            "local.d/ratelimit.conf": "enabled = false;\n",
            "local.d/redis.conf": f'servers = "127.0.0.1:{self.redis_port}";\n',
            "local.d/classifier-bayes.conf": (f'backend = "redis";\nservers = "127.0.0.1:{self.redis_port}";\n'
                                              "min_learns = 1;\nmin_tokens = 1;\nautolearn = false;\n"),
        }
        files.update({f"local.d/{name}": text for name, text in self.local.items()})
        if self.add_header is not None:
            files["local.d/actions.conf"] = f"add_header = {self.add_header};\nreject = 15;\ngreylist = null;\n"
        for name, text in files.items():
            (conf / name).write_text(text)
        self.log = open(self.root / "rspamd.out", "ab")  # noqa: SIM115
        self.procs.append(subprocess.Popen(
            [redis, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.root)], stdout=self.log, stderr=subprocess.STDOUT))
        self.procs.append(subprocess.Popen(
            [rspamd, "-f", "-i", "-c", "/etc/rspamd/rspamd.conf", "--var", f"LOCAL_CONFDIR={conf}",
             "--var", f"DBDIR={conf}/db", "--var", f"RUNDIR={conf}/run", "--var", f"LOGDIR={conf}/log"],
            stdout=self.log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs[-1].poll() is not None:
                raise AssertionError(f"rspamd exited: {(self.root / 'rspamd.out').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/ping", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("rspamd did not answer /ping in time")

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def pid(self) -> int:
        """The main rspamd process (its workers are its children)."""
        return self.procs[-1].pid
