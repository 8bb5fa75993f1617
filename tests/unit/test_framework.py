"""The section-3 API of :class:`cma_qemu.framework.Cma`, with the project's intended behaviour.

Every error case also checks that the state is exactly what it was before the call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from cma_helpers import cma_state as snapshot

from cma_qemu.allocators.best_fit import BestFitAllocator
from cma_qemu.errors import EADDRINUSE, EBUSY, EINVAL, ENOENT, ENOMEM, CmaError
from cma_qemu.framework import (
    AllocEvent,
    AllocFailedEvent,
    Cma,
    CmaEvent,
    CmaInfo,
    FreeEvent,
)
from cma_qemu.regions import RamBank, RamLayout, Region, ReservedRange

P = 4096
K = 1 << 10
M = 1 << 20
BASE = 0x40000000
U64 = 2**64 - 1


def make(
    regions: str = "a=1M@0x40000000;b=1M@0x40100000;c=1M@0x40200000",
    map: str | None = None,
    asterisk: str | None = None,
    ram: tuple[int, int] = (BASE, 16 * M),
) -> Cma:
    return Cma.from_attributes(regions, map, asterisk, ram=[ram])


def unchanged(cma: Cma, call: Callable[[], object], error: type[CmaError]) -> CmaError:
    before = snapshot(cma)
    with pytest.raises(error) as info:
        call()
    assert snapshot(cma) == before
    return info.value


def region_of(cma: Cma, start: int) -> str:
    chunk = cma.chunk(start)
    return chunk.region.label


# ------------------------------------------------------------------------------ alloc via map
def test_alloc_first_matching_rule_wins() -> None:
    cma = make(map="dev=b;dev=a")
    assert cma.alloc("dev", "", 4 * K).region.name == "b"


def test_alloc_tries_names_in_order_and_falls_through_when_full() -> None:
    cma = make(map="dev=b,a")
    first = cma.alloc("dev", "", M)
    second = cma.alloc("dev", "", M)
    assert (first.region.name, second.region.name) == ("b", "a")
    assert first.start == 0x40100000 and second.start == BASE
    unchanged(cma, lambda: cma.alloc("dev", "", P), ENOMEM)


def test_alloc_skips_unknown_names() -> None:
    cma = make(map="dev=nosuch,c,a")
    assert cma.alloc("dev", "", P).region.name == "c"


def test_alloc_only_unknown_names_is_enomem() -> None:
    cma = make(map="dev=nosuch,other")
    error = unchanged(cma, lambda: cma.alloc("dev", "", P), ENOMEM)
    assert "nosuch" in str(error)


def test_alloc_no_rule_matches_falls_back_to_asterisk() -> None:
    cma = make(map="vpu=a", asterisk="c")
    assert cma.alloc("camera", "", P).region.name == "c"
    # a rule without a kind part matches only the empty kind: vpu/x falls back too
    assert cma.alloc("vpu", "x", P).region.name == "c"
    assert cma.alloc("vpu", "", P).region.name == "a"


def test_alloc_kind_patterns() -> None:
    cma = make(map="dev/k=a;dev/*=b;dev=c")
    assert cma.alloc("dev", "k", P).region.name == "a"
    assert cma.alloc("dev", "z", P).region.name == "b"
    assert cma.alloc("dev", "", P).region.name == "b"  # '/*' matches the empty kind too


def test_alloc_star_rule_uses_asterisk() -> None:
    cma = make(map="dev=*;other=a", asterisk="b,c")
    assert cma.alloc("dev", "", P).region.name == "b"


def test_alloc_map_unset_uses_asterisk() -> None:
    cma = make(asterisk="c,a")
    assert cma.map is None
    assert cma.alloc("anyone", "anything", P).region.name == "c"


def test_alloc_derived_asterisk_when_map_unset() -> None:
    cma = make()
    assert cma.asterisk == ("a", "b", "c")
    assert cma.alloc("x", "", P).region.name == "a"


def test_alloc_asterisk_unset_is_enoent() -> None:
    cma = make("-a=1M")
    assert cma.asterisk is None
    unchanged(cma, lambda: cma.alloc("dev", "", P), ENOENT)
    cma.set_map("other=a")
    unchanged(cma, lambda: cma.alloc("dev", "", P), ENOENT)  # no rule, no asterisk
    cma.set_map("dev=*")
    unchanged(cma, lambda: cma.alloc("dev", "", P), ENOENT)  # '*' rule, no asterisk


def test_alloc_empty_dev_is_einval() -> None:
    cma = make()
    unchanged(cma, lambda: cma.alloc("", "", P), EINVAL)
    unchanged(cma, lambda: cma.alloc("", "k", P), EINVAL)
    cma.set_map("x=a")
    unchanged(cma, lambda: cma.alloc("", "", P), EINVAL)


@pytest.mark.parametrize("size", [0, -1, -4096, 1.5, "4K", True, 2**64])
def test_alloc_bad_size_is_einval(size: Any) -> None:
    cma = make()
    unchanged(cma, lambda: cma.alloc("dev", "", size), EINVAL)


@pytest.mark.parametrize("alignment", [3, 6, 4097, 0x3000, -1, -4096, 2**64])
def test_alloc_bad_alignment_is_einval(alignment: int) -> None:
    cma = make()
    unchanged(cma, lambda: cma.alloc("dev", "", P, alignment), EINVAL)
    unchanged(cma, lambda: cma.alloc_from("a", P, alignment), EINVAL)
    region = cma.region("a")
    assert region is not None
    unchanged(cma, lambda: cma.alloc_from_region(region, P, alignment), EINVAL)


def test_alloc_rounds_size_to_pages_and_alignment_to_a_page() -> None:
    cma = make("a=64K@0x40000000", asterisk="a")
    one = cma.alloc("dev", "", 1)
    assert (one.size, one.requested) == (P, 1)
    two = cma.alloc("dev", "", P + 1, 1)
    assert (two.size, two.requested) == (2 * P, P + 1)
    for chunk in (one, two):
        assert chunk.start % P == 0
    assert cma.region("a").free_space == 64 * K - 3 * P  # type: ignore[union-attr]
    three = cma.alloc("dev", "", P, 2)  # alignment 2 still means a page
    assert three.start % P == 0
    aligned = cma.alloc("dev", "", P, 32 * K)
    assert aligned.start % (32 * K) == 0


def test_alloc_enomem_when_nothing_fits() -> None:
    cma = make()
    error = unchanged(cma, lambda: cma.alloc("dev", "", 2 * M), ENOMEM)
    assert "a, b, c" in str(error)
    cma.alloc("dev", "", M)
    cma.alloc("dev", "", M)
    cma.alloc("dev", "", M)
    unchanged(cma, lambda: cma.alloc("dev", "", P), ENOMEM)


def test_alloc_alignment_larger_than_region_is_enomem() -> None:
    cma = make("a=1M@0x40100000", asterisk="a")
    unchanged(cma, lambda: cma.alloc("dev", "", P, 1 << 30), ENOMEM)


def test_alloc_owner_is_recorded() -> None:
    cma = make()
    assert cma.alloc("dev", "", P, owner="guest0").owner == "guest0"
    assert cma.alloc("dev", "", P).owner is None


# ------------------------------------------------------------------------------ alloc_from
def test_alloc_from_list_in_order() -> None:
    cma = make()
    assert cma.alloc_from("c,a", M).region.name == "c"
    assert cma.alloc_from("c,a", M).region.name == "a"
    unchanged(cma, lambda: cma.alloc_from("c,a", P), ENOMEM)


@pytest.mark.parametrize("regions", ["*", None])
def test_alloc_from_star_and_none_use_asterisk(regions: str | None) -> None:
    cma = make(asterisk="b")
    assert cma.alloc_from(regions, P).region.name == "b"


def test_alloc_from_star_without_asterisk_is_enoent() -> None:
    cma = make("-a=1M")
    unchanged(cma, lambda: cma.alloc_from("*", P), ENOENT)
    unchanged(cma, lambda: cma.alloc_from(None, P), ENOENT)
    assert cma.alloc_from("a", P).region.name == "a"


@pytest.mark.parametrize("regions", ["a,,b", ",a", "a,", "a b", "a;b", "a\tb", "*,a", "a,*"])
def test_alloc_from_bad_list_is_einval(regions: str) -> None:
    cma = make()
    unchanged(cma, lambda: cma.alloc_from(regions, P), EINVAL)


def test_alloc_from_unknown_names_skipped() -> None:
    cma = make()
    assert cma.alloc_from("x,y,b", P).region.name == "b"
    unchanged(cma, lambda: cma.alloc_from("x,y", P), ENOMEM)


# ------------------------------------------------------------------------------ private regions
def test_private_region_only_reachable_through_alloc_from_region() -> None:
    cma = make("a=1M@0x40000000", asterisk="a")
    private = cma.region_register(0x40800000, M)
    assert private.name is None and private.label == "<private@0x40800000>"
    assert cma.region("") is None
    assert all(cma.alloc_from("a", M // 2).region is not private for _ in range(2))
    unchanged(cma, lambda: cma.alloc("dev", "", P), ENOMEM)
    unchanged(cma, lambda: cma.alloc_from("*", P), ENOMEM)
    chunk = cma.alloc_from_region(private, 3 * K, 16 * K)
    assert chunk.region is private and chunk.size == P and chunk.start % (16 * K) == 0
    assert private.free_space == M - P


def test_alloc_from_region_unregistered_is_einval() -> None:
    cma = make()
    stranger = Region(name="a", start=BASE, size=M)
    unchanged(cma, lambda: cma.alloc_from_region(stranger, P), EINVAL)
    private = cma.region_register(0x40800000, M)
    cma.region_unregister(private)
    unchanged(cma, lambda: cma.alloc_from_region(private, P), EINVAL)


def test_alloc_from_region_errors() -> None:
    cma = make()
    region = cma.region("a")
    assert region is not None
    unchanged(cma, lambda: cma.alloc_from_region(region, 0), EINVAL)
    unchanged(cma, lambda: cma.alloc_from_region(region, 2 * M), ENOMEM)


# ------------------------------------------------------------------------------ get / put / free
def test_get_put_refcounts() -> None:
    cma = make()
    chunk = cma.alloc_from("a", 8 * K)
    assert chunk.refcount == 1
    assert cma.get(chunk.start) is chunk
    assert chunk.refcount == 2
    assert cma.put(chunk.start) is False
    assert cma.chunks == [chunk]
    assert cma.put(chunk.start) is True
    assert cma.chunks == []
    assert chunk.refcount == 0
    assert cma.region("a").free_space == M  # type: ignore[union-attr]
    unchanged(cma, lambda: cma.put(chunk.start), ENOENT)
    unchanged(cma, lambda: cma.get(chunk.start), ENOENT)


def test_unknown_and_inside_addresses_are_enoent() -> None:
    cma = make()
    chunk = cma.alloc_from("a", 8 * K)
    for addr in (chunk.start + P, chunk.start + 1, chunk.end, 0, BASE + 15 * M):
        unchanged(cma, lambda addr=addr: cma.get(addr), ENOENT)
        unchanged(cma, lambda addr=addr: cma.put(addr), ENOENT)
        unchanged(cma, lambda addr=addr: cma.free(addr), ENOENT)
        unchanged(cma, lambda addr=addr: cma.chunk(addr), ENOENT)
    assert cma.chunk_containing(chunk.start + P) is chunk
    assert cma.chunk_containing(chunk.end) is None
    assert cma.chunk_containing(0) is None


def test_free_ignores_refcount() -> None:
    cma = make()
    chunk = cma.alloc_from("b", P)
    cma.get(chunk.start)
    cma.get(chunk.start)
    assert cma.free(chunk.start) is chunk
    assert cma.chunks == []
    unchanged(cma, lambda: cma.free(chunk.start), ENOENT)


def test_freed_space_is_reused() -> None:
    cma = make()
    chunk = cma.alloc_from("a", M)
    cma.free(chunk.start)
    again = cma.alloc_from("a", M)
    assert again.start == chunk.start


def test_release_owner() -> None:
    cma = make()
    mine = [cma.alloc_from("a", P, owner="g1"), cma.alloc_from("b", P, owner="g1")]
    other = cma.alloc_from("a", P, owner="g2")
    anon = cma.alloc_from("c", P)
    assert set(map(id, cma.release_owner("g1"))) == set(map(id, mine))
    assert cma.chunks == [other, anon]
    assert cma.release_owner("nobody") == []


def test_chunks_listed_in_address_order() -> None:
    cma = make()
    starts = [cma.alloc_from(n, P).start for n in ("c", "a", "b")]
    assert [c.start for c in cma.chunks] == sorted(starts)


# ------------------------------------------------------------------------------ info
def test_info_bounds_and_sums() -> None:
    cma = make(map="dev=c,a;solo=b")
    cma.alloc_from("a", 3 * P)
    info = cma.info("dev")
    assert info == CmaInfo(BASE, 0x40300000, 2 * M, 2 * M - 3 * P, 2)
    assert cma.info("solo", "") == CmaInfo(0x40100000, 0x40200000, M, M, 1)


def test_info_about_lists() -> None:
    cma = make()
    assert cma.info_about("b,c") == CmaInfo(0x40100000, 0x40300000, 2 * M, 2 * M, 2)
    assert cma.info_about("*") == CmaInfo(BASE, 0x40300000, 3 * M, 3 * M, 3)
    assert cma.info_about(None) == cma.info_about("*")


def test_info_no_known_region() -> None:
    cma = make(map="dev=nosuch")
    expected = CmaInfo(U64, 0, 0, 0, 0)
    assert cma.info_about("nosuch,other") == expected
    assert cma.info_about("") == expected
    assert cma.info("dev") == expected


def test_info_duplicates_counted_once() -> None:
    cma = make()
    assert cma.info_about("a,a,b,a") == CmaInfo(BASE, 0x40200000, 2 * M, 2 * M, 2)


def test_info_errors() -> None:
    cma = make("-a=1M")
    with pytest.raises(ENOENT):
        cma.info("dev")
    with pytest.raises(ENOENT):
        cma.info_about("*")
    with pytest.raises(EINVAL):
        cma.info("")
    with pytest.raises(EINVAL):
        cma.info_about("a,,b")


# ------------------------------------------------------------------------------ set_defaults
def test_set_defaults_explicit_asterisk_wins() -> None:
    cma = Cma()
    cma.set_defaults("a=1M;b=1M", "x=a", "b")
    assert cma.asterisk == ("b",)
    assert cma.map_text == "x=a"


def test_set_defaults_derived_asterisk_from_non_dash_names() -> None:
    cma = Cma()
    cma.set_defaults("-fw=1M/128K;b1=32M;-x=1M;b2=16M@0x44000000")
    assert cma.asterisk == ("b1", "b2")
    assert cma.asterisk_text == "b1,b2"
    assert [(e.name, e.in_asterisk) for e in cma.early_regions] == [
        ("fw", False),
        ("b1", True),
        ("x", False),
        ("b2", True),
    ]


def test_set_defaults_all_dash_derives_nothing() -> None:
    cma = Cma()
    cma.set_defaults("-a=1M;-b=1M")
    assert cma.asterisk is None and cma.asterisk_text == ""


def test_set_defaults_normalises_early_regions() -> None:
    cma = Cma()
    cma.set_defaults("a=5000@0x40001001/64K;b=1M@0/0;c=1")
    a, b, c = cma.early_regions
    assert (a.size, a.start, a.alignment) == (2 * P, 0x40010000, 64 * K)
    assert (b.size, b.start, b.alignment) == (M, None, P)
    assert (c.size, c.start, c.alignment) == (P, None, P)
    assert not any(e.reserved for e in cma.early_regions)


@pytest.mark.parametrize(
    ("regions", "map", "asterisk"),
    [
        ("a=1Q", "x=a", "a"),
        ("a=1M", "x", "a"),
        ("a=1M", "x=a", "a,,b"),
        ("a=0", None, None),
        ("a=1M/3", None, None),
        ("=1M", None, None),
        ("a=1M@0xfffffffffffff000", None, None),
    ],
)
def test_set_defaults_invalid_changes_nothing(
    regions: str, map: str | None, asterisk: str | None
) -> None:
    cma = Cma()
    cma.set_defaults("old=1M", "old=old", "old")
    unchanged(cma, lambda: cma.set_defaults(regions, map, asterisk), EINVAL)


def test_set_map_and_asterisk_runtime() -> None:
    cma = make()
    cma.set_map("dev=b")
    assert cma.map_text == "dev=b"
    unchanged(cma, lambda: cma.set_map("dev"), EINVAL)
    cma.set_map("")
    assert cma.map is None and cma.map_text == ""
    cma.set_asterisk("c")
    assert cma.asterisk == ("c",)
    unchanged(cma, lambda: cma.set_asterisk("a,,"), EINVAL)
    cma.set_asterisk("")
    assert cma.asterisk is None


def test_a_repeated_request_follows_every_change_of_map_asterisk_and_regions() -> None:
    """alloc remembers where a (dev, kind) goes; each change of what decides that is seen."""
    cma = make(map="dev=a;*/*=*", asterisk="c")

    def region_of(dev: str, kind: str = "") -> str | None:
        chunk = cma.alloc(dev, kind, P)
        return chunk.region.name

    assert region_of("dev") == "a"
    assert region_of("other") == "c"
    cma.set_map("dev=b;*/*=*")
    assert region_of("dev") == "b"
    cma.set_asterisk("a")
    assert region_of("other") == "a"
    cma.set_defaults(None, "dev=c")
    assert region_of("dev") == "c"
    cma.set_map("dev=d,c")
    assert region_of("dev") == "c"  # no region d yet
    d = cma.region_register(0x40800000, M, name="d")
    assert region_of("dev") == "d"
    for chunk in [c for c in cma.chunks if c.region is d]:
        cma.free(chunk.start)
    cma.region_unregister(d)
    assert region_of("dev") == "c"
    cma.set_map("dev=d")
    with pytest.raises(ENOMEM):
        cma.alloc("dev", "", P)


def test_alloc_remembers_a_bounded_number_of_targets() -> None:
    cma = make(asterisk="a")
    for i in range(5000):
        chunk = cma.alloc(f"dev{i}", "", P)
        cma.free(chunk.start)
    assert len(cma._targets) <= 4096


# ------------------------------------------------------------------------------ early regions
LAYOUT = RamLayout((RamBank(BASE, 16 * M),), (ReservedRange("the kernel", BASE, 2 * M),))


def test_early_register_reserve_init() -> None:
    cma = Cma()
    fixed = cma.early_region_register("fixed", M, start=0x40400000)
    anywhere = cma.early_region_register("any", 3 * P + 1, alignment=64 * K)
    private = cma.early_region_register(None, M)
    assert anywhere.size == 4 * P and anywhere.alignment == 64 * K
    assert [e.name for e in cma.early_regions] == ["fixed", "any", None]
    reserved = cma.early_regions_reserve(LAYOUT)
    assert reserved == [fixed, anywhere, private]
    assert fixed.start == 0x40400000 and fixed.reserved
    assert anywhere.start == 0x40FF0000
    assert private.start == 0x40EF0000  # below "any" (0x40ff0000-0x40ff3fff)
    regions = cma.init()
    assert [r.label for r in regions] == ["fixed", "any", "<private@0x40ef0000>"]
    assert cma.early_regions == []
    assert cma.region("fixed").start == 0x40400000  # type: ignore[union-attr]
    assert cma.region("any").in_asterisk  # type: ignore[union-attr]
    assert not private.in_asterisk


@pytest.mark.parametrize("alignment", [3, -1, 0x3000])
def test_early_register_bad_alignment(alignment: int) -> None:
    cma = Cma()
    unchanged(cma, lambda: cma.early_region_register("a", M, alignment=alignment), EINVAL)


def test_early_register_bad_size_and_overflow() -> None:
    cma = Cma()
    unchanged(cma, lambda: cma.early_region_register("a", 0), EINVAL)
    unchanged(cma, lambda: cma.early_region_register("a", -P), EINVAL)
    unchanged(cma, lambda: cma.early_region_register("a", M, start=U64 - P), EINVAL)


def test_early_reserve_all_or_nothing() -> None:
    cma = Cma()
    cma.early_region_register("ok", M)
    cma.early_region_register("bad", M, start=BASE)  # on the kernel
    error = unchanged(cma, lambda: cma.early_regions_reserve(LAYOUT), EADDRINUSE)
    assert "the kernel" in str(error) and "0x40000000-0x400fffff" in str(error)
    assert not any(e.reserved for e in cma.early_regions)


def test_early_reserve_too_big_all_or_nothing() -> None:
    cma = Cma()
    cma.early_region_register("ok", M)
    cma.early_region_register("huge", 15 * M)
    unchanged(cma, lambda: cma.early_regions_reserve(LAYOUT), ENOMEM)


def test_early_reserve_twice_keeps_earlier_reservations() -> None:
    cma = Cma()
    first = cma.early_region_register("one", M)
    cma.early_regions_reserve(LAYOUT)
    second = cma.early_region_register("two", M)
    assert cma.early_regions_reserve(LAYOUT) == [second]
    assert first.start == 0x40F00000 and second.start == 0x40E00000


def test_init_drops_unreserved_regions() -> None:
    cma = Cma()
    cma.early_region_register("never", M)
    assert cma.init() == []
    assert cma.regions == [] and cma.early_regions == []


def test_early_reserve_avoids_registered_regions() -> None:
    cma = Cma()
    cma.region_register(0x40F00000, M, name="drv")
    early = cma.early_region_register("late", M)
    cma.early_regions_reserve(LAYOUT)
    assert early.start == 0x40E00000
    cma.init()
    assert [r.label for r in cma.regions] == ["late", "drv"]


def test_early_reserve_conflict_with_registered_region() -> None:
    cma = Cma()
    cma.region_register(0x40800000, M, name="drv")
    cma.early_region_register("x", M, start=0x40400000)
    cma.early_region_register("y", M, start=0x40800000)
    error = unchanged(cma, lambda: cma.early_regions_reserve(LAYOUT), EADDRINUSE)
    assert "drv" in str(error) and "0x40800000-0x408fffff" in str(error)


def test_init_all_or_nothing_on_conflict() -> None:
    cma = Cma()
    cma.early_region_register("x", M, start=0x40400000)
    cma.early_region_register("y", M, start=0x40800000)
    cma.early_regions_reserve(LAYOUT)
    cma.region_register(0x40800000, M, name="drv")  # registered after the reservation
    error = unchanged(cma, cma.init, EADDRINUSE)
    assert "region y" in str(error) and "region drv" in str(error)
    assert [r.label for r in cma.regions] == ["drv"]


def test_from_attributes_aquila_seed() -> None:
    cma = Cma.from_attributes(
        "-mfc_fw=1M/128K;mfc_b1=32M;mfc_b2=16M@0x44000000",
        "s3c-mfc5/f=mfc_fw;s3c-mfc5/a=mfc_b1;s3c-mfc5/b=mfc_b2",
        ram=[(BASE, 384 * M)],
        keep_free=[ReservedRange("the kernel", BASE, 32 * M)],
    )
    assert cma.asterisk == ("mfc_b1", "mfc_b2")
    layout = {r.name: (r.start, r.size) for r in cma.regions}
    assert layout == {
        "mfc_b2": (0x44000000, 16 * M),
        "mfc_fw": (0x57F00000, M),
        "mfc_b1": (0x55F00000, 32 * M),
    }
    assert cma.alloc("s3c-mfc5", "f", 4 * K).region.name == "mfc_fw"
    assert cma.alloc("s3c-mfc5", "b", 4 * K).region.name == "mfc_b2"
    assert cma.alloc("s3c-mfc5", "x", 4 * K).region.name == "mfc_b1"  # asterisk fallback


# ------------------------------------------------------------------------------ region_register
def test_region_register_overlap_names_both_ranges() -> None:
    cma = make()
    error = unchanged(cma, lambda: cma.region_register(0x401FF000, P, name="new"), EADDRINUSE)
    assert "new" in str(error) and "0x401ff000-0x401fffff" in str(error)
    assert "region b" in str(error) and "0x40100000-0x401fffff" in str(error)
    error = unchanged(cma, lambda: cma.region_register(0x402FF000, 2 * P), EADDRINUSE)
    assert "<private>" in str(error) and "region c" in str(error)


@pytest.mark.parametrize(
    ("start", "size"),
    [
        (0x40800000, 0),
        (0x40800000, -P),
        (0x40800000, 100),
        (0x40800001, P),
        (-P, P),
        (2**64 - P, 2 * P),
    ],
)
def test_region_register_invalid(start: int, size: int) -> None:
    cma = make()
    unchanged(cma, lambda: cma.region_register(start, size, name="n"), EINVAL)


def test_region_register_touching_is_fine() -> None:
    cma = make()
    region = cma.region_register(0x40300000, P, name="d", in_asterisk=True)
    assert region.free_space == P and region.users == 0 and region.allocator is None
    assert [r.name for r in cma.regions] == ["a", "b", "c", "d"]


def test_duplicate_names_most_recent_wins() -> None:
    cma = make()
    newer = cma.region_register(0x40800000, M, name="a")
    assert cma.region("a") is newer
    assert cma.alloc_from("a", P).region is newer
    assert cma.info_about("a").lower_bound == 0x40800000
    cma.free(cma.chunks[0].start)
    cma.region_unregister(newer)
    assert cma.region("a") is not None and cma.region("a").start == BASE  # type: ignore[union-attr]


def test_region_unregister() -> None:
    cma = make()
    b = cma.region("b")
    assert b is not None
    chunk = cma.alloc_from("b", P)
    unchanged(cma, lambda: cma.region_unregister(b), EBUSY)
    cma.free(chunk.start)
    cma.region_unregister(b)
    assert cma.region("b") is None
    assert [r.name for r in cma.regions] == ["a", "c"]
    unchanged(cma, lambda: cma.region_unregister(b), ENOENT)
    # its range can be registered again
    assert cma.region_register(0x40100000, M, name="b2").start == 0x40100000


# ------------------------------------------------------------------------------ allocators
class Xyz(BestFitAllocator):
    name = "xyz"


class Broken(BestFitAllocator):
    name = "broken"

    def __init__(self, start: int, size: int) -> None:
        raise RuntimeError("cannot start")


def test_lazy_attach_default_allocator() -> None:
    cma = make()
    a = cma.region("a")
    assert a is not None and a.allocator is None and a.attached is None
    cma.alloc_from("a", P)
    assert a.attached == "bf"


def test_region_waiting_for_unloaded_allocator() -> None:
    cma = make("w=1M@0x40000000:xyz;a=1M@0x40100000")
    w = cma.region("w")
    assert w is not None and w.allocator_name == "xyz"
    unchanged(cma, lambda: cma.alloc_from("w", P), ENOMEM)
    assert w.attach_failed
    unchanged(cma, lambda: cma.alloc_from("w", P), ENOMEM)  # not retried lazily
    cma.allocator_register(Broken)  # another name: still waiting
    assert w.allocator is None
    unchanged(cma, lambda: cma.alloc_from("w", P), ENOMEM)
    cma.allocator_register(Xyz)
    assert w.attached == "xyz"
    assert cma.alloc_from("w", P).region is w
    assert cma.registry.names() == ["bf", "bitmap", "broken", "xyz"]


def test_allocator_register_attaches_only_to_regions_asking_for_it() -> None:
    cma = make("w=1M@0x40000000:xyz;a=1M@0x40100000")
    a = cma.region("a")
    cma.allocator_register(Xyz)
    assert a is not None and a.allocator is None  # asked for the default; lazy
    assert cma.region("w").attached == "xyz"  # type: ignore[union-attr]


def test_allocator_register_duplicate_name_changes_nothing() -> None:
    cma = make()
    before = cma.registry.names()
    with pytest.raises(EBUSY):
        cma.allocator_register(BestFitAllocator)
    assert cma.registry.names() == before


def test_allocator_whose_init_fails() -> None:
    cma = make("w=1M@0x40000000:broken")
    cma.allocator_register(Broken)
    w = cma.region("w")
    assert w is not None and w.allocator is None and w.attach_failed
    unchanged(cma, lambda: cma.alloc_from("w", P), ENOMEM)


def test_set_region_allocator() -> None:
    cma = make()
    a = cma.region("a")
    assert a is not None
    chunk = cma.alloc_from("a", P)
    unchanged(cma, lambda: cma.set_region_allocator(a, "bitmap"), EBUSY)
    cma.free(chunk.start)
    cma.set_region_allocator(a, "bitmap")
    assert a.allocator is None and a.allocator_name == "bitmap"
    cma.alloc_from("a", P)
    assert a.attached == "bitmap"
    b = cma.region("b")
    assert b is not None
    cma.set_region_allocator(b, "nosuch")
    unchanged(cma, lambda: cma.alloc_from("b", P), ENOMEM)
    cma.set_region_allocator(b, None)
    assert cma.alloc_from("b", P).region.attached == "bf"
    stranger = Region(name="s", start=0, size=P)
    with pytest.raises(ENOENT):
        cma.set_region_allocator(stranger, "bf")


# ------------------------------------------------------------------------------ stats
def test_stats_counters() -> None:
    cma = make("a=64K@0x40000000;b=64K@0x40100000")
    chunk = cma.alloc_from("a", 3 * P)
    cma.alloc_from("a", 5 * P)
    assert cma.alloc_from("a,b", 32 * K + 1).region.name == "b"  # 9 pages: a fails
    with pytest.raises(ENOMEM):
        cma.alloc_from("a,b", 128 * K)  # 32 pages: both fail
    cma.free(chunk.start)
    a, b = cma.stats()
    assert (a.name, a.start) == ("a", BASE)
    assert a.alloc_pages_success == 8
    assert a.alloc_pages_fail == 9 + 32
    assert a.release_pages_success == 3
    assert a.total_pages == 16
    assert a.available_pages == 11
    assert a.maxchunk == 8 * P  # holes: 3 pages at the start, 8 after the 5-page chunk
    assert b.alloc_pages_fail == 32 and b.alloc_pages_success == 9
    assert b.release_pages_success == 0
    assert (b.total_pages, b.available_pages) == (16, 7)
    assert b.maxchunk == 7 * P


def test_stats_success_counted_on_the_region_that_served() -> None:
    cma = make("a=8K@0x40000000;b=64K@0x40100000")
    cma.alloc_from("a,b", 12 * K)
    a, b = cma.stats()
    assert (a.alloc_pages_fail, a.alloc_pages_success) == (3, 0)
    assert (b.alloc_pages_fail, b.alloc_pages_success) == (0, 3)


# ------------------------------------------------------------------------------ events
def test_events() -> None:
    cma = make(map="dev=a")
    seen: list[CmaEvent] = []
    unsubscribe = cma.subscribe(seen.append)
    chunk = cma.alloc("dev", "k", 3 * K, owner="o")
    other = cma.alloc_from("b", P)
    with pytest.raises(ENOMEM):
        cma.alloc("dev", "", 2 * M)
    with pytest.raises(EINVAL):
        cma.alloc("dev", "", 0)
    cma.get(chunk.start)
    cma.put(chunk.start)  # still referenced: no event
    cma.put(chunk.start)
    cma.free(other.start)
    assert [type(e) for e in seen] == [
        AllocEvent,
        AllocEvent,
        AllocFailedEvent,
        AllocFailedEvent,
        FreeEvent,
        FreeEvent,
    ]
    first = seen[0]
    assert isinstance(first, AllocEvent)
    assert (first.chunk, first.dev, first.kind) == (chunk, "dev", "k")
    second = seen[1]
    assert isinstance(second, AllocEvent) and (second.dev, second.kind) == (None, None)
    failed = seen[2]
    assert isinstance(failed, AllocFailedEvent)
    assert (failed.dev, failed.regions, failed.size) == ("dev", ("a",), 2 * M)
    assert isinstance(failed.error, ENOMEM)
    invalid = seen[3]
    assert isinstance(invalid, AllocFailedEvent) and isinstance(invalid.error, EINVAL)
    freed = seen[4]
    assert isinstance(freed, FreeEvent) and freed.chunk is chunk
    unsubscribe()
    unsubscribe()  # twice is harmless
    cma.alloc_from("a", P)
    assert len(seen) == 6


def test_alloc_from_region_events() -> None:
    cma = make()
    seen: list[CmaEvent] = []
    cma.subscribe(seen.append)
    region = cma.region("c")
    assert region is not None
    cma.alloc_from_region(region, P)
    with pytest.raises(ENOMEM):
        cma.alloc_from_region(region, 2 * M)
    assert [type(e) for e in seen] == [AllocEvent, AllocFailedEvent]
    failed = seen[1]
    assert isinstance(failed, AllocFailedEvent) and failed.regions == ("c",)


def test_raising_listener_does_not_break_allocation(caplog: pytest.LogCaptureFixture) -> None:
    cma = make()
    seen: list[CmaEvent] = []

    def boom(event: CmaEvent) -> None:
        raise RuntimeError("listener bug")

    cma.subscribe(boom)
    cma.subscribe(seen.append)
    chunk = cma.alloc_from("a", P)
    assert cma.chunks == [chunk]
    cma.free(chunk.start)
    assert cma.chunks == []
    with pytest.raises(ENOMEM):
        cma.alloc_from("a", 2 * M)
    assert len(seen) == 3
    assert "listener" in caplog.text


def test_release_owner_emits_free_events() -> None:
    cma = make()
    cma.alloc_from("a", P, owner="g")
    cma.alloc_from("b", P, owner="g")
    seen: list[CmaEvent] = []
    cma.subscribe(seen.append)
    cma.release_owner("g")
    assert [type(e) for e in seen] == [FreeEvent, FreeEvent]


def test_set_defaults_empty_asterisk_means_not_given() -> None:
    cma = Cma()
    cma.set_defaults("a=1M;-b=1M", None, "")
    assert cma.asterisk == ("a",)
