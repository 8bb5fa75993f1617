"""cma-qemu: the 2010 Contiguous Memory Allocator for emulated ARM boards.

The framework (regions, map, asterisk, allocators, the CMA API) is pure Python and usable on
its own; the machine, channel and monitor layers put it in front of a QEMU guest.
"""

import importlib.metadata as _metadata

from cma_qemu.attributes import (
    PAGE_SIZE,
    Map,
    MapRule,
    Pattern,
    RegionSpec,
    format_asterisk,
    format_map,
    format_regions,
    parse_asterisk,
    parse_map,
    parse_regions,
)
from cma_qemu.errors import (
    EADDRINUSE,
    EBUSY,
    EINVAL,
    ENOENT,
    ENOMEM,
    AttributeSyntaxError,
    CmaError,
)
from cma_qemu.framework import (
    AllocEvent,
    AllocFailedEvent,
    Chunk,
    Cma,
    CmaInfo,
    FreeEvent,
    RegionStats,
)
from cma_qemu.regions import (
    EarlyRegion,
    RamBank,
    RamLayout,
    Region,
    ReservedRange,
    place_early_regions,
)

try:  # pyproject.toml is the one place that says the version; the installed metadata has it
    __version__ = _metadata.version("cma-qemu")
except _metadata.PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "EADDRINUSE",
    "EBUSY",
    "EINVAL",
    "ENOENT",
    "ENOMEM",
    "PAGE_SIZE",
    "AllocEvent",
    "AllocFailedEvent",
    "AttributeSyntaxError",
    "Chunk",
    "Cma",
    "CmaError",
    "CmaInfo",
    "EarlyRegion",
    "FreeEvent",
    "Map",
    "MapRule",
    "Pattern",
    "RamBank",
    "RamLayout",
    "Region",
    "RegionSpec",
    "RegionStats",
    "ReservedRange",
    "__version__",
    "format_asterisk",
    "format_map",
    "format_regions",
    "parse_asterisk",
    "parse_map",
    "parse_regions",
    "place_early_regions",
]
