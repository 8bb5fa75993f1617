"""A first-fit page bitmap like mainline Linux ``mm/cma.c`` (name ``"bitmap"``).

Mainline CMA keeps one bit per page and calls ``bitmap_find_next_zero_area_off()`` with an
alignment mask, starting from page 0 every time. Here the bitmap is a ``bytearray`` with one
byte per page (0 free, 1 used), because CPython finds runs of zero bytes with
``bytearray.find`` in C, far faster than any bit twiddling in Python. It is the baseline that
best-fit is compared with: allocation cost grows with the region, not with the number of holes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import ClassVar

from cma_qemu.allocators.base import Allocator
from cma_qemu.attributes import PAGE_SIZE
from cma_qemu.errors import EBUSY, EINVAL

__all__ = ["BitmapAllocator"]

_FREE = 0
_USED = 1
_ZERO_RUNS = re.compile(b"\0+")


class BitmapAllocator(Allocator):
    """First fit over a page bitmap; regions must start and end on page boundaries.

    Costs use p for the region's pages; construction is O(p) (the zeroed map). The scans run
    in C (``bytearray.find``, ``re``), so their constant is small.
    """

    name: ClassVar[str] = "bitmap"

    def __init__(self, start: int, size: int) -> None:
        if start < 0 or size <= 0 or start % PAGE_SIZE or size % PAGE_SIZE:
            raise EINVAL(
                f"cannot manage {size:#x} bytes at {start:#x}: not whole pages", where="bitmap"
            )
        super().__init__(start, size)
        self._base_pfn = start // PAGE_SIZE
        self._pages = size // PAGE_SIZE
        self._map = bytearray(self._pages)
        #: Needles of n zero / n one bytes, cached because sizes repeat.
        self._zeros: dict[int, bytes] = {}
        self._ones: dict[int, bytes] = {}

    def alloc(self, size: int, alignment: int) -> int | None:
        """First fit: the lowest aligned run of free pages (``bitmap_find_next_zero_area_off``).

        Runtime complexity: O(p) per scan for the free run (from the bottom of the map, as
        mainline scans); an alignment miss scans on from the next aligned page.
        """
        if size <= 0 or size % PAGE_SIZE:
            raise EINVAL(f"size {size:#x} is not a positive number of pages", where="bitmap")
        if alignment <= 0 or alignment & (alignment - 1):
            raise EINVAL(f"alignment {alignment:#x} is not a power of two", where="bitmap")
        nr = size // PAGE_SIZE
        if nr > self._pages:
            return None
        zeros = self._zeros.get(nr)
        if zeros is None:
            zeros = self._zeros[nr] = bytes(nr)
        bitmap = self._map
        # Align absolute page numbers, like mainline's align_offset for unaligned bases.
        mask = max(alignment // PAGE_SIZE, 1) - 1
        offset = self._base_pfn & mask
        pos = 0
        while True:
            found = bitmap.find(zeros, pos)
            if found < 0:
                return None
            aligned = ((found + offset + mask) & ~mask) - offset
            if aligned == found:
                break
            # No aligned run starts before ``aligned``: look again from there.
            pos = aligned
        ones = self._ones.get(nr)
        if ones is None:
            ones = self._ones[nr] = b"\1" * nr
        bitmap[found : found + nr] = ones
        return self.start + found * PAGE_SIZE

    def free(self, start: int, size: int) -> None:
        """Clear the pages; EINVAL (and no change) unless every page in the range is in use.

        Runtime complexity: O(n) for a chunk of n pages.
        """
        first, rest = divmod(start - self.start, PAGE_SIZE)
        nr, partial = divmod(size, PAGE_SIZE)
        if rest or partial or nr <= 0 or first < 0 or first + nr > self._pages:
            raise EINVAL(
                f"free of {size:#x}@{start:#x} is not whole pages inside the region "
                f"{self.size:#x}@{self.start:#x}",
                where="bitmap",
            )
        bitmap = self._map
        if bitmap.find(_FREE, first, first + nr) >= 0:
            raise EINVAL(f"free of {size:#x}@{start:#x} overlaps free pages", where="bitmap")
        zeros = self._zeros.get(nr)
        if zeros is None:
            zeros = self._zeros[nr] = bytes(nr)
        bitmap[first : first + nr] = zeros

    def reserve(self, start: int, size: int) -> bool:
        """Set the pages of ``[start, start+size)`` if all are free: O(pages)."""
        first, rest = divmod(start - self.start, PAGE_SIZE)
        nr, partial = divmod(size, PAGE_SIZE)
        if rest or partial or nr <= 0 or first < 0 or first + nr > self._pages:
            return False
        bitmap = self._map
        if bitmap.find(_USED, first, first + nr) >= 0:
            return False
        bitmap[first : first + nr] = b"\1" * nr
        return True

    def holes(self) -> Iterator[tuple[int, int]]:
        """Maximal runs of free pages in address order (a snapshot taken at the first next()).

        Runtime complexity: O(p).
        """
        start = self.start
        for run in list(_ZERO_RUNS.finditer(self._map)):
            yield start + run.start() * PAGE_SIZE, (run.end() - run.start()) * PAGE_SIZE

    def largest_free(self) -> int:
        """Longest free run: a scan of the whole map in C (mainline's ``maxchunk`` scans too).

        Runtime complexity: O(p).
        """
        longest = max((r.end() - r.start() for r in _ZERO_RUNS.finditer(self._map)), default=0)
        return longest * PAGE_SIZE

    def cleanup(self) -> None:
        """EBUSY while any page is still in use. Runtime complexity: O(p)."""
        used = self._pages - self._map.count(_FREE)
        if used:
            raise EBUSY(
                f"region {self.size:#x}@{self.start:#x} still has {used} pages allocated",
                where="bitmap",
            )
