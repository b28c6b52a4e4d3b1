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

from ..antispam.builtin import RateLimiter
from .throttle import AuthThrottle, LastLogins, UserSessions

__all__ = ["Bus", "SharedConnections", "SharedLogins", "SharedRateLimiter", "SharedTable", "SharedThrottle",
           "SharedUserSessions", "WorkerContext"]

log = logging.getLogger("postier.server")

IP_BUCKETS = 16384  # per worker and kind: u32 counts by hashed key (client IP, IMAP user)
COUNT_KINDS = 2  # the counted rows: 0 connections by client IP, 1 IMAP sessions by user
THROTTLE_SLOTS = 16384  # failure records (the in-process throttle keeps up to 100,000 IPs)
LOGIN_SLOTS = 8192  # POP3 LOGIN-DELAY: the last login per hashed user
RATE_SLOTS = 8192  # port 25's per-minute rates, per hashed client IP (one region per configured rate)
RATE_RING = 32  # (stamp, count) groups kept per IP and rate (more events: the oldest groups merge)
PROBES = 4  # a record lives in one of the PROBES slots after its hash
MAX_RING = 64  # failure stamps kept per IP (max_failures above this counts as this)
MAGIC = b"PSTRSHM2"
_HEADER = struct.Struct("<8sIIII16s")  # magic, workers, ip buckets, throttle slots, ring, hash key
_SLOT_HEAD = struct.Struct("<QI4x")  # hashed key (0 = empty), number of entries


def _ring(max_failures: int) -> int:
    return max(1, min(max_failures, MAX_RING))


