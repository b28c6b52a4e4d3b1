"""What the worker processes of one server share (`[server] workers` > 1): connection counts, the
failed-login throttle, and wake-ups (IMAP IDLE, the queue runner).

State and events take one mechanism each, both set up by the supervisor (server/supervisor.py):

- State lives in one memory-mapped file, DATA_DIR/run/workers.shm, made before the workers are
  forked (each worker, a restarted one too, inherits the mapping). Connection counts are a row per
  worker that only that worker writes (its open connections in total, and per hashed client IP), so
  admitting a connection reads N rows and takes no lock: no system call and no round trip on the
  accept path, which is why this is not a state service on a socket. The throttle's table (failure
  stamps per hashed IP, the algorithm of `throttle.AuthThrottle`) is written by every worker under
  an fcntl lock on the file (released by the kernel if the holder dies). When a worker dies its row
  is zeroed before its replacement starts. IPs are hashed with a key made at start-up, so a client
  cannot choose an address that shares another's bucket; a collision (two IPs in one bucket) can
  only make a limit stricter for them, never looser.
- Events are Unix datagrams: each worker binds DATA_DIR/run/worker-<i>.sock and sends a change to
  every other worker's socket (a mailbox changed: IDLE sessions wake and re-read the index; a
  message was queued: the primary worker's queue runner looks at once; a renewed certificate: load
  it). Sends never block; a lost datagram only delays (IDLE's mtime poll, the queue's 5 s scan
  still see the change).

Why no SO_REUSEPORT: the supervisor binds each listener once, as root, and the workers inherit it;
the kernel hands each new connection to whichever worker accepts first, so a busy worker takes
fewer, and no port is ever bound by a process that has dropped root.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .throttle import AuthThrottle

__all__ = ["Bus", "SharedConnections", "SharedTable", "SharedThrottle", "WorkerContext"]

log = logging.getLogger("postier.server")

IP_BUCKETS = 16384  # per worker: u32 connection counts by hashed client IP
THROTTLE_SLOTS = 16384  # failure records (the in-process throttle keeps up to 100,000 IPs)
PROBES = 4  # a record lives in one of the PROBES slots after its hash
MAX_RING = 64  # failure stamps kept per IP (max_failures above this counts as this)
MAGIC = b"PSTRSHM1"
_HEADER = struct.Struct("<8sIIII16s")  # magic, workers, ip buckets, throttle slots, ring, hash key
_SLOT_HEAD = struct.Struct("<QI4x")  # hashed IP (0 = empty), number of stamps


def _ring(max_failures: int) -> int:
    return max(1, min(max_failures, MAX_RING))


class SharedTable:
    """The memory-mapped state file: a header, N connection rows, the throttle's slots."""

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, workers: int, ring: int, key: bytes):
        self.path = path
        self.fd = fd
        self.mm = mm
        self.workers = workers
        self.ring = ring
        self.key = key
        self.slot_size = _SLOT_HEAD.size + 8 * ring
        self.conn_off = _HEADER.size
        self.throttle_off = self.conn_off + 4 * workers * (1 + IP_BUCKETS)
        self.counts = memoryview(mm)[self.conn_off:self.throttle_off].cast("I")

    @classmethod
    def create(cls, path: Path, workers: int, max_failures: int) -> SharedTable:
        """A new, zeroed table for `workers` processes (the supervisor, before forking)."""
        ring = _ring(max_failures)
        size = _HEADER.size + 4 * workers * (1 + IP_BUCKETS) + THROTTLE_SLOTS * (_SLOT_HEAD.size + 8 * ring)
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a previous run's: never shared with a new set of workers
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            # Every block reserved now: a page of a sparse file first written when the disk is full
            # would kill the writing worker with SIGBUS.
            os.posix_fallocate(fd, 0, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        key = os.urandom(16)
        _HEADER.pack_into(mm, 0, MAGIC, workers, IP_BUCKETS, THROTTLE_SLOTS, ring, key)
        return cls(path, fd, mm, workers, ring, key)

    def ip_hash(self, ip: str) -> int:
        """The keyed 64-bit hash of a client IP (never 0: 0 marks an empty slot)."""
        h = int.from_bytes(hashlib.blake2b(ip.encode(), digest_size=8, key=self.key).digest(), "little")
        return h or 1

    def clear_worker(self, index: int) -> None:
        """A worker died: its connections are gone (the supervisor, before restarting it)."""
        row = index * (1 + IP_BUCKETS)
        self.counts[row:row + 1 + IP_BUCKETS] = memoryview(bytes(4 * (1 + IP_BUCKETS))).cast("I")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The throttle's lock, between processes (fcntl: dropped by the kernel if the holder dies)."""
        fcntl.lockf(self.fd, fcntl.LOCK_EX, 1, 0)
        try:
            yield
        finally:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)

    def close(self) -> None:
        self.counts.release()
        self.mm.close()
        os.close(self.fd)


