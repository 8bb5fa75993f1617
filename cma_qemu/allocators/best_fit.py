"""The best-fit allocator of the 2010 patch set (``mm/cma-best-fit.c``, name ``"bf"``).

The algorithm is described in docs/semantics.md ("Best fit"), with the intended fix: an
alignment miss walks on to the next larger hole instead of dereferencing NULL. The C code kept
the holes in two red-black trees, by size and by start; here the same questions are answered
by structures that cost less per call in CPython:

* by size: ``_sizes``, the distinct hole sizes in order (a plain sorted list, changed only
  when a size appears or disappears; k distinct sizes sum to at most the region, so k stays
  small: below sqrt(2 * region / page) for page-multiple holes), and per size a
  :class:`_Bucket`: a min-heap of hole starts, and the same starts again by their offset in
  a 64 KiB block. The usual request, one whose size some hole has exactly, is two dict
  lookups and a look at a heap's top. Heap entries are dropped lazily: an entry is live
  while ``_hole_end`` still says that hole has that size, and a bucket is compacted when its
  dead entries outnumber its live ones;
* by start: two dicts, start -> end and end -> start, for coalescing on free, and a dict of
  the blocks handed out, which proves a free is not a double free without an ordered search;
* an address-ordered index of hole starts (``_by_start``) only once something needs one:
  :meth:`reserve`, or a free of a range that is not exactly a block handed out (a partial or
  bad free, which must be checked against the holes around it). From then on it is kept up to
  date, at the previous cost of one sorted insert or delete per hole change.

Equal sizes go lowest address first, as before: a heap's top is its lowest start; when it
cannot hold an aligned request, the offset of a start in its 64 KiB block says how much
padding any alignment up to 64 KiB needs there, so the lowest start that fits is the lowest
top among the offset heaps that fit; only a bigger alignment walks, in address order, the
starts at offsets that can fit (see :meth:`BestFitAllocator._lowest_fit`).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort
from collections.abc import Iterator
from heapq import heappop, heappush
from typing import ClassVar

from sortedcontainers import SortedList

from cma_qemu.allocators.base import Allocator
from cma_qemu.errors import EBUSY, EINVAL

__all__ = ["BestFitAllocator"]

#: Addresses handled: below 2**64, like the C code's unsigned long on a 64-bit host.
_LIMIT = 1 << 64
#: A bucket is compacted when its heaps hold more than this many entries beyond twice their
#: live ones (each live hole has two entries: dead ones then outnumber the live ones).
_SLACK_ENTRIES = 16
#: An alignment walk sorts a heap this short in place; a longer one is walked as a heap.
_SORT_BELOW = 64
#: Starts are also filed by their offset in a block of this many bytes, which tells for any
#: alignment up to it whether a start needs padding and how much (16 offsets for page-aligned
#: holes).
_OFFSET_SPAN = 64 << 10
_OFFSET_MASK = _OFFSET_SPAN - 1


def _check_alignment(alignment: int) -> None:
    """The framework passes powers of two; anything else would silently misplace a chunk."""
    if alignment <= 0 or alignment & (alignment - 1):
        raise EINVAL(f"alignment {alignment:#x} is not a power of two", where="bf")


class _Bucket:
    """The holes of one size: their starts in a min-heap, and again by offset in a 64 KiB
    block (``by_offset[start % 64K]``), so a request aligned to at most 64 KiB finds the
    lowest start it fits by looking at one heap top per offset, without walking. Entries of
    dropped holes stay until they reach a heap's top or the bucket is compacted."""

    __slots__ = ("by_offset", "count", "entries", "starts")

    def __init__(self, start: int) -> None:
        self.count = 1  # live holes
        self.starts = [start]
        self.by_offset = {start & _OFFSET_MASK: [start]}
        self.entries = 2  # entries in all the heaps, dead ones included


