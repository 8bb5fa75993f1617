"""The framework of a board plus overrides, built one way for every user: the agent at boot or
attach, ``cma-qemu replay`` offline, ``qemu-command`` and the labgrid driver, so offline and
live placement agree.
"""

from __future__ import annotations

from collections.abc import Sequence

from cma_qemu.boards import Board
from cma_qemu.errors import EINVAL
from cma_qemu.framework import Cma
from cma_qemu.regions import RamBank, ReservedRange

__all__ = ["build_cma", "use_allocator"]


def build_cma(
    *,
    board: Board | None = None,
    regions: str | None = None,
    ram: Sequence[RamBank] = (),
    map_text: str | None = None,
    asterisk: str | None = None,
    keep_free: Sequence[ReservedRange] = (),
    allocator: str | None = None,
) -> Cma:
    """Boot a framework the way the agent does: board defaults, ``--cma`` replacing regions.

    ``--map`` and ``--asterisk`` are applied after boot, as the monitor's writes would be;
    ``allocator`` puts every region on that allocator.
    """
    if board is not None:
        cma = Cma.from_attributes(
            board.regions if regions is None else regions,
            board.map,
            board.asterisk,
            ram=board.ram,
            keep_free=(*board.keep_free, *keep_free),
        )
    else:
        if not ram:
            raise EINVAL("replay needs --board, or --cma with at least one --ram BASE:SIZE")
        cma = Cma.from_attributes(regions or "", None, None, ram=ram, keep_free=keep_free)
    if map_text is not None:
        cma.set_map(map_text)
    if asterisk is not None:
        cma.set_asterisk(asterisk)
    if allocator is not None:
        use_allocator(cma, allocator)
    return cma


def use_allocator(cma: Cma, name: str) -> None:
    """Put every region on the allocator ``name`` (EINVAL naming the loaded ones if unknown)."""
    if cma.registry.get(name) is None:
        known = ", ".join(cma.registry.names())
        raise EINVAL(f"no allocator named {name!r} (loaded: {known})")
    for region in cma.regions:
        cma.set_region_allocator(region, name)
