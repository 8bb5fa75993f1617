"""What every fuzz target checks: the profile in use, a hang guard, and the error shape."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, TypeVar

from hypothesis import settings

from cma_qemu.errors import CmaError, error_class

__all__ = ["PROFILE", "HangError", "check_error", "fuzz", "no_hang"]

#: ``fuzz-quick`` (the default test run) or ``fuzz`` (``./dev.sh fuzz``: 100,000 cases).
PROFILE = os.environ.get("CMA_QEMU_FUZZ_PROFILE", "fuzz-quick")

_F = TypeVar("_F", bound=Callable[..., Any])


def fuzz(test: _F) -> _F:
    """Apply the selected profile to one target (profiles are registered in conftest.py)."""
    return settings(settings.get_profile(PROFILE))(test)


class HangError(AssertionError):
    """An example ran past its time limit: a hang, whatever the code was doing."""


@contextlib.contextmanager
def no_hang(seconds: float = 10.0) -> Iterator[None]:
    """Fail the example if the block has not finished after ``seconds`` (SIGALRM).

    Hypothesis' deadline only measures an example that ends; this one interrupts one that
    never would. Main thread only, which is where pytest runs tests.
    """

    def expire(signum: int, frame: FrameType | None) -> None:
        raise HangError(f"no answer after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check_error(error: BaseException) -> CmaError:
    """Assert ``error`` is one of the project's errors: errno-named, one non-empty line."""
    assert isinstance(error, CmaError), f"not a CmaError: {type(error).__name__}: {error}"
    name = type(error).errno_name
    assert error_class(name) is not CmaError, f"{type(error).__name__} has no errno name"
    assert isinstance(error, error_class(name))
    text = str(error)
    assert text and "\n" not in text, f"not one line: {text!r}"
    return error
