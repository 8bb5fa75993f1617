"""An asyncio event loop on a thread of its own, for synchronous code that drives the agent.

The agent is asyncio; pytest tests and labgrid drivers are plain functions. They share one
:class:`LoopThread` per owner (the pytest plugin per session, a labgrid driver per ``on()``)
and hand it coroutines with :meth:`LoopThread.run`, which blocks until the result is there.
A coroutine that a timeout or an interrupt abandons is cancelled and waited for, so it never
keeps running on the loop behind its caller's back.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from cma_qemu import lifecycle

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    """An event loop running forever in a daemon thread until :meth:`stop`.

    Cost: one thread; :meth:`run` adds two thread hand-offs to the coroutine's own time.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cma-qemu-loop")
        self._thread.daemon = True
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and return its result (or raise its error).

        On a timeout (``concurrent.futures.TimeoutError``) or an interrupt the coroutine is
        cancelled and waited for (up to a minute, signals held back meanwhile) before the
        exception goes on, so it cannot outlive the caller.
        """
        done: concurrent.futures.Future[T] = concurrent.futures.Future()
        started: list[asyncio.Task[T]] = []

        def start() -> None:
            task = self.loop.create_task(coro)
            started.append(task)
            task.add_done_callback(lambda t: _settle(t, done))

        self.loop.call_soon_threadsafe(start)
        try:
            return done.result(timeout)
        except BaseException:
            self.loop.call_soon_threadsafe(lambda: [task.cancel() for task in started])
            with lifecycle.deferred(), contextlib.suppress(BaseException):
                done.exception(60)
            raise

    def stop(self) -> None:
        """Stop the loop and join its thread (up to 10 s); the loop is closed once stopped."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self.loop.is_running():
            self.loop.close()


def _settle(task: asyncio.Task[T], done: concurrent.futures.Future[T]) -> None:
    """Hand a finished task's outcome to the waiting thread."""
    if task.cancelled():
        done.cancel()
    elif (error := task.exception()) is not None:
        done.set_exception(error)
    else:
        done.set_result(task.result())
