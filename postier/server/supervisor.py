"""The supervisor of `[server] workers` > 1: N worker processes sharing every listener.

`supervise(config, n)` binds every listener (as root when started as root), loads the TLS
certificates, drops privileges, recovers the queue spool once, makes the shared state
(server/shared.py), then forks N workers. Each worker inherits the listening sockets and runs
`app.serve` with its own event loop, its own `App` and its own delivery agent; worker 0 (the primary)
also runs what must run once per server (the queue runner, the report jobs, the learning queue, the
ACME renewals, the status file). The kernel gives each new connection to a worker that accepts it.

The supervisor does no mail work and has no event loop: it waits for signals and for its children.
SIGTERM/SIGINT: SIGTERM to every worker, each drains as one process does (`serve`), then exit;
workers still running after `STOP_GRACE` seconds are killed. SIGHUP: the supervisor re-reads the
configuration, binds each listener added or moved (closes its copy of each removed one) and hands
the new sockets to every worker over its control socket (SCM_RIGHTS), then forwards SIGHUP; each
worker reloads its configuration and certificates and serves the sockets it was handed. Handing
over rather than restarting the workers keeps every open session (IMAP IDLE above all); a worker
started later inherits the new set. Ports below 1024 cannot be bound once root is dropped (as
in one process: reported, the rest goes on). A worker that dies is
restarted after a backoff (1 s, doubling to 30 s; reset once it has run a minute); connections it had
are gone, mail it acknowledged is on disk (the queue and Maildir are durable before every 250), and
the primary's queue runner retries whatever was in flight. READY=1 goes to systemd once every worker
serves; the workers themselves never speak sd_notify (`NotifyAccess=main`).

Written with fork and signals rather than multiprocessing: the workers must inherit sockets bound
as root and a memory mapping, and must be restartable one at a time without a pickled target.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import selectors
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import multiprocess

from .. import faults
from ..config import Config, ConfigError, load_config
from ..queue.spool import Spool
from . import notify, reload, sockets, stats
from .shared import Bus, SharedTable, WorkerContext

if TYPE_CHECKING:
    from .app import Prepared

__all__ = ["STOP_GRACE", "supervise", "worker_count"]

log = logging.getLogger("postier")

MAX_WORKERS = 256  # config.py's bound for an explicit value; one per core is capped to it too
STOP_GRACE = 25.0  # seconds a stopping worker may take before it is killed (systemd waits 30)
BACKOFF_FIRST, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 30.0, 60.0
PR_SET_PDEATHSIG = 1


def worker_count(config: Config) -> int:
    """`[server] workers`, 0 (the default) meaning one per CPU core this process may use (its
    affinity mask: a unit's CPUAffinity=, a container's cpuset); with one core, one process and no
    supervisor."""
    n = config.server.workers
    if n == 0:
        n = os.process_cpu_count() or 1
    return max(1, min(n, MAX_WORKERS))


def workers_file(config: Config) -> Path:
    """DATA_DIR/run/workers: "index pid" per line, rewritten at every (re)start (tests, operators)."""
    return config.data_dir / "run" / "workers"


@dataclass
class _Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    ready_fd: int = -1
    control: socket.socket | None = None  # our end of its control socket (reload: new listeners)
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None


@dataclass
class _State:
    config: Config
    prepared: Prepared  # the bound sockets, TLS contexts and metrics endpoint, inherited by every worker
    table: SharedTable
    run_worker: RunWorker
    workers: list[_Worker] = field(default_factory=list)
    abstract_bus: bool = False
    metrics_dir: Path | None = None
    stopping: bool = False
    announced: bool = False
    exit_code: int = 0
    stop_deadline: float | None = None


#: What the composition root hands in (server/app.py `prepare`, `run_worker`; no import back to it).
Prepare = Callable[[Config], "Prepared"]
RunWorker = Callable[[Config, "Prepared", WorkerContext], None]


def supervise(config: Config, n: int, prepare: Prepare, run_worker: RunWorker) -> int:
    """Run `n` workers until SIGTERM/SIGINT; the exit status of the server. `prepare` binds the
    listeners, reads the certificates and drops root; `run_worker` is a worker's life."""
    prepared = prepare(config)
    # Once per server, before any worker can queue: a spool file without its row is a message whose
    # 250 was never sent (queue/spool.py); with workers running, it could be one being written.
    # In cluster mode the queue lives in PostgreSQL (queue/cluster.py) and the local spool is unused.
    if not config.cluster.dsn:
        spool = Spool(config.spool_dir / "queue")
        try:
            files, rows = spool.recover()
        finally:
            spool.close()
        if files or rows:
            log.warning("queue recovery: removed %d unacknowledged spool files, %d messages without file",
                        files, rows)
    run_dir = config.data_dir / "run"
    try:
        a = config.antispam
        table = SharedTable.create(run_dir / "workers.shm", n, config.auth.max_failures,
                                   (a.max_connections_per_minute > 0, a.max_messages_per_minute > 0))
    except OSError as exc:
        raise SystemExit(f"postier: cannot create {run_dir / 'workers.shm'}: {exc.strerror or exc}") from None
    abstract = Bus.probe(run_dir)
    stats.clear_workers(config.data_dir)  # `postier status`: this run's workers' files only
    metrics_dir = run_dir / "metrics"  # the workers' metric values (postier/metrics.py): a new run, new counts
    shutil.rmtree(metrics_dir, ignore_errors=True)
    metrics_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    faults.share_count(str(run_dir / "fault-hits"))  # POSTIER_FAULT=NAME:N counts every worker's hits
    st = _State(config, prepared, table, run_worker, [_Worker(i) for i in range(n)], abstract, metrics_dir)

    sel = selectors.DefaultSelector()
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    sel.register(wake_r, selectors.EVENT_READ, None)
    pending: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, lambda signum, _frame: pending.append(signum))
    try:
        reload.pid_file(config).parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        reload.pid_file(config).write_text(f"{os.getpid()}\n")  # `postier reload` signals us
    except OSError as exc:
        log.warning("cannot write %s: %s", reload.pid_file(config), exc)
    log.info("starting %d workers", n)
    for w in st.workers:
        _spawn(st, w, sel, wake_r)
    while True:
        timeout = 1.0
        now = time.monotonic()
        for w in st.workers:
            if w.restart_at is not None:
                timeout = max(0.0, min(timeout, w.restart_at - now))
        for key, _ev in sel.select(timeout):
            if key.data is None:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
            else:
                _on_ready(st, key.data, sel)
        while pending:
            signum = pending.pop(0)
            if signum in (signal.SIGTERM, signal.SIGINT) and not st.stopping:
                st.stopping = True
                st.stop_deadline = time.monotonic() + STOP_GRACE
                notify.stopping()
                log.info("stopping %d workers", sum(1 for w in st.workers if w.pid))
                _signal_all(st, signal.SIGTERM)
            elif signum == signal.SIGHUP and not st.stopping:
                notify.reloading()
                _reload_listeners(st)
                log.info("reload: asking every worker")
                _signal_all(st, signal.SIGHUP)
                notify.ready()
        _reap(st, sel)
        now = time.monotonic()
        if st.stopping:
            if not any(w.pid for w in st.workers):
                break
            if st.stop_deadline is not None and now > st.stop_deadline:
                log.error("workers still running after %.0f s: killed", STOP_GRACE)
                _signal_all(st, signal.SIGKILL)
                st.stop_deadline = None
            continue
        for w in st.workers:
            if w.restart_at is not None and now >= w.restart_at:
                _spawn(st, w, sel, wake_r)
    reload.uninstall(config)
    with_pid = workers_file(config)
    with_pid.unlink(missing_ok=True)
    table.close()
    table.path.unlink(missing_ok=True)
    log.info("stopped")
    return st.exit_code


