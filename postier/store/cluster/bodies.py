"""Message bodies in an S3-compatible object store, once each, under their content hash (SHA-256).

A body is written with PutObject and the store's 200 answer is the confirmation that it is durable;
the mailbox index (PostgreSQL, `store.cluster.mailboxes`) only refers to a body after that answer,
so a message is never visible without its bytes. Writing the same body twice writes the same key
with the same bytes (idempotent), so concurrent deliveries of one message need no coordination.
Bodies no longer referenced are deleted later by `store.cluster.gc` (`postier cluster gc`), up to
1,000 a DeleteObjects request, whose answer names any key it did not delete. A key
names its content, so read bodies are kept in a small in-process cache (bounded in bytes, bodies up
to `cache_item` bytes) that can never be stale: an IMAP client's FETCH BODYSTRUCTURE then BODY[]
costs one GET.

The client is boto3 (botocore's SigV4 signing, retries and endpoint handling, well kept and the
reference client for S3): the mailbox calls already run in worker threads, and a boto3 client is
safe to share between threads, so its blocking API fits as it is (aiobotocore would only add an
event-loop hop back into those threads).

A large body (a spooled message) is uploaded without ever being held whole (`put_stream`): its
SHA-256 is computed first, reading the file in 256 KiB pieces (the key is the hash, and the index
must be marked before the upload), then it is sent from the file by offset. Up to `part_size` (8 MiB)
that is one PutObject whose body is a window on the file; above, an S3 multipart upload
(CreateMultipartUpload, UploadPart per 8 MiB window, as S3 wants parts of 5 MiB or more but the
last, then CompleteMultipartUpload, whose 200 is the confirmation), aborted (AbortMultipartUpload)
on any failure so that no parts are left behind. botocore reads each window in pieces (the SigV4
payload hash, its checksum, the socket) and rewinds it for a retry, so memory is bounded by its
pieces, not by the body. Not boto3's `upload_fileobj`: its managed transfer reads each part of a
file object into memory (a part size per worker thread) and would also need the prefix joined to
the file in one object; the three calls are few and keep the key, the confirmation and the abort
in view. An object already present under the key (HEAD, with the same length) is not uploaded
again: its mark was renewed first, so the collector cannot delete it before the commit.

A part of a large body (a FETCH of a section or a partial range, server/imapfetch.py) is read by
ranged GETs (`RangedBody`, RFC 9110 §14.1.2 byte ranges), not downloaded whole: a read at a new
position asks for the bytes asked for, and reads that go on from there ask for windows that double,
up to RANGE_MAX, each streamed from the answer a piece at a time (memory: the caller's piece). Such
bytes cannot be checked against the key (only a whole body can): the whole-body path
(`download`) stays for what reads the whole message.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Buffer, Callable, Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import boto3
import botocore.config
import botocore.exceptions

from ..errors import MessageGone, StoreUnavailable
from ...proto.crlf import bare_lf

__all__ = ["BodiesNotDeleted", "BodyStore", "RangedBody", "SpooledSource", "body_digest", "body_key"]

PREFIX = "bodies/"
_KEY = re.compile(r"bodies/([0-9a-f]{2})/([0-9a-f]{64})")
PART_SIZE = 8 << 20  # multipart part (S3: at least 5 MiB, except the last part)
READ_CHUNK = 256 << 10  # hashing a spooled body, and the download's chunk
DELETE_BATCH = 1000  # keys per DeleteObjects request (S3's limit)
RANGE_MAX = 4 << 20  # the largest window of one ranged GET of `RangedBody`

#: (offset, n) -> up to n bytes of a body from `offset` (fewer only at its end)
type ReadAt = Callable[[int, int], bytes]


class BodiesNotDeleted(StoreUnavailable):
    """A DeleteObjects answer named keys it did not delete (`failed`: digest -> the store's code and
    message); the other objects of the call are gone."""

    def __init__(self, failed: dict[str, str]) -> None:
        first = next(iter(failed.items()))
        super().__init__(f"object store did not delete {len(failed)} bodies (first {first[0][:12]}: {first[1]})")
        self.failed = failed


def body_key(digest: str) -> str:
    """The object key of a body: fanned out by the first two hex digits, as object stores like."""
    return f"{PREFIX}{digest[:2]}/{digest}"


def body_digest(key: str) -> str | None:
    """The hash a key names when it is a body's key (`body_key`'s form exactly), else None."""
    m = _KEY.fullmatch(key)
    return m.group(2) if m and m.group(2).startswith(m.group(1)) else None


class SpooledSource:
    """A message as it is stored: `head` (bytes in memory: the queue's prefix) then the file at
    `path` (a spooled body, `MessageBody.spool_path`), `size` bytes in all, read by offset
    (os.pread, so windows on it need no shared file position). A context manager: the file is
    open between enter and exit."""

    def __init__(self, head: bytes, path: str, size: int, digest: str | None = None) -> None:
        self.head = head
        self.path = path
        self.size = size
        #: its SHA-256 when already known (`BodyStore.digest_stream` of this same content), else None
        self.digest = digest
        self._fd = -1

    def __enter__(self) -> Self:
        self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)
        self._fd = -1

    def crlf_clean(self) -> bool:
        """Whether every LF follows a CR (the mailbox stores CRLF; a body with a bare LF is
        rewritten in memory instead, as `append` does)."""
        prev_cr = False
        for offset in range(0, self.size, READ_CHUNK):
            piece = self.read_at(offset, READ_CHUNK)
            if bare_lf(piece, prev_cr):
                return False
            prev_cr = piece[-1:] == b"\r"
        return True

    def read_at(self, offset: int, n: int) -> bytes:
        n = max(0, min(n, self.size - offset))
        out = b""
        if offset < len(self.head):
            out = self.head[offset:offset + n]
            offset, n = len(self.head), n - len(out)
        if n > 0:
            out += os.pread(self._fd, n, offset - len(self.head))
        return out


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _read_errors() -> Iterator[None]:
    """A GET's failure as the store's: the object missing is MessageGone, anything else
    StoreUnavailable (every read of a body: `download`, `get`, `get_range`)."""
    try:
        yield
    except botocore.exceptions.ClientError as exc:
        if _code(exc) in ("NoSuchKey", "404"):
            raise MessageGone("message body missing from the object store") from exc
        raise StoreUnavailable(f"object store unavailable: {exc}") from exc
    except botocore.exceptions.BotoCoreError as exc:
        raise StoreUnavailable(f"object store unavailable: {exc}") from exc


class _Seekable(io.RawIOBase):
    """A read-only, seekable file of `_size` octets read at `_pos` (the subclass's `readinto`)."""

    _pos = 0
    _size = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos


class _Window(_Seekable):
    """Bytes [start, start + length) of a body read by offset, as the file object of one request:
    readable, seekable (botocore rewinds a body to retry its request) and never held whole."""

    def __init__(self, read_at: ReadAt, start: int, length: int) -> None:
        super().__init__()
        self._read_at = read_at
        self._start = start
        self._size = length
        self._pos = 0

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        if want <= 0:
            return 0
        data = self._read_at(self._start + self._pos, want)
        if len(data) != want:
            raise OSError(f"body source ended early at {self._start + self._pos + len(data)}")
        view[:want] = data
        self._pos += want
        return want


class BodyStore:
    """put/get of message bodies by SHA-256; failures to reach the store raise StoreUnavailable."""

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str,
                 region: str = "us-east-1", timeout: float = 5.0, cache_bytes: int = 32 << 20,
                 cache_item: int = 1 << 20, part_size: int = PART_SIZE):
        self.bucket = bucket
        self.part_size = part_size
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

    @staticmethod
    def digest_stream(read_at: ReadAt, size: int) -> str:
        """The SHA-256 (hex) of `size` bytes read by offset, READ_CHUNK at a time."""
        sha = hashlib.sha256()
        for offset in range(0, size, READ_CHUNK):
            sha.update(read_at(offset, READ_CHUNK))
        return sha.hexdigest()

    def put_stream(self, read_at: ReadAt, size: int, digest: str) -> str:
        """Store `size` bytes read by offset whose SHA-256 is `digest` (`digest_stream`, with the
        body's mark renewed before this call) without holding them whole: one streamed PutObject up
        to `part_size`, a multipart upload above, aborted if any part of it fails. Returns `digest`
        once the object store has confirmed the write (or already holds the object)."""
        key = body_key(digest)
        try:
            if self._holds(key, size):
                return digest
            if size <= self.part_size:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=_Window(read_at, 0, size),
                                       ContentLength=size, ContentType="message/rfc822")
            else:
                self._multipart(key, read_at, size)
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, OSError) as exc:
            raise StoreUnavailable(f"object store unavailable: {exc}") from exc
        return digest

    def _holds(self, key: str, size: int) -> bool:
        """Whether the object is there already, with `size` bytes (a body is its key's content). A
        403 counts as absent: S3 answers a HEAD of a missing key so to a client without ListBucket,
        and the upload then says whether the client may write at all."""
        try:
            got = self.client.head_object(Bucket=self.bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound", "403", "Forbidden"):
                return False
            raise
        return int(got.get("ContentLength", -1)) == size

    def _multipart(self, key: str, read_at: ReadAt, size: int) -> None:
        upload = self.client.create_multipart_upload(Bucket=self.bucket, Key=key,
                                                     ContentType="message/rfc822")["UploadId"]
        try:
            parts = []
            for number, start in enumerate(range(0, size, self.part_size), 1):
                length = min(self.part_size, size - start)
                got = self.client.upload_part(Bucket=self.bucket, Key=key, UploadId=upload, PartNumber=number,
                                              Body=_Window(read_at, start, length), ContentLength=length)
                parts.append({"PartNumber": number, "ETag": got["ETag"]})
            # botocore turns a 200 carrying an error (S3 may answer so once it has started) into an error
            self.client.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                                  MultipartUpload={"Parts": parts})
        except BaseException:
            with contextlib.suppress(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            raise

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

    def delete(self, digests: str | Iterable[str]) -> None:
        """Delete the objects of one body or of several: DeleteObjects, up to DELETE_BATCH keys a
        request, in Quiet mode (S3 then answers only the keys it could not delete). A key that is
        already gone counts as deleted (S3 answers so). Raises `BodiesNotDeleted` naming the bodies
        whose objects the store refused (the others are gone), StoreUnavailable when a request
        failed as a whole (its keys may or may not be gone)."""
        wanted = [digests] if isinstance(digests, str) else list(digests)
        with self._lock:
            for digest in wanted:
                old = self._cache.pop(digest, None)
                if old is not None:
                    self._cached -= len(old)
        failed: dict[str, str] = {}
        for i in range(0, len(wanted), DELETE_BATCH):
            keys = [{"Key": body_key(d)} for d in wanted[i:i + DELETE_BATCH]]
            try:
                got = self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                raise StoreUnavailable(f"object store unavailable: {exc}") from exc
            for err in got.get("Errors", []):
                refused = body_digest(str(err.get("Key", "")))
                if refused is not None:
                    failed[refused] = f"{err.get('Code', '?')}: {err.get('Message', '')}"
        if failed:
            raise BodiesNotDeleted(failed)

    def list_page(self, start_after: str, limit: int = 1000) -> tuple[list[tuple[str, datetime]], bool]:
        """One ListObjectsV2 page of the keys under `bodies/` after `start_after`, in key order (at
        most `limit`, which S3 caps at 1,000): (key, LastModified) each, and whether more follow."""
        try:
            got = self.client.list_objects_v2(Bucket=self.bucket, Prefix=PREFIX, StartAfter=start_after,
                                              MaxKeys=max(1, min(limit, 1000)))
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise StoreUnavailable(f"object store unavailable: {exc}") from exc
        return [(o["Key"], o["LastModified"]) for o in got.get("Contents", [])], bool(got.get("IsTruncated"))

    def download(self, digest: str, dest: Path, chunk: int = READ_CHUNK) -> int:
        """Write a body into the new file `dest`, `chunk` bytes at a time from the GET's streaming
        body (memory bounded by `chunk`, whatever the body's size), checking its SHA-256 against its
        key on the way; returns its size. The file is for reading back at once, not durable (no
        fsync); on failure the caller removes it."""
        sha = hashlib.sha256()
        size = 0
        with _read_errors():
            got = self.client.get_object(Bucket=self.bucket, Key=body_key(digest))
            with open(dest, "xb") as out:
                for piece in got["Body"].iter_chunks(chunk):
                    sha.update(piece)
                    out.write(piece)
                    size += len(piece)
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
        with _read_errors():
            try:
                got = self.client.get_object(**args)
                data = bytes(got["Body"].read())
            except botocore.exceptions.ClientError as exc:
                if _code(exc) == "InvalidRange":  # an empty body asked for by range
                    return b""
                raise
        if limit is None:
            self._remember(digest, data)
        return data

    def get_range(self, digest: str, start: int, end: int) -> Any:
        """The streaming body of a ranged GET of octets start..end - 1 (`end` > `start`; fewer when
        the body is shorter), to be read and closed by the caller (`RangedBody`)."""
        with _read_errors():
            return self.client.get_object(Bucket=self.bucket, Key=body_key(digest),
                                          Range=f"bytes={start}-{end - 1}")["Body"]  # RFC 9110 §14.1.2


class RangedBody(_Seekable):
    """A large body opened for reading parts of it (`ClusterMailboxes.open_message(partial=True)`),
    `size` octets as the index tells: seekable, read by ranged GETs (`BodyStore.get_range`). A read
    at a new position asks for what it asks for; a read going on from where the previous one ended
    goes on in the same answer, or asks for a window twice the last one (up to RANGE_MAX). Nothing
    is held but the answer being read; a seek elsewhere closes it. The object store out of reach is
    StoreUnavailable, the object gone MessageGone, at the read."""

    def __init__(self, bodies: BodyStore, digest: str, size: int) -> None:
        super().__init__()
        self._bodies, self._digest, self._size = bodies, digest, size
        self._pos = 0
        self._stream: Any = None  # the open answer: octets _at.._end - 1 of the body
        self._at = self._end = 0
        self._window = 0
        self.requests = 0  # ranged GETs made (tests, bench)

    def _drop(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.close()
            self._stream = None

    def close(self) -> None:
        self._drop()
        super().close()

    def readinto(self, buffer: Buffer) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._size - self._pos)
        done = 0
        while done < want:
            if self._stream is None or self._at != self._pos + done or self._at >= self._end:
                go_on = self._stream is not None and self._at == self._pos + done
                self._drop()
                # a new position: what is asked for; going on: twice the last window
                self._window = min(RANGE_MAX, max(want - done, 2 * self._window if go_on else 0))
                self._at = self._pos + done
                self._end = min(self._size, self._at + self._window)
                self._stream = self._bodies.get_range(self._digest, self._at, self._end)
                self.requests += 1
            try:
                piece = self._stream.read(min(want - done, self._end - self._at))
            except (botocore.exceptions.BotoCoreError, OSError) as exc:
                self._drop()
                raise StoreUnavailable(f"object store unavailable: {exc}") from exc
            if not piece:  # the object is shorter than the index says
                self._drop()
                break
            view[done:done + len(piece)] = piece
            done += len(piece)
            self._at += len(piece)
        self._pos += done
        return done
