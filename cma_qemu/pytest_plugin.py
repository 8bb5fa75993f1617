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
``fresh_board``, ``fresh_agent``, ``fresh_guest``
    A board of the test's own, restored in 0.2 to 0.4 s from a snapshot the session takes
    once (one boot, on a board that serves no test; docs/snapshots.md) and shut down after
    the test: a panic, a wedged driver or a full tmpfs stays with the test that caused it.
    ``--cma-fresh=restore`` makes ``agent`` and ``guest`` these too (default ``shared``).

The asyncio parts run on a :class:`~cma_qemu.loop_thread.LoopThread`, so tests are plain functions.

Test reports: a failed test's report carries the console of every board that printed
something since the test started (a ``Captured stdout: guest console ...`` section: in the
terminal, and in JUnit ``system-out`` with ``-o junit_logging=system-out`` or ``all``), and
``--cma-log-dir DIR`` writes each test's console to ``DIR/NODEID.BOARD.log``, passed or not.
Boards are session-scoped: under pytest-xdist each worker boots its own.

While boards are up, SIGTERM and SIGHUP stop the session the way Ctrl-C does (pytest's
"KeyboardInterrupt" path, :mod:`cma_qemu.lifecycle`): the running test is abandoned, every
board is shut down and its files removed, and pytest exits with 128 + the signal number (143,
129) instead of dying on the spot with QEMU's RAM and sockets left behind. A coroutine that a
signal or a timeout abandons is cancelled and waited for, so nothing keeps running on the loop.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
from collections.abc import Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cma_qemu import guest_put, lifecycle
from cma_qemu.agent import Agent
from cma_qemu.boards import load_board
from cma_qemu.framework import Chunk, Cma
from cma_qemu.loop_thread import LoopThread
from cma_qemu.machine.console import require_success
from cma_qemu.monitor.commands import MONITOR_OWNER
from cma_qemu.shell import GuestStub, ScriptResult

__all__ = ["BoardSession", "Guest", "GuestResult", "SyncAgent", "SyncStub"]

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--cma-board``: the board ``cma_board`` boots (default ``virt``)."""
    group = parser.getgroup("cma-qemu")
    group.addoption("--cma-board", default="virt", help="board the cma-qemu fixtures boot")
    group.addoption(
        "--cma-fresh",
        choices=("shared", "restore"),
        default="shared",
        help="what the agent and guest fixtures give: the session's shared board (shared) "
        "or a board of the test's own, restored from a session snapshot (restore)",
    )
    group.addoption(
        "--cma-log-dir",
        metavar="DIR",
        default=None,
        help="write each test's guest console output to DIR/NODEID.BOARD.log",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker of tests that boot QEMU."""
    config.addinivalue_line("markers", "e2e: boots real QEMU with a real Linux guest")


@pytest.hookimpl(trylast=True)  # after the fixture teardown that closes the boards
def pytest_sessionfinish(session: pytest.Session) -> None:
    """A session that SIGTERM or SIGHUP stopped (while boards were up) exits 128 + signal."""
    if _Boards.stopped_by is not None:
        session.exitstatus = 128 + _Boards.stopped_by


#: Console positions of the boards that were up when a test started: where its output begins.
_CONSOLE_START = pytest.StashKey[dict[str, int]]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Mark where each live board's console stands before the test's fixtures run."""
    item.stash[_CONSOLE_START] = {
        label: session.console_mark() for label, session in _Boards.live_sessions()
    }


def _consoles_since_start(item: pytest.Item) -> list[tuple[str, str]]:
    """``(board label, console text)`` printed since ``item`` started, boards with output only.

    A board booted during the test counts from its first line (its boot log). Cost: one copy
    of each board's retained transcript (at most 1 MiB each).
    """
    start = item.stash.get(_CONSOLE_START, {})
    out = []
    for label, session in _Boards.live_sessions():
        text = session.console_since(start.get(label, 0))
        if text.strip():
            out.append((label, text))
    return out


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failed phase's report gets the guest consoles; ``--cma-log-dir`` gets every test's."""
    report = yield
    if report.failed:
        for label, text in _consoles_since_start(item):
            # on this report (terminal), and on the item's, so the teardown report that
            # JUnit writes ``system-out`` from carries it too
            key = f"stdout: guest console ({label})"
            item.add_report_section(report.when, key, text)
            report.sections.append((f"Captured {key} {report.when}", text))
    log_dir = item.config.getoption("--cma-log-dir")
    if log_dir:
        # after every phase: the file grows with the test; the last test's teardown closes
        # the boards, and then the file written after its call stays
        _write_console_logs(Path(log_dir), item)
    return report


def _write_console_logs(directory: Path, item: pytest.Item) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^\w.-]+", "_", item.nodeid).strip("_")
    for label, text in _consoles_since_start(item):
        board = re.sub(r"[^\w.-]+", "_", label)
        (directory / f"{name}.{board}.log").write_text(text)


@dataclass(frozen=True)
class GuestResult:
    """Output (CRs removed, last newline dropped) and exit status of a guest command."""

    output: str
    status: int

    def __iter__(self) -> Iterator[Any]:
        return iter((self.output, self.status))


