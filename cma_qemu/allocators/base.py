"""The allocator plug-in interface: one instance per region, like ``reg->private_data``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

from cma_qemu.errors import EOPNOTSUPP

__all__ = ["Allocator"]


class Allocator(ABC):
    """Manages the free space of one region.

    The framework serialises every call, rounds ``size`` up to a page and ``alignment`` up to a
    power of two >= PAGE_SIZE before calling :meth:`alloc`, and only passes :meth:`free` a
    ``(start, size)`` pair that :meth:`alloc` returned. Constructing an instance is the
    ``init(reg)`` of the 2010 interface; :meth:`cleanup` is ``cleanup(reg)``.

    Each implementation states the runtime complexity of its methods; the framework's own
    costs (``Cma``) are given in terms of them.
    """

    #: The name regions ask for in ``:ALLOC-NAME`` and that the registry files it under.
    name: ClassVar[str]

    def __init__(self, start: int, size: int) -> None:
        self.start = start
        self.size = size

    @abstractmethod
    def alloc(self, size: int, alignment: int) -> int | None:
        """Return the start of a free, aligned ``size``-byte block and mark it used, or None."""

    @abstractmethod
    def free(self, start: int, size: int) -> None:
        """Give back a block that :meth:`alloc` returned."""

    @abstractmethod
    def holes(self) -> Iterator[tuple[int, int]]:
        """Yield the free blocks as ``(start, size)`` in address order (maximal, merged)."""

    @abstractmethod
    def largest_free(self) -> int:
        """Size of the largest free block (``maxchunk`` in the stats)."""

    def reserve(self, start: int, size: int) -> bool:
        """Mark exactly ``[start, start+size)`` used if all of it is free; False (no change)
        otherwise. The framework uses it to restore a journal's chunks at their old places.

        Optional: an allocator without it raises EOPNOTSUPP, and its regions cannot be
        restored.
        """
        raise EOPNOTSUPP(f"allocator {self.name} cannot reserve a given range", where=self.name)

    def cleanup(self) -> None:  # noqa: B027 - optional hook, like the C interface
        """Called when the region is unregistered; the region holds no chunks by then."""
