"""Checking, from inside the booted guest, that it honoured every ``/reserved-memory`` node.

A DTB node the kernel did not like is not an error at boot: the kernel logs a line and uses the
range as ordinary RAM, and the agent would then hand out memory the guest kernel also uses.
So after boot the agent reads ``dmesg``, ``/proc/iomem`` and the node names under
``/proc/device-tree/reserved-memory`` over the console:

* any "failed to reserve memory", "unsupported node format" or "OVERLAP DETECTED" line from the
  reserved-memory code is an error;
* a ``no-map`` region is a hole in "System RAM" (ARM lists it as a top-level ``reserved``
  entry instead), so any reservation that still overlaps a "System RAM" entry is an error;
* "Reserved memory: created DMA memory pool at ..." lines (nodes with the default
  ``shared-dma-pool`` compatible) are parsed; a pool at a reservation's base must have its
  size (the kernel prints whole MiB);
* each reservation has its node, named as :func:`~cma_qemu.machine.devicetree.node_name`
  names it (the node name is what carries the region's name into the guest), in the guest's
  live tree, and when the kernel logs "initialized node NAME" for a pool at a reservation's
  base, NAME is that node.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cma_qemu.errors import EADDRINUSE, EIO
from cma_qemu.machine.devicetree import node_name
from cma_qemu.units import ranges_overlap

__all__ = [
    "RESERVED_MEMORY_DIR",
    "IomemEntry",
    "ReservedMemoryLog",
    "parse_iomem",
    "parse_reserved_memory_log",
    "system_ram",
    "verify_reservations",
]


#: Where the guest's live device tree shows the ``/reserved-memory`` children.
RESERVED_MEMORY_DIR = "/proc/device-tree/reserved-memory"


class ConsoleLike(Protocol):
    """What verification needs from a console: run a command, get output and status."""

    async def run(self, cmd: str, timeout: float = ...) -> tuple[str, int]: ...


@dataclass(frozen=True, slots=True)
class IomemEntry:
    """One ``/proc/iomem`` line: ``[start, end)`` (iomem prints an inclusive end)."""

    start: int
    end: int
    name: str
    depth: int

    def overlaps(self, start: int, size: int) -> bool:
        return ranges_overlap(start, start + size, self.start, self.end)


_IOMEM = re.compile(
    r"^(?P<indent>\s*)(?P<start>[0-9a-fA-F]+)-(?P<end>[0-9a-fA-F]+) : (?P<name>.*)$"
)


def parse_iomem(text: str) -> list[IomemEntry]:
    """Parse ``/proc/iomem`` (nesting is two spaces per level)."""
    out = []
    for line in text.replace("\r", "").splitlines():
        m = _IOMEM.match(line.rstrip())
        if m is None:
            continue
        start, end = int(m.group("start"), 16), int(m.group("end"), 16) + 1
        out.append(IomemEntry(start, end, m.group("name").strip(), len(m.group("indent")) // 2))
    return out


def system_ram(entries: Sequence[IomemEntry]) -> list[IomemEntry]:
    """The top-level "System RAM" entries."""
    return [e for e in entries if e.depth == 0 and e.name == "System RAM"]


@dataclass(frozen=True, slots=True)
class ReservedMemoryLog:
    """What the kernel said about ``/reserved-memory``: failures and DMA pools it created."""

    errors: tuple[str, ...]
    #: (base, size in bytes) from "created DMA memory pool at BASE, size N MiB"
    pools: tuple[tuple[int, int], ...]
    #: (node name, base or None) from "OF: reserved mem: initialized node NAME, compatible id
    #: ..." (the base of the pool created just before it, if any)
    initialized: tuple[tuple[str, int | None], ...]


_RMEM_ERROR = re.compile(
    r"failed to reserve memory|unsupported node format|OVERLAP DETECTED|"
    r"regions without no-map are not yet supported|failed to allocate memory for node",
    re.IGNORECASE,
)
_RMEM_POOL = re.compile(
    r"Reserved memory: created (?:DMA|CMA) memory pool at (?P<base>0x[0-9a-fA-F]+), "
    r"size (?P<size>\d+) MiB"
)
_RMEM_INIT = re.compile(r"reserved mem: initialized node (?P<node>\S+), compatible id ")
_DMESG_PREFIX = re.compile(r"^<\d+>|^\[\s*\d+\.\d+\]\s*")


def parse_reserved_memory_log(dmesg: str) -> ReservedMemoryLog:
    """Pick the reserved-memory lines out of a kernel log."""
    errors: list[str] = []
    pools: list[tuple[int, int]] = []
    inits: list[tuple[str, int | None]] = []
    pool_base: int | None = None  # the kernel logs a node's pool, then the node's name
    for raw in dmesg.replace("\r", "").splitlines():
        line = _DMESG_PREFIX.sub("", raw).strip()
        if _RMEM_ERROR.search(line):
            errors.append(line)
        if (m := _RMEM_POOL.search(line)) is not None:
            pool_base = int(m.group("base"), 16)
            pools.append((pool_base, int(m.group("size")) << 20))
        elif (m := _RMEM_INIT.search(line)) is not None:
            inits.append((m.group("node"), pool_base))
            pool_base = None
    return ReservedMemoryLog(tuple(errors), tuple(pools), tuple(inits))


async def verify_reservations(
    console: ConsoleLike,
    reservations: Sequence[tuple[str | None, int, int]],
    *,
    timeout: float = 30.0,
) -> None:
    """Raise EIO/EADDRINUSE if the guest did not honour every reservation (see module doc)."""
    dmesg, status = await console.run("dmesg", timeout)
    if status != 0:
        raise EIO(f"dmesg failed in the guest (status {status})", where="guest")
    iomem_text, status = await console.run("cat /proc/iomem", timeout)
    if status != 0:
        raise EIO(f"cannot read /proc/iomem in the guest (status {status})", where="guest")
    listing, status = await console.run(f"ls -1 {RESERVED_MEMORY_DIR}", timeout)
    if status != 0:
        raise EIO(
            f"cannot list {RESERVED_MEMORY_DIR} in the guest (status {status})", where="guest"
        )
    check_reservations(dmesg, iomem_text, reservations, listing.split())


def check_reservations(
    dmesg: str,
    iomem_text: str,
    reservations: Sequence[tuple[str | None, int, int]],
    nodes: Sequence[str] | None = None,
) -> None:
    """The pure part of :func:`verify_reservations`, for tests and offline logs.

    ``nodes`` are the names under the guest's ``/proc/device-tree/reserved-memory`` (None:
    not checked).
    """
    rlog = parse_reserved_memory_log(dmesg)
    if rlog.errors:
        raise EIO(
            "the guest kernel rejected a reserved-memory node: " + "; ".join(rlog.errors),
            where="guest",
        )
    entries = parse_iomem(iomem_text)
    if entries and all(e.start == 0 for e in entries):
        raise EIO("/proc/iomem shows no addresses (not running as root?)", where="guest")
    ram = system_ram(entries)
    if not ram:
        raise EIO("no System RAM in the guest's /proc/iomem", where="guest")
    pool_bases = {base: size for base, size in rlog.pools}
    initialized = {base: node for node, base in rlog.initialized if base is not None}
    listed = None if nodes is None else set(nodes)
    for name, start, size in reservations:
        label = name or "private region"
        node = node_name(name, start)
        if listed is not None and node not in listed:
            raise EIO(
                f"{label} at {start:#x}: the guest's device tree has no "
                f"{RESERVED_MEMORY_DIR}/{node}",
                where="guest",
            )
        if initialized.get(start, node) != node:
            raise EIO(
                f"{label} at {start:#x}: the kernel initialized node {initialized[start]} "
                f"there, not {node}",
                where="guest",
            )
        for entry in ram:
            if entry.overlaps(start, size):
                raise EADDRINUSE(
                    f"{label} {start:#x}-{start + size - 1:#x} is still System RAM in the "
                    f"guest ({entry.start:#x}-{entry.end - 1:#x}): the kernel ignored its "
                    "no-map node",
                    where="guest",
                )
        if pool_bases and start in pool_bases and pool_bases[start] != size >> 20 << 20:
            raise EIO(
                f"{label} at {start:#x}: the kernel made a pool of {pool_bases[start]:#x} "
                f"bytes, the node asked for {size:#x}",
                where="guest",
            )
