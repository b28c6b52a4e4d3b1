"""tests/concurrency.py: `together` returns results in order, re-raises the first error and fails on a hang."""

import threading

import pytest

from tests.concurrency import together


def test_results_in_the_order_of_the_calls() -> None:
    start = threading.Barrier(3, timeout=30)  # all three run at once, or this would break

    def value(n: int) -> int:
        start.wait()
        return n * n

    assert together(lambda: value(1), lambda: value(2), lambda: value(3)) == [1, 4, 9]


def test_the_first_error_is_raised_with_the_others_as_notes() -> None:
    first_raised = threading.Event()

    def fails() -> None:
        raise KeyError("first")

    def fails_later() -> None:
        assert first_raised.wait(30)
        raise ValueError("second")

    def fails_and_tells() -> None:
        try:
            fails()
        finally:
            first_raised.set()

    with pytest.raises(KeyError, match="first") as info:
        together(fails_later, fails_and_tells, lambda: None)
    notes = info.value.__notes__
    assert len(notes) == 1 and notes[0].startswith("call 1 of 3 (") and "ValueError: second" in notes[0]


def test_a_call_that_does_not_end_fails_with_its_stack() -> None:
    release = threading.Event()

    def stuck() -> None:
        release.wait(60)

    try:
        with pytest.raises(pytest.fail.Exception) as info:
            together(lambda: None, stuck, timeout=0.5)
    finally:
        release.set()
    assert "call 2 of 2 (test_a_call_that_does_not_end_fails_with_its_stack.<locals>.stuck) had not ended" \
        in str(info.value)
    assert "release.wait(60)" in str(info.value)
