"""The CMA API of the 2010 patch set, with the intended fixes (docs/semantics.md).

One :class:`Cma` is the whole state the kernel kept in globals: the early list, the
registered regions, the chunk tree, the map, the asterisk and the allocators. Every public call
takes one lock, as the kernel took ``cma_mutex``, and leaves the state as it was when it raises.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn, TypeAlias

from sortedcontainers import SortedList

from cma_qemu.allocators.base import Allocator
from cma_qemu.allocators.registry import AllocatorRegistry
from cma_qemu.attributes import (
    PAGE_SIZE,
    Map,
    RegionSpec,
    derive_asterisk,
    format_asterisk,
    format_map,
    parse_asterisk,
    parse_map,
    parse_regions,
)
from cma_qemu.errors import EADDRINUSE, EBUSY, EINVAL, ENOENT, ENOMEM, CmaError
from cma_qemu.regions import (
    MAX_ADDRESS,
    EarlyRegion,
    RamBank,
    RamLayout,
    Region,
    ReservedRange,
    align_up,
    describe_range,
    place_early_regions,
)
from cma_qemu.units import ranges_overlap

__all__ = [
    "AllocEvent",
    "AllocFailedEvent",
    "Chunk",
    "Cma",
    "CmaChange",
    "CmaEvent",
    "CmaInfo",
    "FreeEvent",
    "RefcountEvent",
    "RegionStats",
    "SettingEvent",
]

log = logging.getLogger(__name__)


@dataclass(eq=False, slots=True)
class Chunk:
    """One allocation. ``size`` is page-rounded; ``requested`` is what the caller asked for."""

    start: int
    size: int
    requested: int
    region: Region
    refcount: int = 1
    owner: str | None = None

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.start + self.size


@dataclass(frozen=True)
class CmaInfo:
    """``struct cma_info``: bounds and sizes over the known regions of a list."""

    lower_bound: int
    upper_bound: int
    total_size: int
    free_size: int
    count: int


@dataclass(frozen=True)
class RegionStats:
    """Per-region counters under the names mainline's debugfs uses."""

    name: str | None
    start: int
    alloc_pages_success: int
    alloc_pages_fail: int
    release_pages_success: int
    total_pages: int
    available_pages: int
    maxchunk: int


@dataclass(frozen=True)
class AllocEvent:
    """A chunk was allocated.

    ``alignment`` and ``regions`` say how it was asked for, so a recording can ask again:
    the alignment the allocator got (at least a page), and the region list that was tried
    (the map's or asterisk's list for ``alloc``, the given list for ``alloc_from``; empty
    for ``alloc_from_region``).
    """

    chunk: Chunk
    dev: str | None
    kind: str | None
    alignment: int = PAGE_SIZE
    regions: tuple[str, ...] = ()


@dataclass(frozen=True)
class FreeEvent:
    """A chunk was freed (its last reference dropped)."""

    chunk: Chunk


@dataclass(frozen=True)
class AllocFailedEvent:
    """An allocation request failed; ``regions`` is the list that was tried."""

    dev: str | None
    kind: str | None
    regions: tuple[str, ...]
    size: int
    alignment: int
    error: CmaError


@dataclass(frozen=True)
class RefcountEvent:
    """``get`` or a ``put`` that did not free changed a chunk's reference count."""

    chunk: Chunk


@dataclass(frozen=True)
class SettingEvent:
    """A runtime setting changed: ``"map"``, ``"asterisk"`` (``value`` is the new text) or
    ``"allocator"`` (``region`` asks for allocator ``value``; None: the default)."""

    what: str
    value: str | None
    region: Region | None = None


CmaEvent: TypeAlias = AllocEvent | FreeEvent | AllocFailedEvent
#: Everything :meth:`Cma.subscribe_changes` sees: the events and the other state changes.
CmaChange: TypeAlias = CmaEvent | RefcountEvent | SettingEvent

_NO_REGIONS_INFO = CmaInfo(MAX_ADDRESS, 0, 0, 0, 0)
_PAGE_MASK = PAGE_SIZE - 1
#: Resolved (dev, kind) targets kept at most; more distinct pairs than this start it afresh.
_MAX_TARGETS = 4096


