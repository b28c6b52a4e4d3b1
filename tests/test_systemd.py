"""The service manager: the unit `postier systemd-unit` prints passes `systemd-analyze verify` (which
starts nothing), and the sd_notify protocol is spoken to a datagram socket standing in for systemd's
NOTIFY_SOCKET: READY=1 once every listener serves, RELOADING=1/READY=1 around a reload, STOPPING=1."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from postier.config import STANDARD_PORTS
from postier.server import notify
from tests.harness import Instance
from tests.programs import require


def test_unit_verifies(tmp_path: Path) -> None:
    analyze = require("systemd-analyze")
    inst = Instance(tmp_path / "data", "u.test")
    text = inst.cli("systemd-unit").stdout
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", f"ReadWritePaths={inst.root}", "PrivateTmp=yes",
                 "CapabilityBoundingSet=CAP_NET_BIND_SERVICE CAP_SETUID CAP_SETGID CAP_CHOWN"):
        assert f"\n{line}\n" in text, line
    exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert exec_start.endswith(f" --config {inst.config} serve")
    assert os.access(exec_start.split("=", 1)[1].split()[0], os.X_OK)
    unit = tmp_path / "postier.service"
    unit.write_text(text)
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stderr + r.stdout


def test_unit_with_a_typo_does_not_verify(tmp_path: Path) -> None:
    """The check above would notice a mistake: systemd-analyze reports unknown settings on stderr."""
    analyze = require("systemd-analyze")
    unit = tmp_path / "bad.service"
    unit.write_text("[Service]\nType=notifyy\nExecStart=/bin/true\n")
    r = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert "notifyy" in r.stderr


class Manager:
    """A datagram socket where systemd's would be."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(30)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def wait_for(self, key: str) -> dict[str, str]:
        while True:
            msg = self.next()
            if key in msg:
                return msg


@pytest.fixture
def manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Manager]:
    path = str(tmp_path / "notify")
    m = Manager(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield m
    m.sock.close()


def test_ready_reloading_stopping(tmp_path: Path, manager: Manager) -> None:
    inst = Instance(tmp_path / "data", "n.test")
    inst.start()
    try:
        ready = manager.wait_for("READY")
        assert ready["READY"] == "1"
        for role in STANDARD_PORTS:  # READY=1 means every listener serves
            if role == "lmtp":
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(inst.lmtp_path))
            else:
                socket.create_connection(inst.addr(role), timeout=5).close()
        assert inst.proc is not None
        inst.proc.send_signal(signal.SIGHUP)
        reloading = manager.next()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert manager.next()["READY"] == "1"
        inst.proc.send_signal(signal.SIGTERM)
        assert manager.wait_for("STOPPING")["STOPPING"] == "1"
        assert inst.stop() == 0
    finally:
        inst.stop()


def test_notify_abstract_socket_and_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"postier-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready("ok")
        assert s.recv(100) == b"READY=1\nSTATUS=ok"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not notify.stopping()  # not under systemd: nothing to do
