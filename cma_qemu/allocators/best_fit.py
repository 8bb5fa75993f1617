"""The best-fit allocator of the 2010 patch set (``mm/cma-best-fit.c``, name ``"bf"``).

The algorithm is described in docs/semantics.md ("Best fit"), with the intended fix: an
alignment miss walks on to the next larger hole instead of dereferencing NULL. Holes live in
two sorted lists, like the two red-black trees of the C code:

* ``by_start``: hole starts in address order, with a dict start -> end beside it, for the
  overlap check and coalescing on free, and for :meth:`holes`;
* ``by_size``: one integer key per hole, ``size << 64 | start``, so the smallest hole comes
  first and equal sizes go lowest address first. Plain ints compare much faster than tuples
  in CPython, which is where most of the time goes.

Every operation is O(log n) in the number of holes (sortedcontainers' list-of-lists, so in
practice a couple of bisects and a short ``list.insert``), except that an alignment miss may
walk over holes that are big enough but cannot hold the aligned block.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

from sortedcontainers import SortedList

from cma_qemu.allocators.base import Allocator
from cma_qemu.errors import EBUSY, EINVAL

__all__ = ["BestFitAllocator"]

#: Bits reserved for the start address in a ``by_size`` key; addresses are below 2**64.
_SHIFT = 64
_MASK = (1 << _SHIFT) - 1


def _check_alignment(alignment: int) -> None:
    """The framework passes powers of two; anything else would silently misplace a chunk."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise EINVAL(f"alignment {alignment:#x} is not a power of two", where="bf")


class BestFitAllocator(Allocator):
    """Best fit over a set of free holes; one instance per region.

    Costs use h for the number of holes; construction is O(1).
    """

    name: ClassVar[str] = "bf"

    def __init__(self, start: int, size: int) -> None:
        if start < 0 or size <= 0 or start + size > 1 << _SHIFT:
            raise EINVAL(f"cannot manage {size:#x} bytes at {start:#x}", where="bf")
        super().__init__(start, size)
        self._end = start + size
        #: start -> end (one past the last byte) of every hole.
        self._hole_end: dict[int, int] = {start: self._end}
        self._by_start = SortedList([start])
        self._by_size = SortedList([size << _SHIFT | start])

    # -- the Allocator interface -------------------------------------------------------------

    def alloc(self, size: int, alignment: int) -> int | None:
        """Take ``size`` bytes from the smallest hole that holds them aligned.

        Runtime complexity: O(log h), plus one step per hole that is big enough but cannot
        hold the block at ``alignment`` (only alignments above the page size can miss).
        """
        if size <= 0:
            raise EINVAL(f"size {size:#x} must be positive", where="bf")
        _check_alignment(alignment)
        mask = alignment - 1
        for key in self._by_size.irange(minimum=size << _SHIFT):
            hstart: int = key & _MASK
            hend: int = hstart + (key >> _SHIFT)
            s = (hstart + mask) & ~mask
            if s + size <= hend:
                break
        else:
            return None
        return self._take(key, hstart, hend, s, size, alignment)

    def free(self, start: int, size: int) -> None:
        """Turn ``[start, start+size)`` back into a hole, merged with adjacent holes.

        A range that leaves the region or overlaps a hole (a double free) raises EINVAL and
        changes nothing, where the C code only warned and leaked.

        Runtime complexity: O(log h).
        """
        end = start + size
        if size <= 0 or start < self.start or end > self._end:
            raise EINVAL(
                f"free of {size:#x}@{start:#x} is outside the region "
                f"{self.size:#x}@{self.start:#x}",
                where="bf",
            )
        hole_end = self._hole_end
        by_start = self._by_start
        by_size = self._by_size
        # The hole with the greatest start below ``end``: it overlaps iff it ends after
        # ``start``; if it does not, no earlier hole can either.
        pred: int | None = next(
            by_start.irange(maximum=end, inclusive=(True, False), reverse=True), None
        )
        new_start = start
        if pred is not None:
            pred_end = hole_end[pred]
            if pred_end > start:
                raise EINVAL(
                    f"free of {size:#x}@{start:#x} overlaps the free block "
                    f"{pred_end - pred:#x}@{pred:#x}",
                    where="bf",
                )
            if pred_end == start:
                by_size.remove((pred_end - pred) << _SHIFT | pred)
                new_start = pred
        if new_start == start:
            by_start.add(start)
        new_end = end
        succ_end = hole_end.pop(end, None)
        if succ_end is not None:
            by_size.remove((succ_end - end) << _SHIFT | end)
            by_start.remove(end)
            new_end = succ_end
        hole_end[new_start] = new_end
        by_size.add((new_end - new_start) << _SHIFT | new_start)

    def reserve(self, start: int, size: int) -> bool:
        """Carve ``[start, start+size)`` out of the hole that holds all of it: O(log n)."""
        end = start + size
        if size <= 0 or start < self.start or end > self._end:
            return False
        hstart: int | None = next(self._by_start.irange(maximum=start, reverse=True), None)
        if hstart is None:
            return False
        hend = self._hole_end[hstart]
        if hend < end:
            return False
        self._by_size.remove((hend - hstart) << _SHIFT | hstart)
        self._by_start.remove(hstart)
        del self._hole_end[hstart]
        for piece_start, piece_end in ((hstart, start), (end, hend)):
            if piece_end > piece_start:
                self._by_start.add(piece_start)
                self._hole_end[piece_start] = piece_end
                self._by_size.add((piece_end - piece_start) << _SHIFT | piece_start)
        return True

    def holes(self) -> Iterator[tuple[int, int]]:
        """Free blocks in address order; they are always maximal because free() merges.

        Runtime complexity: O(h) (a snapshot of the starts is taken first).
        """
        hole_end = self._hole_end
        for start in list(self._by_start):
            yield start, hole_end[start] - start

    def largest_free(self) -> int:
        """The last ``by_size`` key. Runtime complexity: O(1)."""
        by_size = self._by_size
        return int(by_size[-1] >> _SHIFT) if by_size else 0

    def cleanup(self) -> None:
        """Like the C code, insist on one hole; we also insist it is the whole region.

        Runtime complexity: O(1), or O(h) to word the EBUSY error.
        """
        if len(self._by_start) != 1 or self._hole_end.get(self.start) != self._end:
            raise EBUSY(
                f"region {self.size:#x}@{self.start:#x} still has "
                f"{self.size - self.free_bytes():#x} bytes allocated",
                where="bf",
            )

    # -- helpers -------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Sum of the holes; the framework keeps its own ``free_space`` counter.

        Runtime complexity: O(h).
        """
        hole_end = self._hole_end
        return sum(hole_end[s] - s for s in self._by_start)

    def _take(self, key: int, hstart: int, hend: int, s: int, size: int, alignment: int) -> int:
        """Carve the chunk ``[s, s+size)`` out of the hole ``[hstart, hend)`` (cases 1-3)."""
        by_size = self._by_size
        by_start = self._by_start
        hole_end = self._hole_end
        by_size.remove(key)
        if s == hstart:
            if s + size == hend:
                # (1) exact fit: the hole disappears.
                by_start.remove(hstart)
                del hole_end[hstart]
                return s
            # (2) at the start: the hole begins after the chunk (same place in address order,
            # but sortedcontainers has no in-place replace, so remove + add).
            new_start = hstart + size
            by_start.remove(hstart)
            by_start.add(new_start)
            del hole_end[hstart]
            hole_end[new_start] = hend
            by_size.add((hend - new_start) << _SHIFT | new_start)
            return s
        left = hend - (s + size)
        if left:
            # (3) in the middle.
            if left % alignment == 0:
                # The aligned end of the hole is free too: go there, leaving one fragment.
                s += left
            else:
                tail = s + size
                by_start.add(tail)
                hole_end[tail] = hend
                by_size.add(left << _SHIFT | tail)
        # (2) at the end: the hole keeps its start and ends where the chunk begins.
        hole_end[hstart] = s
        by_size.add((s - hstart) << _SHIFT | hstart)
        return s
