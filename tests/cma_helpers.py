"""Helpers the unit and fuzz tests share: a small framework, and a snapshot of its state.

A module rather than functions in ``conftest.py``: every ``conftest.py`` outside a package is
imported as the module ``conftest`` and pytest drops the previous one when it loads the next
(``tests/fuzz`` has its own), so ``from conftest import ...`` would find whichever came last.
``tests/conftest.py`` puts this directory on ``sys.path`` and offers the same helpers as
fixtures.
"""

from __future__ import annotations

import functools

from cma_qemu.allocators.registry import AllocatorRegistry
from cma_qemu.framework import Cma

__all__ = ["RAM", "allocator_registry", "cma_state", "make_cma"]

#: 512 MiB at 0x40000000, the virt board's RAM.
RAM = (0x40000000, 0x20000000)


def make_cma(regions: str = "a=16M;b=16M", map: str = "dev/*=a") -> Cma:
    """Two 16 MiB regions ``a`` and ``b`` in ``RAM``, the map sending ``dev`` to ``a``."""
    return Cma.from_attributes(regions=regions, map=map, asterisk=None, ram=[RAM])


@functools.cache
def _installed() -> AllocatorRegistry:
    return AllocatorRegistry.installed()


def allocator_registry() -> AllocatorRegistry:
    """A new registry with what ``AllocatorRegistry.installed()`` finds, scanned once per process.

    ``Cma()`` without a registry scans every installed package's entry points (~4 ms, more
    than most fuzz cases' own work); tests that build a framework per example pass this
    instead. A new registry each time, so a registration one example makes never reaches
    the next.
    """
    registry = AllocatorRegistry()
    for name in _installed().names():
        cls = _installed().get(name)
        assert cls is not None
        registry.register(cls)
    return registry


def cma_state(cma: Cma, *, attached: bool = False) -> tuple[object, ...]:
    """Everything a failed call must leave as it was: regions, chunks, map, asterisk, early list.

    Regions come first and chunks second (some tests compare just those two). ``attached``
    adds which allocator each region has attached; it is off by default because a failed
    allocation may legitimately attach a region's allocator lazily.
    """
    return (
        [
            (r.label, r.start, r.size, r.free_space, r.users, tuple(r.holes()), r.allocator_name)
            + ((r.attached,) if attached else ())
            for r in cma.regions
        ],
        [(c.start, c.size, c.requested, c.owner, c.refcount, c.region.label) for c in cma.chunks],
        # The parsed values (immutable: frozen dataclasses, tuples), not map_text and
        # asterisk_text: equal values format equally, and formatting cost ~80 us a snapshot.
        cma.map,
        cma.asterisk,
        [(e.name, e.size, e.start, e.alignment, e.reserved) for e in cma.early_regions],
    )
