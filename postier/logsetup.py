"""The server's log: one line per record on standard error, as `basicConfig` would write it, for less.

Why not `logging.basicConfig` alone: a message received on port 25 logs two lines (its decision and
its result), and the standard path cost about 10% of the event loop's time per message under
smtp-source (measured by switching the two lines off: 0.40-0.44 against 0.45-0.49 ms of the event
loop's CPU per message). The standard library's own switches take most of it away:
- no caller lookup (`logging._srcfile = None`, the documented way to skip the stack walk; the format
  names no file, line or function);
- no process, thread or asyncio task names in the record (the format shows none; the process id
  cost a getpid system call per line);
and this module adds the rest:
- `LineFormatter` formats the date and time once a second instead of once a line;
- `LoopBufferedHandler` gathers the lines an event-loop step logs and writes them with one system
  call when the step is over (`call_soon`), instead of a write and a flush per line. Lines logged
  outside an event loop (threads, the supervisor, the CLI) are written at once, after whatever is
  gathered, so the order of lines is kept. A process that ends normally flushes (logging.shutdown);
  a crash injected by postier/faults.py flushes first; a real SIGKILL can lose the lines of the
  step it interrupts, which is no more than it loses of the step's work.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import TextIO

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
BUFFER_LIMIT = 64 << 10  # characters gathered before they are written even within a step


class LineFormatter(logging.Formatter):
    """`FORMAT`, with `time.strftime` called once a second rather than for every record."""

    def __init__(self) -> None:
        super().__init__(FORMAT)
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(second))
            self._second = second
        line = f"{self._stamp},{int(record.msecs):03d} {record.name} {record.levelname} {record.getMessage()}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class LoopBufferedHandler(logging.StreamHandler[TextIO]):
    """Writes the lines of one event-loop step together (see the module docstring)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._gathered: list[str] = []
        self._size = 0
        self._flush_on: asyncio.AbstractEventLoop | None = None  # the loop a flush is due on

    def emit(self, record: logging.LogRecord) -> None:  # called with self.lock held (Handler.handle)
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        try:
            if loop is None:  # not on an event loop: at once, after what a step gathered
                self._gathered.append(line)
                self._write()
                return
            if self._flush_on is not loop:  # none due on this loop (another may have ended first)
                loop.call_soon(self.flush)
                self._flush_on = loop
            self._gathered.append(line)
            self._size += len(line)
            if self._size >= BUFFER_LIMIT:
                self._write()
        except Exception:
            self.handleError(record)

    def _write(self) -> None:
        text = "".join(self._gathered)
        self._gathered.clear()
        self._size = 0
        self.stream.write(text)
        self.stream.flush()

    def flush(self) -> None:
        assert self.lock is not None  # made by Handler.__init__
        with self.lock:
            self._flush_on = None
            if self._gathered:
                try:
                    self._write()
                except (OSError, ValueError):  # standard error closed or gone: nothing to tell
                    self._gathered.clear()
                    self._size = 0
            elif self.stream and hasattr(self.stream, "flush"):
                self.stream.flush()


def configure(level: int = logging.INFO) -> None:
    """The server's (and its delivery agent's) logging: `FORMAT` on standard error."""
    logging._srcfile = None  # no stack walk per record: the format names no caller
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False  # type: ignore[attr-defined]  # 3.12+, not in typeshed's stubs yet
    root = logging.getLogger()
    if root.handlers:  # configured already (tests, an embedding program): theirs stands
        return
    handler = LoopBufferedHandler(sys.stderr)
    handler.setFormatter(LineFormatter())
    root.addHandler(handler)
    root.setLevel(level)
    # A line gathered before a fork must be written once, by the parent.
    os.register_at_fork(before=handler.flush)


def flush() -> None:
    """Write every gathered line now (before a crash injected by postier/faults.py)."""
    for handler in logging.getLogger().handlers:
        try:
            handler.flush()
        except Exception:  # noqa: S110 - a crash is due: it must not wait on the log
            pass
