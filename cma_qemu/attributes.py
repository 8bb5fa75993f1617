"""The three CMA attribute strings of the 2010 patch set: regions, map and asterisk.

CONTRACT STUB (to be implemented): the signatures below are fixed; bodies to be written.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE_SIZE = 4096
MAX_ATTRIBUTE_LENGTH = 64 * 1024
MAX_REGIONS = 1024


@dataclass(frozen=True)
class RegionSpec:
    """One ``[-]NAME=SIZE[@START][/ALIGN][:ALLOC]`` entry, as written (not yet normalised).

    ``start`` and ``alignment`` are None when absent or given as 0 ("anywhere" / "default").
    """

    name: str
    size: int
    start: int | None = None
    alignment: int | None = None
    allocator: str | None = None
    in_asterisk: bool = True


@dataclass(frozen=True)
class Pattern:
    """``dev[/kind]``; ``dev`` None is the empty dev part, ``kind`` None means no ``/kind``."""

    dev: str | None
    kind: str | None


@dataclass(frozen=True)
class MapRule:
    """``patterns=regions``; ``regions`` None stands for ``*`` (the asterisk list)."""

    patterns: tuple[Pattern, ...]
    regions: tuple[str, ...] | None


@dataclass(frozen=True)
class Map:
    rules: tuple[MapRule, ...]

    def resolve(self, dev: str, kind: str) -> tuple[str, ...] | None:
        """Region names for (dev, kind) from the first matching rule; None = use asterisk.

        No matching rule also gives None (the documented implied ``*/*=*``).
        """
        raise NotImplementedError


def parse_memsize(text: str, position: int = 0, *, attribute: str = "size") -> tuple[int, int]:
    """Kernel ``memparse`` at ``position``: returns (value, position after it)."""
    raise NotImplementedError


def parse_regions(text: str) -> tuple[RegionSpec, ...]:
    raise NotImplementedError


def format_regions(specs: tuple[RegionSpec, ...]) -> str:
    raise NotImplementedError


def parse_map(text: str) -> Map | None:
    """None for an empty (unset) map."""
    raise NotImplementedError


def format_map(value: Map | None) -> str:
    raise NotImplementedError


def parse_asterisk(text: str) -> tuple[str, ...]:
    raise NotImplementedError


def format_asterisk(names: tuple[str, ...]) -> str:
    raise NotImplementedError


def derive_asterisk(specs: tuple[RegionSpec, ...]) -> tuple[str, ...]:
    """The names without a leading ``-``, in order (section 2.1)."""
    raise NotImplementedError
