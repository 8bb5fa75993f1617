"""Offline replay: a script in the stub's line format against the framework, no QEMU.

The same regions, placed the same way as at boot, give the same addresses the guest sees, so
a recorded guest session can be replayed and compared, or tried under another allocator.
"""

from __future__ import annotations

import gc
import io
from collections.abc import Callable
from dataclasses import dataclass

from cma_qemu.configuration import use_allocator
from cma_qemu.errors import EINVAL
from cma_qemu.framework import Cma
from cma_qemu.regions import RamBank
from cma_qemu.script import FrameworkBackend, ScriptRunner, parse_number

__all__ = [
    "RegionSummary",
    "ReplayResult",
    "external_fragmentation",
    "parse_ram",
    "replay",
]


def external_fragmentation(largest_free: int, free: int) -> float:
    """1 - largest free block / total free: 0 when the free space is one block (or none).

    How much of the free space a single request cannot use; the figure an allocator
    comparison needs beside "free", since two allocators can leave the same bytes free in
    very different shapes.
    """
    return 1.0 - largest_free / free if free else 0.0


@dataclass(frozen=True)
class RegionSummary:
    """One region at the end of a replay."""

    name: str | None
    start: int
    size: int
    free: int
    largest_free: int
    allocator: str | None

    @property
    def fragmentation(self) -> float:
        """External fragmentation of this region (see :func:`external_fragmentation`)."""
        return external_fragmentation(self.largest_free, self.free)


@dataclass(frozen=True)
class ReplayResult:
    """What one replay printed and how the allocator fared."""

    allocator: str | None
    stdout: str
    stderr: str
    allocations: int
    failed_allocations: int
    errors: int
    regions: tuple[RegionSummary, ...]

    @property
    def succeeded(self) -> int:
        """Allocations that returned a chunk."""
        return self.allocations - self.failed_allocations

    @property
    def largest_free(self) -> int:
        """The largest free block over all regions."""
        return max((r.largest_free for r in self.regions), default=0)

    @property
    def free(self) -> int:
        """Free bytes over all regions."""
        return sum(r.free for r in self.regions)

    @property
    def fragmentation(self) -> float:
        """Over all regions: 1 - the largest free block anywhere / all free bytes."""
        return external_fragmentation(self.largest_free, self.free)


def parse_ram(text: str) -> RamBank:
    """``BASE:SIZE`` (memparse numbers) for ``--ram``."""
    base_text, colon, size_text = text.partition(":")
    base = parse_number(base_text)
    size = parse_number(size_text) if colon else None
    if base is None or size is None or size == 0:
        raise EINVAL(f"--ram {text!r}: expected BASE:SIZE, for example 0x40000000:512M")
    if base % 4096 or size % 4096:
        raise EINVAL(f"--ram {text!r}: base and size must be multiples of the 4 KiB page")
    return RamBank(base, size)


def replay(
    script: str,
    cma: Cma,
    allocator: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Run ``script`` against ``cma``, optionally with every region on one allocator.

    ``progress(lines done, lines in all)`` is called every few thousand lines (see
    :meth:`ScriptRunner.run`). Cost: the script's lines, each O(log n) in live chunks plus one
    allocator call.
    """
    if allocator is not None:
        use_allocator(cma, allocator)
    out, err = io.StringIO(), io.StringIO()
    runner = ScriptRunner(FrameworkBackend(cma), out, err)
    # A replay makes no reference cycles, so the cycle collector would only walk the live
    # chunks over and over (a tenth of the time at 100k live chunks); it is paused meanwhile.
    collecting = gc.isenabled()
    gc.disable()
    try:
        runner.run(script, progress)
    finally:
        if collecting:
            gc.enable()
    summaries = tuple(
        RegionSummary(
            r.name,
            r.start,
            r.size,
            r.free_space,
            r.largest_free(),
            r.attached or r.allocator_name or cma.registry.default_name,
        )
        for r in cma.regions
    )
    return ReplayResult(
        allocator=allocator,
        stdout=out.getvalue(),
        stderr=err.getvalue(),
        allocations=runner.allocations,
        failed_allocations=runner.failed_allocations,
        errors=runner.failures,
        regions=summaries,
    )
