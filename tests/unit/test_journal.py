"""The journal of the agent's state (issue 8.3), and the framework hooks it stands on."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cma_qemu.allocators.best_fit import BestFitAllocator
from cma_qemu.allocators.bitmap import BitmapAllocator
from cma_qemu.errors import EADDRINUSE, EINVAL
from cma_qemu.framework import Cma, CmaChange, RefcountEvent, SettingEvent

K = 1 << 10
M = 1 << 20
P = 4 * K
BASE = 0x40000000
ALLOCATORS = [BestFitAllocator, BitmapAllocator]


def make(allocator: str = "bf") -> Cma:
    return Cma.from_attributes(
        f"a=1M:{allocator};b=1M:{allocator}", "*/*=a,b", ram=[(BASE, 16 * M)]
    )


# ------------------------------------------------------------------------------ reserve
@pytest.mark.parametrize("cls", ALLOCATORS, ids=lambda c: c.name)
def test_reserve_takes_exactly_the_range_and_only_when_free(cls: type[BestFitAllocator]) -> None:
    allocator = cls(BASE, 64 * K)
    assert allocator.reserve(BASE + 8 * K, 8 * K)
    assert list(allocator.holes()) == [(BASE, 8 * K), (BASE + 16 * K, 48 * K)]
    before = list(allocator.holes())
    assert not allocator.reserve(BASE + 12 * K, 8 * K)  # overlaps the reserved range
    assert not allocator.reserve(BASE + 60 * K, 8 * K)  # leaves the region
    assert not allocator.reserve(BASE - P, 2 * P)
    assert list(allocator.holes()) == before
    assert allocator.reserve(BASE, 8 * K)  # a whole hole
    assert allocator.reserve(BASE + 60 * K, 4 * K)  # the end of the last one
    assert list(allocator.holes()) == [(BASE + 16 * K, 44 * K)]
    allocator.free(BASE + 8 * K, 8 * K)
    assert list(allocator.holes()) == [(BASE + 8 * K, 52 * K)]  # a reserved range frees


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 4)), max_size=12))
def test_reserve_agrees_between_allocators(ranges: list[tuple[int, int]]) -> None:
    bf = BestFitAllocator(BASE, 16 * P)
    bitmap = BitmapAllocator(BASE, 16 * P)
    for first, count in ranges:
        start, size = BASE + first * P, count * P
        assert bf.reserve(start, size) == bitmap.reserve(start, size)
        assert list(bf.holes()) == list(bitmap.holes())


# ------------------------------------------------------------------------------ restore
@pytest.mark.parametrize("allocator", ["bf", "bitmap"])
def test_restore_chunk_keeps_new_allocations_off_it(allocator: str) -> None:
    cma = make(allocator)
    a = cma.region("a")
    assert a is not None
    where = a.start + 4 * P
    chunk = cma.restore_chunk(where, 2 * P, 5 * K, owner="guest:x", refcount=2)
    assert (chunk.region, chunk.owner, chunk.refcount, chunk.requested) == (a, "guest:x", 2, 5 * K)
    assert cma.chunk(where) is chunk and a.users == 1 and a.free_space == 1 * M - 2 * P
    others = [cma.alloc("d", "", P) for _ in range(254)]
    assert all(o.end <= where or chunk.end <= o.start for o in others)
    assert cma.put(where) is False and cma.put(where) is True  # its refcount came back


def test_restore_chunk_refuses_a_used_or_bad_range_and_changes_nothing() -> None:
    cma = make()
    taken = cma.alloc("d", "", 2 * P)
    snapshot = (
        [(c.start, c.size) for c in cma.chunks],
        [(r.free_space, r.users) for r in cma.regions],
    )
    with pytest.raises(EADDRINUSE, match="overlaps memory in use"):
        cma.restore_chunk(taken.start + P, 2 * P, P)
    for start, size, requested in [(BASE + 1, P, P), (taken.start, P + 1, P), (0x100, P, P)]:
        with pytest.raises(EINVAL):
            cma.restore_chunk(start, size, requested)
    b = cma.region("b")
    assert b is not None
    with pytest.raises(EINVAL, match="not inside one region"):
        cma.restore_chunk(b.start - P, 2 * P, P)
    with pytest.raises(EINVAL):
        cma.restore_chunk(b.start, P, 2 * P)  # requested more than the chunk
    after = [(c.start, c.size) for c in cma.chunks], [(r.free_space, r.users) for r in cma.regions]
    assert after == snapshot


# ------------------------------------------------------------------------------ changes
def test_subscribe_changes_sees_refcounts_and_settings() -> None:
    cma = make()
    seen: list[CmaChange] = []
    unsubscribe = cma.subscribe_changes(seen.append)
    chunk = cma.alloc("d", "", P)
    cma.get(chunk.start)
    cma.put(chunk.start)
    cma.set_map("*/*=b")
    cma.set_asterisk("b")
    b = cma.region("b")
    assert b is not None
    cma.set_region_allocator(b, "bitmap")
    cma.put(chunk.start)
    names = [type(c).__name__ for c in seen]
    assert names == [
        "AllocEvent",
        "RefcountEvent",
        "RefcountEvent",
        "SettingEvent",
        "SettingEvent",
        "SettingEvent",
        "FreeEvent",
    ]
    assert isinstance(seen[1], RefcountEvent) and seen[1].chunk is chunk
    settings_seen = [(c.what, c.value) for c in seen if isinstance(c, SettingEvent)]
    assert settings_seen == [("map", "*/*=b"), ("asterisk", "b"), ("allocator", "bitmap")]
    unsubscribe()
    cma.alloc("d", "", P)
    assert len(seen) == 7
