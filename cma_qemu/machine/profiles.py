"""What the machine layer reads from a board, and the RAM it spans.

:class:`cma_qemu.boards.Board` satisfies :class:`BoardLike`; the machine layer never imports
the board files' module, so a test or a harness can hand it anything with these fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["BoardLike", "ChannelLike", "RamBankLike", "ram_extent"]


class RamBankLike(Protocol):
    @property
    def base(self) -> int: ...
    @property
    def size(self) -> int: ...


class ChannelLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...


class BoardLike(Protocol):
    """The fields of a board the machine layer reads."""

    @property
    def name(self) -> str: ...
    @property
    def machine_type(self) -> str: ...
    @property
    def cpu(self) -> str | None: ...
    @property
    def kernel_flavour(self) -> str: ...
    @property
    def ram(self) -> Sequence[RamBankLike]: ...
    @property
    def channel(self) -> ChannelLike: ...
    @property
    def memory_access(self) -> str: ...


def ram_extent(board: BoardLike) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """``(base, total size, banks)`` of a board's RAM."""
    banks = tuple((b.base, b.size) for b in board.ram)
    return min(b for b, _ in banks), sum(s for _, s in banks), banks
