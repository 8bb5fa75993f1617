"""What the agent and front ends use of a running QEMU, whether this process launched it
(:class:`~cma_qemu.machine.launch.Machine`) or attached to it
(:class:`~cma_qemu.machine.attached.AttachedMachine`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from qemu.qmp import QMPClient

from cma_qemu.machine.console import Console
from cma_qemu.machine.events import EventHub
from cma_qemu.machine.memory import GuestMemory
from cma_qemu.machine.profiles import BoardLike

__all__ = ["MachineLike"]


class MachineLike(Protocol):
    """A running QEMU: its QMP client and socket, guest memory, events and the guest channel.

    ``console`` and ``wait_ready`` need the console this process owns: an attached machine
    raises EIO for both. ``boot_time`` is None when this process did not boot the guest.
    """

    @property
    def board(self) -> BoardLike: ...
    @property
    def qmp(self) -> QMPClient: ...
    @property
    def qmp_path(self) -> Path: ...
    @property
    def channel_path(self) -> Path: ...
    @property
    def memory(self) -> GuestMemory: ...
    @property
    def events(self) -> EventHub: ...
    @property
    def console(self) -> Console: ...
    @property
    def boot_time(self) -> float | None: ...

    async def wait_ready(self, timeout: float | None = None, *, since: int | None = None) -> str:
        """Wait for the guest's next ready marker; returns its channel."""
        ...

    async def close(self) -> None:
        """Release what this process holds of the machine."""
        ...
