"""Early placement (memblock-like) and the Region record."""

from __future__ import annotations

import pytest

from cma_qemu.attributes import parse_regions
from cma_qemu.boards import load_board
from cma_qemu.errors import EADDRINUSE, EINVAL, ENOMEM
from cma_qemu.framework import Cma
from cma_qemu.regions import (
    EarlyRegion,
    RamBank,
    RamLayout,
    Region,
    ReservedRange,
    align_up,
    describe_range,
    place_early_regions,
)

P = 4096
K = 1 << 10
M = 1 << 20
BASE = 0x40000000
RAM16 = RamLayout((RamBank(BASE, 16 * M),))
GONI = RamLayout(
    (RamBank(BASE, 256 * M), RamBank(0x50000000, 128 * M)),
    (
        ReservedRange("the kernel", BASE, 32 * M),
        ReservedRange("the initrd and DTB", 0x48000000, 32 * M),
    ),
)


def place(regions: list[EarlyRegion], layout: RamLayout) -> list[int]:
    result = place_early_regions(regions, layout)
    assert [r for r, _ in result] == regions  # input order kept
    return [start for _, start in result]


def test_helpers() -> None:
    assert align_up(0, P) == 0
    assert align_up(1, P) == P
    assert align_up(P, P) == P
    assert align_up(0x40001001, 64 * K) == 0x40010000
    assert describe_range(BASE, M) == "0x40000000-0x400fffff"
    assert RAM16.describe() == "0x40000000-0x40ffffff"
    assert GONI.describe() == "0x40000000-0x4fffffff, 0x50000000-0x57ffffff"
    assert RamBank(BASE, M).end == BASE + M
    assert ReservedRange("x", BASE, M).end == BASE + M


def test_early_region_labels_and_fixed() -> None:
    assert EarlyRegion("a", M).label == "region 'a'"
    assert EarlyRegion(None, M).label == "private region"
    assert not EarlyRegion("a", M).fixed
    assert EarlyRegion("a", M, start=BASE).fixed


def test_exact_placement() -> None:
    assert place([EarlyRegion("a", M, start=0x40400000)], RAM16) == [0x40400000]
    # the whole RAM, and exactly the last page
    assert place([EarlyRegion("a", 16 * M, start=BASE)], RAM16) == [BASE]
    assert place([EarlyRegion("a", P, start=BASE + 16 * M - P)], RAM16) == [BASE + 16 * M - P]


def test_top_down_in_list_order() -> None:
    regions = [EarlyRegion("a", M), EarlyRegion("b", 2 * M), EarlyRegion(None, P)]
    assert place(regions, RAM16) == [0x40F00000, 0x40D00000, 0x40CFF000]


def test_top_down_alignment() -> None:
    regions = [EarlyRegion("small", 3 * P, alignment=64 * K), EarlyRegion("big", M, alignment=M)]
    starts = place(regions, RAM16)
    assert starts == [0x40FF0000, 0x40E00000]
    assert starts[1] % M == 0


def test_fixed_regions_placed_before_anywhere_regions() -> None:
    # listed first, "anywhere" would take the top MiB that "fixed" asks for
    regions = [EarlyRegion("any", M), EarlyRegion("fixed", M, start=0x40F00000)]
    assert place(regions, RAM16) == [0x40E00000, 0x40F00000]


def test_gaps_between_keep_free_ranges() -> None:
    layout = RamLayout(
        (RamBank(BASE, 16 * M),),
        (ReservedRange("low", BASE, 4 * M), ReservedRange("high", 0x40C00000, 4 * M)),
    )
    assert place([EarlyRegion("fits", 8 * M)], layout) == [0x40400000]
    assert place([EarlyRegion("a", 5 * M), EarlyRegion("b", 3 * M)], layout) == [
        0x40700000,
        0x40400000,
    ]
    with pytest.raises(ENOMEM):
        place_early_regions([EarlyRegion("too big", 8 * M + P)], layout)
    with pytest.raises(ENOMEM):
        place_early_regions([EarlyRegion("a", 5 * M), EarlyRegion("b", 4 * M)], layout)


def test_top_down_skips_gap_too_small_once_aligned() -> None:
    layout = RamLayout(
        (RamBank(BASE, 16 * M),),
        (ReservedRange("r", 0x40F01000, 0xFF000),),  # top gap [0x40e.., 0x40f01000)
    )
    # 1 MiB aligned to 1 MiB: the gap below 0x40f01000 holds 0x40e00000-0x40efffff
    assert place([EarlyRegion("a", M, alignment=M)], layout) == [0x40E00000]
    assert place([EarlyRegion("a", M)], layout) == [0x40E01000]


