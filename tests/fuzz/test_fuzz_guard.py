"""The hang guard every fuzz target runs its cases under (``no_hang`` in fuzzing.py)."""

from __future__ import annotations

import signal
import time

import pytest
from fuzzing import HangError, no_hang


def test_a_spinning_block_is_stopped_by_cpu_time() -> None:
    with pytest.raises(HangError, match="CPU"), no_hang(cpu_seconds=0.05):
        while True:
            pass


def test_a_nested_guard_leaves_the_outer_one_running() -> None:
    # (a nested guard used to switch the outer CPU timer off when it left)
    with no_hang(cpu_seconds=30):
        with no_hang():
            pass
        cpu_left, _ = signal.getitimer(signal.ITIMER_VIRTUAL)
        wall_left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0 < cpu_left <= 31  # (rounded up to the timer tick)
        assert wall_left > 0
    assert signal.getitimer(signal.ITIMER_VIRTUAL) == (0.0, 0.0)


def test_a_hang_inside_a_nested_guard_is_caught_by_the_outer_limit() -> None:
    started = time.process_time()
    with pytest.raises(HangError), no_hang(cpu_seconds=0.05), no_hang(cpu_seconds=60):
        while True:
            pass
    assert time.process_time() - started < 5
