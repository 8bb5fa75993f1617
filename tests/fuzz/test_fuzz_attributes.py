"""Fuzz the regions, map and asterisk attributes where they enter the framework.

The unit property tests check the parsers alone; here the same text goes through
``cma_set_defaults``, early placement and ``cma_init`` (a board boot), and through the runtime
``map`` / ``asterisk`` writes of a framework that holds chunks. Every outcome is a working
framework or one of the project's errors, and an error changes nothing.
"""

from __future__ import annotations

import itertools

from cma_helpers import allocator_registry
from fuzzing import check_error, fuzz, no_hang, ram_spans
from hypothesis import given
from hypothesis import strategies as st
from strategies import asterisk_texts, map_texts, regions_texts
from test_framework_properties import (  # type: ignore[import-not-found]
    build,
    check_invariants,
    snapshot,
)

from cma_qemu.attributes import PAGE_SIZE, derive_asterisk, parse_asterisk, parse_map, parse_regions
from cma_qemu.errors import AttributeSyntaxError, CmaError
from cma_qemu.framework import Cma
from cma_qemu.regions import RamBank, ReservedRange

BASE = 0x40000000
M = 1 << 20
RAMS = [
    (RamBank(BASE, 32 * M),),
    (RamBank(BASE, 8 * M), RamBank(BASE + 8 * M, 8 * M)),
    (RamBank(BASE, 4 * M), RamBank(0x80000000, 16 * M)),
]
KEEP_FREE = [(), (ReservedRange("the kernel", BASE, 2 * M),)]


def _placed_within(cma: Cma, banks: tuple[RamBank, ...], keep: tuple[ReservedRange, ...]) -> None:
    spans = ram_spans(banks)
    regions = cma.regions
    for left, right in itertools.pairwise(regions):
        assert left.end <= right.start
    for region in regions:
        assert region.start % PAGE_SIZE == 0 and region.size % PAGE_SIZE == 0
        assert any(low <= region.start and region.end <= high for low, high in spans)
        assert all(region.end <= k.start or k.end <= region.start for k in keep)
        assert region.free_space == region.size and region.users == 0


@fuzz
@given(
    regions=regions_texts,
    map_text=st.none() | map_texts,
    asterisk=st.none() | asterisk_texts,
    ram=st.sampled_from(RAMS),
    keep=st.sampled_from(KEEP_FREE),
)
def test_boot_from_attributes(
    regions: str,
    map_text: str | None,
    asterisk: str | None,
    ram: tuple[RamBank, ...],
    keep: tuple[ReservedRange, ...],
) -> None:
    """``Cma.from_attributes`` (set_defaults, early reserve, init): a framework or one error."""
    try:
        with no_hang():
            cma = Cma.from_attributes(
                regions, map_text, asterisk, ram=ram, keep_free=keep, registry=allocator_registry()
            )
    except CmaError as error:
        check_error(error)
        return
    _placed_within(cma, ram, keep)
    specs = parse_regions(regions) if regions else ()
    assert sorted(r.name or "" for r in cma.regions) == sorted(s.name for s in specs)
    explicit = parse_asterisk(asterisk) if asterisk else ()
    assert cma.asterisk == (explicit or derive_asterisk(specs) or None)
    assert cma.map == (parse_map(map_text) if map_text else None)
    # the framework serves: every region with a loaded allocator takes a page, and gives it back
    for region in cma.regions:
        if region.allocator_name not in (None, *cma.registry.names()):
            continue
        chunk = cma.alloc_from_region(region, PAGE_SIZE)
        assert region.start <= chunk.start < region.end
        check_invariants(cma, {c.start: 0 for c in cma.chunks})
        cma.free(chunk.start)


def _framework_with_chunks(allocator: str) -> Cma:
    cma = build(
        [("a", BASE, 16 * PAGE_SIZE), ("b", BASE + 32 * PAGE_SIZE, 8 * PAGE_SIZE)], allocator
    )
    cma.alloc_from("a", PAGE_SIZE)
    cma.alloc_from("b", 2 * PAGE_SIZE)
    return cma


@fuzz
@given(
    writes=st.lists(st.tuples(st.sampled_from(["map", "asterisk"]), map_texts | asterisk_texts)),
    allocator=st.sampled_from(["bf", "bitmap"]),
)
def test_runtime_map_and_asterisk_writes(writes: list[tuple[str, str]], allocator: str) -> None:
    """The sysfs writes: a bad one keeps everything; a good one reads back as written."""
    cma = _framework_with_chunks(allocator)
    for attribute, text in writes:
        before = snapshot(cma)
        try:
            with no_hang():
                if attribute == "map":
                    cma.set_map(text)
                else:
                    cma.set_asterisk(text)
        except CmaError as error:
            check_error(error)
            assert isinstance(error, AttributeSyntaxError) and error.attribute == attribute
            assert snapshot(cma) == before
            continue
        if attribute == "map":
            assert cma.map == parse_map(text)
            assert parse_map(cma.map_text) == cma.map
        else:
            assert cma.asterisk == (parse_asterisk(text) or None)
            assert parse_asterisk(cma.asterisk_text) == (cma.asterisk or ())
        # chunks, regions and stats are untouched by attribute writes
        assert snapshot(cma)[:2] == before[:2]
        for dev, kind in (("d0", ""), ("d1", "k"), ("video", ""), ("x", "y")):
            try:
                cma.info(dev, kind)
            except CmaError as error:
                check_error(error)
        check_invariants(cma, {c.start: 0 for c in cma.chunks})
