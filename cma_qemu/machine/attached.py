"""Attaching to a QEMU someone else started: its QMP socket, guest memory, the guest channel
and events, as an :class:`AttachedMachine` that never stops QEMU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from cma_qemu.closing import AsyncClosing
from cma_qemu.errors import EIO
from cma_qemu.machine import rundir
from cma_qemu.machine.console import Console
from cma_qemu.machine.events import EventHub
from cma_qemu.machine.gdbstub import GDB_CHARDEV, GdbStubGuestMemory, recover_stopped_vm
from cma_qemu.machine.memory import GuestMemory, MmapGuestMemory, PmemsaveGuestMemory
from cma_qemu.machine.profiles import BoardLike, profile_of, ram_extent
from cma_qemu.machine.qmp import (
    Chardev,
    chardevs,
    connect_qmp,
    find_channel_chardev,
    machine_ram_backend,
)

__all__ = ["AttachedMachine", "attach", "open_guest_memory"]

log = logging.getLogger(__name__)


async def open_guest_memory(
    qmp: QMPClient,
    board: BoardLike,
    tmpdir: str | os.PathLike[str],
    events: EventHub | None = None,
) -> GuestMemory:
    """mmap of the shared RAM backend file when there is one, otherwise QMP pmemsave (with
    writes through QEMU's gdbstub when the machine has one: a VM a killed agent left stopped
    there is continued now)."""
    base, size, banks = ram_extent(board)
    if profile_of(board).gdbstub_writes:
        for dev in await chardevs(qmp):
            found = re.match(r"unix:([^,]+)", dev.filename)
            if dev.label == GDB_CHARDEV and found:
                await recover_stopped_vm(qmp, found[1])
                return GdbStubGuestMemory(qmp, tmpdir, found[1], base, size, banks, events=events)
    if board.memory_access == "mmap":
        backend = await machine_ram_backend(qmp)
        if backend is not None and backend.share and backend.mem_path:
            if backend.size < size:
                raise EIO(
                    f"RAM backend {backend.id} has {backend.size:#x} bytes, board {board.name} "
                    f"needs {size:#x}",
                    where="qmp",
                )
            return MmapGuestMemory(backend.mem_path, base, size, banks)
        log.info("no shared RAM backend file: reading guest memory with pmemsave")
    return PmemsaveGuestMemory(qmp, tmpdir, base, size, banks)


@dataclass
class AttachedMachine(AsyncClosing):
    """A QEMU this process does not own: QMP, guest memory, the channel, events.

    Closing it disconnects and frees host resources; it never stops QEMU.
    """

    board: BoardLike
    qmp: QMPClient
    qmp_path: Path
    channel_path: Path
    #: The QEMU chardev serving the channel socket; None for a net channel, whose socket is
    #: the agent's own (QEMU's guestfwd connects to it once per guest connection).
    channel_chardev: Chardev | None
    memory: GuestMemory
    events: EventHub
    _tmpdir: tempfile.TemporaryDirectory[str] | None = None
    #: This process did not boot the guest.
    boot_time: float | None = None

    @property
    def console(self) -> Console:
        """Not here: the console belongs to whoever started QEMU."""
        raise EIO("an attached machine has no console here", where="agent")

    async def wait_ready(self, timeout: float | None = None, *, since: int | None = None) -> str:
        """Not here: the ready marker is on the console (see :attr:`console`)."""
        raise EIO("an attached machine has no console here", where="agent")

    async def close(self) -> None:
        """Disconnect; QEMU keeps running."""
        await self.events.close()
        await self.memory.close()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None


async def attach(
    qmp_path: str | os.PathLike[str],
    channel_path: str | os.PathLike[str],
    board: BoardLike,
    *,
    timeout: float = 10.0,
) -> AttachedMachine:
    """Attach to a running QEMU through its QMP socket (see :class:`AttachedMachine`).

    Finds the RAM backend file for mmap when it is ``share=on`` (pmemsave otherwise) and the
    chardev serving ``channel_path``; raises ENODEV when the channel is not there. A net
    channel has no chardev: ``channel_path`` is where the agent will listen, the socket QEMU's
    guestfwd connects to (``cma-qemu qemu-command`` names it), so nothing is looked up.
    """
    qmp = await connect_qmp(qmp_path, timeout=timeout, name="cma-qemu-attach")
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        chardev = None
        if board.channel.kind != "net":
            chardev = await find_channel_chardev(qmp, channel_path, board)
        rundir.sweep({tempfile.gettempdir(), rundir.default_parent()})  # dead agents' dirs
        tmp = tempfile.TemporaryDirectory(prefix="cma-qemu-attach-")
        os.chmod(tmp.name, 0o700)
        rundir.claim(tmp.name)  # swept by the next start if this process is killed
        hub = EventHub(qmp)
        memory = await open_guest_memory(qmp, board, tmp.name, hub)
        hub.start()
        return AttachedMachine(
            board, qmp, Path(qmp_path), Path(channel_path), chardev, memory, hub, tmp
        )
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        raise