class SharedConnections:
    """One worker's side of the connection limits: its own row, everyone's sums."""

    def __init__(self, table: SharedTable, index: int):
        self.table = table
        self.index = index
        self.row = index * (1 + IP_BUCKETS)
        self.stride = 1 + IP_BUCKETS

    def _bucket(self, ip: str) -> int:
        return 1 + self.table.ip_hash(ip) % IP_BUCKETS

    def total(self) -> int:
        c, s = self.table.counts, self.stride
        return sum(c[w * s] for w in range(self.table.workers))

    def per_ip(self, ip: str) -> int:
        c, s, b = self.table.counts, self.stride, self._bucket(ip)
        return sum(c[w * s + b] for w in range(self.table.workers))

    def admit(self, ip: str, max_total: int, max_per_ip: int) -> bool:
        """Count a connection from `ip` unless every worker's together reach a limit. Two workers
        admitting at the same instant may each see the other's count one late (at most N-1 over)."""
        c, s, b = self.table.counts, self.stride, self._bucket(ip)
        n = self.table.workers
        if sum(c[w * s] for w in range(n)) >= max_total or sum(c[w * s + b] for w in range(n)) >= max_per_ip:
            return False
        c[self.row] += 1
        c[self.row + b] += 1
        return True

    def release(self, ip: str) -> None:
        c, b = self.table.counts, self._bucket(ip)
        if c[self.row] > 0:
            c[self.row] -= 1
        if c[self.row + b] > 0:
            c[self.row + b] -= 1


class SharedThrottle(AuthThrottle):
    """`AuthThrottle` over the shared table: a failure in one worker slows and blocks the IP in all.
    Same rules (stamps within the window, the last `max_failures` kept, success clears)."""

    def __init__(self, table: SharedTable, failure_delay: float = 1.0, max_failures: int = 10,
                 window: float = 600.0, clock: Callable[[], float] = time.monotonic):
        super().__init__(failure_delay, max_failures, window, clock)  # CLOCK_MONOTONIC: one per machine
        self.table = table

    def _slot_off(self, i: int) -> int:
        return self.table.throttle_off + i * self.table.slot_size

    def _read(self, off: int) -> tuple[int, list[float]]:
        key, n = _SLOT_HEAD.unpack_from(self.table.mm, off)
        n = min(n, self.table.ring)
        stamps = list(struct.unpack_from(f"<{n}d", self.table.mm, off + _SLOT_HEAD.size)) if n else []
        return key, stamps

    def _write(self, off: int, key: int, stamps: list[float]) -> None:
        stamps = stamps[-self.table.ring:]
        _SLOT_HEAD.pack_into(self.table.mm, off, key if stamps else 0, len(stamps))
        if stamps:
            struct.pack_into(f"<{len(stamps)}d", self.table.mm, off + _SLOT_HEAD.size, *stamps)

    def _find(self, h: int) -> tuple[int, int | None]:
        """(offset of the record of `h` or of the slot to take for it, whether it is h's record)."""
        start = h % THROTTLE_SLOTS
        cutoff = self.clock() - self.window
        best_off, best_age = -1, float("inf")
        for p in range(PROBES):
            off = self._slot_off((start + p) % THROTTLE_SLOTS)
            key, stamps = self._read(off)
            if key == h:
                return off, h
            newest = stamps[-1] if stamps and key else float("-inf")
            if newest < cutoff:
                newest = float("-inf")  # empty or aged out: free
            if newest < best_age:
                best_off, best_age = off, newest
        return best_off, None  # full: the record whose last failure is oldest gives way

    def _recent(self, ip: str) -> list[float]:
        h = self.table.ip_hash(ip)
        with self.table.locked():
            off, found = self._find(h)
            if found is None:
                return []
            _key, stamps = self._read(off)
            cutoff = self.clock() - self.window
            kept = [t for t in stamps if t >= cutoff]
            if len(kept) != len(stamps):
                self._write(off, h, kept)
            return kept

    def failure(self, ip: str) -> None:
        h = self.table.ip_hash(ip)
        with self.table.locked():
            off, found = self._find(h)
            stamps = self._read(off)[1] if found is not None else []
            stamps.append(self.clock())
            self._write(off, h, stamps[-max(self.max_failures, 1):])

    def success(self, ip: str) -> None:
        h = self.table.ip_hash(ip)
        with self.table.locked():
            off, found = self._find(h)
            if found is not None:
                self._write(off, h, [])


