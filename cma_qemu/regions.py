"""Regions and early placement: what ``cma_early_regions_reserve`` did with memblock.

An :class:`EarlyRegion` is a wish (a size, maybe a start); :func:`place_early_regions` turns
the wishes into addresses inside the board's RAM, never on top of what QEMU loads there, and
a :class:`Region` is a placed, registered range that an allocator manages.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cma_qemu.allocators.base import Allocator
from cma_qemu.attributes import PAGE_SIZE
from cma_qemu.errors import EADDRINUSE, EINVAL, ENOMEM
from cma_qemu.units import align_up, ranges_overlap

__all__ = [
    "MAX_ADDRESS",
    "EarlyRegion",
    "RamBank",
    "RamLayout",
    "Region",
    "ReservedRange",
    "align_up",
    "describe_range",
    "place_early_regions",
]

#: Guest physical addresses are 64-bit (LPAE) at most.
MAX_ADDRESS = (1 << 64) - 1


def describe_range(start: int, size: int) -> str:
    """``0x40000000-0x40ffffff`` (inclusive end, as /proc/iomem prints it)."""
    return f"{start:#x}-{start + size - 1:#x}"


@dataclass(frozen=True)
class RamBank:
    """One contiguous bank of guest RAM."""

    base: int
    size: int

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.base + self.size


@dataclass(frozen=True)
class ReservedRange:
    """A range early regions must not touch, with the label a conflict error shows."""

    label: str
    start: int
    size: int

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.start + self.size


@dataclass(frozen=True)
class RamLayout:
    """The board's RAM banks and the ranges in them that are already spoken for."""

    banks: tuple[RamBank, ...]
    keep_free: tuple[ReservedRange, ...] = ()

    def describe(self) -> str:
        """The banks as ``0x40000000-0x5fffffff`` joined with ``, ``."""
        return ", ".join(describe_range(b.base, b.size) for b in self.banks)


@dataclass
class EarlyRegion:
    """A region asked for before the allocator is up, normalised like the kernel did.

    ``start`` is the start the attribute asked for, or None for "anywhere"; placement then
    writes the chosen start into it and sets ``reserved``. So :attr:`fixed` tells a fixed
    region from an "anywhere" one only before placement.
    """

    name: str | None
    size: int
    alignment: int = PAGE_SIZE
    start: int | None = None
    allocator_name: str | None = None
    in_asterisk: bool = True
    reserved: bool = False

    @property
    def fixed(self) -> bool:
        """True while ``start`` is set.

        Before :func:`place_early_regions` that means the caller asked for this exact start
        (a conflict is then an error, not a move); after placement every reserved region has
        a start, so it is true for all of them and says nothing about what was asked.
        """
        return self.start is not None

    @property
    def label(self) -> str:
        """How errors name this region."""
        return f"region '{self.name}'" if self.name else "private region"


def _merged_banks(banks: Iterable[RamBank]) -> list[tuple[int, int]]:
    """Banks as [start, end) spans with touching banks merged, like memblock.memory."""
    spans: list[tuple[int, int]] = []
    for bank in sorted(banks, key=lambda b: b.base):
        if spans and spans[-1][1] >= bank.base:
            spans[-1] = (spans[-1][0], max(spans[-1][1], bank.end))
        else:
            spans.append((bank.base, bank.end))
    return spans


def place_early_regions(
    regions: Sequence[EarlyRegion], layout: RamLayout
) -> list[tuple[EarlyRegion, int]]:
    """Choose a start for every region, or raise without choosing any.

    Regions with a start get exactly ``[start, start+size)`` or an error naming both ranges;
    the others go top-down at their alignment into what is left, like memblock. Fixed regions
    are placed first so an "anywhere" region never takes the spot a later fixed one asked for
    (the 2010 code placed them in list order and could fail on valid input).
    """
    spans = _merged_banks(layout.banks)
    taken: list[ReservedRange] = list(layout.keep_free)
    placed: dict[int, int] = {}
    order = [i for i, r in enumerate(regions) if r.fixed] + [
        i for i, r in enumerate(regions) if not r.fixed
    ]
    for index in order:
        region = regions[index]
        if region.size <= 0:
            raise EINVAL(f"{region.label} has size 0")
        if region.start is not None:
            start = region.start
            end = start + region.size
            if not any(lo <= start and end <= hi for lo, hi in spans):
                raise ENOMEM(
                    f"{region.label} {describe_range(start, region.size)} is not inside RAM "
                    f"({layout.describe()})"
                )
            for other in taken:
                if ranges_overlap(start, end, other.start, other.end):
                    raise EADDRINUSE(
                        f"{region.label} {describe_range(start, region.size)} overlaps "
                        f"{other.label} {describe_range(other.start, other.size)}"
                    )
        else:
            start = _top_down(region, spans, taken, layout)
        placed[index] = start
        taken.append(ReservedRange(region.label, start, region.size))
    return [(regions[i], placed[i]) for i in sorted(placed)]