class SyncAgent:
    """An :class:`~cma_qemu.agent.Agent` for synchronous test code."""

    def __init__(self, agent: Agent, loop: LoopThread) -> None:
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
        mark = machine.console.mark()
        self.qmp("system_reset")
        self.call(machine.wait_ready(timeout, since=mark), timeout)

    def release_leftovers(self) -> list[Chunk]:
        """Free what the guest and the monitor still hold (between tests)."""
        released = self._agent.channel.reset(reason="test-teardown")
        released += self._agent.cma.release_owner(MONITOR_OWNER)
        return released


class SyncStub:
    """A held ``cma-test`` for synchronous tests."""

    def __init__(self, stub: GuestStub, loop: LoopThread) -> None:
        self._stub = stub
        self._loop = loop

    def send(self, line: str) -> str:
        """One line; what the stub printed for it (stdout and stderr together)."""
        return self._loop.run(self._stub.send(line), self._stub.timeout + 30)


class Guest:
    """The guest console of a booted board."""

    def __init__(self, agent: Agent, loop: LoopThread) -> None:
        self._agent = agent
        self._loop = loop

    def run(self, cmd: str, timeout: float = 120) -> GuestResult:
        """Run a shell command in the guest (in a subshell); output and exit status."""
        out, status = self._loop.run(self._agent.shell.run(cmd, timeout), timeout + 30)
        return GuestResult(out, status)

    def check(self, cmd: str, timeout: float = 120) -> str:
        """Output of a command that must succeed."""
        result = self.run(cmd, timeout)
        return require_success(cmd, result.output, result.status)

    def run_script(self, text: str, timeout: float = 300) -> ScriptResult:
        """``cma-test`` on a script in the guest: exact stdout, stderr and status."""
        return self._loop.run(self._agent.shell.run_script(text, timeout), timeout + 60)

    @contextlib.contextmanager
    def stub(self, timeout: float = 60) -> Iterator[SyncStub]:
        """``cma-test`` held open on the console: ``with guest.stub() as s: s.send(line)``.

        Its chunks stay alive until the block ends (the stub frees them at end of input).
        """
        manager = self._agent.shell.stub(timeout)
        stub = self._loop.run(manager.__aenter__(), timeout + 30)
        try:
            yield SyncStub(stub, self._loop)
        finally:
            self._loop.run(manager.__aexit__(None, None, None), timeout + 30)

    def put_file(self, path: str, data: bytes) -> None:
        """Copy bytes into a guest file."""
        self._loop.run(self._agent.shell.put_file(path, data), 300)

    def put(self, local: str | Path, guest: str, timeout: float = 900) -> None:
        """``boot --put LOCAL:GUEST``: a host file into the guest, mode bits kept."""
        self._loop.run(guest_put.put(self._agent, Path(local), guest), timeout)

    def load_module(self, ko: str | Path, params: str = "", timeout: float = 900) -> str:
        """A ``.ko`` from ``cma-qemu guest module build`` copied in (once) and insmod'ed.

        Its CMA calls need the daemon: ``guest.check("cma-test -k 2>/tmp/kd.err &")``.
        """
        return self._loop.run(guest_put.load_module(self._agent, Path(ko), params), timeout)


@dataclass
class BoardSession:
    """One booted board: its agent and its guest."""

    agent: SyncAgent
    guest: Guest
    _close: Callable[[], None] = field(repr=False)

    def console_mark(self) -> int:
        """Where the guest console's transcript stands now (0 if there is none)."""
        with contextlib.suppress(Exception):  # closed, or a machine without a console
            return self.agent.agent.console.transcript.total
        return 0

    def console_since(self, mark: int) -> str:
        """Console output after ``mark``, CRs removed ("" if there is none)."""
        with contextlib.suppress(Exception):
            return self.agent.agent.console.transcript.since(mark)[1].replace("\r", "")
        return ""


