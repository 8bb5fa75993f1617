"""The agent: one board's framework, QEMU machine, guest channel and monitor, wired together.

Front ends (the CLI, the pytest plugin) only talk to an :class:`Agent`; the layers below it
do not know about each other beyond what docs/design.md allows (the machine knows QEMU, the channel
knows the framework, the monitor knows both through callables).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from cma_qemu.boards import Board
from cma_qemu.channel import ChannelServer, FifoGate
from cma_qemu.channel.session import KERNEL_SUFFIX
from cma_qemu.closing import AsyncClosing
from cma_qemu.configuration import build_cma
from cma_qemu.errors import ENODEV
from cma_qemu.framework import Chunk, Cma
from cma_qemu.guest_image import build_guest, find_guest
from cma_qemu.journal import JOURNAL_NAME, Journal, JournalIdentity, RestoreReport, qemu_identity
from cma_qemu.machine.attached import AttachedMachine, attach
from cma_qemu.machine.console import Console
from cma_qemu.machine.events import QmpEvent
from cma_qemu.machine.launch import CHANNEL_PORT_ID, Machine
from cma_qemu.machine.memory import GuestMemory, MmapGuestMemory
from cma_qemu.machine.qmp import chardevs, uart_rx_level
from cma_qemu.machine.running import MachineLike
from cma_qemu.monitor import Monitor
from cma_qemu.pattern import find_mismatch
from cma_qemu.record import RecordingHeader, RecordingSwitch
from cma_qemu.shell import GuestShell, GuestStub, ScriptResult

__all__ = ["Agent"]

log = logging.getLogger(__name__)

#: The ChannelServer name of a net channel's listener (its connections own ``guest:net:N``).
NET_PORT = "net"

Progress = Callable[[str], None]


class Agent(AsyncClosing):
    """A board with CMA: build it with :meth:`boot` or :meth:`attach`, then ``close()``.

    ``cma`` is the framework (query it freely), ``memory`` reads guest RAM, ``shell`` runs
    guest commands on the ``console`` (booted machines only), ``monitor_path`` is the QMP
    socket for inspection scripts. ``recording`` starts and stops a recording of what is
    served (``--record``); an attached agent keeps a ``journal`` of its state, and
    ``journal_restore`` says what it got back. :meth:`snapshot` saves a booted board and
    :meth:`restore` starts one from it.
    """

    def __init__(
        self,
        board: Board,
        cma: Cma,
        machine: MachineLike,
        channel: ChannelServer,
        monitor: Monitor,
        monitor_path: Path,
    ) -> None:
        self.board = board
        self.cma = cma
        self.machine = machine
        self.channel = channel
        self.monitor = monitor
        self.monitor_path = monitor_path
        #: The channel's name in the ChannelServer: the port, or "net" for the net listener.
        self.port = NET_PORT if board.channel.kind == "net" else board.channel.name
        self._unsubscribe: list[Callable[[], None]] = []
        #: The regions text and allocator the framework was built with (None: the board's).
        self.regions_text: str | None = None
        self.allocator: str | None = None
        self.recording = RecordingSwitch(cma, self._recording_header)
        self.journal: Journal | None = None
        self.journal_restore: RestoreReport | None = None
        self._shell: GuestShell | None = None

    # ------------------------------------------------------------------ construction
    @classmethod
    async def boot(
        cls,
        board: Board,
        *,
        regions: str | None = None,
        map_text: str | None = None,
        asterisk: str | None = None,
        allocator: str | None = None,
        monitor_path: Path | None = None,
        boot_timeout: float = 120.0,
        progress: Progress | None = None,
        record: Path | None = None,
    ) -> Agent:
        """Place the regions, boot the board with them reserved, verify, serve the guest.

        ``record`` writes every allocation and free served to that file (a replayable script).
        """
        say = progress or (lambda _message: None)
        say("placing the CMA regions")
        cma = build_cma(
            board=board, regions=regions, map_text=map_text, asterisk=asterisk, allocator=allocator
        )
        try:
            image = find_guest(board.kernel_flavour)
        except ENODEV:
            say(f"building the {board.kernel_flavour} guest image (once; cached)")
            image = await asyncio.to_thread(build_guest, board.kernel_flavour, None, say)
        reservations = [(r.name, r.start, r.size) for r in cma.regions]
        machine = Machine(board, reservations, image=image, boot_timeout=boot_timeout)
        say(f"booting {board.name} ({board.machine_type}, {board.kernel_flavour} kernel)")
        await machine.start()
        say(f"guest up in {machine.boot_time or 0:.1f} s; reservations verified in the guest")
        try:
            return await cls._serve(
                board,
                cma,
                machine,
                monitor_path or machine.runtime_dir,
                regions=regions,
                allocator=allocator,
                record=record,
            )
        except BaseException:
            await machine.close()
            raise

    @classmethod
    async def attach(
        cls,
        board: Board,
        qmp_path: Path,
        channel_path: Path,
        *,
        regions: str | None = None,
        map_text: str | None = None,
        asterisk: str | None = None,
        allocator: str | None = None,
        monitor_path: Path | None = None,
        record: Path | None = None,
        state: Path | None = None,
        journal: bool = True,
    ) -> Agent:
        """Serve a QEMU someone else started (a test harness): its QMP and channel sockets.

        The regions are placed as at boot; the caller is responsible for having booted the
        guest with them reserved (``cma-qemu boot --json`` prints them). The QEMU outlives
        this agent, and so do its guest's chunks: the agent keeps a journal of its state at
        ``state`` (default: beside the QMP socket) and restores an existing one of this QEMU
        before serving, so a restarted agent serves the guest as if it had never gone.
        """
        cma = build_cma(
            board=board, regions=regions, map_text=map_text, asterisk=asterisk, allocator=allocator
        )
        state_journal: Journal | None = None
        report: RestoreReport | None = None
        if journal:
            identity = JournalIdentity.of(
                board.name, board.regions if regions is None else regions, cma, allocator
            )
            state_journal, report = Journal.open(
                cma,
                state or Path(qmp_path).parent / JOURNAL_NAME,
                identity,
                qemu_identity(qmp_path),
            )
        try:
            machine = await attach(qmp_path, channel_path, board)
        except BaseException:
            if state_journal is not None:
                state_journal.close()
            raise
        try:
            agent = await cls._serve(
                board,
                cma,
                machine,
                monitor_path or Path(qmp_path).parent,
                regions=regions,
                allocator=allocator,
                record=record,
                journal=state_journal,
            )
        except BaseException:
            if state_journal is not None:
                state_journal.close()
            await machine.close()
            raise
        agent.journal_restore = report
        if report is not None and report.restored:
            try:
                await agent._release_if_port_closed()
            except BaseException:
                await agent.close()
                raise
        return agent

    async def snapshot(self, path: Path) -> None:
        """Save the booted guest and the CMA state into the directory ``path``.

        Cost: one QEMU migration (tens of ms) plus copying the RAM pages in use; see
        :mod:`cma_qemu.snapshot`.
        """
        from cma_qemu.snapshot import snapshot_agent

        await snapshot_agent(self, path)

    @classmethod
    async def restore(cls, path: Path, *, monitor_path: Path | None = None) -> Agent:
        """A served agent on a new QEMU started from the snapshot at ``path``, guest at its
        prompt with the clock set (0.2 to 0.4 s, BENCHMARKS.md); ``close()`` it as usual."""
        from cma_qemu.snapshot import restore_agent

        return await restore_agent(path, monitor_path=monitor_path)

    async def _release_if_port_closed(self) -> None:
        """A virtio port the guest closed while no agent was attached took its chunks along.

        The journal cannot have seen that ``VSERPORT_CHANGE``; QEMU's ``frontend-open`` for
        the channel's chardev says whether a guest program holds the port now.
        """
        machine = self.machine
        if not isinstance(machine, AttachedMachine) or self.board.channel.kind != "virtio-serial":
            return
        if machine.channel_chardev is None:
            return
        label = machine.channel_chardev.label
        now = next((c for c in await chardevs(machine.qmp) if c.label == label), None)
        if now is not None and not now.frontend_open:
            released = self.channel.port_closed(self.port)
            log.info("guest port closed while detached: released %d chunk(s)", len(released))

    @classmethod
    async def _serve(
        cls,
        board: Board,
        cma: Cma,
        machine: MachineLike,
        monitor_at: Path,
        *,
        regions: str | None,
        allocator: str | None,
        record: Path | None,
        journal: Journal | None = None,
    ) -> Agent:
        monitor_path = monitor_at / "monitor.sock" if monitor_at.is_dir() else monitor_at
        monitor = Monitor(cma)
        channel = ChannelServer(cma, on_reset=monitor.guest_reset)
        agent = cls(board, cma, machine, channel, monitor, monitor_path)
        agent.regions_text, agent.allocator, agent.journal = regions, allocator, journal
        monitor.read_memory = agent.read
        monitor.commands.record_start = agent.recording.start
        monitor.commands.record_stop = agent.recording.stop
        try:
            if record is not None:
                agent.recording.start(record)
            await monitor.start(monitor_path)
            if board.channel.kind == "net":
                # QEMU starts a socat per guest connection that connects here.
                await channel.add_listener(NET_PORT, machine.channel_path)
            else:
                channel.add_port(board.channel.name, machine.channel_path, gate=cls._gate(machine))
                await channel.wait_connected(board.channel.name, timeout=15)
            agent._follow_events()
        except BaseException:
            await agent._close_serving()
            raise
        return agent

    @staticmethod
    def _gate(machine: MachineLike) -> FifoGate | None:
        """A UART channel's writes are metered by its receive FIFO's level (see FifoGate)."""
        spec = machine.board.channel
        status = spec.rx_fifo_status
        if spec.kind != "uart" or status is None:
            return None
        size = spec.rx_fifo_size
        return FifoGate(lambda: uart_rx_level(machine.qmp, status, size), size)

    def _follow_events(self) -> None:
        """RESET releases the guest's chunks; a closed virtio port releases them too."""
        events = self.machine.events

        def on_reset(event: QmpEvent) -> None:
            released = self.channel.reset(reason="reset")
            log.info("guest reset: released %d chunk(s)", len(released))

        def on_port(event: QmpEvent) -> None:
            if event.data.get("id") == CHANNEL_PORT_ID and not event.data.get("open", True):
                self.channel.port_closed(self.port)

        self._unsubscribe.append(events.on(on_reset, "RESET"))
        self._unsubscribe.append(events.on(on_port, "VSERPORT_CHANGE"))

    # ------------------------------------------------------------------ lifecycle
    def _recording_header(self) -> RecordingHeader:
        return RecordingHeader(
            self.board.name,
            self.regions_text,
            self.cma.map_text,
            self.cma.asterisk_text,
            self.allocator,
        )

    async def _close_serving(self) -> None:
        for unsubscribe in self._unsubscribe:
            with contextlib.suppress(Exception):
                unsubscribe()
        self._unsubscribe.clear()
        with contextlib.suppress(Exception):
            self.recording.close()
        if self.journal is not None:
            with contextlib.suppress(Exception):
                self.journal.close()
            self.journal = None
        with contextlib.suppress(Exception):
            await self.channel.close()
        with contextlib.suppress(Exception):
            await self.monitor.close()

    async def close(self) -> None:
        """Stop serving and shut the machine down (an attached QEMU keeps running)."""
        await self._close_serving()
        await self.machine.close()

    # ------------------------------------------------------------------ guest memory
    @property
    def memory(self) -> GuestMemory:
        """Guest physical memory: mmap on virt, pmemsave on smdkc210."""
        return self.machine.memory

    async def read(self, addr: int, size: int) -> bytes:
        """Guest bytes at a guest physical address."""
        return await self.memory.read(addr, size)

    async def find_mismatch(
        self, chunk: Chunk, pattern: int, size: int | None = None
    ) -> int | None:
        """Check the stub's ``write`` pattern in ``chunk`` from the host side.

        Reads through the mmap view when there is one (no copy), else through QMP.
        """
        nbytes = chunk.requested if size is None else size
        span = (nbytes + 3) // 4 * 4
        memory = self.memory
        if isinstance(memory, MmapGuestMemory):
            return find_mismatch(memory.view(chunk.start, span), nbytes, pattern)
        return find_mismatch(await memory.read(chunk.start, span), nbytes, pattern)

    # ------------------------------------------------------------------ guest commands
    @property
    def console(self) -> Console:
        """The guest console (booted machines only; EIO on an attached one)."""
        return self.machine.console

    @property
    def shell(self) -> GuestShell:
        """Commands, files and ``cma-test`` on the guest console (booted machines only)."""
        if self._shell is None:
            self._shell = GuestShell(self.console)
        return self._shell

    # -- forwards to :attr:`shell`, for callers written against the agent (one line each)
    async def guest_run(self, cmd: str, timeout: float = 60.0) -> tuple[str, int]:
        """:meth:`GuestShell.run <cma_qemu.shell.GuestShell.run>` on this agent's console."""
        return await self.shell.run(cmd, timeout)

    async def _check(self, cmd: str, timeout: float = 60.0) -> str:
        return await self.shell.check(cmd, timeout)

    async def put_file(self, path: str, data: bytes) -> None:
        """:meth:`GuestShell.put_file <cma_qemu.shell.GuestShell.put_file>`."""
        await self.shell.put_file(path, data)

    async def get_file(self, path: str) -> bytes:
        """:meth:`GuestShell.get_file <cma_qemu.shell.GuestShell.get_file>`."""
        return await self.shell.get_file(path)

    async def run_script(self, text: str, timeout: float = 120.0) -> ScriptResult:
        """:meth:`GuestShell.run_script <cma_qemu.shell.GuestShell.run_script>`."""
        return await self.shell.run_script(text, timeout)

    def stub(self, timeout: float = 60.0) -> contextlib.AbstractAsyncContextManager[GuestStub]:
        """:meth:`GuestShell.stub <cma_qemu.shell.GuestShell.stub>`."""
        return self.shell.stub(timeout)

    def chunks_of_guest(self) -> list[Chunk]:
        """The live chunks the guest on this board's channel owns (its kernel code's too)."""
        owner = ChannelServer.owner_for(self.port)
        mine = (owner, owner + KERNEL_SUFFIX)
        each = f"{owner}:"  # a net channel's connections: guest:net:1, guest:net:2, ...
        return [c for c in self.cma.chunks if c.owner in mine or (c.owner or "").startswith(each)]