def _top_down(
    region: EarlyRegion,
    spans: list[tuple[int, int]],
    taken: list[ReservedRange],
    layout: RamLayout,
) -> int:
    """The highest aligned start where the region fits between taken ranges."""
    blockers = sorted(taken, key=lambda r: r.start)
    for lo, hi in reversed(spans):
        # Free gaps inside this span, highest first.
        gaps: list[tuple[int, int]] = []
        cursor = lo
        for block in blockers:
            if block.end <= lo or block.start >= hi:
                continue
            if block.start > cursor:
                gaps.append((cursor, block.start))
            cursor = max(cursor, block.end)
        if cursor < hi:
            gaps.append((cursor, hi))
        for gap_lo, gap_hi in reversed(gaps):
            candidate = (gap_hi - region.size) & ~(region.alignment - 1)
            if candidate >= gap_lo and gap_hi - gap_lo >= region.size:
                return candidate
    raise ENOMEM(
        f"{region.label} of {region.size:#x} bytes (alignment {region.alignment:#x}) does not "
        f"fit in the free RAM of {layout.describe()}"
    )


@dataclass(eq=False)
class Region:
    """A registered region: a placed range whose free space one allocator instance manages.

    The fields are public for reading, like ``struct cma_region`` in the 2010 ``cma.h``, and
    each field's comment says who may write it, as that header's kerneldoc does. *Read only*:
    set when the region is registered and never changed. *Framework*: written only by
    :class:`Cma` under its lock (callers change them through ``Cma`` methods). *Private*: the
    framework's bookkeeping of the allocator attachment. (The header's *Early* fields are
    :class:`EarlyRegion` here.)
    """

    #: Read only. The region's name; None for a private region (reached only by address).
    name: str | None
    #: Read only. Physical start address (page aligned).
    start: int
    #: Read only. Size in bytes (a page multiple).
    size: int
    #: Framework. The allocator the region asks for (None: the registry's default); changed
    #: only by ``Cma.set_region_allocator``.
    allocator_name: str | None = None
    #: Read only. Whether the derived asterisk list includes the region (no ``-`` prefix).
    in_asterisk: bool = False
    #: Framework. Bytes not in any chunk (``free_space`` in the 2010 struct).
    free_space: int = 0
    #: Private. The attached allocator instance (``private_data``), created on first use.
    allocator: Allocator | None = None
    #: Private. The 2010 ``used`` bit: a failed attach is not retried until an allocator
    #: registers.
    attach_failed: bool = False
    #: Framework. Live chunks in the region (v3 ``users``); unregistering needs 0.
    users: int = 0
    #: Framework. Statistics counters, in pages, with mainline's names.
    alloc_pages_success: int = 0
    alloc_pages_fail: int = 0
    release_pages_success: int = 0

    def __post_init__(self) -> None:
        if not self.free_space:
            self.free_space = self.size

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.start + self.size

    @property
    def attached(self) -> str | None:
        """Name of the allocator attached now, if any."""
        return self.allocator.name if self.allocator is not None else None

    @property
    def label(self) -> str:
        """How errors and tables name this region."""
        return self.name if self.name else f"<private@{self.start:#x}>"

    def holes(self) -> list[tuple[int, int]]:
        """Free blocks as (start, size); the whole region while no allocator is attached."""
        if self.allocator is None:
            return [(self.start, self.size)]
        return list(self.allocator.holes())

    def largest_free(self) -> int:
        """The biggest block one allocation could get right now."""
        if self.allocator is None:
            return self.size
        return self.allocator.largest_free()