class _Boards:
    """Boots boards on first use and shuts them all down at the end of the session."""

    #: The signal that stopped a session with boards up (for the exit status), or None.
    stopped_by: int | None = None
    #: The instance the ``cma_boot`` fixture holds (one per pytest process, xdist worker).
    current: _Boards | None = None

    def __init__(self) -> None:
        self._loop: LoopThread | None = None
        self._sessions: dict[tuple[Any, ...], BoardSession] = {}
        self._labels: dict[tuple[Any, ...], str] = {}
        self._signals = contextlib.ExitStack()
        self._snapshots: dict[tuple[Any, ...], Path] = {}
        self._snapshot_dir: Path | None = None
        self._fresh: dict[str, BoardSession] = {}

    @classmethod
    def live_sessions(cls) -> list[tuple[str, BoardSession]]:
        """``(label, session)`` of every board up now: the board name, ``#N`` for others."""
        boards = cls.current
        if boards is None:
            return []
        shared = [(boards._labels[key], s) for key, s in list(boards._sessions.items())]
        return shared + list(boards._fresh.items())

    def _loop_thread(self) -> LoopThread:
        if self._loop is None:
            self._signals.enter_context(lifecycle.signals_interrupt())
            self._loop = LoopThread()
        return self._loop

    def fresh(self, board: str, **attributes: str | None) -> BoardSession:
        """A board of the caller's own, restored from this session's snapshot of ``board``
        (booted and saved on first use, in a board that serves no test); ``session._close()``
        shuts it down. Cost: one boot per session and key, then 0.2 to 0.4 s per call."""
        from cma_qemu.snapshot import restore_agent

        loop = self._loop_thread()
        key = (board, *sorted(attributes.items()))
        if key not in self._snapshots:
            if self._snapshot_dir is None:
                self._snapshot_dir = Path(tempfile.mkdtemp(prefix="cma-qemu-snapshots-"))
            path = self._snapshot_dir / f"s{len(self._snapshots)}"

            async def save() -> None:
                async with await Agent.boot(load_board(board), **attributes) as agent:  # type: ignore[arg-type]
                    await agent.snapshot(path)

            loop.run(save(), 600)
            self._snapshots[key] = path
        agent = loop.run(restore_agent(self._snapshots[key]), 300)
        label = f"{board} (fresh)"

        def close() -> None:
            self._fresh.pop(label, None)
            loop.run(agent.close(), 60)

        session = BoardSession(SyncAgent(agent, loop), Guest(agent, loop), close)
        self._fresh[label] = session
        return session

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
        loop = self._loop_thread()
        agent = loop.run(
            Agent.boot(load_board(board), regions=regions, map_text=map_text, asterisk=asterisk),
            600,
        )

        def close() -> None:
            loop.run(agent.close(), 60)

        session = BoardSession(SyncAgent(agent, loop), Guest(agent, loop), close)
        same = sum(1 for k in self._sessions if k[0] == board)
        self._labels[key] = board if same == 0 else f"{board}#{same + 1}"
        self._sessions[key] = session
        return session

    def close(self) -> None:
        with lifecycle.deferred():  # a signal now must not cut the shutdown in half
            for session in self._sessions.values():
                try:
                    session._close()
                except Exception as error:  # keep closing the others
                    print(f"cma-qemu: closing a board failed: {error}")
            for fresh in list(self._fresh.values()):
                with contextlib.suppress(Exception):
                    fresh._close()
            self._sessions.clear()
            self._labels.clear()
            if self._snapshot_dir is not None:
                shutil.rmtree(self._snapshot_dir, ignore_errors=True)
                self._snapshot_dir = None
                self._snapshots.clear()
            if self._loop is not None:
                self._loop.stop()
                self._loop = None
        self._signals.close()
        if lifecycle.received() is not None:
            _Boards.stopped_by = lifecycle.received()


@pytest.fixture(scope="session")
def cma_boot() -> Iterator[Callable[..., BoardSession]]:
    """Factory: ``cma_boot(board, regions=..., map_text=..., asterisk=...)``, booted once."""
    boards = _Boards.current = _Boards()
    try:
        yield boards.boot
    finally:
        _Boards.current = None
        boards.close()


@pytest.fixture(scope="session")
def cma_board(
    request: pytest.FixtureRequest, cma_boot: Callable[..., BoardSession]
) -> BoardSession:
    """The ``--cma-board`` board, booted once for the session."""
    return cma_boot(str(request.config.getoption("--cma-board")))


@pytest.fixture
def fresh_board(
    request: pytest.FixtureRequest, cma_boot: Callable[..., BoardSession]
) -> Iterator[BoardSession]:
    """The ``--cma-board`` board, of this test's own: restored from a session snapshot (one
    boot per session) and shut down after the test, whatever the test did to it."""
    boards = _Boards.current
    assert boards is not None  # cma_boot made it
    session = boards.fresh(str(request.config.getoption("--cma-board")))
    try:
        yield session
    finally:
        session._close()


@pytest.fixture
def fresh_agent(fresh_board: BoardSession) -> SyncAgent:
    """:class:`SyncAgent` of a board of this test's own (``fresh_board``)."""
    return fresh_board.agent


@pytest.fixture
def fresh_guest(fresh_board: BoardSession) -> Guest:
    """:class:`Guest` of a board of this test's own (``fresh_board``)."""
    return fresh_board.guest


def _board_for_test(request: pytest.FixtureRequest) -> BoardSession:
    """``cma_board``, or with ``--cma-fresh=restore`` the test's own ``fresh_board``."""
    name = "fresh_board" if request.config.getoption("--cma-fresh") == "restore" else "cma_board"
    session: BoardSession = request.getfixturevalue(name)
    return session


@pytest.fixture
def agent(request: pytest.FixtureRequest) -> Iterator[SyncAgent]:
    """The board's agent (see ``--cma-fresh``); on the shared board the test's leftover
    chunks are released afterwards."""
    session = _board_for_test(request)
    yield session.agent
    if request.config.getoption("--cma-fresh") != "restore":
        session.agent.release_leftovers()


@pytest.fixture
def guest(request: pytest.FixtureRequest) -> Guest:
    """The board's guest console (see ``--cma-fresh``)."""
    return _board_for_test(request).guest