def _check_request(size: int, alignment: int) -> tuple[int, int]:
    """Validate and normalise (size, alignment) the way ``__cma_alloc`` did."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise EINVAL(f"invalid size {size!r}: must be a positive number of bytes")
    if size > MAX_ADDRESS:
        raise EINVAL(f"invalid size {size:#x}: larger than the address space")
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 0:
        raise EINVAL(f"invalid alignment {alignment!r}")
    if alignment & (alignment - 1):
        raise EINVAL(f"alignment {alignment:#x} is not a power of two")
    if alignment > MAX_ADDRESS:
        raise EINVAL(f"invalid alignment {alignment:#x}: larger than the address space")
    return align_up(size, PAGE_SIZE), max(alignment, PAGE_SIZE)


def _normalised_early(
    name: str | None,
    size: int,
    start: int | None,
    alignment: int | None,
    allocator: str | None,
    in_asterisk: bool,
) -> EarlyRegion:
    """Alignment at least a page, start rounded up to it, size to a page."""
    align = max(alignment or PAGE_SIZE, PAGE_SIZE)
    placed = align_up(start, align) if start else None
    pages = align_up(size, PAGE_SIZE)
    if placed is not None and placed + pages - 1 > MAX_ADDRESS:
        raise EINVAL(f"region '{name}': start + size overflows the address space")
    return EarlyRegion(name, pages, align, placed, allocator, in_asterisk)


class Cma:
    """The contiguous memory allocator: regions, chunks, map, asterisk and allocators.

    Costs below use r for registered regions, c for live chunks, m for the names in a
    resolved region list, and A for one call of the region's allocator (``bf``: O(log h) in
    its holes, plus the steps of an alignment miss, see its ``alloc``; ``bitmap``: O(pages)
    scanned in C). Every public method takes one re-entrant lock.
    """

    def __init__(self, registry: AllocatorRegistry | None = None) -> None:
        self._lock = threading.RLock()
        self._registry = registry if registry is not None else AllocatorRegistry.installed()
        self._early: list[EarlyRegion] = []
        self._regions: list[Region] = []
        #: start -> Chunk, the global chunk tree's lookups (a dict: O(1)).
        self._chunks: dict[int, Chunk] = {}
        #: The chunk starts in address order, built by the first call that needs the order
        #: (:attr:`chunks`, :meth:`chunk_containing`, :meth:`release_owner`) and kept up to
        #: date from then on. Until then alloc and free skip it: an offline replay never
        #: asks, and keeping it cost a sorted insert and delete per chunk (~15% of a line).
        self._by_address: SortedList | None = None
        self._map: Map | None = None
        self._asterisk: tuple[str, ...] | None = None
        self._listeners: list[Callable[[CmaEvent], None]] = []
        self._change_listeners: list[Callable[[CmaChange], None]] = []
        #: (dev, kind) -> the region list the map or asterisk gives it, and the registered
        #: regions those names find, so a repeated request skips the map matching and the
        #: region lookups. Emptied by every change of the map, the asterisk or the regions.
        self._targets: dict[tuple[str, str], tuple[tuple[str, ...], tuple[Region, ...]]] = {}

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_attributes(
        cls,
        regions: str | None,
        map: str | None = None,
        asterisk: str | None = None,
        *,
        ram: Sequence[tuple[int, int]] | Sequence[RamBank],
        keep_free: Iterable[ReservedRange] = (),
        registry: AllocatorRegistry | None = None,
    ) -> Cma:
        """Boot in one call: defaults, early reservation in ``ram``, then ``init``.

        Runtime complexity: O(r^2) (placement checks every region against those placed).
        """
        cma = cls(registry)
        cma.set_defaults(regions, map, asterisk)
        banks = tuple(b if isinstance(b, RamBank) else RamBank(b[0], b[1]) for b in ram)
        cma.early_regions_reserve(RamLayout(banks, tuple(keep_free)))
        cma.init()
        return cma

    def set_defaults(
        self,
        regions: str | None,
        map: str | None = None,
        asterisk: str | None = None,
    ) -> None:
        """``cma_set_defaults``: store map and asterisk, queue the regions as early regions.

        An explicit, non-empty ``asterisk`` wins over the one derived from the region names
        (the documented behaviour; the 2010 code let the derived one overwrite it); an empty
        one means "not given", as an empty sysfs write means unset. Nothing is changed if any
        of the three strings is invalid.

        Runtime complexity: O(length of the three strings).
        """
        with self._lock:
            specs = parse_regions(regions) if regions else ()
            new_map = parse_map(map) if map else None
            new_asterisk = parse_asterisk(asterisk) if asterisk else None
            if not new_asterisk:
                new_asterisk = derive_asterisk(specs) or None
            early = [self._early_from_spec(spec) for spec in specs]
            self._map = new_map if map is not None else self._map
            if new_asterisk is not None:
                self._asterisk = new_asterisk
            self._targets.clear()
            self._early.extend(early)

    @staticmethod
    def _early_from_spec(spec: RegionSpec) -> EarlyRegion:
        return _normalised_early(
            spec.name, spec.size, spec.start, spec.alignment, spec.allocator, spec.in_asterisk
        )

    def early_region_register(
        self,
        name: str | None,
        size: int,
        *,
        start: int | None = None,
        alignment: int = 0,
        allocator: str | None = None,
        in_asterisk: bool = True,
    ) -> EarlyRegion:
        """``cma_early_region_register``: queue a region to reserve before ``init``.

        Runtime complexity: O(1).
        """
        if alignment < 0 or alignment & (alignment - 1):
            raise EINVAL(f"alignment {alignment:#x} is not a power of two")
        if size <= 0:
            raise EINVAL("early region size must be positive")
        early = _normalised_early(
            name or None, size, start, alignment, allocator, in_asterisk and bool(name)
        )
        with self._lock:
            self._early.append(early)
        return early

    @property
    def early_regions(self) -> list[EarlyRegion]:
        """The early list, in registration order (a copy). Runtime complexity: O(e)."""
        with self._lock:
            return list(self._early)

    def early_regions_reserve(self, layout: RamLayout) -> list[EarlyRegion]:
        """``cma_early_regions_reserve``: place every unreserved early region in ``layout``.

        All or nothing: a conflict raises (naming both ranges) and reserves none, where the
        2010 code logged a warning and went on without the region.

        Runtime complexity: O((e + r + k)^2) for e early regions and k loader ranges.
        """
        with self._lock:
            pending = [r for r in self._early if not r.reserved]
            keep = list(layout.keep_free) + [
                ReservedRange(r.label, r.start, r.size)
                for r in self._early
                if r.reserved and r.start is not None
            ]
            # Regions registered directly (cma_region_register) are taken too.
            keep += [ReservedRange(f"region {r.label}", r.start, r.size) for r in self._regions]
            placements = place_early_regions(pending, RamLayout(layout.banks, tuple(keep)))
            for region, start in placements:
                region.start = start
                region.reserved = True
            return pending

    def init(self) -> list[Region]:
        """``cma_init``: register the reserved early regions; drop the ones never reserved.

        Runtime complexity: O(e * (e + r)) (each registration checks for overlaps).
        """
        with self._lock:
            registered: list[Region] = []
            try:
                for early in self._early:
                    if not early.reserved or early.start is None:
                        log.warning("%s was never reserved; dropped", early.label)
                        continue
                    registered.append(
                        self.region_register(
                            early.start,
                            early.size,
                            name=early.name,
                            allocator=early.allocator_name,
                            in_asterisk=early.in_asterisk,
                        )
                    )
            except CmaError:
                for region in registered:  # all or nothing: leave the state as it was
                    self._regions.remove(region)
                self._targets.clear()
                raise
            self._early.clear()
            return registered

    # ----------------------------------------------------------------- regions
    def region_register(
        self,
        start: int,
        size: int,
        *,
        name: str | None = None,
        allocator: str | None = None,
        in_asterisk: bool = False,
    ) -> Region:
        """``cma_region_register``: a range the caller owns; it must not overlap another.

        Runtime complexity: O(r) (the overlap check).
        """
        if size <= 0 or size % PAGE_SIZE or start % PAGE_SIZE or start < 0:
            raise EINVAL(
                f"region {name or '<private>'} needs a page-aligned start and a positive "
                f"page-multiple size (got {start:#x}+{size:#x})"
            )
        if start + size - 1 > MAX_ADDRESS:
            raise EINVAL(f"region {name or '<private>'}: start + size overflows")
        with self._lock:
            for other in self._regions:
                if ranges_overlap(start, start + size, other.start, other.end):
                    raise EADDRINUSE(
                        f"region {name or '<private>'} {describe_range(start, size)} overlaps "
                        f"region {other.label} {describe_range(other.start, other.size)}"
                    )
            region = Region(
                name=name or None,
                start=start,
                size=size,
                allocator_name=allocator,
                in_asterisk=in_asterisk,
            )
            if name:
                self._regions.insert(0, region)  # named at the head: newest name wins lookups
            else:
                self._regions.append(region)
            self._targets.clear()
            return region

    def region_unregister(self, region: Region) -> None:
        """Remove a region that holds no chunks (v3 ``users`` semantics).

        Runtime complexity: O(r).
        """
        with self._lock:
            self._detach_idle(region)
            self._regions.remove(region)
            self._targets.clear()

    def _detach_idle(self, region: Region) -> None:
        """Run a registered, idle region's allocator ``cleanup``: ENOENT if ``region`` is not
        registered, EBUSY while it holds chunks (both change nothing). O(r)."""
        if region not in self._regions:
            raise ENOENT(f"region {region.label} is not registered")
        if region.users:
            raise EBUSY(f"region {region.label} still holds {region.users} chunk(s)")
        if region.allocator is not None:
            region.allocator.cleanup()

    @property
    def regions(self) -> list[Region]:
        """Registered regions in address order (a new sorted list on every call).

        Runtime complexity: O(r log r).
        """
        with self._lock:
            return sorted(self._regions, key=lambda r: r.start)

    def region(self, name: str) -> Region | None:
        """The most recently registered region with this name.

        Runtime complexity: O(r) (a walk of the named regions, newest first).
        """
        with self._lock:
            return self._named_region(name)

    def _named_region(self, name: str) -> Region | None:
        """:meth:`region` for callers that hold the lock already (the alloc path)."""
        for region in self._regions:
            if region.name is None:
                return None  # private regions are at the tail; names stop here
            if region.name == name:
                return region
        return None

    # ----------------------------------------------------------------- allocators
    @property
    def registry(self) -> AllocatorRegistry:
        """The allocators this instance knows."""
        return self._registry

    def allocator_register(self, allocator: type[Allocator]) -> None:
        """``cma_allocator_register`` with the intended attach condition.

        The new allocator is attached to every allocator-less region that asks for its
        name, or asks for the default while it is the first (default) allocator.

        Runtime complexity: O(r) plus one allocator construction per region it attaches to.
        """
        with self._lock:
            self._registry.register(allocator)
            is_default = self._registry.default_name == allocator.name
            for region in self._regions:
                if region.allocator is not None or region.users:
                    continue
                wanted = region.allocator_name
                if wanted == allocator.name or (wanted is None and is_default):
                    region.attach_failed = False
                    self._attach(region)

    def set_region_allocator(self, region: Region, name: str | None) -> None:
        """Change the allocator a region asks for (v3's ``regions/*/alloc`` write).

        EBUSY while the region holds chunks; the new allocator attaches lazily.

        Runtime complexity: O(r).
        """
        with self._lock:
            self._detach_idle(region)
            region.allocator = None
            region.allocator_name = name
            region.attach_failed = False
            self._emit_change(SettingEvent("allocator", name, region))

    def _attach(self, region: Region) -> bool:
        factory = self._registry.get(region.allocator_name)
        if factory is None:
            log.warning(
                "region %s: allocator %r is not loaded",
                region.label,
                region.allocator_name or "<default>",
            )
            region.attach_failed = True
            return False
        try:
            region.allocator = factory(region.start, region.size)
        except Exception:
            log.exception("region %s: allocator %s failed to start", region.label, factory.name)
            region.attach_failed = True
            return False
        return True

    # ----------------------------------------------------------------- allocation
    def subscribe(self, callback: Callable[[CmaEvent], None]) -> Callable[[], None]:
        """Call ``callback`` after every alloc, free and failed alloc; returns unsubscribe.

        Runtime complexity: O(1); each later event costs one call per subscriber.
        """
        self._listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._listeners:
                self._listeners.remove(callback)

        return unsubscribe

    def subscribe_changes(self, callback: Callable[[CmaChange], None]) -> Callable[[], None]:
        """Like :meth:`subscribe`, plus reference counts and runtime settings (a journal).

        Called under the framework's lock, before the call that made the change returns.
        Runtime complexity: O(1); each later change costs one call per subscriber.
        """
        self._change_listeners.append(callback)

        def unsubscribe() -> None:
            if callback in self._change_listeners:
                self._change_listeners.remove(callback)

        return unsubscribe

    def _emit(self, event: CmaEvent) -> None:
        for callback in list(self._listeners):
            try:
                callback(event)
            except Exception:  # an observer must never break the allocator
                log.exception("CMA event listener %r failed", callback)
        if self._change_listeners:
            self._emit_change(event)

    def _emit_change(self, change: CmaChange) -> None:
        for callback in list(self._change_listeners):
            try:
                callback(change)
            except Exception:
                log.exception("CMA change listener %r failed", callback)

    def _names_for(self, dev: str, kind: str) -> tuple[str, ...]:
        if not dev:
            raise EINVAL("device name must not be empty")
        names = self._map.resolve(dev, kind) if self._map is not None else None
        if names is None:
            if self._asterisk is None:
                target = f"{dev}/{kind}" if kind else dev
                raise ENOENT(f"no region list for {target}: no map rule and no asterisk list")
            return self._asterisk
        return names

    def _names_from_list(self, regions: str | None) -> tuple[str, ...]:
        if regions is None or regions == "*":
            if self._asterisk is None:
                raise ENOENT("region list '*' asked for, but the asterisk list is unset")
            return self._asterisk
        return parse_asterisk(regions)

    def alloc(
        self, dev: str, kind: str, size: int, alignment: int = 0, *, owner: str | None = None
    ) -> Chunk:
        """``cma_alloc``: allocate for (dev, kind) from the regions the map names, in order.

        Runtime complexity: O(m * A) for a (dev, kind) already asked for since the map,
        asterisk or regions last changed, else O(map patterns + m * (r + A)) (map matching,
        then each named region is looked up), then each region is tried until one has room.
        """
        with self._lock:
            target = self._targets.get((dev, kind or ""))
            if (
                target is not None
                and type(size) is int
                and type(alignment) is int
                and 0 < size <= MAX_ADDRESS
                and 0 <= alignment <= MAX_ADDRESS
                and not alignment & (alignment - 1)
            ):  # the request checks of _check_request, for the usual plain ints
                size_r = (size + _PAGE_MASK) & ~_PAGE_MASK
                align_r = alignment if alignment > PAGE_SIZE else PAGE_SIZE
            else:
                try:
                    size_r, align_r = _check_request(size, alignment)
                    target = self._target(dev, kind or "")
                except CmaError as error:
                    self._emit(AllocFailedEvent(dev, kind, (), size, alignment, error))
                    raise
            names, regions = target
            return self._alloc_first(names, regions, size, size_r, align_r, dev, kind or "", owner)

    def _target(self, dev: str, kind: str) -> tuple[tuple[str, ...], tuple[Region, ...]]:
        """The names the map gives (dev, kind) and the regions they find, remembered."""
        target = self._targets.get((dev, kind))
        if target is None:
            names = self._names_for(dev, kind)
            target = (names, self._regions_named(names))
            if len(self._targets) >= _MAX_TARGETS:
                self._targets.clear()
            self._targets[dev, kind] = target
        return target

    def alloc_from(
        self, regions: str | None, size: int, alignment: int = 0, *, owner: str | None = None
    ) -> Chunk:
        """``cma_alloc_from``: allocate from a comma-separated list (``*``/None: asterisk).

        Runtime complexity: O(len(regions) + m * (r + A)).
        """
        with self._lock:
            try:
                size_r, align_r = _check_request(size, alignment)
                names = self._names_from_list(regions)
            except CmaError as error:
                self._emit(AllocFailedEvent(None, None, (), size, alignment, error))
                raise
            found = self._regions_named(names)
            return self._alloc_first(names, found, size, size_r, align_r, None, None, owner)

    def alloc_from_region(
        self, region: Region, size: int, alignment: int = 0, *, owner: str | None = None
    ) -> Chunk:
        """``cma_alloc_from_region``: the only way to reach a private region.

        Runtime complexity: O(r + A) (the membership check, then one allocator call).
        """
        with self._lock:
            try:
                size_r, align_r = _check_request(size, alignment)
                if region not in self._regions:
                    raise EINVAL(f"region {region.label} is not registered")
            except CmaError as bad:
                self._emit(AllocFailedEvent(None, None, (region.label,), size, alignment, bad))
                raise
            chunk = self._alloc_in(region, size, size_r, align_r, owner)
            if chunk is None:
                error = ENOMEM(
                    f"no room for {size_r:#x} bytes (alignment {align_r:#x}) in region "
                    f"{region.label}"
                )
                self._emit(AllocFailedEvent(None, None, (region.label,), size, alignment, error))
                raise error
            self._emit(AllocEvent(chunk, None, None, align_r))
            return chunk

    def _regions_named(self, names: tuple[str, ...]) -> tuple[Region, ...]:
        """The registered regions ``names`` finds, in order; a name that finds none is skipped."""
        found = (self._named_region(name) for name in names)
        return tuple(region for region in found if region is not None)

    def _alloc_first(
        self,
        names: tuple[str, ...],
        regions: tuple[Region, ...],
        requested: int,
        size: int,
        alignment: int,
        dev: str | None,
        kind: str | None,
        owner: str | None,
    ) -> Chunk:
        """The first of ``regions`` (what ``names`` found) with room; ENOMEM naming ``names``."""
        for region in regions:
            chunk = self._alloc_in(region, requested, size, alignment, owner)
            if chunk is not None:
                if self._listeners or self._change_listeners:  # no event object for no one
                    self._emit(AllocEvent(chunk, dev, kind, alignment, names))
                return chunk
        self._no_room(names, requested, size, alignment, dev, kind)

    def _no_room(
        self,
        names: tuple[str, ...],
        requested: int,
        size: int,
        alignment: int,
        dev: str | None,
        kind: str | None,
    ) -> NoReturn:
        where = ", ".join(names) if names else "an empty region list"
        error = ENOMEM(f"no room for {size:#x} bytes (alignment {alignment:#x}) in {where}")
        self._emit(AllocFailedEvent(dev, kind, names, requested, alignment, error))
        raise error

    def _alloc_in(
        self, region: Region, requested: int, size: int, alignment: int, owner: str | None
    ) -> Chunk | None:
        pages = size // PAGE_SIZE
        if region.free_space < size:
            region.alloc_pages_fail += pages
            return None
        allocator = region.allocator
        if allocator is None:
            if region.attach_failed or not self._attach(region):
                region.alloc_pages_fail += pages
                return None
            allocator = region.allocator
            assert allocator is not None
        start = allocator.alloc(size, alignment)
        if start is None:
            region.alloc_pages_fail += pages
            return None
        chunks = self._chunks
        if start in chunks:
            allocator.free(start, size)
            raise EADDRINUSE(f"allocator {region.attached} returned {start:#x} twice")
        chunk = Chunk(start, size, requested, region, owner=owner)
        chunks[start] = chunk
        if self._by_address is not None:
            self._by_address.add(start)
        region.free_space -= size
        region.users += 1
        region.alloc_pages_success += pages
        return chunk

    def _lookup(self, addr: int) -> Chunk:
        chunk: Chunk | None = self._chunks.get(addr)
        if chunk is None:
            raise ENOENT(f"no chunk starts at {addr:#x}")
        return chunk

    def _release(self, chunk: Chunk, taken: bool = False) -> None:
        """Free a live chunk; ``taken``: the caller has popped it from ``_chunks`` already."""
        start, size, region = chunk.start, chunk.size, chunk.region
        if not taken:
            del self._chunks[start]
        if self._by_address is not None:
            self._by_address.remove(start)
        assert region.allocator is not None
        region.allocator.free(start, size)
        region.free_space += size
        region.users -= 1
        region.release_pages_success += size // PAGE_SIZE
        chunk.refcount = 0
        if self._listeners or self._change_listeners:
            self._emit(FreeEvent(chunk))

    def restore_chunk(
        self,
        start: int,
        size: int,
        requested: int,
        *,
        owner: str | None = None,
        refcount: int = 1,
    ) -> Chunk:
        """Re-create a chunk that a guest still holds at a known place (a journal's restore).

        The region's allocator marks exactly ``[start, start+size)`` used; EADDRINUSE, and no
        change, if any of it is not free. No event is emitted: nothing new was allocated.

        Runtime complexity: O(r + A) (find the region, one allocator reserve).
        """
        with self._lock:
            if (
                size <= 0
                or size % PAGE_SIZE
                or start % PAGE_SIZE
                or not 0 < requested <= size
                or refcount < 1
            ):
                raise EINVAL(
                    f"cannot restore a chunk of {requested:#x} bytes in {size:#x}@{start:#x} "
                    f"with refcount {refcount}"
                )
            region = next(
                (r for r in self._regions if r.start <= start and start + size <= r.end), None
            )
            if region is None:
                raise EINVAL(f"chunk {describe_range(start, size)} is not inside one region")
            if region.allocator is None and (region.attach_failed or not self._attach(region)):
                raise ENOENT(f"region {region.label} has no allocator to restore a chunk into")
            assert region.allocator is not None
            if not region.allocator.reserve(start, size):
                raise EADDRINUSE(
                    f"chunk {describe_range(start, size)} overlaps memory in use in region "
                    f"{region.label}"
                )
            chunk = Chunk(start, size, requested, region, refcount=refcount, owner=owner)
            self._chunks[start] = chunk
            if self._by_address is not None:
                self._by_address.add(start)
            region.free_space -= size
            region.users += 1
            return chunk

    def get(self, addr: int) -> Chunk:
        """``cma_get``: take one more reference on the chunk starting at ``addr``.

        Runtime complexity: O(1) (a dict lookup in the chunk tree).
        """
        with self._lock:
            chunk = self._lookup(addr)
            chunk.refcount += 1
            self._emit_change(RefcountEvent(chunk))
            return chunk

    def put(self, addr: int) -> bool:
        """``cma_put``: drop a reference; True when that freed the chunk.

        Runtime complexity: O(A) when it frees (O(log c + A) once the address index is
        built), else O(1).
        """
        with self._lock:
            chunk = self._lookup(addr)
            chunk.refcount -= 1
            if chunk.refcount > 0:
                self._emit_change(RefcountEvent(chunk))
                return False
            self._release(chunk)
            return True

    def free(self, addr: int) -> Chunk:
        """``cma_free`` (v3): free the chunk whatever its reference count.

        Runtime complexity: O(A) (O(log c + A) once the address index is built).
        """
        with self._lock:
            chunk = self._chunks.pop(addr, None)  # one lookup: _release knows it is out
            if chunk is None:
                raise ENOENT(f"no chunk starts at {addr:#x}")
            self._release(chunk, taken=True)
            return chunk

    def release_owner(self, owner: str) -> list[Chunk]:
        """Free every chunk of one owner, as closing ``/dev/cma`` did for its fds.

        Runtime complexity: O(c + k * (log c + A)) for the k chunks it frees (it scans
        every live chunk for the owner).
        """
        with self._lock:
            mine = [c for c in self._in_address_order() if c.owner == owner]
            for chunk in mine:
                self._release(chunk)
            return mine

    def _in_address_order(self) -> list[Chunk]:
        if self._by_address is None:
            self._by_address = SortedList(self._chunks)
        chunks = self._chunks
        return [chunks[start] for start in self._by_address]

    @property
    def chunks(self) -> list[Chunk]:
        """Live chunks in address order (a copy).

        Runtime complexity: O(c); the first call that needs address order (this,
        :meth:`chunk_containing`, :meth:`release_owner`) sorts once, O(c log c).
        """
        with self._lock:
            return self._in_address_order()

    def chunk(self, addr: int) -> Chunk:
        """The live chunk that starts at ``addr`` (ENOENT otherwise). Runtime complexity: O(1)."""
        with self._lock:
            return self._lookup(addr)

    def chunk_containing(self, addr: int) -> Chunk | None:
        """The live chunk whose range holds ``addr``, if any.

        Runtime complexity: O(log c) (the first call that needs address order sorts once).
        """
        with self._lock:
            if self._by_address is None:
                self._by_address = SortedList(self._chunks)
            start = next(self._by_address.irange(maximum=addr, reverse=True), None)
            if start is None:
                return None
            chunk = self._chunks[start]
            return chunk if addr < chunk.end else None

    # ----------------------------------------------------------------- info
    def _info(self, names: tuple[str, ...]) -> CmaInfo:
        found = [r for r in (self.region(n) for n in names) if r is not None]
        unique = list({id(r): r for r in found}.values())
        if not unique:
            return _NO_REGIONS_INFO
        return CmaInfo(
            lower_bound=min(r.start for r in unique),
            upper_bound=max(r.end for r in unique),
            total_size=sum(r.size for r in unique),
            free_size=sum(r.free_space for r in unique),
            count=len(unique),
        )

    def info(self, dev: str, kind: str = "") -> CmaInfo:
        """``cma_info``: what the map gives (dev, kind).

        Runtime complexity: O(map patterns + m * r).
        """
        with self._lock:
            return self._info(self._names_for(dev, kind or ""))

    def info_about(self, regions: str | None) -> CmaInfo:
        """``cma_info_about``: the same over an explicit list (``*``/None: asterisk).

        Runtime complexity: O(len(regions) + m * r).
        """
        with self._lock:
            return self._info(self._names_from_list(regions))

    def stats(self) -> list[RegionStats]:
        """Counters per region, in address order.

        Runtime complexity: O(r log r + sum of each allocator's ``largest_free``).
        """
        with self._lock:
            return [
                RegionStats(
                    name=r.name,
                    start=r.start,
                    alloc_pages_success=r.alloc_pages_success,
                    alloc_pages_fail=r.alloc_pages_fail,
                    release_pages_success=r.release_pages_success,
                    total_pages=r.size // PAGE_SIZE,
                    available_pages=r.free_space // PAGE_SIZE,
                    maxchunk=r.largest_free(),
                )
                for r in self.regions
            ]

    # ----------------------------------------------------------------- map & asterisk
    @property
    def map(self) -> Map | None:
        """The parsed map (None: unset, everyone gets the asterisk list)."""
        return self._map

    @property
    def map_text(self) -> str:
        """The map as the sysfs file would show it (without the newline). O(map size)."""
        with self._lock:
            return format_map(self._map)

    def set_map(self, text: str) -> None:
        """Replace the map (the sysfs ``map`` write); invalid text keeps the old one.

        Runtime complexity: O(len(text)).
        """
        new = parse_map(text)
        with self._lock:
            self._map = new
            self._targets.clear()
            self._emit_change(SettingEvent("map", text))

    @property
    def asterisk(self) -> tuple[str, ...] | None:
        """The asterisk list (None: unset)."""
        return self._asterisk

    @property
    def asterisk_text(self) -> str:
        """The asterisk list as text."""
        with self._lock:
            return format_asterisk(self._asterisk) if self._asterisk is not None else ""

    def set_asterisk(self, text: str) -> None:
        """Replace the asterisk list; empty text unsets it (the sysfs ``asterisk`` write).

        Runtime complexity: O(len(text)).
        """
        names = parse_asterisk(text)
        with self._lock:
            self._asterisk = names if names else None
            self._targets.clear()
            self._emit_change(SettingEvent("asterisk", text))
