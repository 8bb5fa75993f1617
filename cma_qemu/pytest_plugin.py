"""pytest plugin (entry point ``pytest11``): boot a board once, share it, drive its guest.

Fixtures:

``cma_board``
    The board named by ``--cma-board`` (default ``virt``), booted once per session with its
    regions reserved. A :class:`BoardSession`: ``.agent`` and ``.guest``.
``cma_boot``
    A session-wide factory, ``cma_boot("smdkc210", regions="x=16M")``: boots a board (once per
    distinct set of arguments) for the tests that need another one.
``agent``
    :class:`SyncAgent` of ``cma_board``: the framework (``agent.cma``), guest memory
    (``agent.read``, ``agent.find_mismatch``), the monitor socket. After each test the
    guest's and the monitor's leftover chunks are released, so tests stay independent.
``guest``
    :class:`Guest` of ``cma_board``: ``guest.run(cmd)`` gives ``(output, status)``,
    ``guest.run_script(text)`` runs ``cma-test`` on a script.

The asyncio parts run on a private event loop thread, so tests are plain functions.

While boards are up, SIGTERM and SIGHUP stop the session the way Ctrl-C does (pytest's
"KeyboardInterrupt" path, :mod:`cma_qemu.lifecycle`): the running test is abandoned, every
board is shut down and its files removed, and pytest exits with 128 + the signal number (143,
129) instead of dying on the spot with QEMU's RAM and sockets left behind. A coroutine that a
signal or a timeout abandons is cancelled and waited for, so nothing keeps running on the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest

from cma_qemu import lifecycle
from cma_qemu.agent import Agent, GuestStub, ScriptResult
from cma_qemu.boards import load_board
from cma_qemu.framework import Chunk, Cma
from cma_qemu.monitor.commands import MONITOR_OWNER

__all__ = ["BoardSession", "Guest", "GuestResult", "SyncAgent", "SyncStub"]

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--cma-board``: the board ``cma_board`` boots (default ``virt``)."""
    group = parser.getgroup("cma-qemu")
    group.addoption("--cma-board", default="virt", help="board the cma-qemu fixtures boot")


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of tests that boot QEMU."""
    config.addinivalue_line("markers", "e2e: boots real QEMU with a real Linux guest")


@pytest.hookimpl(trylast=True)  # after the fixture teardown that closes the boards
def pytest_sessionfinish(session: pytest.Session) -> None:
    """A session that SIGTERM or SIGHUP stopped (while boards were up) exits 128 + signal."""
    if _Boards.stopped_by is not None:
        session.exitstatus = 128 + _Boards.stopped_by


class _LoopThread:
    """An event loop in a daemon thread; tests hand it coroutines and wait for the result."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cma-qemu-loop")
        self._thread.daemon = True
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop; on a timeout or an interrupt it is cancelled and waited
        for (up to a minute) before the exception goes on, so it cannot outlive the caller."""
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


@dataclass(frozen=True)
class GuestResult:
    """Output (CRs removed, last newline dropped) and exit status of a guest command."""

    output: str
    status: int

    def __iter__(self) -> Iterator[Any]:
        return iter((self.output, self.status))


class SyncAgent:
    """An :class:`~cma_qemu.agent.Agent` for synchronous test code."""

    def __init__(self, agent: Agent, loop: _LoopThread) -> None:
        self._agent = agent
        self._loop = loop

    @property
    def agent(self) -> Agent:
        """The asyncio agent underneath (use :meth:`call` to await its methods)."""
        return self._agent

    @property
    def cma(self) -> Cma:
        """The framework: regions, chunks, stats, map, asterisk; its calls take its lock."""
        return self._agent.cma

    @property
    def board_name(self) -> str:
        """Which board this is."""
        return self._agent.board.name

    @property
    def monitor_path(self) -> str:
        """The agent's QMP monitor socket, for ``qemu.qmp.QMPClient``."""
        return str(self._agent.monitor_path)

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = 300) -> T:
        """Run a coroutine of the agent's world (QMP, memory, channel) and return its result."""
        return self._loop.run(coro, timeout)

    def read(self, addr: int, size: int) -> bytes:
        """Guest physical memory."""
        return self.call(self._agent.read(addr, size))

    def find_mismatch(self, chunk: Chunk, pattern: int, size: int | None = None) -> int | None:
        """Offset of the first word that breaks the stub's ``write`` pattern, or None."""
        return self.call(self._agent.find_mismatch(chunk, pattern, size))

    def guest_chunks(self) -> list[Chunk]:
        """The chunks the guest holds now, in address order."""
        return self._agent.chunks_of_guest()

    def chunk_at(self, addr: int) -> Chunk:
        """The live chunk starting at ``addr``."""
        return self._agent.cma.chunk(addr)

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """A QMP command to QEMU itself."""
        return self.call(self._agent.machine.qmp.execute(command, arguments))

    def reset_guest(self, timeout: float = 120) -> None:
        """``system_reset`` and wait until the guest is up again."""
        machine = self._agent.machine
        mark = machine.console.mark()  # type: ignore[union-attr]
        self.qmp("system_reset")
        self.call(machine.wait_ready(timeout, since=mark), timeout)  # type: ignore[union-attr]

    def release_leftovers(self) -> list[Chunk]:
        """Free what the guest and the monitor still hold (between tests)."""
        released = self._agent.channel.reset(reason="test-teardown")
        released += self._agent.cma.release_owner(MONITOR_OWNER)
        return released


