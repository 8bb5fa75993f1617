"""``cma-qemu inspect``: a client of the agent's monitor, with the same qemu.qmp a script uses."""

from __future__ import annotations

import argparse
import base64
import json
from typing import Any

from qemu.qmp import ExecuteError, QMPClient
from rich.console import Console

from cma_qemu.attributes import memparse
from cma_qemu.errors import EINVAL, ENOENT, error_class
from cma_qemu.lifecycle import run
from cma_qemu.views import chunk_table, region_map, region_table, stats_table

__all__ = ["cmd_inspect", "hexdump"]

_WHAT = ("regions", "chunks", "map", "stats", "dump", "watch", "plot")


def hexdump(addr: int, data: bytes) -> str:
    """``ADDR: 16 bytes in hex |ascii|`` lines, addresses being guest physical."""
    lines = []
    for offset in range(0, len(data), 16):
        row = data[offset : offset + 16]
        hexes = " ".join(f"{b:02x}" for b in row).ljust(47)
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        lines.append(f"{addr + offset:#010x}: {hexes} |{text}|")
    return "\n".join(lines)


async def _execute(client: QMPClient, command: str, args: dict[str, Any] | None = None) -> Any:
    try:
        return await client.execute(command, args)
    except ExecuteError as error:
        cls = error_class(error.error_class)
        # the monitor's desc starts with the command already: say it once
        message = str(error).removeprefix(f"{command}: ")
        raise cls(message, where=f"monitor {command}") from None


async def _inspect(args: argparse.Namespace) -> int:
    console = Console(highlight=False)
    client = QMPClient("cma-qemu-inspect")
    try:
        await client.connect(args.monitor)
    except (OSError, Exception) as error:  # qemu.qmp wraps socket errors in ConnectError
        raise ENOENT(f"cannot connect to the monitor: {error}", where=args.monitor) from None
    try:
        return await _run(client, args, console)
    finally:
        await client.disconnect()


async def _run(client: QMPClient, args: argparse.Namespace, console: Console) -> int:
    what = args.what
    if what in ("regions", "plot"):
        regions = await _execute(client, "query-cma-regions", {"holes": True})
        if args.json and what == "regions":
            print(json.dumps(regions, indent=2))
        elif what == "regions":
            console.print(region_table(regions))
        else:
            chunks = await _execute(client, "query-cma-chunks")
            console.print(region_map(regions, chunks, width=args.width))
    elif what == "chunks":
        chunks = await _execute(client, "query-cma-chunks")
        _show(console, chunks, chunk_table(chunks), args.json)
    elif what == "map":
        value = await _execute(client, "query-cma-map")
        if args.json:
            print(json.dumps(value, indent=2))
        else:
            print(f"map:      {value['map'] or '(unset)'}")
            print(f"asterisk: {value['asterisk'] or '(unset)'}")
    elif what == "stats":
        stats = await _execute(client, "query-cma-stats")
        _show(console, stats, stats_table(stats), args.json)
    elif what == "dump":
        if len(args.operands) != 2:
            raise EINVAL("inspect dump needs ADDR and LEN, for example: dump 0x5df00000 256")
        addr, size = (memparse(text) for text in args.operands)
        if addr is None or size is None or size == 0:
            raise EINVAL(f"inspect dump: bad ADDR or LEN {' '.join(args.operands)!r}")
        reply = await _execute(client, "cma-read", {"addr": addr, "size": size})
        print(hexdump(addr, base64.b64decode(reply["data"])))
    else:  # watch
        await _watch(client, args)
    return 0


def _show(console: Console, data: Any, table: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        console.print(table)


async def _watch(client: QMPClient, args: argparse.Namespace) -> None:
    """Print the monitor's events as they come: one JSON object per line."""
    seen = 0
    async for event in client.events:
        print(json.dumps(dict(event)), flush=True)
        seen += 1
        if args.count and seen >= args.count:
            return


def cmd_inspect(args: argparse.Namespace) -> int:
    """``cma-qemu inspect --monitor SOCK WHAT``."""
    if args.what not in _WHAT:
        raise EINVAL(f"inspect: unknown {args.what!r} (one of: {', '.join(_WHAT)})")
    if args.what != "dump" and args.operands:
        raise EINVAL(f"inspect {args.what} takes no operands")
    return run(_inspect(args))  # SIGTERM/SIGHUP end `watch` like Ctrl-C
