"""A state machine over the framework API, for both allocators.

Rules: alloc, alloc_from, alloc_from_region, free, get, put, set_map and set_asterisk, with
arguments that are valid, out of range or of the wrong kind. A model keeps each chunk's
reference count. After every step: chunks are disjoint, inside their region and aligned,
free + used = total in every region and in the stats, and a step that raised changed nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

from cma_helpers import allocator_registry
from fuzzing import PROFILE, check_error, count_case, no_hang
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from strategies import asterisk_texts, map_texts
from test_framework_properties import (  # type: ignore[import-not-found]
    build,
    check_invariants,
    layouts,
    snapshot,
)

from cma_qemu.attributes import PAGE_SIZE
from cma_qemu.errors import CmaError
from cma_qemu.framework import Chunk, Cma

ALIGNMENTS = [0, 1, PAGE_SIZE, 4 * PAGE_SIZE, 64 * PAGE_SIZE, 3, 6 * PAGE_SIZE, 2**64, -4096]
SIZES = st.one_of(
    st.integers(1, 24 * PAGE_SIZE),
    st.sampled_from([0, -1, 2**64, 2**64 - 1, True, PAGE_SIZE + 1]),
)
REGION_LISTS = st.sampled_from(["r0", "r1,r0", "*", None, "r3,r2", "nosuch", "r0,,r1", "", "r0 "])
DEVS = st.sampled_from(["d0", "d1", "d2", "d3", "", "r0"])
KINDS = st.sampled_from(["", "k", "x"])


class FrameworkMachine(RuleBasedStateMachine):
    """Drives one :class:`Cma`; subclasses pick the allocator."""

    allocator = "bf"
    #: The hang guard of the program running now: one per program, from here to teardown
    #: (Hypothesis calls teardown in a ``finally``), so each step's own guard in ``_do`` is
    #: free. Kept on the class so a guard a failed start left open is closed by the next.
    _guard = contextlib.ExitStack()

    def __init__(self) -> None:
        super().__init__()
        self.cma = Cma(allocator_registry())  # replaced by boot(); no entry-point scan here
        self.refcounts: dict[int, int] = {}
        self.alignments: dict[int, int] = {}
        FrameworkMachine._guard.close()
        FrameworkMachine._guard.enter_context(no_hang())

    def teardown(self) -> None:
        FrameworkMachine._guard.close()

    @initialize(layout=layouts())
    def boot(self, layout: list[tuple[str | None, int, int]]) -> None:
        count_case(type(self).__name__)
        self.cma = build(layout, self.allocator)

    def _do(self, call: Any, *args: Any) -> Any:
        """Run one API call; an error must be the project's and must change nothing."""
        before = snapshot(self.cma)
        try:
            with no_hang():
                return call(*args)
        except CmaError as error:
            check_error(error)
            assert snapshot(self.cma) == before
            return None

    def _allocated(self, chunk: Chunk | None, alignment: int) -> None:
        if chunk is not None:
            assert chunk.start not in self.refcounts
            assert chunk.region.attached == self.allocator
            self.refcounts[chunk.start] = 1
            self.alignments[chunk.start] = alignment

    def _address(self, pick: int) -> int:
        live = sorted(self.refcounts)
        if not live or pick < 0:
            return 0x40000000 - PAGE_SIZE  # no chunk there
        addr = live[pick % len(live)]
        return addr + PAGE_SIZE if pick % 7 == 6 else addr  # sometimes inside a chunk

    @rule(dev=DEVS, kind=KINDS, size=SIZES, alignment=st.sampled_from(ALIGNMENTS))
    def alloc(self, dev: str, kind: str, size: int, alignment: int) -> None:
        self._allocated(self._do(self.cma.alloc, dev, kind, size, alignment), alignment)

    @rule(regions=REGION_LISTS, size=SIZES, alignment=st.sampled_from(ALIGNMENTS))
    def alloc_from(self, regions: str | None, size: int, alignment: int) -> None:
        self._allocated(self._do(self.cma.alloc_from, regions, size, alignment), alignment)

    @rule(pick=st.integers(0, 8), size=SIZES, alignment=st.sampled_from(ALIGNMENTS))
    def alloc_from_region(self, pick: int, size: int, alignment: int) -> None:
        regions = self.cma.regions
        region = regions[pick % len(regions)]
        chunk = self._do(self.cma.alloc_from_region, region, size, alignment)
        self._allocated(chunk, alignment)

    @rule(pick=st.integers(-1, 50))
    def free(self, pick: int) -> None:
        addr = self._address(pick)
        if self._do(self.cma.free, addr) is not None:
            assert addr in self.refcounts
            del self.refcounts[addr]
        else:
            assert addr not in self.refcounts

    @rule(pick=st.integers(-1, 50))
    def get(self, pick: int) -> None:
        addr = self._address(pick)
        if self._do(self.cma.get, addr) is not None:
            self.refcounts[addr] += 1
        else:
            assert addr not in self.refcounts

    @rule(pick=st.integers(-1, 50))
    def put(self, pick: int) -> None:
        addr = self._address(pick)
        freed = self._do(self.cma.put, addr)
        if freed is None:
            assert addr not in self.refcounts
            return
        self.refcounts[addr] -= 1
        assert freed == (self.refcounts[addr] == 0)
        if freed:
            del self.refcounts[addr]

    @rule(text=map_texts)
    def set_map(self, text: str) -> None:
        self._do(self.cma.set_map, text)

    @rule(text=asterisk_texts)
    def set_asterisk(self, text: str) -> None:
        self._do(self.cma.set_asterisk, text)

    @rule(dev=DEVS, kind=KINDS, regions=REGION_LISTS)
    def info(self, dev: str, kind: str, regions: str | None) -> None:
        before = snapshot(self.cma)
        for call, args in ((self.cma.info, (dev, kind)), (self.cma.info_about, (regions,))):
            info = self._do(call, *args)
            if info is not None and info.count:
                assert info.free_size <= info.total_size
                assert info.lower_bound < info.upper_bound
        assert snapshot(self.cma) == before

    @invariant()
    def allocator_invariants(self) -> None:
        check_invariants(self.cma, self.alignments)
        assert {c.start: c.refcount for c in self.cma.chunks} == self.refcounts
        used: dict[int, int] = {}
        for chunk in self.cma.chunks:
            used[chunk.region.start] = used.get(chunk.region.start, 0) + chunk.size
        for stats in self.cma.stats():
            free, total = stats.available_pages, stats.total_pages
            assert free * PAGE_SIZE + used.get(stats.start, 0) == total * PAGE_SIZE
            assert stats.maxchunk <= free * PAGE_SIZE


class BestFitMachine(FrameworkMachine):
    allocator = "bf"


class BitmapMachine(FrameworkMachine):
    allocator = "bitmap"


# A case here is a whole program of up to 30 steps, so the quick profile runs fewer of them.
_machine_settings = settings(
    settings.get_profile(PROFILE),
    stateful_step_count=30,
    max_examples=40 if PROFILE == "fuzz-quick" else settings.get_profile(PROFILE).max_examples,
)
TestBestFitFramework = BestFitMachine.TestCase
TestBestFitFramework.settings = _machine_settings
TestBitmapFramework = BitmapMachine.TestCase
TestBitmapFramework.settings = _machine_settings
