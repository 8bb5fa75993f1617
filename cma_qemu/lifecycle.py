"""How the agent ends on a signal: SIGTERM and SIGHUP take the path Ctrl-C takes.

CI runners, ``timeout``, systemd and container stops end processes with SIGTERM; a closed
terminal sends SIGHUP. Their default action kills the interpreter on the spot, so no
``finally`` and no ``async with`` runs and QEMU, its sockets and files stay behind. Here they
become :class:`Terminated`, a ``KeyboardInterrupt`` subclass, so every cleanup written for
Ctrl-C runs for them too, and the exit status is 128 + the signal number (143, 129).

* :func:`run` is ``asyncio.run`` for a command: the signal cancels the main task (as asyncio
  does for Ctrl-C), the task unwinds (QEMU shut down, files removed), then :class:`Terminated`
  is raised from :func:`run`.
* :func:`signals_interrupt` covers synchronous code (and the pytest plugin): the signal raises
  :class:`Terminated` in the main thread, as SIGINT raises ``KeyboardInterrupt``.
* :func:`deferred` holds signals back during a cleanup that must not be cut short.

Only the first signal acts; later ones while the process unwinds are noted and otherwise
ignored (SIGKILL remains for an agent that hangs).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import Coroutine, Iterator
from types import FrameType
from typing import Any, TypeVar

__all__ = [
    "SIGNALS",
    "Terminated",
    "deferred",
    "exit_status",
    "received",
    "run",
    "signals_interrupt",
]

T = TypeVar("T")

#: The signals handled like Ctrl-C.
SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGHUP)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived; unwinds like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        """``SIGTERM``, ``SIGHUP``."""
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """128 + the signal number, what a shell reports for a process the signal killed."""
        return 128 + self.signum


class _State:
    """The first signal received, and whether signals are held back now."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferring = 0


_state = _State()


def received() -> int | None:
    """The first SIGTERM/SIGHUP this process handled, or None."""
    return _state.signum


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """The exit status for an interrupt: 128 + signal for :class:`Terminated`, else 130."""
    return interrupt.exit_status if isinstance(interrupt, Terminated) else 128 + signal.SIGINT


def _first(signum: int) -> bool:
    """Record ``signum``; True when it is the first one and nothing holds signals back."""
    first = _state.signum is None
    if first:
        _state.signum = signum
    return first and not _state.deferring


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    if _first(signum):
        raise Terminated(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` in the main thread.

    The previous handlers come back afterwards. Outside the main thread (where Python cannot
    set handlers) it does nothing.
    """
    if not _in_main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Within the block a first SIGTERM/SIGHUP is recorded but raises nothing.

    For cleanups (closing boards) that a signal must not cut in half; the caller checks
    :func:`received` afterwards.
    """
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1


async def _cancelled_by_signals(main: Coroutine[Any, Any, T]) -> T:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    caught: list[int] = []

    def on_signal(signum: int) -> None:
        if _first(signum):
            caught.append(signum)
            task.cancel()

    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    for signum in SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        result = await main
    except asyncio.CancelledError:
        if caught and task.uncancel() == 0:
            raise Terminated(caught[0]) from None
        raise
    except Exception as error:  # a cleanup failed while unwinding: the signal still ended it
        if caught:
            raise Terminated(caught[0]) from error
        raise
    finally:
        for signum, handler in previous.items():
            loop.remove_signal_handler(signum)
            signal.signal(signum, handler)
    if caught:  # the coroutine swallowed the cancellation: the signal still ends the run
        raise Terminated(caught[0])
    return result


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, with SIGTERM and SIGHUP cancelling ``main`` as Ctrl-C does.

    Raises :class:`Terminated` once ``main`` has unwound. Outside the main thread it is plain
    ``asyncio.run`` (signal handlers belong to the main thread).
    """
    if not _in_main_thread():
        return asyncio.run(main)
    return asyncio.run(_cancelled_by_signals(main))
