"""SIGTERM and SIGHUP take the Ctrl-C path: cleanups run, the status is 128 + signal."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from cma_qemu import lifecycle
from cma_qemu.cli import main
from cma_qemu.lifecycle import Terminated


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test is a process that has seen no signal yet; handlers come back afterwards."""
    monkeypatch.setattr(lifecycle, "_state", lifecycle._State())
    handlers = {signum: signal.getsignal(signum) for signum in lifecycle.SIGNALS}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize("signum", lifecycle.SIGNALS)
def test_run_cancels_the_main_task_and_lets_it_unwind(signum: signal.Signals) -> None:
    steps: list[str] = []
    before = signal.getsignal(signum)

    async def agent() -> int:
        try:
            os.kill(os.getpid(), signum)
            await asyncio.sleep(30)
            return 0
        finally:
            steps.append("cleanup started")
            await asyncio.sleep(0.01)  # cleanups may await (QMP quit, socket close)
            steps.append("cleanup done")

    with pytest.raises(Terminated) as caught:
        lifecycle.run(agent())
    assert steps == ["cleanup started", "cleanup done"]
    assert caught.value.signum == signum and caught.value.exit_status == 128 + signum
    assert lifecycle.received() == signum
    assert signal.getsignal(signum) is before  # the handler the caller had is back


def test_a_second_signal_does_not_cut_the_cleanup_short() -> None:
    steps: list[str] = []

    async def agent() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(30)
        finally:
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.05)
            steps.append("cleanup done")

    with pytest.raises(Terminated) as caught:
        lifecycle.run(agent())
    assert steps == ["cleanup done"] and caught.value.signum == signal.SIGTERM


def test_a_cleanup_error_after_a_signal_still_ends_as_terminated() -> None:
    async def agent() -> None:
        try:
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(30)
        finally:
            raise OSError("the socket was gone already")

    with pytest.raises(Terminated) as caught:
        lifecycle.run(agent())
    assert caught.value.exit_status == 129
    assert isinstance(caught.value.__cause__, OSError)


def test_run_returns_the_result_without_a_signal() -> None:
    async def agent() -> int:
        await asyncio.sleep(0)
        return 7

    assert lifecycle.run(agent()) == 7
    assert lifecycle.received() is None


def test_signals_interrupt_raises_in_the_main_thread_and_restores() -> None:
    before = signal.getsignal(signal.SIGHUP)
    with pytest.raises(KeyboardInterrupt) as caught, lifecycle.signals_interrupt():
        os.kill(os.getpid(), signal.SIGHUP)
        signal.sigtimedwait([], 0)  # let the handler run
    assert isinstance(caught.value, Terminated) and caught.value.name == "SIGHUP"
    assert lifecycle.exit_status(caught.value) == 129
    assert lifecycle.exit_status(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGHUP) is before


def test_deferred_records_without_raising() -> None:
    with lifecycle.signals_interrupt():
        with lifecycle.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)
        assert lifecycle.received() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # later ones are only noted
        signal.sigtimedwait([], 0)


def test_cli_exits_128_plus_signal(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command stopped by SIGTERM says so in one line and exits 143."""

    def boards(_args: object) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        signal.sigtimedwait([], 0)
        return 0

    monkeypatch.setattr("cma_qemu.cli.cmd_boards", boards)
    assert main(["boards"]) == 143
    assert capsys.readouterr().err == "cma-qemu: terminated by SIGTERM\n"
