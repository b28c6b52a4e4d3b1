"""The server's log handler: lines of one event-loop step written together, in order, none lost."""

from __future__ import annotations

import asyncio
import io
import logging

from postier.logsetup import BUFFER_LIMIT, LineFormatter, LoopBufferedHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


def _logger(stream: CountingStream) -> tuple[logging.Logger, LoopBufferedHandler]:
    handler = LoopBufferedHandler(stream)
    handler.setFormatter(LineFormatter())
    log = logging.getLogger(f"test.logsetup.{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    return log, handler


def test_lines_of_one_step_are_written_once_after_it() -> None:
    stream = CountingStream()
    log, _ = _logger(stream)

    async def main() -> tuple[str, int]:
        for i in range(3):
            log.info("line %d", i)
        during = stream.getvalue()
        await asyncio.sleep(0)  # the step ends: the gathered lines go out
        return during, stream.writes

    during, writes = asyncio.run(main())
    assert during == ""
    assert writes == 1
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == [f"test.logsetup.{id(stream)} INFO line {i}" for i in range(3)]


def test_outside_a_loop_a_line_is_written_at_once_after_the_gathered_ones() -> None:
    stream = CountingStream()
    log, handler = _logger(stream)

    async def main() -> None:
        log.info("first")
        await asyncio.to_thread(log.info, "second, from a thread")  # the loop's line must come first

    asyncio.run(main())
    handler.flush()
    text = stream.getvalue()
    assert text.index("first") < text.index("second, from a thread")
    assert text.count("\n") == 2


def test_many_lines_in_one_step_are_bounded_and_shutdown_flushes() -> None:
    stream = CountingStream()
    log, handler = _logger(stream)
    n = BUFFER_LIMIT // 50 + 10

    async def main() -> None:
        for i in range(n):
            log.info("%040d", i)
        assert stream.writes > 0  # the buffer went out before the step ended
        handler.flush()  # as logging.shutdown() does at exit

    asyncio.run(main())
    assert stream.getvalue().count("\n") == n


def test_the_format_is_basicconfigs() -> None:
    record = logging.LogRecord("postier.inbound", logging.INFO, "", 0, "%s: x=%d", ("Q1", 5), None)
    ours = LineFormatter().format(record)
    theirs = logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s").format(record)
    assert ours == theirs
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        record = logging.LogRecord("postier", logging.ERROR, "", 0, "failed", (), sys.exc_info())
    assert LineFormatter().format(record) == logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s").format(record)


def test_lines_left_by_a_loop_that_ended_go_out_with_the_next_loops_step() -> None:
    stream = CountingStream()
    log, _ = _logger(stream)

    loop = asyncio.new_event_loop()
    loop.call_soon(log.info, "from a loop that ends before its flush runs")
    loop.call_soon(loop.stop)  # the flush the line scheduled would run in the next batch: never
    loop.run_forever()
    loop.close()
    assert stream.getvalue() == ""

    async def main() -> None:
        log.info("next")
        await asyncio.sleep(0)

    asyncio.run(main())
    assert stream.getvalue().count("\n") == 2