def _reload_listeners(st: _State) -> None:
    """SIGHUP: bind the listeners added or moved in the configuration file, close the removed ones,
    and hand the new sockets to every running worker before it is asked to reload. A broken file
    changes nothing here (each worker reports it as one process does)."""
    old = st.config
    if old.source is None:  # not read from a file: nothing to re-read
        return
    try:
        new = reload.live_part(old, load_config(old.source))
    except (ConfigError, OSError):
        return
    socks = st.prepared.socks
    for role, before, after in reload.changed_listeners(old, new):
        if before is not None and role in socks:
            socks.pop(role).close()  # the workers close theirs: the port is free once all have
        if after is None:
            continue
        try:
            sock = sockets.bind(after)
        except OSError as exc:
            log.error("reload: cannot listen: listeners.%s on %s: %s (ports below 1024 need a restart)",
                      role, sockets.where(after), exc.strerror or exc)
            continue
        socks[role] = sock  # and every worker started from now on inherits it
        for w in st.workers:
            if w.pid and w.control is not None:
                try:
                    socket.send_fds(w.control, [role.encode()], [sock.fileno()])
                except OSError as exc:
                    log.error("reload: cannot hand listeners.%s to worker %d: %s", role, w.index, exc)
    st.config = new


def _signal_all(st: _State, sig: int) -> None:
    for w in st.workers:
        if w.pid:
            try:
                os.kill(w.pid, sig)
            except ProcessLookupError:
                pass


