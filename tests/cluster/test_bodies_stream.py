"""Large bodies uploaded from a spooled file (store/cluster/bodies.py `put_stream`) against moto's S3
server: byte for byte under their SHA-256, in one streamed PUT up to the part size and in a multipart
upload above it (moto enforces S3's 5 MiB least part); a part the object store fails aborts the upload,
leaving no parts and no object; two uploads of the same body at once both succeed; a body already
stored is not uploaded again."""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("boto3")

from postier.store.cluster.bodies import PART_SIZE, SpooledSource, body_key  # noqa: E402
from postier.store.errors import StoreUnavailable  # noqa: E402
from tests.concurrency import together

PREFIX = b"Return-Path: <alice@a.test>\r\nReceived: from a.test by b.test; Sat, 5 Dec 2026 02:00:00 +0000\r\n"


def spooled(tmp_path: Path, size: int, seed: bytes = b"") -> tuple[Path, bytes]:
    """A spool file of `size` bytes (varied, so a misplaced window would show) and the whole stored body."""
    line = hashlib.sha256(seed).hexdigest().encode() + b"\r\n"
    data = b"From: a\r\n\r\n" + (line * (size // len(line) + 1))[:size - 11]
    path = tmp_path / f"in.{seed.hex() or 'x'}.{size}"
    path.write_bytes(data)
    return path, PREFIX + path.read_bytes()


def upload(bodies: Any, path: Path) -> str:
    with SpooledSource(PREFIX, str(path), len(PREFIX) + path.stat().st_size) as src:
        digest: str = bodies.digest_stream(src.read_at, src.size)
        return str(bodies.put_stream(src.read_at, src.size, digest))


def uploads_left(bodies: Any) -> list[Any]:
    return list(bodies.client.list_multipart_uploads(Bucket=bodies.bucket).get("Uploads", []))


@pytest.fixture
def calls() -> Iterator[dict[str, int]]:
    """Counts moto's (the object store's) multipart calls, not ours."""
    from moto.s3.models import S3Backend
    counts = {"create": 0, "part": 0}
    create, part = S3Backend.create_multipart_upload, S3Backend.upload_part

    def counted_create(self: Any, *a: Any, **kw: Any) -> Any:
        counts["create"] += 1
        return create(self, *a, **kw)

    def counted_part(self: Any, *a: Any, **kw: Any) -> Any:
        counts["part"] += 1
        return part(self, *a, **kw)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S3Backend, "create_multipart_upload", counted_create)
        mp.setattr(S3Backend, "upload_part", counted_part)
        yield counts


@pytest.mark.parametrize("size", [PART_SIZE * 2 + 12345, 3 << 20])
def test_a_spooled_body_is_stored_byte_exact_under_its_hash(tmp_path: Path, bodies_factory: Callable[[], Any],
                                                           calls: dict[str, int], size: int) -> None:
    bodies = bodies_factory()
    path, whole = spooled(tmp_path, size)
    digest = upload(bodies, path)
    assert digest == hashlib.sha256(whole).hexdigest()
    assert bodies.get(digest) == whole
    etag = bodies.client.head_object(Bucket=bodies.bucket, Key=body_key(digest))["ETag"]
    if size > PART_SIZE:  # a multipart object's ETag ends in its part count
        assert etag.strip('"').endswith("-3") and calls == {"create": 1, "part": 3}
    else:
        assert "-" not in etag and calls == {"create": 0, "part": 0}
    assert uploads_left(bodies) == []
    assert upload(bodies, path) == digest  # already there: not uploaded again
    assert calls["create"] == (1 if size > PART_SIZE else 0)


def test_a_failed_part_aborts_the_upload(tmp_path: Path, bodies_factory: Callable[[], Any]) -> None:
    from moto.s3.models import S3Backend
    bodies = bodies_factory()
    path, whole = spooled(tmp_path, PART_SIZE * 2 + 1)
    part = S3Backend.upload_part

    def failing(self: Any, bucket_name: str, multipart_id: str, part_id: int, value: bytes) -> Any:
        if int(part_id) == 2:
            raise RuntimeError("the object store failed this part")  # moto answers 500
        return part(self, bucket_name, multipart_id, part_id, value)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(S3Backend, "upload_part", failing)
        with pytest.raises(StoreUnavailable):
            upload(bodies, path)
    assert uploads_left(bodies) == []  # aborted: no parts kept
    digest = hashlib.sha256(whole).hexdigest()
    assert bodies.client.list_objects_v2(Bucket=bodies.bucket).get("KeyCount") == 0
    assert upload(bodies, path) == digest and bodies.get(digest) == whole  # the store is back: it goes


def test_two_uploads_of_one_body_at_once(tmp_path: Path, bodies_factory: Callable[[], Any]) -> None:
    first = bodies_factory()
    second = type(first)(first.client.meta.endpoint_url, first.bucket, "test", "test", timeout=2.0)
    path, whole = spooled(tmp_path, PART_SIZE + 4096, b"same")
    barrier = threading.Barrier(2)

    def run(bodies: Any) -> str:
        barrier.wait(10)
        return upload(bodies, path)
    got = together(lambda: run(first), lambda: run(second))
    digest = hashlib.sha256(whole).hexdigest()
    assert got == [digest, digest]
    assert second.get(digest) == whole and uploads_left(first) == []


def test_a_source_joins_its_head_and_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(1000))
    whole = PREFIX + path.read_bytes()
    with SpooledSource(PREFIX, str(path), len(whole)) as src:
        for offset, n in [(0, 5), (len(PREFIX) - 3, 10), (len(PREFIX), 7), (990, 5000), (len(whole), 4), (0, 99999)]:
            assert src.read_at(offset, n) == whole[offset:offset + n]
