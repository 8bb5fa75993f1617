"""The monitor's commands: inspection and control of the framework for scripts and people.

Framework calls are synchronous and made after every argument is checked, so a command either
fully happens or changes nothing; only ``cma-read`` awaits (guest memory), and it reads state
rather than changing it.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeAlias

from cma_qemu.channel.arguments import U64_MAX, Arguments
from cma_qemu.channel.commands import chunk_json, info_json
from cma_qemu.errors import EINVAL, EIO, ENOENT, EOPNOTSUPP, CmaError
from cma_qemu.framework import Chunk, Cma
from cma_qemu.regions import Region

__all__ = [
    "MAX_READ",
    "MONITOR_OWNER",
    "MemoryReader",
    "MonitorCommands",
    "RecordStart",
    "RecordStop",
    "chunk_detail",
    "region_json",
]

log = logging.getLogger(__name__)

#: ``cma-read`` returns at most this many bytes (base64 makes the reply a third bigger).
MAX_READ: Final = 16 * 1024 * 1024

#: The owner recorded on chunks allocated through the monitor.
MONITOR_OWNER: Final = "monitor"

#: Reads guest physical memory: (guest physical address, size) -> exactly ``size`` bytes.
MemoryReader: TypeAlias = Callable[[int, int], Awaitable[bytes]]

_Handler: TypeAlias = Callable[[Arguments], object]

#: Starts recording to a path, and stops it; each returns what the reply reports. The agent
#: provides them (the monitor knows no board or attributes to put in a recording's header).
RecordStart: TypeAlias = Callable[[str], dict[str, object]]
RecordStop: TypeAlias = Callable[[], dict[str, object]]


def region_json(region: Region, holes: bool) -> dict[str, object]:
    """A region as ``query-cma-regions`` reports it (also what the terminal views draw)."""
    data: dict[str, object] = {
        "name": region.name,
        "start": region.start,
        "size": region.size,
        "free": region.free_space,
        "users": region.users,
        "allocator": region.allocator_name,
        "attached": region.attached,
        "asterisk": region.in_asterisk,
    }
    if holes:
        data["holes"] = [{"start": s, "size": n} for s, n in region.holes()]
    return data


def chunk_detail(chunk: Chunk) -> dict[str, object]:
    """A chunk as ``query-cma-chunks`` reports it."""
    data = chunk_json(chunk)
    data["requested"] = chunk.requested
    data["refcount"] = chunk.refcount
    data["owner"] = chunk.owner
    return data


class MonitorCommands:
    """The command table of one monitor (everything but ``qmp_capabilities``)."""

    def __init__(self, cma: Cma, read_memory: MemoryReader | None = None) -> None:
        self.cma = cma
        self.read_memory = read_memory
        self.record_start: RecordStart | None = None
        self.record_stop: RecordStop | None = None
        self.table: dict[str, _Handler] = {
            "query-commands": self.query_commands,
            "query-cma-regions": self.query_regions,
            "query-cma-chunks": self.query_chunks,
            "query-cma-map": self.query_map,
            "query-cma-stats": self.query_stats,
            "query-cma-info": self.query_info,
            "query-cma-info-about": self.query_info_about,
            "cma-set-map": self.set_map,
            "cma-set-asterisk": self.set_asterisk,
            "cma-alloc": self.alloc,
            "cma-alloc-from": self.alloc_from,
            "cma-free": self.free,
            "cma-read": self.read,
            "query-cma-allocators": self.query_allocators,
            "cma-allocator-register": self.allocator_register,
            "cma-record-start": self.start_recording,
            "cma-record-stop": self.stop_recording,
        }

    def names(self) -> list[str]:
        """Every command a negotiated client may execute, including ``qmp_capabilities``."""
        return sorted([*self.table, "qmp_capabilities"])

    def query_commands(self, args: Arguments) -> object:
        """``query-commands``: what qmp-shell completes on."""
        args.done()
        return [{"name": name} for name in self.names()]

    def query_regions(self, args: Arguments) -> object:
        """Regions with free space, users and allocators; ``holes: true`` adds the free blocks."""
        holes = args.boolean("holes", False)
        args.done()
        return [region_json(r, holes) for r in self.cma.regions]

    def query_chunks(self, args: Arguments) -> object:
        """Every live chunk with its owner and refcount."""
        args.done()
        return [chunk_detail(c) for c in self.cma.chunks]

    def query_map(self, args: Arguments) -> object:
        """The map and asterisk attributes as text (empty: unset)."""
        args.done()
        return {"map": self.cma.map_text, "asterisk": self.cma.asterisk_text}

    def query_stats(self, args: Arguments) -> object:
        """Per-region counters under mainline's names."""
        args.done()
        return [dataclasses.asdict(s) for s in self.cma.stats()]

    def query_info(self, args: Arguments) -> object:
        """``cma_info`` for (dev, kind)."""
        dev = args.string("dev")
        kind = args.string("kind", "")
        args.done()
        return info_json(self.cma.info(dev, kind))

    def query_info_about(self, args: Arguments) -> object:
        """``cma_info_about`` for a region list (null or ``*``: asterisk)."""
        regions = args.optional_string("regions")
        args.done()
        return info_json(self.cma.info_about(regions))

    def set_map(self, args: Arguments) -> object:
        """The sysfs ``map`` write: invalid text is EINVAL and keeps the old map."""
        text = args.string("map")
        args.done()
        self.cma.set_map(text)
        return {}

    def set_asterisk(self, args: Arguments) -> object:
        """The sysfs ``asterisk`` write; empty text unsets it."""
        text = args.string("asterisk")
        args.done()
        self.cma.set_asterisk(text)
        return {}

    def alloc(self, args: Arguments) -> object:
        """``cma_alloc`` on behalf of the operator (owner ``monitor``)."""
        dev = args.string("dev")
        kind = args.string("kind", "")
        size = args.u64("size")
        alignment = args.u64("alignment", 0)
        args.done()
        return chunk_detail(self.cma.alloc(dev, kind, size, alignment, owner=MONITOR_OWNER))

    def alloc_from(self, args: Arguments) -> object:
        """``cma_alloc_from`` on behalf of the operator (owner ``monitor``)."""
        regions = args.optional_string("regions")
        size = args.u64("size")
        alignment = args.u64("alignment", 0)
        args.done()
        return chunk_detail(self.cma.alloc_from(regions, size, alignment, owner=MONITOR_OWNER))

    def query_allocators(self, args: Arguments) -> object:
        """The allocators loaded now; the first is the default."""
        args.done()
        registry = self.cma.registry
        return [
            {"name": name, "default": name == registry.default_name} for name in registry.names()
        ]

    def allocator_register(self, args: Arguments) -> object:
        """Load ``module:Class`` and register it while the agent runs (like a module load).

        Regions waiting for an allocator of that name attach it; the socket is the owner's
        only (0600), since this imports code.
        """
        target = args.string("class")
        args.done()
        module_name, colon, class_name = target.partition(":")
        if not colon or not module_name or not class_name:
            raise EINVAL(f"'class' must look like 'package.module:Class', got {target[:128]!r}")
        try:
            module = importlib.import_module(module_name)
            cls = getattr(module, class_name)
        except Exception as error:
            raise ENOENT(f"cannot load {target[:128]!r}: {type(error).__name__}: {error}") from None
        self.cma.allocator_register(cls)
        return {
            "name": cls.name,
            "regions": [r.name for r in self.cma.regions if r.attached == cls.name],
        }

    def start_recording(self, args: Arguments) -> object:
        """Record every allocation and free from now on to ``path`` (docs/line-format.md)."""
        path = args.string("path")
        args.done()
        if self.record_start is None:
            raise EOPNOTSUPP("this monitor has no recorder attached")
        return self.record_start(path)

    def stop_recording(self, args: Arguments) -> object:
        """Stop the recording; the reply says what it holds."""
        args.done()
        if self.record_stop is None:
            raise EOPNOTSUPP("this monitor has no recorder attached")
        return self.record_stop()

    def free(self, args: Arguments) -> object:
        """Free any chunk, whoever owns it: the operator's override."""
        addr = args.u64("addr")
        args.done()
        return chunk_detail(self.cma.free(addr))

    def read(self, args: Arguments) -> object:
        """Guest bytes at [addr, addr+size), base64; size is 1..MAX_READ."""
        addr = args.u64("addr")
        size = args.u64("size")
        args.done()
        if not 0 < size <= MAX_READ:
            raise EINVAL(f"size {size:#x} out of range: 1 to {MAX_READ:#x} bytes")
        if addr + size - 1 > U64_MAX:
            raise EINVAL(f"range {addr:#x}+{size:#x} overflows the address space")
        reader = self.read_memory
        if reader is None:
            raise EOPNOTSUPP("no guest memory reader is attached to this monitor")
        return self._read(reader, addr, size)

    @staticmethod
    async def _read(reader: MemoryReader, addr: int, size: int) -> object:
        try:
            data = await reader(addr, size)
        except CmaError:
            raise
        except OSError as err:
            raise EIO(f"reading {size:#x} bytes at {addr:#x}: {err}") from err
        if len(data) != size:
            raise EIO(f"reading {size:#x} bytes at {addr:#x}: got {len(data):#x} bytes")
        return {"addr": addr, "size": size, "data": base64.b64encode(data).decode("ascii")}