def test_multiple_banks_goni() -> None:
    starts = place([EarlyRegion("b1", 32 * M), EarlyRegion("fw", M, alignment=128 * K)], GONI)
    assert starts == [0x56000000, 0x55F00000]  # top of the second bank, then below
    # bank by bank, the top bank first; a region that fits only in the first bank goes there
    layout = RamLayout((RamBank(BASE, 256 * M), RamBank(0x60000000, 16 * M)))
    assert place([EarlyRegion("x", 32 * M)], layout) == [0x4E000000]
    # touching banks behave as one block (like memblock.memory)
    assert place([EarlyRegion("span", 2 * M, start=0x4FF00000)], GONI) == [0x4FF00000]


def test_region_between_banks_is_not_in_ram() -> None:
    layout = RamLayout((RamBank(BASE, 16 * M), RamBank(0x60000000, 16 * M)))
    with pytest.raises(ENOMEM, match=r"not inside RAM \(0x40000000-0x40ffffff, 0x60000000"):
        place_early_regions([EarlyRegion("gap", M, start=0x50000000)], layout)
    with pytest.raises(ENOMEM):
        place_early_regions([EarlyRegion("straddle", 2 * M, start=0x40F00000)], layout)


@pytest.mark.parametrize("start", [0x3FF00000, 0x40F00001 - 1 + P, 0x41000000, 0x80000000])
def test_outside_ram_is_enomem(start: int) -> None:
    with pytest.raises(ENOMEM) as info:
        place_early_regions([EarlyRegion("a", M, start=start)], RAM16)
    assert "region 'a'" in str(info.value) and "not inside RAM" in str(info.value)


def test_overlap_with_keep_free_names_both() -> None:
    board = load_board("aquila")
    (spec,) = parse_regions("mfc_b2=16M@0x40000000")
    region = EarlyRegion(spec.name, spec.size, start=spec.start)
    with pytest.raises(EADDRINUSE) as info:
        place_early_regions([region], board.layout)
    assert str(info.value) == (
        "region 'mfc_b2' 0x40000000-0x40ffffff overlaps the kernel 0x40000000-0x41ffffff"
    )


def test_overlap_with_keep_free_partial() -> None:
    with pytest.raises(EADDRINUSE, match="the initrd and DTB 0x48000000-0x49ffffff"):
        place_early_regions([EarlyRegion("x", 2 * M, start=0x47F00000)], GONI)


def test_overlap_with_other_region_names_both() -> None:
    regions = [EarlyRegion("a", 2 * M, start=0x40400000), EarlyRegion("b", M, start=0x40500000)]
    with pytest.raises(EADDRINUSE) as info:
        place_early_regions(regions, RAM16)
    message = str(info.value)
    assert "region 'b' 0x40500000-0x405fffff" in message
    assert "region 'a' 0x40400000-0x405fffff" in message


def test_too_big_is_enomem() -> None:
    with pytest.raises(ENOMEM, match="does not fit in the free RAM of 0x40000000-0x40ffffff"):
        place_early_regions([EarlyRegion("a", 17 * M)], RAM16)
    with pytest.raises(ENOMEM):
        place_early_regions([EarlyRegion("a", 8 * M), EarlyRegion("b", 8 * M + P)], RAM16)
    with pytest.raises(ENOMEM):
        place_early_regions(
            [EarlyRegion("a", 15 * M, alignment=32 * M)],
            RamLayout((RamBank(0x40100000, 16 * M),)),
        )


def test_size_zero_is_einval() -> None:
    with pytest.raises(EINVAL):
        place_early_regions([EarlyRegion("a", 0)], RAM16)


def test_nothing_placed_on_error() -> None:
    regions = [EarlyRegion("ok", M), EarlyRegion("bad", M, start=0x10000000)]
    with pytest.raises(ENOMEM):
        place_early_regions(regions, RAM16)
    assert all(r.start in (None, 0x10000000) and not r.reserved for r in regions)


def test_empty_list() -> None:
    assert place_early_regions([], RAM16) == []


def test_seed_layout_on_each_s5pv210_board() -> None:
    for name in ("aquila", "goni"):
        board = load_board(name)
        cma = Cma.from_attributes(
            board.regions, board.map, board.asterisk, ram=board.ram, keep_free=board.keep_free
        )
        placed = {r.name: r.start for r in cma.regions}
        assert placed == {"mfc_b2": 0x44000000, "mfc_b1": 0x55F00000, "mfc_fw": 0x57F00000}
        assert placed["mfc_fw"] % (128 * K) == 0


# ------------------------------------------------------------------------------ Region
def test_region_record() -> None:
    region = Region(name=None, start=BASE, size=M)
    assert region.free_space == M and region.end == BASE + M
    assert region.label == "<private@0x40000000>"
    assert region.holes() == [(BASE, M)]
    assert region.largest_free() == M
    assert region.attached is None
    named = Region(name="a", start=BASE, size=M, free_space=P)
    assert named.label == "a" and named.free_space == P
