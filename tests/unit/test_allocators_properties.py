"""Random alloc/free sequences against a brute-force model of the holes, for both allocators.

The model keeps the free blocks as a sorted list and works out by brute force where each
allocator must put a request: best fit (docs/semantics.md, including the end-placement rule) for
"bf", lowest aligned address for "bitmap". After every step the allocator's holes must equal
the model's exactly, and the holes and live chunks must tile the region.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cma_qemu.allocators.base import Allocator
from cma_qemu.allocators.best_fit import BestFitAllocator
from cma_qemu.allocators.bitmap import BitmapAllocator
from cma_qemu.errors import EINVAL

P = 4096
Holes = list[tuple[int, int]]


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def best_fit_place(holes: Holes, size: int, alignment: int) -> int | None:
    """Best fit by brute force: smallest hole (lowest address on ties) that fits aligned."""
    for start, hsize in sorted(holes, key=lambda h: (h[1], h[0])):
        end = start + hsize
        s = align_up(start, alignment)
        if s + size > end:
            continue
        if s != start and s + size < end and (end - (s + size)) % alignment == 0:
            s = end - size  # middle with an aligned remainder: use the end of the hole
        return s
    return None


def first_fit_place(holes: Holes, size: int, alignment: int) -> int | None:
    """Mainline CMA by brute force: the lowest aligned address with room."""
    for start, hsize in holes:
        s = align_up(start, alignment)
        if s + size <= start + hsize:
            return s
    return None


def carve(holes: Holes, s: int, size: int) -> Holes:
    """The holes after taking ``[s, s+size)`` out of the one that contains it."""
    out: Holes = []
    for start, hsize in holes:
        end = start + hsize
        if start <= s and s + size <= end:
            out += [(a, b - a) for a, b in ((start, s), (s + size, end)) if b > a]
        else:
            out.append((start, hsize))
    return out


def give_back(holes: Holes, s: int, size: int) -> Holes:
    """The holes after freeing ``[s, s+size)``, merged with adjacent ones."""
    merged: Holes = []
    for start, hsize in sorted([*holes, (s, size)]):
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + hsize)
        else:
            merged.append((start, hsize))
    return merged


PLACERS: dict[type[Allocator], Callable[[Holes, int, int], int | None]] = {
    BestFitAllocator: best_fit_place,
    BitmapAllocator: first_fit_place,
}


class AllocatorMachine(RuleBasedStateMachine):
    """Drives one allocator and the model side by side; subclasses pick the allocator."""

    cls: type[Allocator]

    def __init__(self) -> None:
        super().__init__()
        self.allocator: Allocator
        self.model: Holes = []
        self.chunks: list[tuple[int, int]] = []

    @initialize(
        base=st.sampled_from([0, 0x4000_0000, 0x4000_3000, 0x7FFF_F000]),
        pages=st.integers(1, 96),
    )
    def make_region(self, base: int, pages: int) -> None:
        self.allocator = self.cls(base, pages * P)
        self.model = [(base, pages * P)]

    @rule(
        pages=st.integers(1, 24) | st.integers(1, 100),
        alignment=st.sampled_from([1, 1, 1, 2, 4, 8, 16, 64]).map(lambda a: a * P),
    )
    def alloc(self, pages: int, alignment: int) -> None:
        size = pages * P
        expected = PLACERS[self.cls](self.model, size, alignment)
        got = self.allocator.alloc(size, alignment)
        assert got == expected
        if got is not None:
            assert got % alignment == 0
            self.chunks.append((got, size))
            self.model = carve(self.model, got, size)

    @precondition(lambda self: self.chunks)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        start, size = self.chunks.pop(data.draw(st.integers(0, len(self.chunks) - 1)))
        self.allocator.free(start, size)
        self.model = give_back(self.model, start, size)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def bad_free(self, data: st.DataObject) -> None:
        """A range that overlaps some hole (a double or overlapping free) is refused cleanly."""
        hstart, hsize = data.draw(st.sampled_from(self.model))
        region_start, region_end = self.allocator.start, self.allocator.start + self.allocator.size
        first = data.draw(st.integers(region_start // P, (hstart + hsize) // P - 1)) * P
        last = data.draw(st.integers(max(first, hstart) // P + 1, region_end // P)) * P
        with pytest.raises(EINVAL):
            self.allocator.free(first, last - first)

    @invariant()
    def matches_model_and_tiles_the_region(self) -> None:
        if not self.model and not self.chunks:
            return  # before initialize
        holes = list(self.allocator.holes())
        assert holes == self.model
        for (a, n), (b, _) in itertools.pairwise(holes):
            assert a + n < b  # sorted, disjoint, never adjacent (merged)
        pieces = sorted(holes + self.chunks)
        position = self.allocator.start
        for start, size in pieces:
            assert size > 0
            assert start == position  # no gap, no overlap
            position += size
        assert position == self.allocator.start + self.allocator.size
        assert self.allocator.largest_free() == max((n for _, n in holes), default=0)

    def teardown(self) -> None:
        if not hasattr(self, "allocator"):
            return
        for start, size in self.chunks:
            self.allocator.free(start, size)
        assert list(self.allocator.holes()) == [(self.allocator.start, self.allocator.size)]
        self.allocator.cleanup()


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class BestFitMachine(AllocatorMachine):
    cls = BestFitAllocator


class BitmapMachine(AllocatorMachine):
    cls = BitmapAllocator


TestBestFitProperties = BestFitMachine.TestCase
TestBestFitProperties.settings = SETTINGS
TestBitmapProperties = BitmapMachine.TestCase
TestBitmapProperties.settings = SETTINGS


def test_many_small_chunks_against_the_model() -> None:
    """A longer seeded run than hypothesis does, with many holes in play at once."""
    import random

    rng = random.Random(5)
    for cls, place in PLACERS.items():
        alloc = cls(0x4000_0000, 2048 * P)
        model: Holes = [(0x4000_0000, 2048 * P)]
        live: list[tuple[int, int]] = []
        for _ in range(3000):
            if live and rng.random() < 0.45:
                start, size = live.pop(rng.randrange(len(live)))
                alloc.free(start, size)
                model = give_back(model, start, size)
            else:
                size = rng.randint(1, 8) * P
                alignment = rng.choice([1, 1, 1, 2, 4, 16]) * P
                got = alloc.alloc(size, alignment)
                assert got == place(model, size, alignment)
                if got is not None:
                    live.append((got, size))
                    model = carve(model, got, size)
        assert list(alloc.holes()) == model
        for start, size in live:
            alloc.free(start, size)
        alloc.cleanup()