class SyncStub:
    """A held ``cma-test`` for synchronous tests."""

    def __init__(self, stub: GuestStub, loop: _LoopThread) -> None:
        self._stub = stub
        self._loop = loop

    def send(self, line: str) -> str:
        """One line; what the stub printed for it (stdout and stderr together)."""
        return self._loop.run(self._stub.send(line), self._stub.timeout + 30)


class Guest:
    """The guest console of a booted board."""

    def __init__(self, agent: Agent, loop: _LoopThread) -> None:
        self._agent = agent
        self._loop = loop

    def run(self, cmd: str, timeout: float = 120) -> GuestResult:
        """Run a shell command in the guest (in a subshell); output and exit status."""
        out, status = self._loop.run(self._agent.guest_run(cmd, timeout), timeout + 30)
        return GuestResult(out, status)

    def check(self, cmd: str, timeout: float = 120) -> str:
        """Output of a command that must succeed."""
        result = self.run(cmd, timeout)
        if result.status:
            raise AssertionError(f"guest command {cmd!r} exited {result.status}: {result.output}")
        return result.output

    def run_script(self, text: str, timeout: float = 300) -> ScriptResult:
        """``cma-test`` on a script in the guest: exact stdout, stderr and status."""
        return self._loop.run(self._agent.run_script(text, timeout), timeout + 60)

    @contextlib.contextmanager
    def stub(self, timeout: float = 60) -> Iterator[SyncStub]:
        """``cma-test`` held open on the console: ``with guest.stub() as s: s.send(line)``.

        Its chunks stay alive until the block ends (the stub frees them at end of input).
        """
        manager = self._agent.stub(timeout)
        stub = self._loop.run(manager.__aenter__(), timeout + 30)
        try:
            yield SyncStub(stub, self._loop)
        finally:
            self._loop.run(manager.__aexit__(None, None, None), timeout + 30)

    def put_file(self, path: str, data: bytes) -> None:
        """Copy bytes into a guest file."""
        self._loop.run(self._agent.put_file(path, data), 300)


@dataclass
class BoardSession:
    """One booted board: its agent and its guest."""

    agent: SyncAgent
    guest: Guest
    _close: Callable[[], None] = field(repr=False)


class _Boards:
    """Boots boards on first use and shuts them all down at the end of the session."""

    #: The signal that stopped a session with boards up (for the exit status), or None.
    stopped_by: int | None = None

    def __init__(self) -> None:
        self._loop: _LoopThread | None = None
        self._sessions: dict[tuple[Any, ...], BoardSession] = {}
        self._signals = contextlib.ExitStack()

    def boot(
        self,
        board: str,
        *,
        regions: str | None = None,
        map_text: str | None = None,
        asterisk: str | None = None,
    ) -> BoardSession:
        key = (board, regions, map_text, asterisk)
        if key in self._sessions:
            return self._sessions[key]
        if self._loop is None:
            self._signals.enter_context(lifecycle.signals_interrupt())
            self._loop = _LoopThread()
        loop = self._loop
        agent = loop.run(
            Agent.boot(load_board(board), regions=regions, map_text=map_text, asterisk=asterisk),
            600,
        )

        def close() -> None:
            loop.run(agent.close(), 60)

        session = BoardSession(SyncAgent(agent, loop), Guest(agent, loop), close)
        self._sessions[key] = session
        return session

    def close(self) -> None:
        with lifecycle.deferred():  # a signal now must not cut the shutdown in half
            for session in self._sessions.values():
                try:
                    session._close()
                except Exception as error:  # keep closing the others
                    print(f"cma-qemu: closing a board failed: {error}")
            self._sessions.clear()
            if self._loop is not None:
                self._loop.stop()
                self._loop = None
        self._signals.close()
        if lifecycle.received() is not None:
            _Boards.stopped_by = lifecycle.received()


@pytest.fixture(scope="session")
def cma_boot() -> Iterator[Callable[..., BoardSession]]:
    """Factory: ``cma_boot(board, regions=..., map_text=..., asterisk=...)``, booted once."""
    boards = _Boards()
    try:
        yield boards.boot
    finally:
        boards.close()


@pytest.fixture(scope="session")
def cma_board(
    request: pytest.FixtureRequest, cma_boot: Callable[..., BoardSession]
) -> BoardSession:
    """The ``--cma-board`` board, booted once for the session."""
    return cma_boot(str(request.config.getoption("--cma-board")))


@pytest.fixture
def agent(cma_board: BoardSession) -> Iterator[SyncAgent]:
    """The shared board's agent; the test's leftover chunks are released afterwards."""
    yield cma_board.agent
    cma_board.agent.release_leftovers()


@pytest.fixture
def guest(cma_board: BoardSession) -> Guest:
    """The shared board's guest console."""
    return cma_board.guest
