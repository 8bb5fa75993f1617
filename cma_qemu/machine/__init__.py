"""The QEMU side: launch, device tree, QMP session, guest memory, console (images: guest_image).

The names below are loaded when first used, so importing a small module of this package
(``machine.profiles`` for the board files) does not load QEMU's client, pexpect and the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cma_qemu.machine.attached import AttachedMachine, attach
    from cma_qemu.machine.console import Console
    from cma_qemu.machine.devicetree import add_reserved_memory, dump_qemu_dtb
    from cma_qemu.machine.events import EventHub, QmpEvent
    from cma_qemu.machine.launch import Machine, qemu_command
    from cma_qemu.machine.loader import LoadedRange, check_reservations, loader_ranges
    from cma_qemu.machine.memory import GuestMemory, MmapGuestMemory, PmemsaveGuestMemory
    from cma_qemu.machine.verify import verify_reservations

_WHERE = {
    "AttachedMachine": "attached",
    "attach": "attached",
    "Console": "console",
    "add_reserved_memory": "devicetree",
    "dump_qemu_dtb": "devicetree",
    "EventHub": "events",
    "QmpEvent": "events",
    "Machine": "launch",
    "qemu_command": "launch",
    "LoadedRange": "loader",
    "check_reservations": "loader",
    "loader_ranges": "loader",
    "GuestMemory": "memory",
    "MmapGuestMemory": "memory",
    "PmemsaveGuestMemory": "memory",
    "verify_reservations": "verify",
}

__all__ = [
    "AttachedMachine",
    "Console",
    "EventHub",
    "GuestMemory",
    "LoadedRange",
    "Machine",
    "MmapGuestMemory",
    "PmemsaveGuestMemory",
    "QmpEvent",
    "add_reserved_memory",
    "attach",
    "check_reservations",
    "dump_qemu_dtb",
    "loader_ranges",
    "qemu_command",
    "verify_reservations",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
