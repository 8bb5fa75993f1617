"""The first-fit page bitmap ("bitmap"), worked by hand."""

from __future__ import annotations

import pytest

from cma_qemu.allocators.bitmap import BitmapAllocator
from cma_qemu.attributes import PAGE_SIZE as P
from cma_qemu.errors import EBUSY, EINVAL

BASE = 0x4000_0000


def pages_of(bm: BitmapAllocator) -> list[tuple[int, int]]:
    return [((s - BASE) // P, n // P) for s, n in bm.holes()]


def test_first_fit_takes_the_lowest_address_not_the_best_hole() -> None:
    bm = BitmapAllocator(BASE, 32 * P)
    assert bm.alloc(32 * P, P) == BASE
    bm.free(BASE + 2 * P, 4 * P)
    bm.free(BASE + 10 * P, 2 * P)  # an exact fit that best fit would prefer
    assert bm.alloc(2 * P, P) == BASE + 2 * P
    assert pages_of(bm) == [(4, 2), (10, 2)]
    assert bm.largest_free() == 2 * P


def test_alignment_skips_to_the_next_aligned_run() -> None:
    bm = BitmapAllocator(BASE, 64 * P)
    assert bm.alloc(P, P) == BASE
    assert bm.alloc(2 * P, 8 * P) == BASE + 8 * P
    assert bm.alloc(4 * P, 4 * P) == BASE + 4 * P
    assert bm.alloc(8 * P, 16 * P) == BASE + 16 * P
    assert pages_of(bm) == [(1, 3), (10, 6), (24, 40)]


def test_alignment_is_of_the_absolute_address() -> None:
    bm = BitmapAllocator(BASE + 3 * P, 64 * P)  # region starts 3 pages past a 16-page line
    assert bm.alloc(P, 16 * P) == BASE + 16 * P
    assert bm.alloc(P, 2 * P) == BASE + 4 * P


def test_full_and_too_big_return_none() -> None:
    bm = BitmapAllocator(BASE, 4 * P)
    assert bm.alloc(5 * P, P) is None
    assert bm.alloc(4 * P, 8 * P) == BASE
    assert bm.alloc(P, P) is None
    assert bm.largest_free() == 0
    assert list(bm.holes()) == []


@pytest.mark.parametrize(
    ("start", "size"),
    [
        (BASE + 2 * P, P),  # double free
        (BASE, 3 * P),  # runs into free pages
        (BASE + 1, P),  # not page aligned
        (BASE, P + 1),  # not whole pages
        (BASE - P, P),  # before the region
        (BASE + 3 * P, 2 * P),  # past its end
        (BASE, 0),
    ],
)
def test_bad_free_raises_einval_and_changes_nothing(start: int, size: int) -> None:
    bm = BitmapAllocator(BASE, 4 * P)
    assert bm.alloc(2 * P, P) == BASE
    before = list(bm.holes())
    with pytest.raises(EINVAL):
        bm.free(start, size)
    assert list(bm.holes()) == before


@pytest.mark.parametrize(("start", "size"), [(BASE + 1, P), (BASE, P + 1), (BASE, 0), (-P, P)])
def test_region_must_be_whole_pages(start: int, size: int) -> None:
    with pytest.raises(EINVAL):
        BitmapAllocator(start, size)


@pytest.mark.parametrize(("size", "alignment"), [(0, P), (P + 1, P), (P, 0), (P, 3 * P)])
def test_bad_alloc_arguments_raise_einval(size: int, alignment: int) -> None:
    with pytest.raises(EINVAL):
        BitmapAllocator(BASE, 4 * P).alloc(size, alignment)


def test_cleanup_needs_every_page_free() -> None:
    bm = BitmapAllocator(BASE, 4 * P)
    chunk = bm.alloc(P, P)
    assert chunk is not None
    with pytest.raises(EBUSY):
        bm.cleanup()
    bm.free(chunk, P)
    bm.cleanup()