class _Records:
    """A region of the table holding records keyed by a 64-bit hash: each up to `ring` entries of
    `width` doubles, the first of each entry a CLOCK_MONOTONIC stamp. Read and written under the
    table's lock (`SharedTable.locked`); a key lives in one of the PROBES slots after its hash, and
    when all of them are taken by live records the one whose newest entry is oldest gives way."""

    def __init__(self, table: SharedTable, off: int, slots: int, ring: int, width: int = 1):
        self.table = table
        self.off = off
        self.slots = slots
        self.ring = ring
        self.width = width
        self.slot_size = self.size_of(1, ring, width)

    @staticmethod
    def size_of(slots: int, ring: int, width: int = 1) -> int:
        return slots * (_SLOT_HEAD.size + 8 * width * ring)

    def read(self, off: int) -> tuple[int, list[float]]:
        """(key, the entries' doubles, flat) of the slot at `off`."""
        key, n = _SLOT_HEAD.unpack_from(self.table.mm, off)
        n = min(n, self.ring) * self.width
        return key, list(struct.unpack_from(f"<{n}d", self.table.mm, off + _SLOT_HEAD.size)) if n else []

    def write(self, off: int, key: int, values: list[float]) -> None:
        """Store `values` (whole entries; the newest `ring` kept) as `key`'s record; none frees it."""
        values = values[-self.ring * self.width:]
        _SLOT_HEAD.pack_into(self.table.mm, off, key if values else 0, len(values) // self.width)
        if values:
            struct.pack_into(f"<{len(values)}d", self.table.mm, off + _SLOT_HEAD.size, *values)

    def find(self, h: int, cutoff: float) -> tuple[int, bool]:
        """(offset of the record of `h` or of the slot to take for it, whether it is h's record);
        a record whose newest stamp is before `cutoff` counts as free."""
        start = h % self.slots
        best_off, best_age = -1, float("inf")
        for p in range(PROBES):
            off = self.off + (start + p) % self.slots * self.slot_size
            key, values = self.read(off)
            if key == h:
                return off, True
            newest = values[-self.width] if values and key else float("-inf")
            if newest < cutoff:
                newest = float("-inf")  # empty or aged out: free
            if newest < best_age:
                best_off, best_age = off, newest
        return best_off, False


class SharedTable:
    """The memory-mapped state file: a header, the counted rows (N per kind), then the records of
    the throttle, POP3's last logins and port 25's two rates."""

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, workers: int, ring: int, key: bytes,
                 rates: tuple[bool, bool] = (False, False)):
        self.path = path
        self.fd = fd
        self.mm = mm
        self.workers = workers
        self.ring = ring
        self.key = key
        self.conn_off = _HEADER.size
        off = self.conn_off + 4 * COUNT_KINDS * workers * (1 + IP_BUCKETS)
        self.counts = memoryview(mm)[self.conn_off:off].cast("I")
        self.throttle = _Records(self, off, THROTTLE_SLOTS, ring)
        off += _Records.size_of(THROTTLE_SLOTS, ring)
        self.logins = _Records(self, off, LOGIN_SLOTS, 1)
        off += _Records.size_of(LOGIN_SLOTS, 1)
        #: Port 25's connections, then messages, per minute: a region each when that limit is set
        #: (`[antispam]` is read once per start, so a reload cannot add one).
        self.rates: list[_Records | None] = []
        for used in rates:
            self.rates.append(_Records(self, off, RATE_SLOTS, RATE_RING, 2) if used else None)
            off += _Records.size_of(RATE_SLOTS, RATE_RING, 2) if used else 0

    @staticmethod
    def size(workers: int, ring: int, rates: tuple[bool, bool] = (False, False)) -> int:
        return (_HEADER.size + 4 * COUNT_KINDS * workers * (1 + IP_BUCKETS) + _Records.size_of(THROTTLE_SLOTS, ring)
                + _Records.size_of(LOGIN_SLOTS, 1) + sum(rates) * _Records.size_of(RATE_SLOTS, RATE_RING, 2))

    @classmethod
    def create(cls, path: Path, workers: int, max_failures: int,
               rates: tuple[bool, bool] = (False, False)) -> SharedTable:
        """A new, zeroed table for `workers` processes (the supervisor, before forking); `rates`:
        whether port 25's connection and message rates are limited (each region is 4.3 MB)."""
        ring = _ring(max_failures)
        size = cls.size(workers, ring, rates)
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
        return cls(path, fd, mm, workers, ring, key, rates)

    def ip_hash(self, ip: str) -> int:
        """The keyed 64-bit hash of a client IP or a user (never 0: 0 marks an empty slot)."""
        h = int.from_bytes(hashlib.blake2b(ip.encode(), digest_size=8, key=self.key).digest(), "little")
        return h or 1

    def clear_worker(self, index: int) -> None:
        """A worker died: its connections and IMAP sessions are gone (the supervisor, before
        restarting it)."""
        stride = 1 + IP_BUCKETS
        zero = memoryview(bytes(4 * stride)).cast("I")
        for kind in range(COUNT_KINDS):
            row = (kind * self.workers + index) * stride
            self.counts[row:row + stride] = zero

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The records' lock, between processes (fcntl: dropped by the kernel if the holder dies)."""
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
    """One worker's side of a counted limit (kind 0: connections per client IP; kind 1: IMAP
    sessions per user): its own row, everyone's sums."""

    def __init__(self, table: SharedTable, index: int, kind: int = 0):
        self.table = table
        self.index = index
        self.stride = 1 + IP_BUCKETS
        self.base = kind * table.workers * self.stride  # worker 0's row of this kind
        self.row = self.base + index * self.stride

    def _bucket(self, ip: str) -> int:
        return 1 + self.table.ip_hash(ip) % IP_BUCKETS

    def total(self) -> int:
        c, s, b0 = self.table.counts, self.stride, self.base
        return sum(c[b0 + w * s] for w in range(self.table.workers))

    def per_ip(self, ip: str) -> int:
        c, s, b = self.table.counts, self.stride, self.base + self._bucket(ip)
        return sum(c[w * s + b] for w in range(self.table.workers))

    def admit(self, ip: str, max_total: int, max_per_ip: int) -> bool:
        """Count a connection from `ip` unless every worker's together reach a limit. Two workers
        admitting at the same instant may each see the other's count one late (at most N-1 over)."""
        c, s, b0, n = self.table.counts, self.stride, self.base, self.table.workers
        b = self._bucket(ip)
        if sum(c[b0 + w * s] for w in range(n)) >= max_total or \
                sum(c[b0 + w * s + b] for w in range(n)) >= max_per_ip:
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


class SharedUserSessions(UserSessions):
    """`UserSessions` over the table (kind 1): `[imap] max_connections_per_user` counts the
    sessions of every worker. Two users whose hashes share a bucket share a count (stricter only)."""

    def __init__(self, table: SharedTable, index: int):
        super().__init__()
        self.counts = SharedConnections(table, index, kind=1)

    def admit(self, user: str, limit: int) -> bool:
        return self.counts.admit(user.lower(), 2**32 - 1, limit)

    def release(self, user: str) -> None:
        self.counts.release(user.lower())

    def total(self) -> int:
        return self.counts.total()


