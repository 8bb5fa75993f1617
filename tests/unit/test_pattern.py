"""The stub's fill pattern checked from the host: exact offsets, 32-bit wrap, partial words."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from cma_qemu.pattern import expected_pattern, find_mismatch


def fill(pattern: int, size: int) -> bytes:
    words = (size + 3) // 4
    return b"".join(struct.pack("<I", (pattern + i) & 0xFFFFFFFF) for i in range(words))


def test_the_pattern_wraps_at_32_bits() -> None:
    assert list(expected_pattern(0xFFFFFFFE, 4)) == [0xFFFFFFFE, 0xFFFFFFFF, 0, 1]


@given(st.integers(0, 2**32 - 1), st.integers(1, 4096), st.data())
def test_the_first_broken_word_is_found(pattern: int, size: int, data: st.DataObject) -> None:
    good = fill(pattern, size)
    assert find_mismatch(good, size, pattern) is None
    word = data.draw(st.integers(0, (size + 3) // 4 - 1))
    bad = bytearray(good)
    bad[word * 4] ^= 0x01
    assert find_mismatch(bytes(bad), size, pattern) == word * 4
