"""The delivery agent: a helper process that writes and fsyncs local deliveries (maildir(5), mbox).

Why a process and not only threads: the durable write of one message is a handful of system calls
(open, write, fsync, close, rename, fsync of new/), and a Python thread needs the GIL back after
each of them. In the server process the event loop's thread holds the GIL most of the time under
load, so every delivery thread waits for it again and again, and each wait is a context switch
for both threads (measured with smtp-source, 20 sessions: 20-30 context switches per message and
a third more CPU on the event loop's thread than with this agent). The agent has a GIL of its
own; its threads contend only with each other, and none of them is busy in Python.

Like Postfix's delivery agents it is a child of the server: `python -m postier.store.agent
MAIL_ROOT WORKERS`, talking over a socketpair passed as its standard input. One request per
message (a JSON header, then the trace prefix and the body, or the path of the spool file of a
spilled body), one answer per message with one (ok, detail) per recipient, sent only after the
files are fsynced and renamed into new/ (store/maildir.py). The server answers 250 only on that
answer, as before.

If the agent dies, the deliveries waiting for it fail (the client gets 451 and retries) and the
next delivery starts a new agent. Fault injection (postier/faults.py): the agent inherits
POSTIER_FAULT, and when a fault point kills it, the server kills itself too, since the points
stand for a crash of the whole server. libfiu's fault injection (fiu-run, fiu-ctrl) works on one
process: with `[mailbox] delivery_agent = false` the server delivers in its own threads instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import logsetup
from ..logsetup import configure
from ..message.types import AccountError, MessageBody, User
from .errors import OverQuota
from .maildir import DeliveryError, MaildirDraft, QuotaHold, deliver_to_user, folder_root, sync_new
from .quota import OVER_QUOTA

log = logging.getLogger("postier.mda")

_REQUEST = struct.Struct("!II")  # header length, data length
_ANSWER = struct.Struct("!I")  # answer length
MAX_HEADER = 1 << 20  # recipients and paths: far below this
MAX_DATA = 64 << 20  # prefix + an in-memory body (the server spills bodies over 256 KiB)
SOCKET_BUFFER = 4 << 20

type Result = tuple[bool, str]


class AgentError(Exception):
    """The agent is gone (or could not start): the delivery did not happen."""


# -- the server's side ------------------------------------------------------------------------------

class _Answers(asyncio.Protocol):
    """Reads the agent's answers and resolves the futures waiting for them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos = 0
        while len(buf) - pos >= 4:
            (n,) = _ANSWER.unpack_from(buf, pos)
            if n > MAX_HEADER:
                log.error("delivery agent: answer of %d bytes: protocol error", n)
                self.agent.abort()
                return
            if len(buf) - pos - 4 < n:
                break
            answer = json.loads(buf[pos + 4:pos + 4 + n])
            pos += 4 + n
            self.agent.answered(answer["id"], [(bool(ok), str(detail)) for ok, detail in answer["results"]])
        del buf[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent.lost()


class Agent:
    """The server's handle on its delivery agent process (started on first use)."""

    def __init__(self, mail_root: Path, workers: int = 8):
        self.mail_root = mail_root
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.transport: asyncio.Transport | None = None
        self._shut: socket.socket | None = None  # our end, duplicated: close() ends it synchronously
        self._starting: asyncio.Future[None] | None = None
        self._pending: dict[int, asyncio.Future[list[Result]]] = {}
        self._next = 0

    async def _start(self) -> None:
        if self.transport is not None:
            return
        if self._starting is not None:  # another delivery is starting it: wait for that
            await asyncio.shield(self._starting)
            return
        loop = asyncio.get_running_loop()
        self._starting = loop.create_future()
        try:
            ours, theirs = socket.socketpair()
            for s in (ours, theirs):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
            try:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "postier.store.agent", str(self.mail_root), str(self.workers)],
                    stdin=theirs.fileno(), stdout=subprocess.DEVNULL, close_fds=True)
            finally:
                theirs.close()
            self._shut = socket.socket(fileno=os.dup(ours.fileno()))
            transport, _ = await loop.create_unix_connection(lambda: _Answers(self), sock=ours)
            self.transport = transport
            log.info("delivery agent started (pid %d)", self.proc.pid)
            self._starting.set_result(None)
        except BaseException as exc:
            self._starting.set_exception(AgentError(f"cannot start the delivery agent: {exc}"))
            self._starting.exception()  # retrieved: waiters raise it themselves
            raise AgentError(f"cannot start the delivery agent: {exc}") from exc
        finally:
            self._starting = None

    async def deliver(self, users: list[tuple[User, str | None]], prefix: bytes, data: list[bytes] | None,
                      path: str | None, size: int, envelope_from: str, info: str = "") -> list[Result]:
        """Deliver prefix + body (`data` chunks in memory, or the spool file at `path` of `size` bytes);
        `info` is the Maildir flags suffix every copy gets (":2,FS"; "" lands in new/)."""
        await self._start()
        assert self.transport is not None
        self._next += 1
        ident = self._next
        request: dict[str, Any] = {
            "id": ident, "from": envelope_from, "prefix": len(prefix), "path": path, "size": size,
            "to": [[u.address, u.local, u.domain, u.mailbox_format, folder, u.quota] for u, folder in users],
        }
        if info:
            request["info"] = info
        header = json.dumps(request).encode()
        length = len(prefix) + (sum(len(c) for c in data) if data else 0)
        fut: asyncio.Future[list[Result]] = asyncio.get_running_loop().create_future()
        self._pending[ident] = fut
        self.transport.writelines([_REQUEST.pack(len(header), length), header, prefix, *(data or ())])
        return await fut

    def answered(self, ident: int, results: list[Result]) -> None:
        fut = self._pending.pop(ident, None)
        if fut is not None and not fut.done():
            fut.set_result(results)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def lost(self) -> None:
        """The connection to the agent ended: fail what waits, reap the process."""
        self.transport = None
        if self._shut is not None:
            self._shut.close()
            self._shut = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(AgentError("the delivery agent exited"))
        proc, self.proc = self.proc, None
        if proc is not None:
            self._reap(proc, 0)

    def _reap(self, proc: subprocess.Popen[bytes], tries: int) -> None:
        rc = proc.poll()
        if rc is None:
            if tries < 100:
                asyncio.get_running_loop().call_later(0.05, self._reap, proc, tries + 1)
            return
        if rc != 0:
            log.error("delivery agent (pid %d) exited with status %d", proc.pid, rc)
        if rc == -signal.SIGKILL and os.environ.get("POSTIER_FAULT"):
            logsetup.flush()
            os.kill(os.getpid(), signal.SIGKILL)  # a fault point fired in the agent: the server crashes

    def close(self, timeout: float = 30.0) -> None:
        """Let the agent finish what it has and exit (blocking: at server shutdown)."""
        proc = self.proc
        if self._shut is not None:  # EOF for the agent now, not at the loop's next iteration
            try:
                self._shut.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        if self.transport is not None:
            self.transport.close()
        if proc is not None:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.proc = None