class SharedThrottle(AuthThrottle):
    """`AuthThrottle` over the shared table: a failure in one worker slows and blocks the IP in all.
    Same rules (stamps within the window, the last `max_failures` kept, success clears)."""

    def __init__(self, table: SharedTable, failure_delay: float = 1.0, max_failures: int = 10,
                 window: float = 600.0, clock: Callable[[], float] = time.monotonic):
        super().__init__(failure_delay, max_failures, window, clock)  # CLOCK_MONOTONIC: one per machine
        self.table = table
        self.records = table.throttle

    def _recent(self, ip: str) -> list[float]:
        h = self.table.ip_hash(ip)
        cutoff = self.clock() - self.window
        with self.table.locked():
            off, found = self.records.find(h, cutoff)
            if not found:
                return []
            stamps = self.records.read(off)[1]
            kept = [t for t in stamps if t >= cutoff]
            if len(kept) != len(stamps):
                self.records.write(off, h, kept)
            return kept

    def failure(self, ip: str) -> None:
        h = self.table.ip_hash(ip)
        with self.table.locked():
            off, found = self.records.find(h, self.clock() - self.window)
            stamps = self.records.read(off)[1] if found else []
            stamps.append(self.clock())
            self.records.write(off, h, stamps[-max(self.max_failures, 1):])

    def success(self, ip: str) -> None:
        h = self.table.ip_hash(ip)
        with self.table.locked():
            off, found = self.records.find(h, self.clock() - self.window)
            if found:
                self.records.write(off, h, [])


class SharedLogins(LastLogins):
    """`LastLogins` over the table: POP3's LOGIN-DELAY (RFC 2449 §6.5) holds across workers. When
    the PROBES slots of a user's hash are all taken by logins within the delay, the oldest gives way
    (that user may log in again sooner, as no one is refused because of another)."""

    def __init__(self, table: SharedTable, clock: Callable[[], float] = time.monotonic):
        super().__init__(clock)
        self.table = table
        self.records = table.logins

    def last(self, user: str, delay: float) -> float | None:
        h = self.table.ip_hash(user.lower())
        now = self.clock()
        with self.table.locked():
            off, found = self.records.find(h, now - delay)
            stamps = self.records.read(off)[1] if found else []
        return stamps[-1] if stamps and now - stamps[-1] < delay else None

    def record(self, user: str, delay: float) -> None:
        h = self.table.ip_hash(user.lower())
        with self.table.locked():
            off, _found = self.records.find(h, self.clock() - delay)
            self.records.write(off, h, [self.clock()])


