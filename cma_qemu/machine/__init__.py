"""The QEMU side: launch, device tree, QMP session, guest memory, console (images: guest_image)."""

# Re-exports of the machine layer (launch, device tree, QMP, memory, console, verification).
from cma_qemu.machine.console import Console
from cma_qemu.machine.devicetree import add_reserved_memory, dump_qemu_dtb
from cma_qemu.machine.launch import Machine, qemu_command
from cma_qemu.machine.loader import LoadedRange, check_reservations, loader_ranges
from cma_qemu.machine.memory import GuestMemory, MmapGuestMemory, PmemsaveGuestMemory
from cma_qemu.machine.qmp import AttachedMachine, EventHub, QmpEvent, attach
from cma_qemu.machine.verify import verify_reservations

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
