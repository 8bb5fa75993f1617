"""What every fuzz target checks: the profile in use, a hang guard, and the error shape."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

from hypothesis import settings

from cma_qemu.errors import CmaError, error_class
from cma_qemu.regions import RamBank

__all__ = ["PROFILE", "HangError", "check_error", "count_case", "fuzz", "no_hang", "ram_spans"]

#: ``fuzz-quick`` (the default test run) or ``fuzz`` (``./dev.sh fuzz``: 100,000 cases).
PROFILE = os.environ.get("CMA_QEMU_FUZZ_PROFILE", "fuzz-quick")
#: A directory where long runs leave one ``TARGET.progress`` line per target (cases run and
#: seconds so far), so a run stopped early still says how far it got.
PROGRESS = os.environ.get("CMA_QEMU_FUZZ_PROGRESS")

_F = TypeVar("_F", bound=Callable[..., Any])
_counts: dict[str, list[float]] = {}


def count_case(target: str) -> None:
    """Count one case of ``target``; with ``CMA_QEMU_FUZZ_PROGRESS`` set, note it every 10 s."""
    if PROGRESS is None:
        return
    now = time.monotonic()
    entry = _counts.setdefault(target, [0, now, now, now])  # cases, first, last, written
    entry[0] += 1
    entry[2] = now
    if now - entry[3] >= 10:
        entry[3] = now
        _write_progress(target)


def _write_progress(target: str) -> None:
    cases, first, last, _ = _counts[target]
    line = f"{target} cases={int(cases)} seconds={last - first:.0f}\n"
    Path(str(PROGRESS), f"{target}.progress").write_text(line)


@atexit.register
def _write_all_progress() -> None:
    for target in _counts:
        _write_progress(target)


def fuzz(test: _F) -> _F:
    """Apply the selected profile to one ``@given`` target; count its cases, guard each one.

    (Profiles are registered in conftest.py; ``hypothesis.inner_test`` is the function
    Hypothesis calls once per case, so the counter wraps that.)
    """
    target = test.__name__
    inner = test.hypothesis.inner_test  # type: ignore[attr-defined]

    @functools.wraps(inner)
    def counted(*args: Any, **kwargs: Any) -> Any:
        count_case(target)
        with no_hang():
            return inner(*args, **kwargs)

    test.hypothesis.inner_test = counted  # type: ignore[attr-defined]
    return settings(settings.get_profile(PROFILE))(test)


class HangError(AssertionError):
    """An example ran past its time limit: a hang, whatever the code was doing."""


_guarding = False  # a no_hang block is open (main thread only, as the timers are)


@contextlib.contextmanager
def no_hang(cpu_seconds: float = 60.0, wall_seconds: float = 900.0) -> Iterator[None]:
    """Fail the case if the block spins for ``cpu_seconds`` of CPU or blocks for ``wall_seconds``.

    Hypothesis' deadline only measures a case that ends; this interrupts one that never
    would. A loop burns CPU, so CPU time (SIGVTALRM) catches it whatever the machine's load:
    a niced run on a shared machine can be starved of CPU for a minute, which wall time would
    call a hang. The wall-clock limit (SIGALRM) is for a case blocked without using CPU. Main
    thread only, where pytest runs tests; an outer real-time timer (pytest-timeout's signal
    method) is put back after.

    Inside an open guard this is free and the outer guard's limits apply: the first block
    of a case (``fuzz`` opens one around every case) covers the whole case, and a nested pair
    of timers would cost ~10 us a step and switch the outer CPU timer off on leaving.
    """
    global _guarding
    if _guarding:
        yield
        return
    fired: list[str] = []

    def expire(signum: int, frame: FrameType | None) -> None:
        fired.append("CPU" if signum == signal.SIGVTALRM else "wall-clock")
        raise HangError(f"no answer after {fired[-1]} limit")

    previous_vt = signal.signal(signal.SIGVTALRM, expire)
    previous_alarm = signal.signal(signal.SIGALRM, expire)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, wall_seconds)
    signal.setitimer(signal.ITIMER_VIRTUAL, cpu_seconds)
    started = time.monotonic()
    _guarding = True
    try:
        yield
    finally:
        _guarding = False
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGVTALRM, previous_vt)
        signal.signal(signal.SIGALRM, previous_alarm)
        if outer_delay:
            left = max(outer_delay - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)
    if fired:  # raised where it was swallowed (a gc callback, an except clause): say so here
        raise HangError(f"no answer within the {fired[0]} limit")


def check_error(error: BaseException) -> CmaError:
    """Assert ``error`` is one of the project's errors: errno-named, one non-empty line."""
    assert isinstance(error, CmaError), f"not a CmaError: {type(error).__name__}: {error}"
    name = type(error).errno_name
    assert error_class(name) is not CmaError, f"{type(error).__name__} has no errno name"
    assert isinstance(error, error_class(name))
    text = str(error)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return error


def ram_spans(banks: tuple[RamBank, ...]) -> list[tuple[int, int]]:
    """Banks that touch merged into one span, as placement treats them (memblock does too)."""
    spans: list[tuple[int, int]] = []
    for bank in sorted(banks, key=lambda b: b.base):
        if spans and spans[-1][1] == bank.base:
            spans[-1] = (spans[-1][0], bank.end)
        else:
            spans.append((bank.base, bank.end))
    return spans
