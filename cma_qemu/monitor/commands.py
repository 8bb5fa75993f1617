"""The monitor's commands: inspection and control of the framework for scripts and people.

:meth:`MonitorCommands.declare` is the one table: each command's name, handler, arguments
(name, type, default) and return type. The dispatcher decodes requests through it and
``query-qmp-schema`` introspects it (:mod:`cma_qemu.monitor.schema`); :data:`TYPES` declares
the objects the replies are made of.

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

from cma_qemu.errors import EINVAL, EIO, ENOENT, EOPNOTSUPP, CmaError, GenericError
from cma_qemu.framework import Chunk, Cma
from cma_qemu.monitor.events import EVENT_TYPES, EVENTS
from cma_qemu.monitor.hmp import HumanMonitor
from cma_qemu.monitor.protocol import PACKAGE_VERSION, VERSION_INFO
from cma_qemu.monitor.schema import (
    Alternate,
    Command,
    Member,
    ObjectType,
    SchemaType,
    introspect,
)
from cma_qemu.regions import Region
from cma_qemu.wire.arguments import U64_MAX
from cma_qemu.wire.values import chunk_json, info_json

__all__ = [
    "MAX_READ",
    "MONITOR_OWNER",
    "TYPES",
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

#: Starts recording to a path, and stops it; each returns what the reply reports. The agent
#: provides them (the monitor knows no board or attributes to put in a recording's header).
RecordStart: TypeAlias = Callable[[str], dict[str, object]]
RecordStop: TypeAlias = Callable[[], dict[str, object]]

_U64 = "uint64"
_CHUNK = (
    Member("addr", _U64),
    Member("size", _U64),
    Member("region", "StrOrNull"),
    Member("requested", _U64),
    Member("refcount", "int"),
    Member("owner", "StrOrNull"),
)

#: The types of the commands' replies (the events' are in :mod:`.events`).
TYPES: Final[tuple[SchemaType, ...]] = (
    Alternate("StrOrNull", ("str", "null")),
    ObjectType("CommandInfo", (Member("name", "str"),)),
    ObjectType(
        "VersionTriple", (Member("major", "int"), Member("minor", "int"), Member("micro", "int"))
    ),
    ObjectType("VersionInfo", (Member("qemu", "VersionTriple"), Member("package", "str"))),
    ObjectType(
        "CmaRegion",
        (
            Member("name", "StrOrNull"),
            Member("start", _U64),
            Member("size", _U64),
            Member("free", _U64),
            Member("users", "int"),
            Member("allocator", "StrOrNull"),
            Member("attached", "StrOrNull"),
            Member("asterisk", "bool"),
            Member("holes", "[CmaHole]", optional=True),
        ),
    ),
    ObjectType("CmaHole", (Member("start", _U64), Member("size", _U64))),
    ObjectType("CmaChunk", _CHUNK),
    ObjectType("CmaMap", (Member("map", "str"), Member("asterisk", "str"))),
    ObjectType(
        "CmaStats",
        (
            Member("name", "StrOrNull"),
            Member("start", _U64),
            *(
                Member(counter, "int")
                for counter in (
                    "alloc_pages_success",
                    "alloc_pages_fail",
                    "release_pages_success",
                    "total_pages",
                    "available_pages",
                    "maxchunk",
                )
            ),
        ),
    ),
    ObjectType(
        "CmaInfo",
        (
            Member("lower_bound", _U64),
            Member("upper_bound", _U64),
            Member("total_size", _U64),
            Member("free_size", _U64),
            Member("count", "int"),
        ),
    ),
    ObjectType("CmaAllocator", (Member("name", "str"), Member("default", "bool"))),
    ObjectType("CmaAllocatorRegistered", (Member("name", "str"), Member("regions", "[StrOrNull]"))),
    ObjectType("CmaRead", (Member("addr", _U64), Member("size", _U64), Member("data", "str"))),
    ObjectType(
        "CmaRecording",
        (
            Member("path", "str"),
            Member("allocations", "int"),
            Member("frees", "int"),
            Member("live", "int"),
        ),
    ),
)


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
    """The command table of one monitor (everything but ``qmp_capabilities``).

    ``table`` maps each name to its :class:`~cma_qemu.monitor.schema.Command`, which takes the
    request's ``Arguments``.
    """

    def __init__(self, cma: Cma, read_memory: MemoryReader | None = None) -> None:
        self.cma = cma
        self.read_memory = read_memory
        self.record_start: RecordStart | None = None
        self.record_stop: RecordStop | None = None
        self.human = HumanMonitor(cma, PACKAGE_VERSION)
        self.table: dict[str, Command] = {c.name: c for c in self.declare()}
        #: ``qmp_capabilities``: the server runs it (once, before the table is open).
        self.capabilities = Command(
            "qmp_capabilities", _negotiate, (Member("enable", "[str]", optional=True),)
        )

    def declare(self) -> tuple[Command, ...]:
        """The table: name, handler, arguments and return type of every command."""
        addr, size = Member("addr", _U64), Member("size", _U64)
        alignment = Member("alignment", _U64, optional=True, default=0)
        kind = Member("kind", "str", optional=True, default="")
        regions = Member("regions", "StrOrNull", optional=True)
        return (
            Command("query-commands", self.query_commands, returns="[CommandInfo]"),
            Command("query-version", self.query_version, returns="VersionInfo"),
            Command("query-qmp-schema", self.query_qmp_schema, returns="[SchemaInfo]"),
            Command(
                "human-monitor-command",
                self.human_monitor_command,
                (
                    Member("command-line", "str"),
                    Member("cpu-index", _U64, optional=True, default=0),
                ),
                returns="str",
            ),
            Command(
                "query-cma-regions",
                self.query_regions,
                (Member("holes", "bool", optional=True, default=False),),
                returns="[CmaRegion]",
            ),
            Command("query-cma-chunks", self.query_chunks, returns="[CmaChunk]"),
            Command("query-cma-map", self.query_map, returns="CmaMap"),
            Command("query-cma-stats", self.query_stats, returns="[CmaStats]"),
            Command(
                "query-cma-info", self.query_info, (Member("dev", "str"), kind), returns="CmaInfo"
            ),
            Command("query-cma-info-about", self.query_info_about, (regions,), returns="CmaInfo"),
            Command("cma-set-map", self.set_map, (Member("map", "str"),)),
            Command("cma-set-asterisk", self.set_asterisk, (Member("asterisk", "str"),)),
            Command(
                "cma-alloc",
                self.alloc,
                (Member("dev", "str"), kind, size, alignment),
                returns="CmaChunk",
            ),
            Command(
                "cma-alloc-from", self.alloc_from, (regions, size, alignment), returns="CmaChunk"
            ),
            Command("cma-free", self.free, (addr,), returns="CmaChunk"),
            Command("cma-read", self.read, (addr, size), returns="CmaRead"),
            Command("query-cma-allocators", self.query_allocators, returns="[CmaAllocator]"),
            Command(
                "cma-allocator-register",
                self.allocator_register,
                (Member("class", "str"),),
                returns="CmaAllocatorRegistered",
            ),
            Command(
                "cma-record-start",
                self.start_recording,
                (Member("path", "str"),),
                returns="CmaRecording",
            ),
            Command("cma-record-stop", self.stop_recording, returns="CmaRecording"),
        )

    def names(self) -> list[str]:
        """Every command a negotiated client may execute, including ``qmp_capabilities``."""
        return sorted([*self.table, "qmp_capabilities"])

    def query_commands(self) -> object:
        """What qmp-shell completes on."""
        return [{"name": name} for name in self.names()]

    def query_version(self) -> object:
        """This package's version in QEMU's shape (the greeting carries the same)."""
        return VERSION_INFO

    def query_qmp_schema(self) -> object:
        """The commands and events of this monitor and their types, as QEMU's SchemaInfo."""
        return introspect((self.capabilities, *self.table.values()), EVENTS, (*TYPES, *EVENT_TYPES))

    def human_monitor_command(self, command_line: str, cpu_index: int) -> object:
        """HMP text: help, info cma, info chunks, info version (what qmp-shell -H needs)."""
        del cpu_index  # one "CPU" here; accepted because qmp-shell always sends it
        return self.human.execute(command_line)

    def query_regions(self, holes: bool) -> object:
        """Regions with free space, users and allocators; ``holes: true`` adds the free blocks."""
        return [region_json(r, holes) for r in self.cma.regions]

    def query_chunks(self) -> object:
        """Every live chunk with its owner and refcount."""
        return [chunk_detail(c) for c in self.cma.chunks]

    def query_map(self) -> object:
        """The map and asterisk attributes as text (empty: unset)."""
        return {"map": self.cma.map_text, "asterisk": self.cma.asterisk_text}

    def query_stats(self) -> object:
        """Per-region counters under mainline's names."""
        return [dataclasses.asdict(s) for s in self.cma.stats()]

    def query_info(self, dev: str, kind: str) -> object:
        """``cma_info`` for (dev, kind)."""
        return info_json(self.cma.info(dev, kind))

    def query_info_about(self, regions: str | None) -> object:
        """``cma_info_about`` for a region list (null or ``*``: asterisk)."""
        return info_json(self.cma.info_about(regions))

    def set_map(self, map: str) -> object:
        """The sysfs ``map`` write: invalid text is EINVAL and keeps the old map."""
        self.cma.set_map(map)
        return {}

    def set_asterisk(self, asterisk: str) -> object:
        """The sysfs ``asterisk`` write; empty text unsets it."""
        self.cma.set_asterisk(asterisk)
        return {}

    def alloc(self, dev: str, kind: str, size: int, alignment: int) -> object:
        """``cma_alloc`` on behalf of the operator (owner ``monitor``)."""
        return chunk_detail(self.cma.alloc(dev, kind, size, alignment, owner=MONITOR_OWNER))

    def alloc_from(self, regions: str | None, size: int, alignment: int) -> object:
        """``cma_alloc_from`` on behalf of the operator (owner ``monitor``)."""
        return chunk_detail(self.cma.alloc_from(regions, size, alignment, owner=MONITOR_OWNER))

    def query_allocators(self) -> object:
        """The allocators loaded now; the first is the default."""
        registry = self.cma.registry
        return [
            {"name": name, "default": name == registry.default_name} for name in registry.names()
        ]

    def allocator_register(self, class_: str) -> object:
        """Load ``module:Class`` and register it while the agent runs (like a module load).

        Regions waiting for an allocator of that name attach it; the socket is the owner's
        only (0600), since this imports code.
        """
        target = class_
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

    def start_recording(self, path: str) -> object:
        """Record every allocation and free from now on to ``path`` (docs/line-format.md)."""
        if self.record_start is None:
            raise EOPNOTSUPP("this monitor has no recorder attached")
        return self.record_start(path)

    def stop_recording(self) -> object:
        """Stop the recording; the reply says what it holds."""
        if self.record_stop is None:
            raise EOPNOTSUPP("this monitor has no recorder attached")
        return self.record_stop()

    def free(self, addr: int) -> object:
        """Free any chunk, whoever owns it: the operator's override."""
        return chunk_detail(self.cma.free(addr))

    def read(self, addr: int, size: int) -> object:
        """Guest bytes at [addr, addr+size), base64; size is 1..MAX_READ."""
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


def _negotiate(enable: list[str]) -> object:
    """Capabilities negotiation: this monitor offers none (QEMU's ``oob`` included)."""
    if enable:
        raise GenericError(f"Capability '{enable[0][:64]}' not available")
    return {}
