"""Byte units, alignment and address-range overlap: the few helpers every layer shares.

No imports from the project, so the framework, the machine layer and the board files can all
use it without depending on each other. Ranges are half-open: ``[start, end)``.
"""

from __future__ import annotations

__all__ = ["GiB", "KiB", "MiB", "align_up", "ranges_overlap"]

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30


def align_up(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of ``alignment`` (> 0). Runtime complexity: O(1)."""
    return -(-value // alignment) * alignment


def ranges_overlap(a_start: int, a_end: int, b_start: int, b_end: int) -> bool:
    """True when ``[a_start, a_end)`` and ``[b_start, b_end)`` share at least one byte.

    Empty ranges overlap nothing. Runtime complexity: O(1).
    """
    return a_start < b_end and b_start < a_end and a_start < a_end and b_start < b_end
