"""Message bodies in an S3-compatible object store, once each, under their content hash (SHA-256).

A body is written with PutObject and the store's 200 answer is the confirmation that it is durable;
the mailbox index (PostgreSQL, `store.cluster.mailboxes`) only refers to a body after that answer,
so a message is never visible without its bytes. Writing the same body twice writes the same key
with the same bytes (idempotent), so concurrent deliveries of one message need no coordination.
Bodies no longer referenced are deleted later by `store.cluster.gc` (`postier cluster gc`). A key
names its content, so read bodies are kept in a small in-process cache (bounded in bytes, bodies up
to `cache_item` bytes) that can never be stale: an IMAP client's FETCH BODYSTRUCTURE then BODY[]
costs one GET.

The client is boto3 (botocore's SigV4 signing, retries and endpoint handling, well kept and the
reference client for S3): the mailbox calls already run in worker threads, and a boto3 client is
safe to share between threads, so its blocking API fits as it is (aiobotocore would only add an
event-loop hop back into those threads).
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections import OrderedDict
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from ..errors import MessageGone, StoreUnavailable

__all__ = ["BodyStore", "body_digest", "body_key"]

PREFIX = "bodies/"
_KEY = re.compile(r"bodies/([0-9a-f]{2})/([0-9a-f]{64})")


def body_key(digest: str) -> str:
    """The object key of a body: fanned out by the first two hex digits, as object stores like."""
    return f"{PREFIX}{digest[:2]}/{digest}"


def body_digest(key: str) -> str | None:
    """The hash a key names when it is a body's key (`body_key`'s form exactly), else None."""
    m = _KEY.fullmatch(key)
    return m.group(2) if m and m.group(2).startswith(m.group(1)) else None


class BodyStore:
    """put/get of message bodies by SHA-256; failures to reach the store raise StoreUnavailable."""

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str,
                 region: str = "us-east-1", timeout: float = 5.0, cache_bytes: int = 32 << 20,
                 cache_item: int = 1 << 20):
        self.bucket = bucket
        self.cache_bytes = cache_bytes
        self.cache_item = cache_item
        self._cache: OrderedDict[str, bytes] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()
        self.client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint or None, region_name=region,
            aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None,
            config=botocore.config.Config(connect_timeout=timeout, read_timeout=max(timeout, 10.0),
                                          retries={"max_attempts": 2, "mode": "standard"},
                                          s3={"addressing_style": "path"}))

    def ensure_bucket(self) -> None:
        """Create the bucket when it does not exist (`postier cluster init`, tests)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except botocore.exceptions.ClientError:
            self.client.create_bucket(Bucket=self.bucket)

    @staticmethod
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def put(self, data: bytes, digest: str | None = None) -> str:
        """Store `data`; returns its SHA-256 (hex) once the object store has confirmed the write."""
        digest = digest or self.digest(data)
        try:
            self.client.put_object(Bucket=self.bucket, Key=body_key(digest), Body=data,
                                   ContentType="message/rfc822")
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StoreUnavailable(f"object store unavailable: {exc}") from exc
        return digest

    def _remember(self, digest: str, data: bytes) -> None:
        if len(data) > self.cache_item:
            return
        with self._lock:
            if digest in self._cache:
                return
            self._cache[digest] = data
            self._cached += len(data)
            while self._cached > self.cache_bytes:
                _k, old = self._cache.popitem(last=False)
                self._cached -= len(old)

    def delete(self, digest: str) -> None:
        with self._lock:
            old = self._cache.pop(digest, None)
            if old is not None:
                self._cached -= len(old)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=body_key(digest))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StoreUnavailable(f"object store unavailable: {exc}") from exc

    def list_page(self, start_after: str, limit: int = 1000) -> tuple[list[tuple[str, datetime]], bool]:
        """One ListObjectsV2 page of the keys under `bodies/` after `start_after`, in key order (at
        most `limit`, which S3 caps at 1,000): (key, LastModified) each, and whether more follow."""
        try:
            got = self.client.list_objects_v2(Bucket=self.bucket, Prefix=PREFIX, StartAfter=start_after,
                                              MaxKeys=max(1, min(limit, 1000)))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StoreUnavailable(f"object store unavailable: {exc}") from exc
        return [(o["Key"], o["LastModified"]) for o in got.get("Contents", [])], bool(got.get("IsTruncated"))

    def download(self, digest: str, dest: Path, chunk: int = 256 << 10) -> int:
        """Write a body into the new file `dest`, `chunk` bytes at a time from the GET's streaming
        body (memory bounded by `chunk`, whatever the body's size), checking its SHA-256 against its
        key on the way; returns its size. The file is for reading back at once, not durable (no
        fsync); on failure the caller removes it."""
        sha = hashlib.sha256()
        size = 0
        try:
            got = self.client.get_object(Bucket=self.bucket, Key=body_key(digest))
            with open(dest, "xb") as out:
                for piece in got["Body"].iter_chunks(chunk):
                    sha.update(piece)
                    out.write(piece)
                    size += len(piece)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise MessageGone("message body missing from the object store") from exc
            raise StoreUnavailable(f"object store unavailable: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreUnavailable(f"object store unavailable: {exc}") from exc
        if sha.hexdigest() != digest:
            raise StoreUnavailable(f"object store returned other bytes for body {digest[:12]}")
        return size

    def get(self, digest: str, limit: int | None = None) -> bytes:
        """A body's bytes (the first `limit` only, if given)."""
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None:
                self._cache.move_to_end(digest)
        if hit is not None:
            return hit if limit is None else hit[:limit]
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": body_key(digest)}
        if limit is not None:
            args["Range"] = f"bytes=0-{max(0, limit - 1)}"
        try:
            got = self.client.get_object(**args)
            data = bytes(got["Body"].read())
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code == "InvalidRange":  # an empty body asked for by range
                return b""
            if code in ("NoSuchKey", "404"):
                raise MessageGone("message body missing from the object store") from exc
            raise StoreUnavailable(f"object store unavailable: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise StoreUnavailable(f"object store unavailable: {exc}") from exc
        if limit is None:
            self._remember(digest, data)
        return data