def _bus_path(run_dir: Path, index: int, abstract: bool = False) -> str:
    """DATA_DIR/run/worker-N.sock; a data directory too deep for a socket path (108 bytes), or on a
    file system without sockets (`abstract`, see `Bus.probe`), gets a name in the abstract namespace,
    derived from it."""
    path = str(run_dir / f"worker-{index}.sock")
    if len(os.fsencode(path)) < 100 and not abstract:
        return path
    return "\0postier-" + hashlib.sha256(os.fsencode(run_dir)).hexdigest()[:24] + f"-{index}"


class Bus:
    """Wake-ups between workers: one datagram socket per worker, a message to all the others."""

    MAX = 2048  # bytes per datagram (an address and a folder name are far shorter)

    def __init__(self, run_dir: Path, index: int, workers: int, abstract: bool = False):
        self.index = index
        self.paths = [_bus_path(run_dir, i, abstract) for i in range(workers)]
        self.handlers: dict[bytes, Callable[[bytes], object]] = {}
        path = self.paths[index]
        if not path.startswith("\0"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # our predecessor's, if this worker was restarted
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        self.sock.bind(path)

    @staticmethod
    def probe(run_dir: Path) -> bool:
        """True when Unix sockets cannot be made in `run_dir` (the supervisor asks once; every
        worker then uses abstract names)."""
        path = _bus_path(run_dir, -1)
        if path.startswith("\0"):
            return True
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.bind(path)
        except OSError:
            return True
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return False

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.sock.fileno(), self._readable)

    def on(self, kind: bytes, handler: Callable[[bytes], object]) -> None:
        self.handlers[kind] = handler

    def send(self, kind: bytes, payload: bytes = b"", to: int | None = None) -> None:
        """Tell every other worker (or only worker `to`); never blocks, a failure is only logged."""
        data = kind + payload
        if len(data) > self.MAX:
            return
        for i, path in enumerate(self.paths):
            if i == self.index or (to is not None and i != to):
                continue
            try:
                self.sock.sendto(data, path)
            except OSError as exc:  # not up yet (starting, restarting) or its queue is full
                log.debug("worker %d: no wake-up to worker %d: %s", self.index, i, exc)

    def _readable(self) -> None:
        for _ in range(256):
            try:
                data = self.sock.recv(self.MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            handler = self.handlers.get(data[:1])
            if handler is not None:
                try:
                    handler(data[1:])
                except Exception:
                    log.exception("worker %d: wake-up handler failed", self.index)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.sock.close()
        if not self.paths[self.index].startswith("\0"):
            with contextlib.suppress(OSError):
                os.unlink(self.paths[self.index])


@dataclass
class WorkerContext:
    """Who this worker is among its siblings (made by the supervisor, handed to `serve`)."""

    index: int  # 0 is the primary: it runs the queue runner and the jobs (once per server)
    workers: int
    table: SharedTable
    run_dir: Path
    ready: Callable[[], None]  # tells the supervisor this worker serves
    abstract_bus: bool = False  # `Bus.probe`: no socket files in run_dir

    @property
    def primary(self) -> bool:
        return self.index == 0