# -- the agent's side -------------------------------------------------------------------------------

def _serve(sock: socket.socket, mail_root: Path, workers: int) -> None:
    """Read requests; deliver the ones that came in together as one batch (see `_Batch`), the rest
    (mbox, spilled bodies) one by one in worker threads; answer each when it is durable."""
    slow = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="agent")
    syncers = ThreadPoolExecutor(max_workers=max(1, SYNC_THREADS - 1), thread_name_prefix="fsync")
    send_lock = threading.Lock()

    def send(answers: list[bytes]) -> None:
        with send_lock:
            try:
                sock.sendall(b"".join(answers))
            except OSError:
                pass  # the server is gone: nothing to tell

    def one(header: dict[str, Any], data: bytes) -> None:
        send([_answer(header, _deliver_each(mail_root, header, data))])

    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
        pos = 0
        batch = _Batch(mail_root)
        while len(buf) - pos >= _REQUEST.size:
            hlen, dlen = _REQUEST.unpack_from(buf, pos)
            if hlen > MAX_HEADER or dlen > MAX_DATA:
                raise SystemExit(f"delivery agent: request of {hlen}+{dlen} bytes: protocol error")
            end = pos + _REQUEST.size + hlen + dlen
            if len(buf) < end:
                break
            start = pos + _REQUEST.size
            header = json.loads(buf[start:start + hlen])
            data = bytes(buf[start + hlen:end])
            pos = end
            if header["path"] is None and all(r[3] == "maildir" for r in header["to"]):
                batch.add(header, data)
            else:
                slow.submit(one, header, data)
        del buf[:pos]
        if batch.jobs:
            send(batch.run(syncers))
    slow.shutdown(wait=True)
    syncers.shutdown(wait=True)


SYNC_THREADS = 4  # fsyncs of one batch run in this many threads at once (the disk merges them)


def _answer(header: dict[str, Any], results: list[Result]) -> bytes:
    data = json.dumps({"id": header["id"], "results": results}).encode()
    return _ANSWER.pack(len(data)) + data


