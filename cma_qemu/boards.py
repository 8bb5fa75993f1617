"""Board files (``board_configs/*.toml``): load and validate.

A board file is the platform code of the 2010 patch set (``aquila_reserve`` and friends): the
machine to run, its RAM banks, where QEMU's loader puts the kernel and initrd, the guest
channel, and the three attribute strings ``cma_set_defaults`` took.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal, cast

from cma_qemu.attributes import parse_asterisk, parse_map, parse_memsize, parse_regions
from cma_qemu.errors import EINVAL, ENOENT, AttributeSyntaxError
from cma_qemu.machine.profiles import PROFILES, MemoryAccess
from cma_qemu.regions import RamBank, RamLayout, ReservedRange
from cma_qemu.shipped import shipped_dir

__all__ = [
    "Board",
    "ChannelSpec",
    "board_dirs",
    "list_boards",
    "load_board",
    "load_board_file",
]

ChannelKind = Literal["virtio-serial", "uart", "net"]
#: A net channel's name: the TCP address the guest connects to (QEMU's guestfwd takes it).
_NET_NAME = re.compile(r"tcp:(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,5})")


@dataclass(frozen=True)
class ChannelSpec:
    """How the guest stub reaches the agent: a virtio-serial port name, a UART device, or
    (``net``) the TCP address ``tcp:A.B.C.D:PORT`` the guest's NIC reaches the agent at."""

    kind: ChannelKind
    name: str
    #: Guest physical address of the UART's FIFO status register (UFSTAT on Exynos), which
    #: the agent reads over QMP to never overfill the receive FIFO; None for virtio-serial.
    rx_fifo_status: int | None = None
    rx_fifo_size: int = 64


@dataclass(frozen=True)
class Board:
    """One validated board file."""

    name: str
    description: str
    path: Path
    machine_type: str
    cpu: str | None
    kernel_flavour: str
    console: str
    ram: tuple[RamBank, ...]
    keep_free: tuple[ReservedRange, ...]
    channel: ChannelSpec
    memory_access: MemoryAccess
    regions: str
    map: str
    asterisk: str | None

    @property
    def ram_base(self) -> int:
        """Lowest RAM address."""
        return min(bank.base for bank in self.ram)

    @property
    def ram_size(self) -> int:
        """Total RAM (QEMU's ``-m``)."""
        return sum(bank.size for bank in self.ram)

    @property
    def layout(self) -> RamLayout:
        """RAM banks and the loader's ranges, for early placement."""
        return RamLayout(self.ram, self.keep_free)


def board_dirs() -> list[Path]:
    """Where boards are looked up: ``$CMA_QEMU_BOARDS`` (``:``-separated), then the shipped ones.

    The shipped board files are the package data of an installed wheel, or the checkout's
    ``board_configs/`` in an editable install (:func:`cma_qemu.shipped.shipped_dir`).
    """
    dirs = [Path(p) for p in os.environ.get("CMA_QEMU_BOARDS", "").split(os.pathsep) if p]
    shipped = shipped_dir("boards")
    return [*dirs, shipped] if shipped is not None else dirs


def list_boards() -> list[Board]:
    """Every board file found, first directory wins on a name clash, sorted by name."""
    seen: dict[str, Board] = {}
    for directory in board_dirs():
        for path in sorted(directory.glob("*.toml")) if directory.is_dir() else []:
            if path.stem not in seen:
                seen[path.stem] = load_board_file(path)
    return [seen[name] for name in sorted(seen)]


