"""The stub's ``write`` fill pattern, checked from the host: ``word[i] = (pattern + i) mod 2^32``
(docs/line-format.md), with numpy: no Python loop per word.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["expected_pattern", "find_mismatch"]


def expected_pattern(pattern: int, nwords: int) -> np.ndarray[Any, np.dtype[np.uint32]]:
    """``word[i] = (pattern + i) mod 2^32``, the stub's ``write`` fill (docs/line-format.md)."""
    words = np.arange(nwords, dtype=np.uint32)
    words += np.uint32(pattern & 0xFFFFFFFF)  # uint32 arithmetic wraps, as in the stub
    return words


def find_mismatch(data: bytes | memoryview, size: int, pattern: int) -> int | None:
    """Byte offset of the first word of ``data`` that breaks the pattern over ``size`` bytes.

    Cost: O(size), two passes of numpy over the words (no Python loop).
    """
    nwords = (size + 3) // 4
    words = np.frombuffer(data, dtype="<u4", count=nwords)
    expected = expected_pattern(pattern, nwords)
    if np.array_equal(words, expected):
        return None
    return int(np.flatnonzero(words != expected)[0]) * 4
