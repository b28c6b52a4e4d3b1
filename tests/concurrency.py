"""Run a test's workers in threads at once and fail the test on their errors or a hang.

`together(*calls)` is the one way the tests start threads that must all finish: the shape "N threads,
each catching its exception into a list, start, join, `assert not errors`" written once. A call that
raises fails the test with that exception, a call that never ends fails it with its stack instead of
hanging the run (its thread is a daemon: it does not keep the interpreter alive either).
"""

import sys
import threading
import time
import traceback
from collections.abc import Callable

import pytest


def together[T](*calls: Callable[[], T], timeout: float = 120.0) -> list[T]:
    """Run every call in its own (daemon) thread at once and wait for all of them; their results,
    in the order of the calls.

    The first exception raised (in time: the cause, not the `BrokenBarrierError` of a partner left
    waiting) is re-raised, the others attached to it as notes. A call still running `timeout` seconds
    after the start fails the test with the stack it is stuck in. Calls that must start at one moment
    share a `threading.Barrier` of their own, waited on inside them (with a timeout)."""
    results: list[T | None] = [None] * len(calls)
    raised: list[tuple[int, BaseException]] = []  # in the order they happened (list.append is atomic)

    def run(i: int, call: Callable[[], T]) -> None:
        try:
            results[i] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test below
            raised.append((i, exc))

    threads = [threading.Thread(target=run, args=(i, call), name=f"together-{i}-{_name(call)}", daemon=True)
               for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    hung = [_hang(i, len(calls), calls[i], t, timeout) for i, t in enumerate(threads) if t.is_alive()]
    if raised:
        first = raised[0][1]
        for i, exc in raised[1:]:
            first.add_note(f"call {i + 1} of {len(calls)} ({_name(calls[i])}) raised too:\n"
                           + "".join(traceback.format_exception(exc)).rstrip())
        for h in hung:
            first.add_note(h)
        raise first
    if hung:
        pytest.fail("\n".join(hung))
    return results  # type: ignore[return-value]  # every call returned: each slot holds its T


def _name(call: Callable[..., object]) -> str:
    func = getattr(call, "func", call)  # a functools.partial: the function it calls
    return str(getattr(func, "__qualname__", repr(func)))


def _hang(i: int, n: int, call: Callable[..., object], thread: threading.Thread, timeout: float) -> str:
    frame = sys._current_frames().get(thread.ident or -1)
    stack = "".join(traceback.format_stack(frame)).rstrip() if frame is not None else "(ended meanwhile)"
    return f"call {i + 1} of {n} ({_name(call)}) had not ended {timeout:g} s after the start; it is at:\n{stack}"
