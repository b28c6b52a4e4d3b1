"""The package as a user installs it: build the wheel, install it into a clean venv without extras,
and run the smoke path from there (every module imports, `--help`, quickstart, serve, SMTP in, IMAP out).

This catches a runtime import that is not a declared dependency (the dev venv has the test extras,
which pull in more than the app declares) and a wheel that misses files.
"""

from __future__ import annotations

import imaplib
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.harness import REPO, Instance

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    wheels = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("postier-*.whl")
    env = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True, timeout=300)
    py = env / "bin" / "python"
    # Exactly what the README tells an admin to run: the wheel, with the lock file as constraints.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "-c", str(REPO / "requirements.lock"), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return env


def run(env: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(env / "bin" / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=120, cwd="/")


def test_installed_has_no_test_extras(venv: Path) -> None:
    frozen = run(venv, "python", "-m", "pip", "freeze", "--exclude", "postier").stdout.lower()
    assert "pytest" not in frozen and "trustme" not in frozen, frozen
    where = run(venv, "python", "-c", "import postier; print(postier.__file__)").stdout
    assert where.startswith(str(venv)), where  # the wheel, not the checkout


def test_every_module_imports(venv: Path) -> None:
    code = ("import importlib, pkgutil, postier\n"
            "for m in pkgutil.walk_packages(postier.__path__, 'postier.'):\n"
            "    if m.name != 'postier.__main__' and not m.name.startswith('postier.store.cluster'):\n"
            "        importlib.import_module(m.name)\n"
            "print('ok')\n")
    p = run(venv, "python", "-c", code)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_lock_file_matches_the_clean_install(venv: Path) -> None:
    frozen = {ln.strip().lower() for ln in run(venv, "python", "-m", "pip", "freeze", "--exclude", "postier")
              .stdout.splitlines() if ln.strip()}
    locked = {ln.strip().lower() for ln in (REPO / "requirements.lock").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")}
    assert frozen == locked


def test_help_both_ways(venv: Path) -> None:
    for args in (("postier", "--help"), ("python", "-m", "postier", "--help")):
        p = run(venv, *args)
        assert p.returncode == 0 and "quickstart" in p.stdout, p.stderr


def test_smoke_smtp_in_imap_out(venv: Path, tmp_path: Path) -> None:
    inst = Instance(tmp_path / "data", "wheel.test", python=str(venv / "bin" / "python"))
    inst.add_user("alice@wheel.test", "password123")
    with inst:
        inst.start()
        with smtplib.SMTP(*inst.addr("smtp"), timeout=10) as s:
            s.sendmail("bob@remote.test", ["alice@wheel.test"],
                       b"From: bob@remote.test\r\nSubject: from the wheel\r\n\r\nhello\r\n")
        deadline = time.monotonic() + 10
        while not inst.messages("alice@wheel.test") and time.monotonic() < deadline:
            time.sleep(0.05)
        with imaplib.IMAP4(*inst.addr("imap"), timeout=10) as m:
            m.starttls(inst.client_ssl_context())
            m.login("alice@wheel.test", "password123")
            m.select("INBOX")
            typ, data = m.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")
            assert typ == "OK"
            assert b"from the wheel" in data[0][1]
        log = inst.log.read_text()
        assert str(venv) in run(venv, "python", "-c", "import postier; print(postier.__file__)").stdout
    assert "Traceback" not in log, log


def test_cluster_mode_without_its_extra_says_what_to_install(venv: Path, tmp_path: Path) -> None:
    """The wheel without the `cluster` extra: the CLI works, and only cluster mode stops, on one line."""
    data = tmp_path / "data"
    q = run(venv, "postier", "quickstart", "--domain", "wheel.test", "--data-dir", str(data), "--listen",
            "127.0.0.1", "--port-offset", "19400", "--quiet", "--allow-root")
    assert q.returncode == 0, q.stderr
    cfg = data / "postier.toml"
    cfg.write_text(cfg.read_text() + '\n[cluster]\ndsn = "host=127.0.0.1 dbname=none"\ns3_bucket = "bodies"\n')
    p = run(venv, "postier", "--config", str(cfg), "cluster", "status")
    assert p.returncode != 0
    assert p.stderr.strip() == "postier: cluster mode needs psycopg, psycopg_pool, boto3: pip install 'postier[cluster]'"
