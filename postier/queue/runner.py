"""The outbound queue at work: durable enqueue, dispatch per destination, retries, expiry and DSNs
(RFC 5321 §4.5.4 retry strategy, RFC 3461 §6 DSN generation, RFC 5321 §5.1 MX routing).

`Queue` is what the pipelines call (`enqueue`: it is their `Enqueuer`) and what runs
deliveries. Due recipients are grouped into jobs (one message, one destination, at most 100
recipients); each destination gets up to `queue.concurrency_per_domain` workers (and all of them
together at most `queue.concurrency_total`), and a worker keeps its SMTP session open for the next
job of its destination (connection reuse). Recipients in local domains go straight to the MDA.

Every outcome is committed to the spool database before anything depends on it; outcomes of
concurrent jobs share one commit (group commit). A crash loses no accepted message: after a restart
every recipient still `queued` is tried again, so a message in flight at the crash may arrive twice,
never zero times. Time comes from an injectable clock (`schedule.Clock`); `dispatch()` and `drain()`
let tests step the queue by hand.

The storage is a `spool.QueueSpool`: this machine's spool (`spool.Spool`), or in cluster mode the
queue all nodes share (`cluster.ClusterSpool`), where each scan claims due recipients under a lease
that this runner renews while it holds them (docs/scaling.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..accounts import Directory, Lookup
from ..config import Config
from ..faults import fault_point
from ..message.dsn import FULL_LIMIT, DSNRecipient, compose_dsn
from ..message.types import HEADER_LIMIT, MEMORY_DATA_LIMIT, Envelope, MailDelivery, MessageBody, Recipient, remote_targets
from ..message.received import queue_id, return_path
from ..metrics import Metrics
from ..proto.smtp.address import xtext_decode
from ..proto.smtp.errors import AddressError
from ..mailauth.srs import SRS, SRSError, is_srs
from ..mailauth.tlsrpt import TLSReportStore
from ..resolver import BaseResolver
from ..store.errors import StoreUnavailable
from . import schedule
from .client import SMTPClient
from .mtasts import PolicyCache
from .tlsrpt import TLSRecorder
from .delivery import (
    MAX_RCPTS_PER_TRANSACTION, Connector, Failure, Fate, Outbound, RcptResult, Router, transact,
)
from .spool import (
    DELIVERED, FAILED, QUEUED, TLS_REPORT_ROLE, MessageInfo, Op, Outcome, QueueSpool, RecipientSpec, RecipientState,
    Removed, Spool,
)

log = logging.getLogger("postier.queue")

POLL_INTERVAL = 5.0  # longest sleep between scans of the database (enqueue and retry wake earlier)
DUE_BATCH = 5000
CLAIM_MIN = 10  # recipients a node of a cluster claims per scan, at least
LOCAL = "local"  # the destination key of recipients in our own domains
LOCAL_CONCURRENCY = 16
READ_AHEAD = 32  # spool files read per worker-thread hand-off...
READ_AHEAD_BYTES = 4 * 1024 * 1024  # ...and bytes
DOMAIN_CACHE_TTL = 30.0
STOP_GRACE = 10.0
DSN_ROUNDS = 5  # rounds of `send_dsns` for DSNs recorded by other nodes meanwhile


@dataclass
class Job:
    msg_id: str
    dest: str
    domain: str
    recipients: list[str]
    msg: MessageInfo | None = None
    states: list[RecipientState] = field(default_factory=list)
    data: bytes | None = None  # the spool file's content, read ahead for small messages
    reading: bool = False


def _notify_words(notify: str) -> set[str]:
    return {w.strip().upper() for w in notify.split(",") if w.strip()}


def dsn_owed(kind: str, sender: str, notify: str) -> bool:
    """RFC 3461 §4.1, §6.2: which notifications a recipient's NOTIFY asks for; never to `<>`."""
    if not sender:  # RFC 3461 §6.2 / RFC 5321 §4.5.5: never a DSN about a DSN (null sender)
        return False
    words = _notify_words(notify)
    if "NEVER" in words:
        return False
    if kind == "failed":
        return not words or "FAILURE" in words
    if kind == "delayed":
        return not words or "DELAY" in words  # RFC 3461 §4.1: default is FAILURE[,DELAY]
    return "SUCCESS" in words  # delivered, relayed


