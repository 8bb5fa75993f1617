"""The framework's address-ordered chunk index, which is built on first use.

``Cma`` keeps chunks in a dict and builds its sorted index of starts only when something asks
for address order (``chunks``, ``chunk_containing``, ``release_owner``); from then on alloc
and free keep it up to date. Random alloc/free sequences, with the first ordered query at a
random point, must always answer like a naive sort of the live chunks.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cma_qemu.framework import Chunk, Cma

P = 4096
BASE = 0x40000000


def _naive_containing(chunks: list[Chunk], addr: int) -> Chunk | None:
    return next((c for c in chunks if c.start <= addr < c.end), None)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(1, 16), st.integers(0, 1000)), max_size=80),
    first_query=st.integers(0, 80),
    probes=st.lists(st.integers(0, 64 * P), max_size=8),
)
def test_address_order_matches_a_naive_sort(
    ops: list[tuple[bool, int, int]], first_query: int, probes: list[int]
) -> None:
    cma = Cma.from_attributes("t=256K", ram=[(BASE, 16 << 20)])
    live: dict[int, Chunk] = {}
    for step, (is_alloc, pages, pick) in enumerate(ops):
        if is_alloc or not live:
            try:
                chunk = cma.alloc("d", "", pages * P, 0, owner="a" if pick % 2 else "b")
            except Exception:
                continue
            live[chunk.start] = chunk
        else:
            start = sorted(live)[pick % len(live)]
            cma.free(start)
            del live[start]
        if step >= first_query:  # from here on the index exists and must be maintained
            ordered = sorted(live.values(), key=lambda c: c.start)
            assert cma.chunks == ordered
            region = cma.regions[0]
            for probe in probes:
                addr = region.start + probe
                assert cma.chunk_containing(addr) is _naive_containing(ordered, addr)
    released = cma.release_owner("a")
    assert [c.start for c in released] == sorted(c.start for c in live.values() if c.owner == "a")
    assert cma.chunks == sorted((c for c in live.values() if c.owner == "b"), key=lambda c: c.start)
