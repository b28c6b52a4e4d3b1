"""Drive a cutfs mount (tests/powercut/cutfs.py) from a test: mount, power cut (unmount), mount again.

`CutMount(base)` keeps BACKING, the mount point and the filesystem's STATE under `base`. `cut()` is
the power cut: every process using the mount must be gone first (kill -9 them), then the unmount
makes cutfs rebuild BACKING from what was durable. `available()` tells whether FUSE works here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent


def unavailable_reason() -> str | None:
    """None if a cutfs can be mounted here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian's fuse3; scripts/install-test-deps)"
    try:
        import mfusepy  # type: ignore[import-untyped]  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"mfusepy cannot load libfuse3: {exc}"
    return None


class CutMount:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.backing = base / "backing"
        self.mnt = base / "mnt"
        self.state = base / "cutfs-state"
        self.log = base / "cutfs.log"
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.cuts = 0

    def start(self, timeout: float = 20.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.powercut.cutfs", str(self.backing), str(self.mnt), str(self.state)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not os.path.ismount(self.mnt):
            if self.proc.poll() is not None:
                raise AssertionError(f"cutfs exited with {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"cutfs did not mount {self.mnt}: {self.log.read_text()}")
            time.sleep(0.05)

    def cut(self, timeout: float = 60.0) -> None:
        """Power cut: unmount (nothing may use the mount any more) and wait for the rebuild."""
        assert self.proc is not None, "not mounted"
        deadline = time.monotonic() + timeout
        while True:
            p = subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True, text=True)
            if p.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"cannot unmount {self.mnt}: {p.stderr}")
            time.sleep(0.1)  # "busy": a process killed a moment ago still holds files
        rc = self.proc.wait(timeout)
        self.proc = None
        if rc != 0:
            raise AssertionError(f"cutfs failed ({rc}): {self.log.read_text()}")
        self.cuts += 1

    def power_cycle(self) -> None:
        self.cut()
        self.start()

    def close(self) -> None:
        if self.proc is not None:
            subprocess.run(["fusermount3", "-u", "-z", str(self.mnt)], capture_output=True)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