class Queue:
    """The queue of one server: spool, dispatcher, workers. Create in an event loop."""

    def __init__(self, config: Config, directory: Directory, mda: MailDelivery, resolver: BaseResolver, *,
                 clock: schedule.Clock | None = None, rng: random.Random | None = None,
                 srs: SRS | None = None, metrics: Metrics | None = None,
                 tls_reports: TLSReportStore | None = None, spool: QueueSpool | None = None) -> None:
        cfg = config
        self.metrics = metrics  # each recipient's outcome is counted where it is logged (`_log`)
        self.srs = srs  # bounces to our SRS addresses (the queue's own DSNs) go back to the original sender
        self.directory = directory
        self.mda = mda
        self.config = cfg
        self.qcfg = cfg.queue
        self.clock: schedule.Clock = clock or schedule.SystemClock()
        #: The queue's storage: this node's spool, or the cluster's (`queue.cluster`, built by server/app.py).
        self.spool: QueueSpool = spool if spool is not None else Spool(cfg.spool_dir / "queue")
        self.out = Outbound.from_config(cfg)
        sts = None
        if cfg.outbound.mta_sts and not self.out.relay:  # a smarthost applies its own policy
            sts = PolicyCache(resolver, cfg.data_dir / "mta-sts.json", cfg.outbound.ca_file, cfg.outbound.https_port)
        self.router = Router(resolver, self.out, rng, sts)
        # RFC 8460: each session attempt's TLS outcome, for the daily TLS reports (not through a smarthost)
        recorder = (TLSRecorder(tls_reports, self.out.source, sts_failures=sts.failures if sts is not None else None)
                    if tls_reports is not None and not self.out.relay else None)
        self.connector = Connector(self.out, recorder.session if recorder is not None else None)
        self._db_exec = ThreadPoolExecutor(1, thread_name_prefix="queue-db")
        self._io_exec = ThreadPoolExecutor(8, thread_name_prefix="queue-io")
        self._ops: list[tuple[Op[Any], asyncio.Future[Any]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._unlinks: set[asyncio.Future[None]] = set()
        self._busy: set[tuple[str, str]] = set()  # (msg_id, address) dispatched, not yet recorded
        self._inflight: Counter[str] = Counter()  # msg_id -> jobs in flight
        self._dests: dict[str, deque[Job]] = {}
        self._workers: Counter[str] = Counter()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._total = asyncio.Semaphore(max(1, self.qcfg.concurrency_total))
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._local_domains: dict[str, tuple[bool, float]] = {}
        self._last_prune = 0.0
        #: Set when another process runs the deliveries (`[server] workers` > 1, not the primary):
        #: this queue only enqueues, then calls it to wake that process's runner.
        self.remote_runner: Callable[[], None] | None = None
        self.stats: Counter[str] = Counter()

    # -- database plumbing ------------------------------------------------------------------------

    async def _db(self, op: Op[Any]) -> Any:
        """Run a write operation; concurrent ones share a transaction (group commit)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append((op, fut))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())
        return await fut

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        while self._ops:
            batch, self._ops = self._ops, []
            try:
                results = await loop.run_in_executor(self._db_exec, self.spool.run, [op for op, _ in batch], False)
            except Exception as exc:
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            removed = [r.msg_id for r in results if isinstance(r, Removed)]
            if removed:  # committed: the spool files can go (one hand-off for the batch, off this thread)
                unlink = loop.run_in_executor(self._io_exec, self.spool.remove_many, removed)
                self._unlinks.add(unlink)
                unlink.add_done_callback(self._unlinks.discard)
            for (_, f), r in zip(batch, results, strict=True):
                if isinstance(r, Removed):
                    r = True
                if f.done():
                    continue
                if isinstance(r, Exception):
                    f.set_exception(r)
                else:
                    f.set_result(r)

    async def _read[T](self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._db_exec, fn, *args)

    async def _io[T](self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._io_exec, fn, *args)

    # -- enqueue (the Enqueuer) -------------------------------------------------------------------

    async def enqueue(self, env: Envelope, recipients: list[str], prefix: bytes, body: MessageBody,
                      *, sender: str | None = None) -> str:
        """Durably queue the message for `recipients`; returns the queue id. Raises on failure.

        DSN parameters come from the envelope: RET and ENVID of MAIL (RFC 3461 §4.3, §4.4), NOTIFY
        and ORCPT of the RCPT that led to each recipient (§4.1, §4.2; alias targets inherit them).
        """
        params = env.mail_params
        specs = []
        for addr in recipients:
            src = next((r for r in env.recipients if r.address == addr or addr in r.remote), None)
            notify = (src.params.get("NOTIFY") or "") if src else ""
            orcpt = ""
            if src and src.params.get("ORCPT") and src.address == addr:
                kind, _, value = (src.params.get("ORCPT") or "").partition(";")
                with contextlib.suppress(AddressError):
                    orcpt = f"{kind};{xtext_decode(value)}"
            specs.append(RecipientSpec(addr, notify.upper(), orcpt))
        envid = ""
        if params.get("ENVID"):
            with contextlib.suppress(AddressError):
                envid = xtext_decode(params.get("ENVID") or "")
        body_kind = (params.get("BODY") or "").upper()
        eightbit = body_kind in ("8BITMIME", "BINARYMIME") or not prefix.isascii() or (
            body.in_memory and not body.head(HEADER_LIMIT).isascii())
        user = env.auth_user.address if env.auth_user is not None else ""
        return await self.store(sender=env.mail_from if sender is None else sender, recipients=specs,
                                prefix=prefix, body=body, user=user, envid=envid,
                                ret=(params.get("RET") or "").upper(), smtputf8="SMTPUTF8" in params,
                                eightbit=eightbit, msg_id=env.qid, tls_optional=env.role == TLS_REPORT_ROLE)

    async def store(self, *, sender: str, recipients: list[RecipientSpec], prefix: bytes,
                    body: MessageBody | bytes, user: str = "", envid: str = "", ret: str = "",
                    smtputf8: bool = False, eightbit: bool = False, msg_id: str | None = None,
                    tls_optional: bool = False) -> str:
        """Spool file first (fsynced), then the rows (committed): only then is the message queued."""
        if not recipients:
            raise ValueError("no recipients")
        size = -1
        mid = ""
        for _ in range(5):
            mid, msg_id = msg_id or queue_id(), None
            try:
                size = await self._io(self.spool.write_file, mid, prefix, body)
                break
            except FileExistsError:
                continue
        if size < 0:
            raise RuntimeError("could not allocate a queue id")
        now = self.clock.time()
        info = MessageInfo(mid, sender, now, size, user, envid, ret, smtputf8, eightbit, tls_optional=tls_optional)
        # claimed at once when this process schedules it itself (the dispatcher of another node must not)
        claim = self.remote_runner is None and not self._stopping
        fut = asyncio.ensure_future(self._db(self.spool.op_insert(info, recipients, now, claim)))
        try:
            await asyncio.shield(fut)  # a cancelled session must not undo a commit in progress
        except asyncio.CancelledError:
            raise
        except BaseException:
            await self._io(self.spool.remove_file, mid)
            raise
        fault_point("queue.after_commit")  # committed: the caller's 250 is not sent yet
        self.stats["queued"] += 1
        log.info("%s: queued from=<%s> size=%d nrcpt=%d%s", mid, sender, size, len(recipients),
                 f" user={user}" if user else "")
        if self.remote_runner is not None:
            self.remote_runner()  # its runner dispatches the new rows (durable already)
        elif not self._stopping:
            await self._schedule(info, [_fresh(mid, r, now) for r in recipients])
        return mid

    async def sends_today(self, user: str) -> int:
        """Messages `user` submitted in the last 24 hours (submission.max_messages_per_day)."""
        return await self._read(self.spool.sends_since, user, self.clock.time() - 86400.0)

    # -- dispatch ---------------------------------------------------------------------------------

    async def _is_local(self, domain: str) -> bool:
        now = time.monotonic()
        hit = self._local_domains.get(domain)
        if hit is not None and now - hit[1] < DOMAIN_CACHE_TTL:
            return hit[0]
        local = await asyncio.to_thread(self.directory.is_local_domain, domain)
        self._local_domains[domain] = (local, now)
        return local

    async def _schedule(self, msg: MessageInfo, states: list[RecipientState]) -> int:
        """Turn due recipients of one message into jobs (per destination, bounded size); start workers."""
        groups: dict[tuple[str, str], list[RecipientState]] = {}
        for st in states:
            if (msg.id, st.address) in self._busy:
                continue
            dest = LOCAL if await self._is_local(st.domain) else self.out.destination(st.domain)
            groups.setdefault((dest, st.domain), []).append(st)
        n = 0
        for (dest, domain), group in groups.items():
            for i in range(0, len(group), MAX_RCPTS_PER_TRANSACTION):
                chunk = group[i:i + MAX_RCPTS_PER_TRANSACTION]
                addrs = [st.address for st in chunk]
                self._busy.update((msg.id, a) for a in addrs)
                self._inflight[msg.id] += 1
                self._dests.setdefault(dest, deque()).append(Job(msg.id, dest, domain, addrs, msg, chunk))
                n += 1
            self._spawn(dest)
        return n

    def _spawn(self, dest: str) -> None:
        limit = LOCAL_CONCURRENCY if dest == LOCAL else max(1, self.qcfg.concurrency_per_domain)
        want = min(limit - self._workers[dest], len(self._dests.get(dest, ())))
        for _ in range(max(0, want)):
            self._workers[dest] += 1
            task = asyncio.get_running_loop().create_task(self._worker(dest))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def dispatch(self) -> int:
        """Schedule every queued recipient whose time has come; returns the number of new jobs."""
        # A shared queue hands each node a few rounds of work at a time, not everything that is due
        batch = DUE_BATCH if self.spool.lease <= 0 else max(CLAIM_MIN, 2 * self.qcfg.concurrency_total)
        rows = await self._read(self.spool.due_full, self.clock.time(), batch)
        per_msg: dict[str, tuple[MessageInfo, list[RecipientState]]] = {}
        for info, st in rows:
            if (info.id, st.address) not in self._busy:
                per_msg.setdefault(info.id, (info, []))[1].append(st)
        n = 0
        for info, states in per_msg.values():
            n += await self._schedule(info, states)
        return n

    async def drain(self, timeout: float = 60.0) -> None:
        """Wait until no job is pending or running (tests; shutdown)."""
        async with asyncio.timeout(timeout):
            while True:
                # Only futures still pending: a finished one can sit in _unlinks until its discard
                # callback runs, and gather() over finished futures completes without yielding to
                # the loop, which would spin here forever (and starve the timeout).
                pending = [t for t in (*self._tasks, *self._unlinks) if not t.done()]
                if self._flusher is not None and not self._flusher.done():
                    pending.append(self._flusher)
                if pending:
                    await asyncio.wait(pending)
                elif self._ops:
                    await asyncio.sleep(0.001)  # an op queued for a flusher about to start
                else:
                    return

    async def run_once(self) -> int:
        """Dispatch what is due and wait for all of it to finish (tests step the queue with this)."""
        n = await self.dispatch()
        await self.drain()
        return n

    # -- workers ----------------------------------------------------------------------------------

    async def _worker(self, dest: str) -> None:
        session: SMTPClient | None = None
        try:
            async with self._total:
                while (dq := self._dests.get(dest)) and not self._stopping:
                    job = dq.popleft()
                    started = time.monotonic()
                    try:
                        if dest == LOCAL:
                            results = await self._deliver_local(job)
                        else:
                            session, results = await self._deliver_remote(job, session)
                    except asyncio.CancelledError:
                        raise
                    except Exception as exc:  # one job's bug must not stop the queue
                        if isinstance(exc, StoreUnavailable):  # cluster mode: the body or rows out of reach
                            log.error("%s: delivery deferred: %s", job.msg_id, exc)
                        else:
                            log.exception("%s: delivery failed", job.msg_id)
                        if session is not None:
                            session.close()
                            session = None
                        results = [RcptResult(a, Fate.DEFERRED, f"internal error: {exc.__class__.__name__}",
                                              "4.3.0") for a in job.recipients]
                    await self._complete(job, results)
                    if self.metrics is not None:
                        self.metrics.queue_attempt(dest == LOCAL, time.monotonic() - started)
        finally:
            if session is not None:
                await session.quit()
            self._workers[dest] -= 1
            if self._workers[dest] <= 0:
                del self._workers[dest]
                if not self._dests.get(dest):
                    self._dests.pop(dest, None)

    async def _load(self, job: Job) -> bool:
        """Jobs come with their message and recipient states; reload them only when missing."""
        if job.msg is not None and job.states:
            return True
        job.msg = await self._read(self.spool.message, job.msg_id)
        if job.msg is None:
            return False
        states = await self._read(self.spool.recipients, job.msg_id)
        wanted = set(job.recipients)
        job.states = [s for s in states if s.address in wanted and s.status == QUEUED]
        return bool(job.states)

    async def _deliver_remote(self, job: Job, session: SMTPClient | None
                              ) -> tuple[SMTPClient | None, list[RcptResult]]:
        if not await self._load(job):
            return session, []
        assert job.msg is not None
        if session is not None and session.closed:
            session.close()
            session = None
        # RFC 8460 §5.3: a TLS report goes out despite TLS failures, over a session of its own (opportunistic
        # TLS, not counted in the next report) that no other message reuses
        own = job.msg.tls_optional and session is None
        if session is None:
            route = await self.router.route(job.domain, tls_optional=own)
            failure = route.failure
            if failure is None:
                session, failure = await self.connector.open(route)
            if failure is not None:
                if not own:
                    await self._fail_destination(job, failure)
                return None, [failure.result(s.address) for s in job.states]
        assert session is not None
        msg = job.msg
        data: bytes | Path
        if msg.size > MEMORY_DATA_LIMIT:
            async with self._source(msg.id) as data:
                results = await transact(session, msg, job.states, data)
        else:
            if job.data is None:
                await self._read_ahead(job)
            data = job.data if job.data is not None else await self._io(self.spool.read_file, msg.id)
            job.data = None
            results = await transact(session, msg, job.states, data)
        if any(r.fate is Fate.DELIVERED for r in results):
            fault_point("queue.after_remote_ok")  # the remote MX said 250, the queue does not know yet
        if session.closed or any(r.fate is Fate.DEFERRED and not r.remote for r in results):
            session.close()
            session = None
        elif own:
            await session.quit()
            session = None
        return session, results

    async def _read_ahead(self, job: Job) -> None:
        """Read this job's spool file and those of the next small jobs of its destination in one
        worker-thread call (one hand-off per batch instead of one per message)."""
        batch = [job]
        budget = READ_AHEAD_BYTES - (job.msg.size if job.msg else 0)
        for j in self._dests.get(job.dest, ()):
            if len(batch) >= READ_AHEAD or budget <= 0:
                break
            if j.data is None and not j.reading and j.msg is not None and j.msg.size <= min(budget, MEMORY_DATA_LIMIT):
                batch.append(j)
                budget -= j.msg.size
        for j in batch:
            j.reading = True
        try:
            contents = await self._io(self.spool.read_many, [j.msg_id for j in batch])
        finally:
            for j in batch:
                j.reading = False
        for j, c in zip(batch, contents, strict=True):
            j.data = c

    async def _fail_destination(self, job: Job, failure: Failure) -> None:
        """The destination cannot be reached now: every job waiting for it shares this attempt's fate."""
        if failure.fate is Fate.FAILED and job.dest != job.domain:
            return  # a per-domain verdict does not apply to other domains behind the same relay
        dq = self._dests.get(job.dest)
        if not dq:
            return
        same = [j for j in dq if failure.fate is Fate.DEFERRED or j.domain == job.domain]
        for j in same:
            dq.remove(j)
        for j in same:
            if await self._load(j):
                await self._complete(j, [failure.result(s.address) for s in j.states])
            else:
                await self._complete(j, [])

    @contextlib.asynccontextmanager
    async def _source(self, msg_id: str) -> AsyncIterator[bytes | Path]:
        """A large message to read in pieces: its spool file (in cluster mode a download of its
        body into a file), given back when the caller is done, whatever the outcome."""
        source = await self._io(self.spool.source, msg_id)
        try:
            yield source
        finally:
            await self._io(self.spool.release_source, source)

    @contextlib.asynccontextmanager
    async def _local_body(self, msg: MessageInfo) -> AsyncIterator[bytes | MessageBody]:
        """A queued message for the mailboxes: in memory when small; a large one as a read-only
        view of its file (`_source`), which the delivery agent, or cluster mode's upload, reads in
        pieces, as a large message is sent."""
        if msg.size <= MEMORY_DATA_LIMIT:
            yield await self._io(self.spool.read_file, msg.id)
            return
        async with self._source(msg.id) as source:
            if isinstance(source, bytes):
                yield source
                return
            body = await self._io(_spooled, source)
            try:
                yield body
            finally:
                body.close()  # a borrowed file: the queue's, left in place

    async def _deliver_local(self, job: Job) -> list[RcptResult]:
        """Recipients in our own domains: straight to the MDA (aliases may add remote recipients)."""
        if not await self._load(job):
            return []
        assert job.msg is not None
        msg = job.msg
        results: list[RcptResult] = []
        found: list[Recipient] = []
        for st in job.states:
            if self.srs is not None and is_srs(st.address.rpartition("@")[0]):
                try:
                    found.append(Recipient(st.address, (), (self.srs.reverse(st.address),)))
                except SRSError:
                    results.append(RcptResult(st.address, Fate.FAILED, "550 5.1.1 Invalid or expired SRS address",
                                              "5.1.1"))
                continue
            res = await asyncio.to_thread(self.directory.resolve, st.address)
            if res.status is Lookup.UNKNOWN_USER:
                results.append(RcptResult(st.address, Fate.FAILED, "550 5.1.1 No such user here", "5.1.1"))
            elif res.status is not Lookup.FOUND:
                results.append(RcptResult(st.address, Fate.DEFERRED, "domain is no longer local", "4.3.0"))
            else:
                found.append(Recipient(st.address, res.users, res.remote))
        if not found:
            return results
        if any(r.users for r in found):
            async with self._local_body(msg) as data:
                local = await self.mda.deliver_recipients(found, return_path(msg.sender), data, msg.sender)
        else:  # only remote targets (aliases): the MDA queues them, with no body to read here
            local = await self.mda.deliver_recipients(found, return_path(msg.sender), b"", msg.sender)
        failed, full = set(local.failed_users), set(local.over_quota)
        for r in found:
            if r.address in local.delivered:
                results.append(RcptResult(r.address, Fate.DELIVERED, "250 2.0.0 delivered to mailbox", "2.0.0",
                                          mx="local"))
            elif full and all(u.address in full for u in r.users if u.address in failed):
                # RFC 3463 X.2.2 mailbox full: retried until the queue lifetime, or bounced at once
                if self.config.limits.quota_reject_permanent:
                    results.append(RcptResult(r.address, Fate.FAILED, "552 5.2.2 mailbox full", "5.2.2", mx="local"))
                else:
                    results.append(RcptResult(r.address, Fate.DEFERRED, "452 4.2.2 mailbox full", "4.2.2",
                                              mx="local"))
            else:
                results.append(RcptResult(r.address, Fate.DEFERRED, "451 4.3.0 local delivery failed", "4.3.0",
                                          mx="local"))
        expanded = remote_targets(found)
        if expanded:  # alias targets in foreign domains join the message as new recipients
            now = self.clock.time()
            await self._db(self.spool.op_add_recipients(msg.id, expanded, now))
            await self._schedule(msg, [_fresh(msg.id, RecipientSpec(a), now) for a in expanded])
        return results

    # -- outcomes ---------------------------------------------------------------------------------

    def _decide(self, msg: MessageInfo, st: RecipientState, r: RcptResult, now: float, local: bool) -> Outcome:
        q = self.qcfg
        remote_mta = r.remote_mta if r.remote else ""
        if r.fate is Fate.DELIVERED:
            kind = "delivered" if local else ("" if r.dsn_passed else "relayed")
            dsn = kind if kind and dsn_owed(kind, msg.sender, st.notify) else ""
            return Outcome(st.address, DELIVERED, r.reply, r.status_code, r.mx, r.tls, 0.0, dsn, remote_mta)
        if r.fate is Fate.FAILED:
            dsn = "failed" if dsn_owed("failed", msg.sender, st.notify) else ""
            return Outcome(st.address, FAILED, r.reply, r.status_code, r.mx, r.tls, 0.0, dsn, remote_mta)
        # deferred
        if schedule.expired(msg.created, now, q.max_lifetime):
            # RFC 5321 §4.5.4.1: give up; the DSN keeps the last temporary status (RFC 3463 4.x.x)
            days = q.max_lifetime / 86400
            reply = f"{r.reply} (gave up after {days:g} days in the queue)" if r.reply else "expired"
            dsn = "failed" if dsn_owed("failed", msg.sender, st.notify) else ""
            return Outcome(st.address, FAILED, reply, r.status_code or "4.4.7", r.mx, r.tls, 0.0, dsn, remote_mta)
        nxt = schedule.next_attempt(msg.created, now, st.attempts + 1, q.retry_initial, q.retry_max, q.max_lifetime)
        dsn = ""
        if schedule.warn_due(msg.created, now, q.delay_warning, msg.warned) and dsn_owed("delayed", msg.sender,
                                                                                      st.notify):
            dsn = "delayed"
        return Outcome(st.address, QUEUED, r.reply, r.status_code, r.mx, r.tls, nxt, dsn, remote_mta)

    async def _complete(self, job: Job, results: list[RcptResult]) -> None:
        now = self.clock.time()
        msg = job.msg
        outcomes: list[Outcome] = []
        if msg is not None:
            states = {s.address: s for s in job.states}
            outcomes = [self._decide(msg, states[r.address], r, now, job.dest == LOCAL)
                        for r in results if r.address in states]
        self._inflight[job.msg_id] -= 1
        last = self._inflight[job.msg_id] <= 0
        if last:
            del self._inflight[job.msg_id]
        finished: bool | None = None
        if outcomes or last:
            try:
                finished = await self._db(self.spool.op_complete(job.msg_id, outcomes, now, last))
            except StoreUnavailable as exc:
                log.error("%s: recording the outcome failed (it will be retried): %s", job.msg_id, exc)
            except Exception:
                log.exception("%s: recording the outcome failed (it will be retried)", job.msg_id)
        self._busy.difference_update((job.msg_id, a) for a in job.recipients)
        removed = bool(last and finished)
        for i, o in enumerate(outcomes):
            self._log(job, msg, o, now, removed and i == len(outcomes) - 1)
        if removed and not outcomes:
            log.info("%s: removed", job.msg_id)  # rows deleted, file unlinked after the commit
        elif last and finished is False:
            try:
                await self.send_dsns(job.msg_id)  # owed by this job or an earlier one of the message
            except StoreUnavailable as exc:  # cluster mode: the worker goes on; `owing_dsn` finds it later
                log.error("%s: DSN not sent yet (it stays owed): %s", job.msg_id, exc)
            except Exception:  # whatever it was, the worker goes on with the jobs behind this one
                log.exception("%s: DSN not sent yet (it stays owed)", job.msg_id)

    def _log(self, job: Job, msg: MessageInfo | None, o: Outcome, now: float, removed: bool) -> None:
        """One line per recipient, as Postfix writes them; the last one says when the message left the queue."""
        state = {DELIVERED: "sent", FAILED: "bounced", QUEUED: "deferred"}[o.status]
        self.stats[state] += 1
        delay = now - msg.created if msg else 0.0
        if self.metrics is not None:
            self.metrics.queue_outcome(job.dest == LOCAL, "delivered" if o.status == DELIVERED else state, delay)
        log.info("%s: to=<%s> relay=%s delay=%.2f tls=%s status=%s (%s)%s", job.msg_id, o.address, o.mx or "none",
                 delay, o.tls or "none", state, o.reply, "; removed" if removed else "")

    async def send_dsns(self, msg_id: str) -> None:
        """Send the DSNs a message owes (one per round for all its recipients that owe one), then clean up.

        In a shared queue another node can record a recipient that owes a DSN while this node holds
        the duty (`claim_dsn`): that node's claim fails and it leaves the DSN to the holder. So the
        holder looks again after handing the duty back (a committed read, later than the other
        node's failed claim, sees its recipient) and takes another round if anything is owed; a
        node recording after the hand-back wins the claim itself. The rounds are bounded: what is
        left is found by the periodic `owing_dsn` scan."""
        for _ in range(DSN_ROUNDS):
            if self._inflight.get(msg_id):
                return  # the last job of this message sends it
            if not await self._read(self.spool.claim_dsn, msg_id, self.clock.time()):
                return  # another node is sending it (a shared queue)
            msg = await self._read(self.spool.message, msg_id)
            if msg is None:
                return
            owed = [s for s in await self._read(self.spool.recipients, msg_id) if s.dsn]
            if owed and not await self._send_dsn(msg, owed):
                return  # the duty stays claimed until its lease runs out; `owing_dsn` finds it
            warned = any(s.dsn == "delayed" for s in owed)
            # also hands the duty back when nothing was owed (it would block other nodes for a lease)
            done = self.spool.op_dsn_done(msg_id, [s.address for s in owed], warned)
            finish = self.spool.op_finish(msg_id)

            def op(conn: Any, done: Op[None] = done, finish: Op[bool | Removed] = finish) -> bool | Removed:
                done(conn)
                return finish(conn)

            if await self._db(op):
                log.info("%s: removed", msg_id)
                return
            if not any(s.dsn for s in await self._read(self.spool.recipients, msg_id)):
                return

    async def _send_dsn(self, msg: MessageInfo, owed: list[RecipientState]) -> bool:
        """Queue the DSN about `owed` (none to the null sender); False if it could not be queued."""
        if msg.sender:
            want = max(HEADER_LIMIT, FULL_LIMIT + 1) if msg.ret == "FULL" else HEADER_LIMIT
            head = await self._io(self.spool.read_head, msg.id, want)
            now = self.clock.time()
            recips = []
            for s in owed:
                recips.append(DSNRecipient(
                    address=s.address, action=s.dsn,
                    status=s.status_code or ("5.0.0" if s.dsn == "failed" else "4.0.0" if s.dsn == "delayed" else "2.0.0"),
                    diagnostic=s.last_reply if s.remote_mta else "", remote_mta=s.remote_mta,
                    orcpt=s.orcpt, reason=s.last_reply, last_attempt=now,
                    will_retry_until=msg.created + self.qcfg.max_lifetime if s.dsn == "delayed" else None))
            dsn = compose_dsn(reporting_mta=self.config.hostname, sender=msg.sender, recipients=recips,
                              original=head, complete=len(head) >= msg.size, queue_id=msg.id,
                              arrival=msg.created, now=now, envid=msg.envid, ret=msg.ret, smtputf8=msg.smtputf8)
            try:
                dsn_id = await self.store(sender="", recipients=[RecipientSpec(msg.sender, "NEVER")], prefix=b"",
                                          body=dsn.data, eightbit=dsn.eightbit, smtputf8=dsn.smtputf8)
            except Exception:
                log.exception("%s: could not queue the DSN (will try again)", msg.id)
                return False
            log.info("%s: sender non-delivery notification: %s (%s)", msg.id, dsn_id,
                     ",".join(sorted({s.dsn for s in owed})))
        self.stats["dsn"] += 1
        return True

    # -- life cycle -------------------------------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    async def start(self, recover: bool = True) -> None:
        """Recover the spool after a crash (unless another process did: `recover`), then run, unless
        `remote_runner` says another process does."""
        if recover:
            files, rows = await self._read(self.spool.recover)
            if files or rows:
                log.warning("queue recovery: removed %d unacknowledged spool files, %d messages without file",
                            files, rows)
        if self.remote_runner is not None:
            return
        n = await self._read(self.spool.count)
        log.info("queue: %d messages waiting", n)
        self._loop_task = asyncio.get_running_loop().create_task(self._run())
        if self.spool.lease > 0:
            self._renew_task = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Keep the leases of every recipient this node holds (dispatched, not yet recorded) alive, so
        that no other node takes them over while they are waiting or being delivered here."""
        while not self._stopping:
            await asyncio.sleep(self.spool.lease / 3)
            held = sorted(self._busy)
            if not held:
                continue
            try:
                lost = await self._read(self.spool.renew, held, self.clock.time())
            except Exception as exc:  # noqa: BLE001 - the database is away: the next round tries again
                log.warning("queue: renewing %d leases failed: %s", len(held), exc)
                continue
            lost = [k for k in lost if k in self._busy]  # not just recorded meanwhile
            if lost:  # expired and claimable by another node: both may deliver these (at least once)
                log.warning("queue: %d of %d leases ran out before renewal (%s to <%s>, ...)", len(lost), len(held),
                            *lost[0])

    async def _run(self) -> None:
        for msg_id in await self._read(self.spool.owing_dsn):  # DSNs a crash interrupted
            try:
                await self.send_dsns(msg_id)
            except Exception:
                log.exception("%s: DSN failed", msg_id)
        while not self._stopping:
            self._wake.clear()
            try:
                await self.dispatch()
                now = self.clock.time()
                if now - self._last_prune > 3600:
                    self._last_prune = now
                    await self._read(self.spool.prune_sends, now - 2 * 86400)
                    if self.spool.lease > 0:  # DSNs owed by messages of a node that died meanwhile
                        for msg_id in await self._read(self.spool.owing_dsn):
                            await self.send_dsns(msg_id)
                nxt = await self._read(self.spool.next_due)
            except StoreUnavailable as exc:  # cluster mode: PostgreSQL out of reach; tried again below
                log.error("queue: dispatch failed: %s", exc)
                nxt = None
            except Exception:
                log.exception("queue: dispatch failed")
                nxt = None
            delay = POLL_INTERVAL if nxt is None else min(POLL_INTERVAL, max(0.05, nxt - self.clock.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def stop(self) -> None:
        """Stop dispatching; let running jobs finish for a while, then cancel them (they will be retried)."""
        self._stopping = True
        self._wake.set()
        for task in (self._loop_task, self._renew_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            await self.drain(STOP_GRACE)
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._busy and self.spool.lease > 0:  # what was not recorded: any node may take it now
            with contextlib.suppress(Exception):
                await self._read(self.spool.release, sorted(self._busy))
        self._db_exec.shutdown(wait=True)
        self._io_exec.shutdown(wait=True)
        self.spool.close()


def _fresh(msg_id: str, r: RecipientSpec, now: float) -> RecipientState:
    """The state of a recipient just queued (as `Spool.op_insert` writes it)."""
    return RecipientState(msg_id, r.address, r.address.rpartition("@")[2].lower(), QUEUED, now, 0, "", "", "",
                          r.notify, r.orcpt, "")


def _spooled(path: Path) -> MessageBody:
    """A read-only body over a queued message's file (its spool file, or its download in cluster
    mode), for a local delivery that must not read it whole (blocking: opens the file)."""
    return MessageBody.from_spool(str(path), path.stat().st_size)
