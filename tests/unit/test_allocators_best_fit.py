"""Best-fit ("bf") worked by hand against the cases of docs/semantics.md, "Best fit"."""

from __future__ import annotations

import pytest

from cma_qemu.allocators.best_fit import BestFitAllocator
from cma_qemu.errors import EBUSY, EINVAL

P = 4096
BASE = 0x4000_0000


def with_holes(region_pages: int, holes: list[tuple[int, int]]) -> BestFitAllocator:
    """A region of ``region_pages`` pages whose only free blocks are ``holes`` (page units).

    Takes the whole region in one exact-fit allocation, then frees the holes, so every hole
    configuration can be set up directly.
    """
    bf = BestFitAllocator(BASE, region_pages * P)
    assert bf.alloc(region_pages * P, P) == BASE
    assert list(bf.holes()) == []
    for start, pages in holes:
        bf.free(BASE + start * P, pages * P)
    assert pages_of(bf) == sorted(holes)
    return bf


def pages_of(bf: BestFitAllocator) -> list[tuple[int, int]]:
    """The holes in page units relative to BASE, for readable expectations."""
    return [((s - BASE) // P, n // P) for s, n in bf.holes()]


def test_fresh_region_is_one_hole() -> None:
    bf = BestFitAllocator(BASE, 64 * P)
    assert list(bf.holes()) == [(BASE, 64 * P)]
    assert bf.largest_free() == 64 * P
    bf.cleanup()


def test_exact_fit_removes_the_hole_and_beats_an_earlier_bigger_hole() -> None:
    bf = with_holes(32, [(0, 4), (8, 2), (16, 3)])
    assert bf.alloc(2 * P, P) == BASE + 8 * P
    assert pages_of(bf) == [(0, 4), (16, 3)]


def test_chunk_at_start_advances_the_hole() -> None:
    bf = with_holes(32, [(4, 4)])
    assert bf.alloc(P, P) == BASE + 4 * P
    assert pages_of(bf) == [(5, 3)]


def test_chunk_at_end_shrinks_the_hole() -> None:
    # Hole [1, 8): 4-page alignment puts the 4-page chunk at 4, which ends the hole.
    bf = with_holes(32, [(1, 7)])
    assert bf.alloc(4 * P, 4 * P) == BASE + 4 * P
    assert pages_of(bf) == [(1, 3)]


def test_middle_with_aligned_remainder_moves_to_the_end() -> None:
    # Hole [1, 12): s = 2, chunk [2, 4), left = 8 pages, a multiple of 2 pages -> go to 10.
    bf = with_holes(32, [(1, 11)])
    assert bf.alloc(2 * P, 2 * P) == BASE + 10 * P
    assert pages_of(bf) == [(1, 9)]


def test_middle_with_unaligned_remainder_splits_a_tail_hole() -> None:
    # Hole [1, 12): s = 4, chunk [4, 6), left = 6 pages, not a multiple of 4 -> split.
    bf = with_holes(32, [(1, 11)])
    assert bf.alloc(2 * P, 4 * P) == BASE + 4 * P
    assert pages_of(bf) == [(1, 3), (6, 6)]


def test_alignment_miss_walks_to_the_next_larger_hole() -> None:
    # Size order: [1,3) 2p, [5,9) 4p, [11,16) 5p, [24,64) 40p. With 4-page alignment the first
    # two cannot hold 2 pages (the v2 code crashed here); [11,16) can, at 12 (middle, split).
    bf = with_holes(64, [(1, 2), (5, 4), (11, 5), (24, 40)])
    assert bf.alloc(2 * P, 4 * P) == BASE + 12 * P
    assert pages_of(bf) == [(1, 2), (5, 4), (11, 1), (14, 2), (24, 40)]


def test_alignment_miss_everywhere_returns_none_and_changes_nothing() -> None:
    bf = with_holes(64, [(1, 2), (5, 4), (9 + 2, 3)])
    before = list(bf.holes())
    assert bf.alloc(2 * P, 16 * P) is None
    assert bf.alloc(5 * P, P) is None
    assert list(bf.holes()) == before


def test_equal_size_holes_go_lowest_address_first() -> None:
    bf = BestFitAllocator(BASE, 32 * P)
    assert bf.alloc(32 * P, P) == BASE
    for start in (10, 2, 20):  # freed out of address order on purpose
        bf.free(BASE + start * P, 2 * P)
    assert [bf.alloc(2 * P, P) for _ in range(3)] == [BASE + 2 * P, BASE + 10 * P, BASE + 20 * P]
    assert bf.alloc(P, P) is None


def test_alignment_is_of_the_absolute_address() -> None:
    bf = BestFitAllocator(BASE + P, 60 * P)  # region [1, 61): start only page aligned
    assert bf.alloc(P, 16 * P) == BASE + 16 * P  # left = 44 pages, not 16-aligned: split
    assert pages_of(bf) == [(1, 15), (17, 44)]
    # Region [1, 65): left = 48 pages is 16-aligned, so the chunk goes to the end instead.
    bf = BestFitAllocator(BASE + P, 64 * P)
    assert bf.alloc(P, 16 * P) == BASE + 64 * P
    assert pages_of(bf) == [(1, 63)]


def test_free_coalesces_with_both_neighbours() -> None:
    bf = with_holes(32, [(0, 2), (3, 2), (10, 1)])
    bf.free(BASE + 2 * P, P)
    assert pages_of(bf) == [(0, 5), (10, 1)]
    assert bf.largest_free() == 5 * P


@pytest.mark.parametrize(
    ("freed", "expected"),
    [
        ((5, 1), [(2, 4), (10, 2)]),  # joins the hole before it
        ((9, 1), [(2, 3), (9, 3)]),  # joins the hole after it
        ((7, 1), [(2, 3), (7, 1), (10, 2)]),  # touches neither
        ((5, 5), [(2, 10)]),  # fills the gap: both
    ],
)
def test_free_coalesces_one_side(freed: tuple[int, int], expected: list[tuple[int, int]]) -> None:
    bf = with_holes(32, [(2, 3), (10, 2)])
    bf.free(BASE + freed[0] * P, freed[1] * P)
    assert pages_of(bf) == expected


@pytest.mark.parametrize(
    ("start", "pages"),
    [
        (2, 3),  # exactly a hole: double free
        (4, 2),  # overlaps a hole's end
        (1, 2),  # overlaps a hole's start
        (1, 10),  # covers a whole hole
        (3, 1),  # inside a hole
        (31, 2),  # leaves the region
        (-1, 1),  # starts before it
        (20, 0),  # empty
    ],
)
def test_bad_free_raises_einval_and_changes_nothing(start: int, pages: int) -> None:
    bf = with_holes(32, [(2, 3), (10, 2)])
    before = list(bf.holes())
    with pytest.raises(EINVAL):
        bf.free(BASE + start * P, pages * P)
    assert list(bf.holes()) == before
    assert bf.alloc(2 * P, P) == BASE + 10 * P  # the structures still agree


def test_cleanup_needs_the_whole_region_free() -> None:
    bf = BestFitAllocator(BASE, 16 * P)
    a = bf.alloc(P, P)
    assert a is not None
    with pytest.raises(EBUSY):
        bf.cleanup()
    b = bf.alloc(15 * P, P)
    assert b is not None
    with pytest.raises(EBUSY):  # no hole at all
        bf.cleanup()
    bf.free(a, P)
    bf.free(b, 15 * P)
    bf.cleanup()


def test_largest_free_of_a_full_region_is_zero() -> None:
    bf = BestFitAllocator(BASE, 4 * P)
    assert bf.alloc(4 * P, P) == BASE
    assert bf.largest_free() == 0
    assert bf.alloc(P, P) is None


@pytest.mark.parametrize(("size", "alignment"), [(0, P), (-P, P), (P, 0), (P, 3 * P), (P, -P)])
def test_bad_alloc_arguments_raise_einval(size: int, alignment: int) -> None:
    with pytest.raises(EINVAL):
        BestFitAllocator(BASE, 4 * P).alloc(size, alignment)


@pytest.mark.parametrize(("start", "size"), [(BASE, 0), (-P, P), (2**64 - P, 2 * P)])
def test_bad_region_raises_einval(start: int, size: int) -> None:
    with pytest.raises(EINVAL):
        BestFitAllocator(start, size)


def test_partial_free_then_the_whole_block_is_a_double_free() -> None:
    """Freeing part of a block leaves the rest of it checked against the holes: freeing the
    whole block afterwards overlaps the part already free."""
    bf = BestFitAllocator(BASE, 16 * P)
    a = bf.alloc(4 * P, P)
    assert a == BASE
    bf.free(a + P, 2 * P)
    with pytest.raises(EINVAL):
        bf.free(a, 4 * P)
    bf.free(a, P)
    bf.free(a + 3 * P, P)
    bf.cleanup()


def test_a_block_freed_twice_is_refused() -> None:
    bf = BestFitAllocator(BASE, 16 * P)
    a = bf.alloc(2 * P, P)
    b = bf.alloc(2 * P, P)
    assert a is not None and b is not None
    bf.free(a, 2 * P)
    with pytest.raises(EINVAL):
        bf.free(a, 2 * P)
    assert pages_of(bf) == [(0, 2), (4, 12)]


@pytest.mark.parametrize(("sort_below", "slack_entries"), [(0, 16), (64, 16), (10**9, 0)])
def test_many_holes_of_one_size_against_the_model(
    monkeypatch: pytest.MonkeyPatch, sort_below: int, slack_entries: int
) -> None:
    """Hundreds of equal holes and aligned requests: the by-offset lookup (alignments up to
    64 KiB), the walk in address order for bigger ones, through a big heap (``_SORT_BELOW``
    0) or a sorted short one, and compaction at every step (``_SLACK_ENTRIES`` 0) all place
    every chunk where the brute-force model does."""
    import random

    from test_allocators_properties import best_fit_place, carve, give_back

    from cma_qemu.allocators import best_fit

    monkeypatch.setattr(best_fit, "_SORT_BELOW", sort_below)
    monkeypatch.setattr(best_fit, "_SLACK_ENTRIES", slack_entries)
    rng = random.Random(7)
    bf = BestFitAllocator(BASE, 4096 * P)
    model = [(BASE, 4096 * P)]
    live: list[tuple[int, int]] = []
    for _ in range(1500):  # fill with 1- and 2-page chunks, then churn
        size = rng.choice([1, 1, 2]) * P
        got = bf.alloc(size, P)
        assert got is not None
        live.append((got, size))
        model = carve(model, got, size)
    for _ in range(3000):
        if rng.random() < 0.5:
            start, size = live.pop(rng.randrange(len(live)))
            bf.free(start, size)
            model = give_back(model, start, size)
        else:
            size = rng.choice([1, 1, 2, 3]) * P
            alignment = rng.choice([1, 1, 2, 4, 16, 32, 64]) * P  # 32, 64: above 64 KiB
            got = bf.alloc(size, alignment)
            assert got == best_fit_place(model, size, alignment)
            if got is not None:
                live.append((got, size))
                model = carve(model, got, size)
    assert list(bf.holes()) == model
    assert bf.largest_free() == max(n for _, n in model)
