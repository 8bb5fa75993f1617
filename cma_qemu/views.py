"""Terminal views: region tables, chunk tables, stats, and a picture of each region.

They draw the monitor's JSON shapes (``query-cma-regions`` with holes, ``query-cma-chunks``,
``query-cma-stats``), so ``cma-qemu demo`` (a local framework) and ``cma-qemu inspect`` (a
remote agent over QMP) show exactly the same thing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from cma_qemu.framework import Cma
from cma_qemu.monitor.commands import chunk_detail, region_json

__all__ = [
    "chunk_table",
    "human_size",
    "local_snapshot",
    "region_map",
    "region_table",
    "stats_table",
]

Json = Mapping[str, Any]
_PALETTE = ("cyan", "magenta", "green", "yellow", "blue", "red", "bright_cyan", "bright_magenta")


def human_size(value: int) -> str:
    """16M, 128K, 1.5M or hex: sizes as people read them in tables."""
    if value == 0:
        return "0"
    for shift, suffix in ((30, "G"), (20, "M"), (10, "K")):
        if value and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    if value >= 1 << 20:
        return f"{value / (1 << 20):.1f}M"
    return f"{value:#x}"


def local_snapshot(cma: Cma) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    """(regions with holes, chunks) of a local framework, in the monitor's shapes."""
    return [region_json(r, True) for r in cma.regions], [chunk_detail(c) for c in cma.chunks]


def region_table(regions: Sequence[Json], title: str = "CMA regions") -> Table:
    """Name, range, size, allocator, asterisk membership and use of every region."""
    table = Table(title=title, title_justify="left")
    for column, justify in (
        ("region", "left"),
        ("start", "right"),
        ("end", "right"),
        ("size", "right"),
        ("allocator", "left"),
        ("in *", "center"),
        ("chunks", "right"),
        ("free", "right"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for region in regions:
        start, size = int(region["start"]), int(region["size"])
        allocator = region.get("attached") or region.get("allocator") or "default"
        table.add_row(
            str(region["name"] or "(private)"),
            f"{start:#010x}",
            f"{start + size - 1:#010x}",
            human_size(size),
            str(allocator),
            "yes" if region.get("asterisk") else "",
            str(region.get("users", 0)),
            human_size(int(region["free"])),
        )
    return table


def chunk_table(chunks: Sequence[Json], title: str = "Live chunks") -> Table:
    """Every live chunk with its region, owner and reference count."""
    table = Table(title=title, title_justify="left")
    for column in ("start", "size", "requested", "region", "owner", "refs"):
        table.add_column(column, justify="left" if column in ("region", "owner") else "right")
    for chunk in chunks:
        table.add_row(
            f"{int(chunk['addr']):#010x}",
            human_size(int(chunk["size"])),
            f"{int(chunk.get('requested', chunk['size'])):#x}",
            str(chunk.get("region") or "(private)"),
            str(chunk.get("owner") or ""),
            str(chunk.get("refcount", 1)),
        )
    return table


def stats_table(stats: Sequence[Json], title: str = "CMA statistics") -> Table:
    """Mainline's per-area counters."""
    table = Table(title=title, title_justify="left")
    names = (
        "alloc_pages_success",
        "alloc_pages_fail",
        "release_pages_success",
        "total_pages",
        "available_pages",
    )
    table.add_column("region")
    for name in names:
        table.add_column(name.replace("_", " "), justify="right")
    table.add_column("maxchunk", justify="right")
    for row in stats:
        table.add_row(
            str(row["name"] or f"(private@{int(row['start']):#x})"),
            *(str(row[name]) for name in names),
            human_size(int(row["maxchunk"])),
        )
    return table


def region_map(regions: Sequence[Json], chunks: Sequence[Json], width: int = 64) -> Group:
    """One bar per region: each cell is 1/width of it; chunks coloured, holes dotted.

    A cell that holds any chunk shows that chunk's colour (so a 4 KiB chunk in a 32 MiB region
    is still visible), the legend under the bar lists the chunks with their colour.
    """
    lines: list[Text] = []
    colours: dict[int, str] = {}
    for index, chunk in enumerate(sorted(chunks, key=lambda c: int(c["addr"]))):
        colours[int(chunk["addr"])] = _PALETTE[index % len(_PALETTE)]
    for region in regions:
        start, size = int(region["start"]), int(region["size"])
        mine = [c for c in chunks if start <= int(c["addr"]) < start + size]
        cells: list[str | None] = [None] * width
        for chunk in mine:
            first = (int(chunk["addr"]) - start) * width // size
            last = (int(chunk["addr"]) + int(chunk["size"]) - 1 - start) * width // size
            for cell in range(first, min(last, width - 1) + 1):
                cells[cell] = colours[int(chunk["addr"])]
        bar = Text()
        for colour in cells:
            bar.append("█" if colour else "·", style=colour or "dim")
        used = size - int(region["free"])
        header = Text(f"{region['name'] or '(private)'} ", style="bold")
        header.append(
            f"{start:#x}+{human_size(size)}  used {human_size(used)} of {human_size(size)}", "dim"
        )
        holes = region.get("holes")
        if isinstance(holes, list):
            header.append(f", {len(holes)} hole(s)", "dim")
        lines.append(header)
        lines.append(Text("  [") + bar + Text("]"))
        legend = Text("   ")
        for chunk in mine:
            legend.append("■ ", style=colours[int(chunk["addr"])])
            legend.append(f"{int(chunk['addr']):#x}+{human_size(int(chunk['size']))}  ")
        if mine:
            lines.append(legend)
    return Group(*lines)