class BestFitAllocator(Allocator):
    """Best fit over a set of free holes; one instance per region.

    Costs use h for the number of holes, k for the number of distinct hole sizes (k <= h), b
    for the holes of one size; construction is O(1). A size that appears or disappears also
    moves up to k entries of the plain list ``_sizes`` (one memmove; k is small, see the
    module). Heap costs are amortized: a dead entry is popped or compacted away once.
    """

    name: ClassVar[str] = "bf"

    __slots__ = (
        "_buckets",
        "_by_start",
        "_end",
        "_hole_end",
        "_hole_start",
        "_sizes",
        "_used",
    )

    def __init__(self, start: int, size: int) -> None:
        if start < 0 or size <= 0 or start + size > _LIMIT:
            raise EINVAL(f"cannot manage {size:#x} bytes at {start:#x}", where="bf")
        super().__init__(start, size)
        self._end = start + size
        #: start -> end (one past the last byte) of every hole, and end -> start.
        self._hole_end: dict[int, int] = {}
        self._hole_start: dict[int, int] = {}
        #: size -> the holes of that size; ``_sizes`` holds exactly its keys, in order.
        self._buckets: dict[int, _Bucket] = {}
        self._sizes: list[int] = []
        #: start -> size of every block alloc or reserve handed out, while every free so far
        #: named exactly one of them (None after a partial free: then frees use the index).
        self._used: dict[int, int] | None = {}
        #: Hole starts in address order; None until something needs the order.
        self._by_start: SortedList | None = None
        self._add_hole(start, self._end)

    # -- the Allocator interface -------------------------------------------------------------

    def alloc(self, size: int, alignment: int) -> int | None:
        """Take ``size`` bytes from the smallest hole that holds them aligned.

        Runtime complexity: O(log b) when a hole of exactly ``size`` bytes holds the block,
        else O(log k) to find the next size, then per size tried (smallest first, until one
        holds the block): O(log b) for its lowest start and, when that start is misaligned,
        one look per distinct offset of its starts in a 64 KiB block (at most 16 for
        page-aligned holes) for an alignment up to 64 KiB; for a bigger one, a walk in address
        order over the starts at the offsets that can fit, O(log b) a step, up to the first
        fit at each. Plus O(log h) while the address index exists.
        """
        if size <= 0:
            raise EINVAL(f"size {size:#x} must be positive", where="bf")
        if alignment <= 0 or alignment & (alignment - 1):
            _check_alignment(alignment)
        mask = alignment - 1
        bucket = self._buckets.get(size)
        if bucket is not None:
            starts = bucket.starts
            top = starts[0]
            if not top & mask and self._hole_end.get(top) == top + size:
                # The usual case, inline: the lowest hole of exactly this size, aligned
                # already. (1) exact fit: the hole disappears.
                heappop(starts)
                bucket.entries -= 1
                self._drop_hole(top, top + size)
                if self._used is not None:
                    self._used[top] = size
                return top
            hstart = self._lowest_fit(size, bucket, size, mask)
            if hstart is not None:
                return self._take(hstart, size, size, alignment)
        sizes = self._sizes
        for i in range(bisect_right(sizes, size), len(sizes)):
            hsize = sizes[i]
            hstart = self._lowest_fit(hsize, self._buckets[hsize], size, mask)
            if hstart is not None:
                return self._take(hstart, hsize, size, alignment)
        return None

    def free(self, start: int, size: int) -> None:
        """Turn ``[start, start+size)`` back into a hole, merged with adjacent holes.

        A range that leaves the region or overlaps a hole (a double free) raises EINVAL and
        changes nothing, where the C code only warned and leaked.

        Runtime complexity: O(log b + log k) (amortized) for a block that alloc or reserve
        handed out, plus O(log h) while the address index exists; any other range builds the
        index first (O(h log h), once) and is checked against it.
        """
        end = start + size
        if size <= 0 or start < self.start or end > self._end:
            raise EINVAL(
                f"free of {size:#x}@{start:#x} is outside the region "
                f"{self.size:#x}@{self.start:#x}",
                where="bf",
            )
        # A block handed out is disjoint from every hole by construction; anything else is
        # checked against the holes around it (and from then on every free is).
        used = self._used
        if used is None:
            self._check_free_against_holes(start, end)
        else:
            handed_out = used.pop(start, None)  # one lookup in the usual case
            if handed_out != size:
                if handed_out is not None:
                    used[start] = handed_out  # a different block starts here: put it back
                self._check_free_against_holes(start, end)
                self._used = None  # part of a block (or several) is free now: use the index
        hole_start, hole_end = self._hole_start, self._hole_end
        if start in hole_start:  # the hole before ends where the block begins: merge
            new_start = hole_start[start]
            self._drop_hole(new_start, start)
        else:
            new_start = start
        if end in hole_end:  # and the hole after begins where it ends
            new_end = hole_end[end]
            self._drop_hole(end, new_end)
        else:
            new_end = end
        self._add_hole(new_start, new_end)

    def reserve(self, start: int, size: int) -> bool:
        """Carve ``[start, start+size)`` out of the hole that holds all of it.

        Runtime complexity: O(log h + log k + log b) (the first call builds the address
        index, O(h log h)).
        """
        end = start + size
        if size <= 0 or start < self.start or end > self._end:
            return False
        index = self._index()
        hstart: int | None = next(index.irange(maximum=start, reverse=True), None)
        if hstart is None:
            return False
        hend = self._hole_end[hstart]
        if hend < end:
            return False
        self._drop_hole(hstart, hend)
        if start > hstart:
            self._add_hole(hstart, start)
        if hend > end:
            self._add_hole(end, hend)
        if self._used is not None:
            self._used[start] = size
        return True

    def holes(self) -> Iterator[tuple[int, int]]:
        """Free blocks in address order; they are always maximal because free() merges.

        Runtime complexity: O(h log h) (a sorted snapshot of the starts is taken first; O(h)
        while the address index exists).
        """
        hole_end = self._hole_end
        starts = list(self._by_start) if self._by_start is not None else sorted(hole_end)
        for start in starts:
            yield start, hole_end[start] - start

    def largest_free(self) -> int:
        """The largest distinct hole size. Runtime complexity: O(1)."""
        sizes = self._sizes
        return sizes[-1] if sizes else 0

    def cleanup(self) -> None:
        """Like the C code, insist on one hole; we also insist it is the whole region.

        Runtime complexity: O(1), or O(h) to word the EBUSY error.
        """
        if len(self._hole_end) != 1 or self._hole_end.get(self.start) != self._end:
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
        return sum(end - start for start, end in self._hole_end.items())

    def _index(self) -> SortedList:
        """The address index of hole starts, built on first use: O(h log h) once, then O(1)."""
        if self._by_start is None:
            self._by_start = SortedList(self._hole_end)
        return self._by_start

    def _check_free_against_holes(self, start: int, end: int) -> None:
        """EINVAL if ``[start, end)`` overlaps a hole (a double or overlapping free).

        The hole with the greatest start below ``end`` overlaps iff it ends after ``start``;
        if it does not, no earlier hole can either. O(log h) once the index exists.
        """
        pred: int | None = next(
            self._index().irange(maximum=end, inclusive=(True, False), reverse=True), None
        )
        if pred is not None:
            pred_end = self._hole_end[pred]
            if pred_end > start:
                raise EINVAL(
                    f"free of {end - start:#x}@{start:#x} overlaps the free block "
                    f"{pred_end - pred:#x}@{pred:#x}",
                    where="bf",
                )

    def _add_hole(self, start: int, end: int) -> None:
        """Record the hole ``[start, end)``: O(log b) amortized, O(log k) for a new size."""
        self._hole_end[start] = end
        self._hole_start[end] = start
        size = end - start
        bucket = self._buckets.get(size)
        if bucket is None:
            self._buckets[size] = _Bucket(start)
            insort(self._sizes, size)
        else:
            bucket.count += 1
            heappush(bucket.starts, start)
            by_offset = bucket.by_offset
            offset = start & _OFFSET_MASK
            heap = by_offset.get(offset)
            if heap is None:
                by_offset[offset] = [start]
            else:
                heappush(heap, start)
            bucket.entries += 2
            if bucket.entries > 4 * bucket.count + _SLACK_ENTRIES:
                self._compact(size, bucket)
        if self._by_start is not None:
            self._by_start.add(start)

    def _drop_hole(self, start: int, end: int) -> None:
        """Forget the hole ``[start, end)``; its heap entries die in place: O(1), O(log k) for
        the last hole of its size."""
        del self._hole_end[start]
        del self._hole_start[end]
        size = end - start
        bucket = self._buckets[size]
        bucket.count -= 1
        if not bucket.count:
            del self._buckets[size]
            sizes = self._sizes
            del sizes[bisect_left(sizes, size)]
        if self._by_start is not None:
            self._by_start.remove(start)

    def _compact(self, size: int, bucket: _Bucket) -> None:
        """Keep only the live entries, once each (a sorted list is a heap): O(b log b), paid
        for by the dead entries it drops."""
        hole_end = self._hole_end
        live = sorted({s for s in bucket.starts if hole_end.get(s) == s + size})
        bucket.starts = live
        bucket.by_offset = {}
        for start in live:  # in order, so each list is sorted, hence a heap
            bucket.by_offset.setdefault(start & _OFFSET_MASK, []).append(start)
        bucket.entries = 2 * len(live)

    def _lowest_fit(self, hsize: int, bucket: _Bucket, size: int, mask: int) -> int | None:
        """The lowest start of a ``hsize`` hole that holds ``size`` bytes at ``mask + 1``.

        The heap's top usually does. If not, and the alignment is at most 64 KiB, the
        by-offset heaps answer in one look per offset (at most 16 for page-aligned holes);
        a bigger alignment walks, in address order, the offsets whose starts can fit.
        """
        hole_end = self._hole_end
        starts = bucket.starts
        while True:  # the size has live holes, so a live entry is at the top once dead go
            top = starts[0]
            if hole_end.get(top) == top + hsize:
                break
            heappop(starts)
            bucket.entries -= 1
        slack = hsize - size
        if -top & mask <= slack:
            return top
        if mask < _OFFSET_SPAN:
            # A start's offset in its 64 KiB block gives its padding for this alignment: the
            # answer is the lowest live top among the offsets that need no more than the
            # hole has to spare. No walk.
            best = None
            for offset, heap in bucket.by_offset.items():
                if -offset & mask <= slack:
                    while heap and hole_end.get(heap[0]) != heap[0] + hsize:
                        heappop(heap)
                        bucket.entries -= 1
                    if heap and (best is None or heap[0] < best):
                        best = heap[0]
            return best
        # A bigger alignment: a start's 64 KiB offset still rules most out (its padding is at
        # least the padding to the next 64 KiB), so only the offsets that can fit are
        # walked, each in address order up to its first fit; the lowest of those wins.
        best = None
        for offset, heap in bucket.by_offset.items():
            if -offset & _OFFSET_MASK <= slack:
                found = self._first_fit_in(heap, hsize, slack, mask)
                if found is not None and (best is None or found < best):
                    best = found
        return best

    def _first_fit_in(self, heap: list[int], hsize: int, slack: int, mask: int) -> int | None:
        """The lowest live start in ``heap`` (starts of ``hsize`` holes) whose padding to
        ``mask + 1`` is at most ``slack``: a walk in address order, O(log b) a step."""
        hole_end = self._hole_end
        if len(heap) <= _SORT_BELOW:
            heap.sort()  # address order for the walk; a sorted list is still a heap
            for start in heap:
                if -start & mask <= slack and hole_end.get(start) == start + hsize:
                    return start
            return None
        # A big heap: visit it in address order without reordering it (a second heap of the
        # entries whose parents were visited).
        length = len(heap)
        frontier = [(heap[0], 0)]
        while frontier:
            start, i = heappop(frontier)
            if -start & mask <= slack and hole_end.get(start) == start + hsize:
                return start
            child = 2 * i + 1
            if child < length:
                heappush(frontier, (heap[child], child))
                if child + 1 < length:
                    heappush(frontier, (heap[child + 1], child + 1))
        return None

    def _take(self, hstart: int, hsize: int, size: int, alignment: int) -> int:
        """Carve the chunk out of the hole ``[hstart, hstart+hsize)`` (cases 1-3)."""
        hend = hstart + hsize
        s = (hstart + alignment - 1) & -alignment
        self._drop_hole(hstart, hend)
        if s == hstart:
            # (1) exact fit: the hole disappears; (2) at the start: it begins after the chunk.
            if s + size != hend:
                self._add_hole(s + size, hend)
        else:
            left = hend - (s + size)
            if left:
                # (3) in the middle.
                if left % alignment == 0:
                    # The aligned end of the hole is free too: go there, leaving one fragment.
                    s += left
                else:
                    self._add_hole(s + size, hend)
            # (2) at the end: the hole keeps its start and ends where the chunk begins.
            self._add_hole(hstart, s)
        if self._used is not None:
            self._used[s] = size
        return s
