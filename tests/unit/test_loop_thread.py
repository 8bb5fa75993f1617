"""LoopThread: a coroutine that a timeout or an interrupt abandons does not run on."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Iterator

import pytest

from cma_qemu.loop_thread import LoopThread


@pytest.fixture
def loop() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.stop()


def test_result_comes_back(loop: LoopThread) -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert loop.run(answer(), 5) == 42


def test_errors_come_back(loop: LoopThread) -> None:
    async def fail() -> None:
        raise ValueError("guest said no")

    with pytest.raises(ValueError, match="guest said no"):
        loop.run(fail(), 5)


def test_a_timeout_cancels_and_waits_for_the_coroutine(loop: LoopThread) -> None:
    unwound = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        finally:
            await asyncio.sleep(0.05)  # a cleanup that awaits, like closing a board
            unwound.set()

    with pytest.raises(concurrent.futures.TimeoutError):
        loop.run(slow(), 0.1)
    assert unwound.is_set()  # finished before run() gave the timeout back
