"""The shared unit, alignment and overlap helpers, against brute force."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from cma_qemu.units import GiB, KiB, MiB, align_up, ranges_overlap

small = st.integers(min_value=0, max_value=300)


def test_units() -> None:
    assert (KiB, MiB, GiB) == (1024, 1024 * 1024, 1024**3)


@given(st.integers(min_value=0, max_value=2**64), st.integers(min_value=1, max_value=2**20))
def test_align_up_is_the_next_multiple(value: int, alignment: int) -> None:
    aligned = align_up(value, alignment)
    assert aligned % alignment == 0
    assert value <= aligned < value + alignment


@given(small, small, small, small)
def test_ranges_overlap_is_sharing_a_byte(a: int, a_len: int, b: int, b_len: int) -> None:
    shared = set(range(a, a + a_len)) & set(range(b, b + b_len))
    assert ranges_overlap(a, a + a_len, b, b + b_len) is bool(shared)
    assert ranges_overlap(b, b + b_len, a, a + a_len) is bool(shared)