def _write_workers(st: _State) -> None:
    path = workers_file(st.config)
    try:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{w.index} {w.pid}\n" for w in st.workers if w.pid))
        tmp.replace(path)
    except OSError as exc:
        log.warning("cannot write %s: %s", path, exc)


def _spawn(st: _State, w: _Worker, sel: selectors.BaseSelector, wake_r: int) -> None:
    r, wfd = os.pipe2(os.O_CLOEXEC)
    if w.control is not None:
        w.control.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:  # the worker
        code = 1
        try:
            os.close(r)
            ours.close()
            for other in st.workers:  # the other workers' control sockets are not ours to read
                if other.control is not None:
                    other.control.close()
            code = _worker_main(st, w.index, wfd, wake_r, theirs)
        except SystemExit as exc:  # as the interpreter would: a message goes to stderr, status 1
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            if not isinstance(exc.code, int) and exc.code is not None:
                print(exc.code, file=sys.stderr, flush=True)
        except BaseException:
            log.exception("worker %d failed", w.index)
        finally:
            logging.shutdown()
            os._exit(code)
    os.close(wfd)
    theirs.close()
    w.control = ours
    w.pid, w.started, w.ready, w.ready_fd, w.restart_at = pid, time.monotonic(), False, r, None
    sel.register(r, selectors.EVENT_READ, w)
    log.info("worker %d started (pid %d)", w.index, pid)
    _write_workers(st)


def _on_ready(st: _State, w: _Worker, sel: selectors.BaseSelector) -> None:
    try:
        data = os.read(w.ready_fd, 16)
    except OSError:
        data = b""
    if data:
        w.ready = True
    else:  # the worker's end closed: it exited (reaped below)
        sel.unregister(w.ready_fd)
        os.close(w.ready_fd)
        w.ready_fd = -1
    if not st.announced and all(x.ready for x in st.workers):
        st.announced = True
        notify.ready(f"{len(st.workers)} workers")  # every worker serves (sd_notify READY=1)
        log.info("all %d workers serve", len(st.workers))


def _reap(st: _State, sel: selectors.BaseSelector) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        w = next((x for x in st.workers if x.pid == pid), None)
        if w is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        w.pid = 0
        if w.ready_fd >= 0:
            sel.unregister(w.ready_fd)
            os.close(w.ready_fd)
            w.ready_fd = -1
        st.table.clear_worker(w.index)  # its connections are gone
        if st.metrics_dir is not None:  # its open sessions too (its counters stay in the sums)
            multiprocess.mark_process_dead(pid, str(st.metrics_dir))  # type: ignore[no-untyped-call]
        if st.stopping:
            log.info("worker %d stopped (%s)", w.index, _how(code))
            continue
        if not st.announced:  # a worker that cannot start: the server does not start (as one process)
            log.error("worker %d (pid %d) failed to start (%s); stopping", w.index, pid, _how(code))
            st.stopping, st.exit_code = True, code if code > 0 else 1
            st.stop_deadline = time.monotonic() + STOP_GRACE
            _signal_all(st, signal.SIGTERM)
            continue
        ran = time.monotonic() - w.started
        if ran >= HEALTHY_AFTER:
            w.backoff = BACKOFF_FIRST
        log.error("worker %d (pid %d) died (%s); restarting in %.0f s", w.index, pid, _how(code), w.backoff)
        w.restart_at = time.monotonic() + w.backoff
        w.backoff = min(BACKOFF_MAX, w.backoff * 2)
        _write_workers(st)


def _how(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"


def _worker_main(st: _State, index: int, ready_fd: int, wake_r: int, control: socket.socket) -> int:
    """In the forked worker: plain signals, no supervisor state, then `serve` until told to stop."""
    signal.set_wakeup_fd(-1)
    os.close(wake_r)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # The worker ends with the supervisor: a supervisor killed with SIGKILL is a crash of the server
    # (what it acknowledged is on disk), not a reason to serve on unsupervised.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as exc:
        log.warning("worker %d: cannot follow the supervisor's death: %s", index, exc)
    if os.getppid() == 1:
        return 0  # the supervisor is already gone
    os.environ.pop("NOTIFY_SOCKET", None)  # only the supervisor speaks to systemd
    os.environ["POSTIER_SUPERVISOR"] = str(os.getppid())  # fault injection crashes the whole server

    def ready() -> None:
        try:
            os.write(ready_fd, b"R")
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise

    ctx = WorkerContext(index, st.table.workers, st.table, st.config.data_dir / "run", ready, st.abstract_bus,
                        control, st.metrics_dir)
    st.run_worker(st.config, st.prepared, ctx)
    return 0