class SharedRateLimiter(RateLimiter):
    """`RateLimiter` over the table (port 25's connections or messages per minute, `which` 0 or 1):
    the limit counts every worker's events. Each IP keeps up to RATE_RING (stamp, count) groups;
    beyond that the two oldest merge under the newer stamp, so their events are counted until the
    newer one leaves the window: exact up to RATE_RING events a window, stricter (never looser)
    above."""

    def __init__(self, table: SharedTable, which: int, limit: int, window: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        super().__init__(limit, window, clock=clock)
        self.table = table
        records = table.rates[which]
        if records is None and limit > 0:
            raise ValueError("the shared table was made without this rate")
        self.records = records

    def _live(self, values: list[float], now: float) -> list[float]:
        out: list[float] = []
        for i in range(0, len(values) - 1, 2):
            if values[i] > now - self.window:
                out += values[i:i + 2]
        return out

    def hit(self, key: str) -> bool:
        records = self.records
        if self.limit <= 0 or records is None:
            return True
        h = self.table.ip_hash(key)
        now = self.clock()
        with self.table.locked():
            off, found = records.find(h, now - self.window)
            values = self._live(records.read(off)[1], now) if found else []
            if sum(values[1::2]) >= self.limit:
                records.write(off, h, values)
                return False
            values += [now, 1.0]
            while len(values) > 2 * records.ring:  # merge the two oldest groups (stricter)
                values[0:4] = [values[2], values[1] + values[3]]
            records.write(off, h, values)
            return True

    def count(self, key: str) -> int:
        records = self.records
        if records is None:
            return 0
        h = self.table.ip_hash(key)
        now = self.clock()
        with self.table.locked():
            off, found = records.find(h, now - self.window)
            values = self._live(records.read(off)[1], now) if found else []
        return int(sum(values[1::2]))


def _bus_path(run_dir: Path, index: int, abstract: bool = False) -> str:
    """DATA_DIR/run/worker-N.sock; a data directory too deep for a socket path (108 bytes), or on a
    file system without sockets (`abstract`, see `Bus.probe`), gets a name in the abstract namespace,
    derived from it."""
    path = str(run_dir / f"worker-{index}.sock")
    if len(os.fsencode(path)) < 100 and not abstract:
        return path
    return "\0postier-" + hashlib.sha256(os.fsencode(run_dir)).hexdigest()[:24] + f"-{index}"


_RECORD = struct.Struct("!H")  # a wake-up's length, before it, in a datagram of several


class Bus:
    """Wake-ups between workers: one datagram socket per worker, a message to all the others."""

    MAX = 2048  # bytes per datagram (an address and a folder name are far shorter)

    def __init__(self, run_dir: Path, index: int, workers: int, abstract: bool = False):
        self.index = index
        self.paths = [_bus_path(run_dir, i, abstract) for i in range(workers)]
        self.handlers: dict[bytes, Callable[[bytes], object]] = {}
        self._gathered: dict[tuple[bytes, int | None], None] = {}  # this step's wake-ups, in order
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
        """Tell every other worker (or only worker `to`); never blocks, a failure is only logged.

        On the event loop the wake-ups of one step are gathered, the same one kept once, and sent
        together when the step is over: deliveries answered by one agent batch make one datagram
        per worker instead of one per message (a wake-up only says "look again", so two are one)."""
        data = kind + payload
        if len(data) > self.MAX - _RECORD.size:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a thread: at once
            self._send_now([data], to)
            return
        key = (data, to)
        if key in self._gathered:
            return
        if not self._gathered:
            loop.call_soon(self._flush)
        self._gathered[key] = None

    def _flush(self) -> None:
        gathered = list(self._gathered)
        self._gathered.clear()
        for to in {to for _data, to in gathered}:
            self._send_now([data for data, t in gathered if t == to], to)

    def _send_now(self, records: list[bytes], to: int | None) -> None:
        datagrams: list[bytes] = []
        part = bytearray()
        for data in records:
            if len(part) + _RECORD.size + len(data) > self.MAX:
                datagrams.append(bytes(part))
                part.clear()
            part += _RECORD.pack(len(data)) + data
        if part:
            datagrams.append(bytes(part))
        for i, path in enumerate(self.paths):
            if i == self.index or (to is not None and i != to):
                continue
            for datagram in datagrams:
                try:
                    self.sock.sendto(datagram, path)
                except OSError as exc:  # not up yet (starting, restarting) or its queue is full
                    log.debug("worker %d: no wake-up to worker %d: %s", self.index, i, exc)
                    break

    def _readable(self) -> None:
        for _ in range(256):
            try:
                datagram = self.sock.recv(self.MAX)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            pos = 0
            while pos + _RECORD.size <= len(datagram):
                (n,) = _RECORD.unpack_from(datagram, pos)
                data = datagram[pos + _RECORD.size:pos + _RECORD.size + n]
                pos += _RECORD.size + n
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
    #: The supervisor's control socket (SOCK_SEQPACKET): listening sockets bound at a reload.
    control: socket.socket | None = None
    #: Where every worker's metric values are mapped (postier/metrics.py), fresh for each run.
    metrics_dir: Path | None = None

    def handed_sockets(self) -> dict[str, socket.socket]:
        """The listening sockets the supervisor has handed over since the last call, by role (each
        message a role's name and its descriptor, SCM_RIGHTS; sent before the SIGHUP that asks for
        them, so they are waiting)."""
        out: dict[str, socket.socket] = {}
        if self.control is None:
            return out
        self.control.setblocking(False)  # (recv_fds drops its flags argument: no MSG_DONTWAIT)
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.control, 256, 1)
            except (BlockingIOError, InterruptedError):
                return out
            except OSError as exc:
                log.error("worker %d: control socket: %s", self.index, exc)
                return out
            if not data and not fds:
                return out  # the supervisor is gone
            for fd in fds[1:]:
                os.close(fd)
            if fds:
                old = out.pop(data.decode(errors="replace"), None)
                if old is not None:
                    old.close()
                out[data.decode(errors="replace")] = socket.socket(fileno=fds[0])

    @property
    def primary(self) -> bool:
        return self.index == 0
