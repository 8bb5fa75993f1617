"""One profile per QEMU machine type, what the machine layer reads from a board, and the RAM
it spans.

Every fact that differs between machine types (console tty, how the host reads guest RAM,
where the device tree comes from, the console UART's FIFO register, whether ``-m`` is
honoured, ...) is a field of :class:`MachineProfile`, so the rest of the stack asks the
profile instead of comparing machine type names. :class:`cma_qemu.boards.Board` satisfies
:class:`BoardLike`; the machine layer never imports the board files' module, so a test or a
harness can hand it anything with these fields. This module imports nothing heavy: the
board-file loader uses it for validation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Protocol

from cma_qemu.errors import EINVAL

__all__ = [
    "PROFILES",
    "BoardLike",
    "ChannelLike",
    "DtbSource",
    "MachineProfile",
    "MemoryAccess",
    "RamBankLike",
    "machine_profile",
    "profile_of",
    "ram_extent",
]

MemoryAccess = Literal["mmap", "pmemsave"]
#: ``"qemu"``: QEMU's own tree (``-machine dumpdtb=``); ``"image"``: the guest image's DTB.
DtbSource = Literal["qemu", "image"]


@dataclass(frozen=True, slots=True)
class MachineProfile:
    """What this project knows about one QEMU ``-M`` machine type."""

    machine_type: str
    #: The Debian armhf kernel flavour a board gets unless its file names one.
    kernel_flavour: str
    #: The guest's console tty (``console=`` on the kernel command line).
    console: str
    #: How the host reads guest RAM: mmap of a shared RAM file, or QMP ``pmemsave``.
    memory_access: MemoryAccess
    #: QEMU honours ``-m`` and ``memory-backend=`` (smdkc210 always has 1 GiB and ignores both).
    honours_ram_size: bool
    dtb_source: DtbSource
    #: The device tree's UARTs name DMA channels QEMU does not emulate: drop them.
    drop_uart_dma: bool
    #: Guest physical address of the console UART's receive FIFO status register; when set,
    #: console input is typed in bursts of ``console_burst`` bytes once the FIFO has room.
    console_fifo_status: int | None
    console_burst: int
    #: Channel kinds the machine can wire (``virtio-serial`` needs a virtio bus).
    channel_kinds: tuple[str, ...]
    #: All RAM is one block, so a board's banks must touch.
    contiguous_ram: bool
    #: Host writes to guest RAM go through QEMU's gdbstub (no shared RAM file to write).
    gdbstub_writes: bool = False


#: UFSTAT of the Exynos4210's UART0 (the smdkc210 console): its receive FIFO level.
_EXYNOS_UART0_UFSTAT = 0x13800018

PROFILES: Mapping[str, MachineProfile] = MappingProxyType(
    {
        "virt": MachineProfile(
            machine_type="virt",
            kernel_flavour="armmp-lpae",
            console="ttyAMA0",
            memory_access="mmap",
            honours_ram_size=True,
            dtb_source="qemu",
            drop_uart_dma=False,
            console_fifo_status=None,
            console_burst=0,
            channel_kinds=("virtio-serial", "uart"),
            contiguous_ram=True,
        ),
        "smdkc210": MachineProfile(
            machine_type="smdkc210",
            kernel_flavour="armmp",
            console="ttySAC0",
            memory_access="pmemsave",
            honours_ram_size=False,
            dtb_source="image",
            drop_uart_dma=True,
            # QEMU 7.2's Exynos UART loses a receive FIFO filled to 64 bytes.
            console_fifo_status=_EXYNOS_UART0_UFSTAT,
            console_burst=16,
            # net: the LAN9215 (QEMU's lan9118) at 0x05000000 (see machine/devicetree.py)
            channel_kinds=("uart", "net"),
            contiguous_ram=False,
            gdbstub_writes=True,
        ),
    }
)


def machine_profile(machine_type: str, what: str = "profile") -> MachineProfile:
    """The profile of ``machine_type``; EINVAL naming ``what`` is missing otherwise. O(1)."""
    try:
        return PROFILES[machine_type]
    except KeyError:
        raise EINVAL(
            f"no {what} known for QEMU machine {machine_type!r} (known: {', '.join(PROFILES)})",
            where="machine",
        ) from None


class RamBankLike(Protocol):
    @property
    def base(self) -> int: ...
    @property
    def size(self) -> int: ...


class ChannelLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def rx_fifo_status(self) -> int | None: ...
    @property
    def rx_fifo_size(self) -> int: ...


class BoardLike(Protocol):
    """The fields of a board the machine layer reads."""

    @property
    def name(self) -> str: ...
    @property
    def machine_type(self) -> str: ...
    @property
    def cpu(self) -> str | None: ...
    @property
    def kernel_flavour(self) -> str: ...
    @property
    def ram(self) -> Sequence[RamBankLike]: ...
    @property
    def channel(self) -> ChannelLike: ...
    @property
    def memory_access(self) -> str: ...


def ram_extent(board: BoardLike) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """``(base, total size, banks)`` of a board's RAM."""
    banks = tuple((b.base, b.size) for b in board.ram)
    return min(b for b, _ in banks), sum(s for _, s in banks), banks


def profile_of(board: BoardLike, what: str = "profile") -> MachineProfile:
    """The profile of the board's machine type (EINVAL for one this project does not know)."""
    return machine_profile(board.machine_type, what)