def load_board(name_or_path: str) -> Board:
    """A board by name (``virt``) or by the path of its file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or os.sep in name_or_path:
        if not candidate.is_file():
            raise ENOENT(f"no board file {name_or_path}")
        return load_board_file(candidate)
    for directory in board_dirs():
        path = directory / f"{name_or_path}.toml"
        if path.is_file():
            return load_board_file(path)
    known = ", ".join(
        sorted({p.stem for d in board_dirs() if d.is_dir() for p in d.glob("*.toml")})
    )
    raise ENOENT(f"no board named {name_or_path!r} (known: {known or 'none'})")


class _Reader:
    """Typed access to the TOML tree that names the key in every error."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, message: str) -> EINVAL:
        return EINVAL(f"{key}: {message}", where=str(self.path))

    def table(self, data: Mapping[str, Any], key: str, allowed: set[str]) -> dict[str, Any]:
        value = data.get(key)
        if not isinstance(value, dict):
            raise self.fail(key, "missing table" if value is None else "must be a table")
        self.only(value, allowed, key)
        return value

    def only(self, data: Mapping[str, Any], allowed: set[str], where: str) -> None:
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise self.fail(
                where, f"unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})"
            )

    def string(
        self, data: Mapping[str, Any], key: str, where: str, default: str | None = None
    ) -> str:
        value = data.get(key, default)
        if not isinstance(value, str):
            raise self.fail(f"{where}.{key}", "missing" if value is None else "must be a string")
        return value

    def size(self, data: Mapping[str, Any], key: str, where: str) -> int:
        value = data.get(key)
        if isinstance(value, bool) or value is None:
            raise self.fail(f"{where}.{key}", "missing" if value is None else "must be a number")
        if isinstance(value, int):
            number = value
        elif isinstance(value, str):
            try:
                number, end = parse_memsize(value, 0, attribute=f"{where}.{key}")
            except AttributeSyntaxError as error:
                raise self.fail(
                    f"{where}.{key}", f"{value!r} is not a size ({error.message})"
                ) from None
            if end != len(value):
                raise self.fail(
                    f"{where}.{key}", f"{value!r} is not a size (text after the number)"
                )
        else:
            raise self.fail(f"{where}.{key}", 'must be a number or a size string like "384M"')
        if number < 0 or number % 4096:
            raise self.fail(f"{where}.{key}", f"{number:#x} is not a multiple of the 4 KiB page")
        return number


