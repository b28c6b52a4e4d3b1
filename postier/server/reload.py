"""Live reload (SIGHUP, `postier reload`): re-read the configuration and the certificate files.

What changes at once: the certificate of every new TLS handshake (implicit TLS, STARTTLS and https
alike: the pair in service, ACME's once issued or else [tls], is loaded into the live SSLContexts
through `tlsreload.reload_certificates`, the same swap ACME renewals use), listeners added, removed or moved (closed
ones stop accepting; their sessions go on; with several workers the supervisor binds the new
ones and hands each worker a copy over its control socket, server/supervisor.py), and what sessions read from the configuration when they
start ([limits], [imap], [pop3]: new sessions get a copy of the frozen `App` with the new
configuration). Sessions already open are not touched: an IMAP IDLE opened before a reload still gets
its EXISTS after it.

What does not: every other table configures a long-lived component `build_app` made once (the queue,
mail authentication, the resolver, ...), and `data_dir` and `[server]` (who we run as) are fixed for
the life of the process; a change to any of them is reported and applies at the next restart. A
listener on a port below 1024 cannot be opened once root is dropped (reported, the rest goes on). A
broken configuration is logged on one line naming the key and the running one stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from ..acme.store import certificate_files
from ..config import Config, ConfigError, Listener, load_config
from ..tlsreload import CertificateError, reload_certificates
from . import notify, sockets
from .base import ListenerSet

log = logging.getLogger("postier")

#: What a reload applies to new sessions; every other field of Config needs a restart.
LIVE = frozenset({"listeners", "tls", "limits", "imap", "pop3", "source"})


def pid_file(cfg: Config) -> Path:
    return cfg.data_dir / "run" / "postier.pid"


class Reloader:
    """Applies a re-read configuration to running services and listeners."""

    def __init__(self, listeners: ListenerSet, rebind: bool = True,
                 handed: Callable[[], dict[str, socket.socket]] | None = None) -> None:
        self.listeners = listeners
        #: False in a worker of several (server/supervisor.py): the listening sockets are the
        #: supervisor's; it binds a listener added or moved and hands it over (`handed`: the
        #: sockets received since the last reload, by role) before passing SIGHUP on.
        self.rebind = rebind
        self.handed = handed
        self._lock = asyncio.Lock()
        #: Set once the listeners serve: a SIGHUP that arrives while they start waits for it.
        self.started = asyncio.Event()

    async def reload(self) -> bool:
        """Re-read the configuration; True when it was applied."""
        await self.started.wait()
        async with self._lock:
            notify.reloading()
            try:
                return await self._reload()
            finally:
                notify.ready()

    async def _reload(self) -> bool:
        app = self.listeners.services
        old: Config = app.config
        assert old.source is not None
        try:
            new = await asyncio.to_thread(load_config, old.source)
        except ConfigError as exc:
            log.error("reload failed: %s; keeping the running configuration", exc)
            return False
        # The one certificate swap (tlsreload): the pair in service (ACME's once issued, else [tls]) is
        # checked, then loaded into every live context, mail and https alike; new handshakes use it.
        files = certificate_files(new)
        if files is not None and app.ssl_context is not None:
            try:
                await asyncio.to_thread(reload_certificates, [*app.web.tls_contexts], *files)
            except CertificateError as exc:
                log.error("reload failed: tls.cert: %s; keeping the running configuration", exc)
                return False
        elif files is not None:
            log.warning("reload: tls: a certificate was added; TLS starts at the next restart")
        new = live_part(old, new, report=True)
        # The App is frozen: new sessions get a copy with the new configuration and the same components
        # (per-App caches, such as the SMTP listeners' settings, are then rebuilt from it).
        self.listeners.services = dataclasses.replace(app, config=new)
        await self._listeners(old, new)
        log.info("reloaded %s", old.source)
        return True

    async def _listeners(self, old: Config, new: Config) -> None:
        handed = self.handed() if self.handed is not None else {}
        for role, before, after in changed_listeners(old, new):
            if before is not None:
                for b in [b for b in self.listeners.bound if b.role == role]:
                    b.server.close()  # stop accepting; the sessions it started go on
                    self.listeners.bound.remove(b)
                if before.path is not None and self.rebind:  # (several workers: the supervisor's file)
                    with contextlib.suppress(OSError):
                        before.path.unlink()
                log.info("reload: closed %s on %s", role, sockets.where(before))
            if after is not None:
                try:
                    if self.rebind:
                        sock = sockets.bind(after)
                    elif role in handed:
                        sock = handed.pop(role)
                    else:  # the supervisor could not bind it (it logged why)
                        raise OSError(0, "not bound by the supervisor")
                except OSError as exc:
                    log.error("reload: cannot listen: listeners.%s on %s: %s (ports below 1024 need a restart)",
                              role, sockets.where(after), exc.strerror or exc)
                    continue
                server = await self.listeners.serve_socket(role, sock)
                if server is not None:
                    await server.start_serving()
                    log.info("reload: listening: %s on %s", role, sockets.where(after))
        for sock in handed.values():  # handed for a change this worker did not see (the file changed again)
            sock.close()


def live_part(old: Config, new: Config, report: bool = False) -> Config:
    """`new` with every field a reload does not apply kept from `old` (`report`: log each such change)."""
    fixed = [f.name for f in dataclasses.fields(Config) if f.name not in LIVE]
    if report:
        for key in fixed:
            if getattr(new, key) != getattr(old, key):
                log.warning("reload: %s changed; it takes effect at the next restart", key)
    return dataclasses.replace(new, **{k: getattr(old, k) for k in fixed})


def changed_listeners(old: Config, new: Config) -> list[tuple[str, Listener | None, Listener | None]]:
    """(role, before, after) for each listener added, removed or changed (None: not configured)."""
    out = []
    for role in dict.fromkeys([*old.listeners, *new.listeners]):
        before, after = old.listeners.get(role), new.listeners.get(role)
        if before != after:
            out.append((role, before, after))
    return out


def install(reloader: Reloader, cfg: Config, write_pid: bool = True) -> None:
    """SIGHUP reloads; the pid file lets `postier reload` find us (a worker's supervisor writes it
    and passes SIGHUP on: `write_pid` False)."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(reloader.reload())  # waits until the listeners serve
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)  # SIGHUP's default action would end the server
    if not write_pid:
        return
    path = pid_file(cfg)
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        path.write_text(f"{os.getpid()}\n")
    except OSError as exc:
        log.warning("cannot write %s: %s (`postier reload` needs it; SIGHUP works)", path, exc)


def uninstall(cfg: Config) -> None:
    with contextlib.suppress(OSError):
        pid_file(cfg).unlink()


def running_pid(cfg: Config) -> int | None:
    """The pid of the server of this configuration, or None when none runs."""
    try:
        pid = int(pid_file(cfg).read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, IndexError):
        return None
    if b"serve" not in cmdline or not any(b"postier" in part for part in cmdline):
        return None  # a stale pid file whose pid now belongs to another program
    return pid
