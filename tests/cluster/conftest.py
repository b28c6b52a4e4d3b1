"""Cluster mode's real services on loopback: a throwaway PostgreSQL 15 cluster (initdb/pg_ctl in a temp
directory, run as the `postgres` user when the tests run as root, since PostgreSQL refuses root) and
moto's S3-compatible server."""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import free_port
from tests.programs import PACKAGES, missing, require

PG_BIN = Path("/usr/lib/postgresql/15/bin")


_TEMPLATE: list[Path] = []


def _template(run_as: list[str]) -> Path:
    """An initdb data directory made once per test process (never started), removed at its exit."""
    if not _TEMPLATE:
        top = Path(tempfile.mkdtemp(prefix="postier-pg-template-"))
        atexit.register(shutil.rmtree, top, True)
        if run_as:
            pw = pwd.getpwnam("postgres")
            os.chown(top, pw.pw_uid, pw.pw_gid)
        subprocess.run([*run_as, str(PG_BIN / "initdb"), "-D", str(top / "data"), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, timeout=120, cwd=top)
        _TEMPLATE.append(top / "data")
    return _TEMPLATE[0]


class PgServer:
    """One PostgreSQL cluster: `start()`, `stop()`, `dsn(db)`, `create_db()`."""

    def __init__(self) -> None:
        if not (PG_BIN / "initdb").exists():
            missing(f"initdb is not installed in {PG_BIN} (Debian package {PACKAGES['initdb']})")
        self.dir = Path(tempfile.mkdtemp(prefix="postier-pg-"))  # not under pytest's 0700 basetemp
        self.data = self.dir / "data"
        self.port = free_port("127.0.0.1")
        self._as: list[str] = []
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self._as = [require("runuser"), "-u", "postgres", "--"]
        # A copy of this process's one initdb result (initdb costs 1-2 s of CPU; a copy, a few ms): each
        # server is still its own cluster in its own directory.
        self._run("cp", "-a", str(_template(self._as)), str(self.data))
        self._names = itertools.count()

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120, cwd=self.dir)

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "log"), "-o", opts, "-w",
                  "start")

    def stop(self) -> None:
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def dsn(self, db: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def create_db(self) -> str:
        import psycopg
        name = f"t{next(self._names)}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}".encode())
        return self.dsn(name)

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    server = PgServer()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def pg_own() -> Iterator[PgServer]:
    """A PostgreSQL a test may stop."""
    server = PgServer()
    server.start()
    yield server
    server.remove()


class S3Server:
    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.port = free_port("127.0.0.1")
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def bucket(self) -> str:
        # moto keeps its buckets per process, not per server: names must not repeat across modules
        return f"bucket-{uuid.uuid4().hex[:16]}"

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = S3Server()
    yield server
    server.stop()


@pytest.fixture
def bodies_factory(s3: S3Server) -> Callable[[], object]:
    from postier.store.cluster.bodies import BodyStore
    name = s3.bucket()

    def make() -> BodyStore:
        b = BodyStore(s3.endpoint, name, "test", "test", timeout=2.0)
        b.ensure_bucket()
        return b
    return make


@pytest.fixture
def store(pg: PgServer, bodies_factory: Callable[[], Any]) -> Iterator[Any]:
    """A ClusterStore on a fresh database of `pg` and a fresh bucket (store/cluster/store.py)."""
    from postier.store.cluster.store import ClusterStore
    s = ClusterStore(pg.create_db(), bodies_factory(), timeout=3.0)
    yield s
    s.close()


@pytest.fixture
def mb(store: Any) -> Iterator[Any]:
    """alice@example.org's mailboxes in `store`, the default folders made (a test module may
    define its own for another user)."""
    from postier.message.types import User
    m = store.acquire(User("alice@example.org", "alice", "example.org", "maildir"))
    m.ensure_defaults()
    yield m
    store.release(m)


@pytest.fixture
def nodes(tmp_path: Path, pg: PgServer, s3: S3Server) -> Iterator[list[Any]]:
    """Two started cluster nodes sharing `pg` (a fresh database) and `s3` (test_nodes.py `_nodes`)."""
    from .test_nodes import _nodes

    ns = _nodes(tmp_path, pg.create_db(), s3)
    yield ns
    for n in ns:
        n.stop()


@pytest.fixture
def node(tmp_path: Path, pg: PgServer, s3: S3Server) -> Iterator[tuple[Any, str]]:
    """One cluster node on a fresh database of `pg`, not started, and that database's DSN."""
    from .test_nodes import make_nodes

    dsn = pg.create_db()
    (n,) = make_nodes(tmp_path, dsn, s3, count=1)
    yield n, dsn
    n.stop()