def _deliver_each(mail_root: Path, header: dict[str, Any], data: bytes) -> list[Result]:
    """One request, recipient after recipient (mbox, spilled bodies)."""
    try:
        cut = header["prefix"]
        prefix, rest = data[:cut], data[cut:]
        results: list[Result] = []
        for address, local, domain, fmt, folder, *limit in header["to"]:
            body: MessageBody | bytes = rest
            if header["path"] is not None:
                body = MessageBody.from_spool(header["path"], header["size"])
            try:
                ok, detail = deliver_to_user(mail_root, User(address, local, domain, fmt, *limit[:1]), prefix,
                                             body, header["from"], folder, str(header.get("info", "")))
            finally:
                if isinstance(body, MessageBody):
                    body.close()
            results.append((ok, detail))
        return results
    except Exception as exc:  # a bug or a vanished spool file: this message fails, the agent lives
        log.exception("delivery agent: request %s failed", header.get("id"))
        return [(False, f"delivery agent error: {exc}")] * len(header.get("to", ()))


class _Batch:
    """Maildir deliveries that arrived together, done step by step for all of them: write each
    file, fsync them all (in SYNC_THREADS threads), rename them all, fsync each new/ once. The
    same durability as one by one (store/maildir.py: MaildirDraft), with a handful of thread
    hand-offs per batch instead of several per message."""

    def __init__(self, mail_root: Path):
        self.mail_root = mail_root
        self.jobs: list[tuple[dict[str, Any], list[Result | None]]] = []
        self.drafts: list[tuple[list[Result | None], int, Any]] = []
        self.holds: list[tuple[list[Result | None], int, QuotaHold, MaildirDraft]] = []

    def add(self, header: dict[str, Any], data: bytes) -> None:
        cut = header["prefix"]
        prefix, body = data[:cut], data[cut:]
        results: list[Result | None] = [None] * len(header["to"])
        self.jobs.append((header, results))
        for i, (address, local, domain, fmt, folder, *limit) in enumerate(header["to"]):
            try:
                user = User(address, local, domain, fmt, *limit[:1])
                root = folder_root(user.maildir(self.mail_root), folder)
                draft = MaildirDraft(root, prefix, body, str(header.get("info", "")))
                if user.quota is not None:  # store/quota.py: reserved, or refused with nothing kept
                    hold = QuotaHold(self.mail_root, user)
                    try:
                        hold.reserve(draft)
                    except BaseException:
                        draft.discard()
                        raise
                    self.holds.append((results, i, hold, draft))
                self.drafts.append((results, i, draft))
            except OverQuota:
                log.info("delivery to %s refused: over quota", address)
                results[i] = (False, OVER_QUOTA)
            except (DeliveryError, AccountError, OSError, ValueError, sqlite3.Error) as exc:
                self._failed(results, i, address, exc)

    def _failed(self, results: list[Result | None], i: int, address: str, exc: Exception) -> None:
        log.error("delivery to %s failed: %s", address, exc)
        results[i] = (False, str(exc))

    def run(self, syncers: ThreadPoolExecutor) -> list[bytes]:
        drafts = self.drafts

        def sync(part: list[tuple[list[Result | None], int, Any]]) -> None:
            for results, i, draft in part:
                try:
                    draft.sync()
                except DeliveryError as exc:
                    self._failed(results, i, str(draft.root), exc)

        parts = [drafts[k::SYNC_THREADS] for k in range(min(SYNC_THREADS, len(drafts)))]
        futures = [syncers.submit(sync, part) for part in parts[1:]]
        if parts:
            sync(parts[0])  # this thread takes a share too
        for f in futures:
            f.result()
        published: dict[str, list[tuple[list[Result | None], int, str]]] = {}
        for results, i, draft in drafts:
            if results[i] is not None:
                continue
            try:
                name = draft.publish()
            except DeliveryError as exc:
                self._failed(results, i, str(draft.root), exc)
                continue
            published.setdefault(draft.dest_dir, []).append((results, i, name))
        for new_dir, done in published.items():
            try:
                sync_new(new_dir)  # one fsync of new/ for every rename into it
            except DeliveryError as exc:
                for results, i, _name in done:
                    self._failed(results, i, new_dir, exc)
                continue
            for results, i, name in done:
                results[i] = (True, name)
        for results, i, hold, draft in self.holds:
            got = results[i]
            if got is None or not got[0]:
                hold.release(draft)
        return [_answer(header, [r or (False, "not delivered") for r in results]) for header, results in self.jobs]


def main(argv: list[str]) -> int:
    """Agent entry point: MAIL_ROOT WORKERS, the socket to the server on standard input."""
    if len(argv) != 2:
        print("usage: python -m postier.store.agent MAIL_ROOT WORKERS", file=sys.stderr)
        return 2
    configure()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when the agent ends (EOF)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sock = socket.socket(fileno=os.dup(0))
    os.close(0)
    _serve(sock, Path(argv[0]), max(1, int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
