"""Parsers of QEMU's HMP text (``info mtree -f``, ``info roms``): pure functions, testable
without QEMU; :mod:`cma_qemu.machine.qmp` runs the commands.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["MtreeRange", "RomEntry", "parse_info_roms", "parse_mtree"]


@dataclass(frozen=True, slots=True)
class MtreeRange:
    """One line of a flat view from ``info mtree -f``: ``[start, end)`` of a region."""

    start: int
    end: int
    priority: int
    kind: str
    name: str
    offset: int | None = None

    @property
    def size(self) -> int:
        return self.end - self.start


_MTREE_LINE = re.compile(
    r"^\s*(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+\(prio (?P<prio>-?\d+), (?P<kind>[\w/-]+)\):"
    r"\s*(?P<name>\S+)(?:\s+@(?P<off>[0-9a-f]+))?"
)
_MTREE_AS = re.compile(r'^\s*AS "(?P<name>[^"]+)"')


def parse_mtree(text: str) -> dict[str, list[MtreeRange]]:
    """Parse ``info mtree -f`` into flat ranges per address space name.

    Flat views are shared between address spaces (``AS "memory"`` and ``AS "cpu-memory-0"``
    name the same view), so every AS line of a view gets the same list.
    """
    views: dict[str, list[MtreeRange]] = {}
    names: list[str] = []
    ranges: list[MtreeRange] = []

    def flush() -> None:
        for n in names:
            views[n] = list(ranges)

    for line in text.replace("\r", "").splitlines():
        if line.startswith("FlatView #"):
            flush()
            names, ranges = [], []
            continue
        if (m := _MTREE_AS.match(line)) is not None:
            names.append(m.group("name"))
            continue
        if (m := _MTREE_LINE.match(line)) is not None:
            off = m.group("off")
            ranges.append(
                MtreeRange(
                    int(m.group("start"), 16),
                    int(m.group("end"), 16) + 1,
                    int(m.group("prio")),
                    m.group("kind"),
                    m.group("name"),
                    int(off, 16) if off else None,
                )
            )
    flush()
    return views


@dataclass(frozen=True, slots=True)
class RomEntry:
    """One ``info roms`` line: a blob QEMU's loader copies into the machine at reset."""

    name: str
    addr: int | None
    size: int
    mem: str | None


_ROM_ADDR = re.compile(
    r"^addr=(?P<addr>[0-9a-f]+)\s+size=0x(?P<size>[0-9a-f]+)\s+mem=(?P<mem>\w+)\s+"
    r'name="(?P<name>.*)"\s*$'
)
_ROM_FW = re.compile(r'^(?P<fw>\S+)\s+size=0x(?P<size>[0-9a-f]+)\s+name="(?P<name>.*)"\s*$')


def parse_info_roms(text: str) -> list[RomEntry]:
    """Parse ``info roms``; fw_cfg files (no guest address) come back with ``addr=None``."""
    out = []
    for line in text.replace("\r", "").splitlines():
        if (m := _ROM_ADDR.match(line.strip())) is not None:
            out.append(
                RomEntry(
                    m.group("name"),
                    int(m.group("addr"), 16),
                    int(m.group("size"), 16),
                    m.group("mem"),
                )
            )
        elif (m := _ROM_FW.match(line.strip())) is not None:
            out.append(RomEntry(m.group("name"), None, int(m.group("size"), 16), None))
    return out