def load_board_file(path: Path) -> Board:
    """Parse and validate one board file; errors name the file and the key."""
    reader = _Reader(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise EINVAL(f"not valid TOML: {error}", where=str(path)) from None
    except RecursionError:  # tomllib recurses once per level of nested arrays and tables
        raise EINVAL("not valid TOML: nested too deeply", where=str(path)) from None
    except ValueError as error:  # an integer longer than int()'s 4300-digit limit
        reason = str(error).split(";")[0]  # (the rest names a Python setting)
        raise EINVAL(f"not valid TOML: {reason}", where=str(path)) from None
    except (OSError, UnicodeDecodeError) as error:
        raise EINVAL(f"cannot read: {error}", where=str(path)) from None
    reader.only(
        data, {"name", "description", "machine", "ram", "reserve", "channel", "cma"}, "board"
    )
    name = reader.string(data, "name", "board")
    if name != path.stem:
        raise reader.fail("name", f"{name!r} must match the file name {path.stem!r}")
    description = reader.string(data, "description", "board", "")

    machine = reader.table(data, "machine", {"type", "cpu", "kernel"})
    machine_type = reader.string(machine, "type", "machine")
    if machine_type not in PROFILES:
        raise reader.fail(
            "machine.type", f"{machine_type!r} is not supported (supported: {', '.join(PROFILES)})"
        )
    profile = PROFILES[machine_type]
    cpu = machine.get("cpu")
    if cpu is not None and not isinstance(cpu, str):
        raise reader.fail("machine.cpu", "must be a string")
    flavour = reader.string(machine, "kernel", "machine", profile.kernel_flavour)
    if flavour not in ("armmp", "armmp-lpae"):
        raise reader.fail(
            "machine.kernel", f"{flavour!r} is not a Debian armhf flavour (armmp, armmp-lpae)"
        )

    banks = data.get("ram")
    if not isinstance(banks, list) or not banks:
        raise reader.fail("ram", "needs at least one [[ram]] bank")
    ram: list[RamBank] = []
    for index, bank in enumerate(banks):
        where = f"ram[{index}]"
        if not isinstance(bank, dict):
            raise reader.fail(where, "must be a table")
        reader.only(bank, {"base", "size"}, where)
        ram.append(RamBank(reader.size(bank, "base", where), reader.size(bank, "size", where)))
        if ram[-1].size == 0:
            raise reader.fail(where, "size must not be 0")
    ordered = sorted(ram, key=lambda b: b.base)
    for low, high in pairwise(ordered):
        if high.base < low.end:
            raise reader.fail("ram", f"banks at {low.base:#x} and {high.base:#x} overlap")
    if profile.contiguous_ram and any(b.end != h.base for b, h in pairwise(ordered)):
        raise reader.fail(
            "ram", f"QEMU {machine_type} has one contiguous RAM block: banks must touch"
        )

    keep_free: list[ReservedRange] = []
    reserve = data.get("reserve", [])
    if not isinstance(reserve, list):
        raise reader.fail("reserve", "must be an array of [[reserve]] tables")
    for index, entry in enumerate(reserve):
        where = f"reserve[{index}]"
        if not isinstance(entry, dict):
            raise reader.fail(where, "must be a table")
        reader.only(entry, {"label", "start", "size"}, where)
        item = ReservedRange(
            reader.string(entry, "label", where),
            reader.size(entry, "start", where),
            reader.size(entry, "size", where),
        )
        if not any(b.base <= item.start and item.end <= b.end for b in ordered):
            raise reader.fail(where, f"{item.label} is not inside RAM")
        keep_free.append(item)

    channel_table = reader.table(
        data, "channel", {"kind", "name", "rx_fifo_status", "rx_fifo_size"}
    )
    kind = reader.string(channel_table, "kind", "channel")
    if kind not in ("virtio-serial", "uart", "net"):
        raise reader.fail("channel.kind", f"{kind!r}: must be 'virtio-serial', 'uart' or 'net'")
    if kind not in profile.channel_kinds:
        use = " or ".join(map(repr, profile.channel_kinds))
        lacks = "no virtio bus" if kind == "virtio-serial" else f"no {kind} channel"
        raise reader.fail("channel.kind", f"{machine_type} has {lacks}: use {use}")
    fifo_status = channel_table.get("rx_fifo_status")
    if fifo_status is not None and (
        isinstance(fifo_status, bool) or not isinstance(fifo_status, int)
    ):
        raise reader.fail("channel.rx_fifo_status", "must be an address (an integer)")
    fifo_size = channel_table.get("rx_fifo_size", 64)
    if isinstance(fifo_size, bool) or not isinstance(fifo_size, int) or not 2 <= fifo_size <= 4096:
        raise reader.fail("channel.rx_fifo_size", "must be an integer from 2 to 4096")
    if fifo_status is not None and kind != "uart":
        raise reader.fail("channel.rx_fifo_status", "only a UART channel has a FIFO")
    channel_name = reader.string(channel_table, "name", "channel")
    if kind == "net":
        match = _NET_NAME.fullmatch(channel_name)
        if match is None or not 0 < int(match[2]) < 65536:
            raise reader.fail("channel.name", f"{channel_name!r}: must be tcp:A.B.C.D:PORT")
    channel = ChannelSpec(
        cast(ChannelKind, kind),
        channel_name,
        fifo_status,
        fifo_size,
    )

    cma = reader.table(data, "cma", {"regions", "map", "asterisk"})
    regions = reader.string(cma, "regions", "cma", "")
    map_text = reader.string(cma, "map", "cma", "")
    asterisk = cma.get("asterisk")
    if asterisk is not None and not isinstance(asterisk, str):
        raise reader.fail("cma.asterisk", "must be a string")
    try:
        parse_regions(regions)
        parse_map(map_text)
        if asterisk is not None:
            parse_asterisk(asterisk)
    except AttributeSyntaxError as error:
        raise reader.fail(f"cma.{error.attribute}", error.message) from None

    return Board(
        name=name,
        description=description,
        path=path,
        machine_type=machine_type,
        cpu=cpu,
        kernel_flavour=flavour,
        console=profile.console,
        ram=tuple(ram),
        keep_free=tuple(keep_free),
        channel=channel,
        memory_access=profile.memory_access,
        regions=regions,
        map=map_text,
        asterisk=asterisk,
    )
