"""``human-monitor-command``: the few HMP lines that make ``qmp-shell -H`` useful here.

QEMU's HMP answers in text with ``\\r\\n`` line ends and reports a mistake as text too (the
QMP reply is still a success); qmp-shell's HMP mode relies on that, and on the shape of
``help`` (``NAME ARGS -- TEXT`` per line) and ``info`` (``info NAME -- TEXT``) to complete
commands. Only reading commands exist: changing state goes through the QMP commands.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from cma_qemu.attributes import format_memsize
from cma_qemu.framework import Cma

__all__ = ["EOL", "HumanMonitor"]

#: HMP's line end.
EOL: Final = "\r\n"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart, one ``\\r\\n`` line per row."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in (header, *rows)
    ]
    return "".join(line.rstrip() + EOL for line in lines)


class HumanMonitor:
    """Text views of one framework for ``human-monitor-command``. Cost: O(regions + chunks)."""

    def __init__(self, cma: Cma, version: str) -> None:
        self.cma = cma
        self.version = version
        self._info: dict[str, tuple[Callable[[], str], str]] = {
            "chunks": (self.info_chunks, "show the live chunks, their regions and owners"),
            "cma": (self.info_cma, "show the CMA regions, their free space and allocators"),
            "version": (self.info_version, "show the version of cma-qemu"),
        }

    def execute(self, command_line: str) -> str:
        """The text HMP prints for ``command_line`` (mistakes included, as HMP does)."""
        words = command_line.split()
        if not words:
            return ""
        name, rest = words[0], words[1:]
        if name in ("help", "?"):
            return self.help(rest[0] if rest else None)
        if name in ("info", "i"):
            if not rest:
                return self.help_info()
            entry = self._info.get(rest[0])
            if entry is None:
                return f"info: unknown subcommand '{rest[0]}' (try 'info'){EOL}"
            return entry[0]()
        return f"unknown command: '{name}'{EOL}"

    def help(self, topic: str | None = None) -> str:
        """``help``: one ``NAME ARGS -- TEXT`` line per command; ``help info`` lists info."""
        if topic in ("info", "i"):
            return self.help_info()
        lines = {
            "help|?": "help|? [cmd] -- show the help of all commands or just [cmd]",
            "info": "info [subcommand] -- show information about the regions and chunks",
        }
        if topic is None:
            return "".join(line + EOL for line in lines.values())
        for key, line in lines.items():
            if topic in key.split("|"):
                return line + EOL
        return f"unknown command: '{topic}'{EOL}"

    def help_info(self) -> str:
        """``info``: one ``info NAME -- TEXT`` line per subcommand."""
        return "".join(f"info {name} -- {text}{EOL}" for name, (_, text) in self._info.items())

    def info_cma(self) -> str:
        """The region table: where each region is, its size, free space and users."""
        rows = [
            [
                region.name or "(private)",
                f"{region.start:#x}",
                f"{region.start + region.size - 1:#x}",
                format_memsize(region.size),
                format_memsize(region.free_space),
                str(region.users),
                region.attached or region.allocator_name or "(default)",
                "yes" if region.in_asterisk else "no",
            ]
            for region in self.cma.regions
        ]
        header = ["name", "start", "end", "size", "free", "users", "allocator", "asterisk"]
        return _table(header, rows) + f"map: {self.cma.map_text or '(unset)'}{EOL}"

    def info_chunks(self) -> str:
        """The live chunks by address."""
        chunks = sorted(self.cma.chunks, key=lambda c: c.start)
        if not chunks:
            return f"no live chunks{EOL}"
        rows = [
            [
                f"{chunk.start:#x}",
                format_memsize(chunk.size),
                chunk.region.name or "(private)",
                chunk.owner or "-",
                str(chunk.refcount),
            ]
            for chunk in chunks
        ]
        return _table(["addr", "size", "region", "owner", "refs"], rows)

    def info_version(self) -> str:
        """What QEMU's ``info version`` prints, for this package."""
        return f"{self.version} (cma-qemu){EOL}"
