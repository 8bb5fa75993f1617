"""``cma-qemu demo``: the main job, start to finish, on a real board.

Boot the board with its regions reserved, let the guest allocate for several devices and
kinds through the map, write a distinct pattern into every chunk, check each pattern from the
host through guest memory, free, and draw the regions before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from cma_qemu.agent import Agent
from cma_qemu.boards import Board, load_board
from cma_qemu.lifecycle import run
from cma_qemu.shell import GuestStub
from cma_qemu.views import human_size, local_snapshot, region_map, region_table, stats_table

__all__ = ["DEMO_SESSIONS", "cmd_demo"]

_CHUNK_LINE = re.compile(r"^(\d+): 0x([0-9a-f]+)@0x([0-9a-f]+)$", re.MULTILINE)

#: Per board: (guest line, why) pairs; allocations are followed by a write of a pattern.
DEMO_SESSIONS: dict[str, list[tuple[str, str]]] = {
    "virt": [
        ("alloc vpu/f 96K", "vpu/f=fw"),
        ("alloc vpu/dec 6M", "vpu/*=video,common"),
        ("alloc vpu/dec 3M/1M", "same, 1 MiB aligned"),
        ("alloc camera 4M", "camera,isp=camera,common"),
        ("alloc isp 2M", "same rule"),
        ("alloc gpu 1M", "no rule: */*=* (asterisk)"),
        ("alloc-from common 8M", "a named region"),
        ("alloc vpu/dec 64M", "too big: ENOMEM"),
    ],
    "aquila": [
        ("alloc s3c-mfc5/f 512K", "s3c-mfc5/f=mfc_fw"),
        ("alloc s3c-mfc5/a 8M", "s3c-mfc5/a=mfc_b1"),
        ("alloc s3c-mfc5/b 4M", "s3c-mfc5/b=mfc_b2"),
        ("alloc fimc0 2M", "no rule: asterisk"),
        ("alloc s3c-mfc5/a 40M", "too big: ENOMEM"),
    ],
    "smdkc210": [
        ("alloc s5p-mfc/f 256K", "s5p-mfc/f=mfc_fw"),
        ("alloc s5p-mfc/a 8M", "s5p-mfc/a=mfc_b1"),
        ("alloc s5p-mfc/b 8M", "s5p-mfc/b=mfc_b2"),
        ("alloc s5p-fimc0 2M", "s5p-fimc?=fimc"),
    ],
}
DEMO_SESSIONS["goni"] = DEMO_SESSIONS["aquila"]
DEMO_SESSIONS["smdkc210-uart"] = DEMO_SESSIONS["smdkc210"]  # the same layout, the UART channel


@dataclass
class _Held:
    chunk_id: int
    start: int
    size: int
    pattern: int
    device: str


def _pattern(chunk_id: int) -> int:
    """A distinct 32-bit seed per chunk, so a chunk showing another's bytes is caught."""
    return (0xC0DE0000 + chunk_id * 0x1111) & 0xFFFFFFFF


async def _session(agent: Agent, stub: GuestStub, console: Console) -> list[_Held]:
    held: list[_Held] = []
    table = Table(title="Guest session: cma-test in the guest", title_justify="left")
    table.add_column("guest line", no_wrap=True)
    table.add_column("reply")
    table.add_column("region")
    table.add_column("why")
    for line, why in DEMO_SESSIONS.get(agent.board.name, DEMO_SESSIONS["virt"]):
        reply = (await stub.send(line)).strip()
        match = _CHUNK_LINE.match(reply)
        region = ""
        if match:
            chunk_id, size, start = int(match[1]), int(match[2], 16), int(match[3], 16)
            chunk = agent.cma.chunk(start)
            region = chunk.region.label
            pattern = _pattern(chunk_id)
            await stub.send(f"write {chunk_id} {pattern:#x}")
            held.append(_Held(chunk_id, start, size, pattern, line.split()[1]))
        table.add_row(line, reply, region, why, style=None if match else "yellow")
    console.print(table)
    return held


async def _verify(agent: Agent, held: list[_Held], console: Console) -> bool:
    table = Table(title="Host check of every pattern through guest memory", title_justify="left")
    for column in ("chunk", "device", "start", "size", "pattern", "host sees"):
        table.add_column(column)
    ok = True
    checked = 0
    began = time.perf_counter()
    for item in held:
        chunk = agent.cma.chunk(item.start)
        bad = await agent.find_mismatch(chunk, item.pattern)
        checked += chunk.requested
        ok = ok and bad is None
        seen = "[green]intact[/green]" if bad is None else f"[red]differs at +{bad:#x}[/red]"
        table.add_row(
            str(item.chunk_id),
            item.device,
            f"{item.start:#x}",
            human_size(item.size),
            f"{item.pattern:#010x} + i",
            seen,
        )
    elapsed = time.perf_counter() - began
    console.print(table)
    rate = checked / elapsed / 1e9 if elapsed > 0 else 0.0
    console.print(
        f"[dim]{human_size(checked)} checked in {elapsed * 1000:.1f} ms ({rate:.2f} GB/s) "
        f"through {type(agent.memory).__name__}[/dim]"
    )
    return ok


async def _demo(board: Board, console: Console) -> int:
    with console.status(f"booting {board.name}") as status:
        agent = await Agent.boot(board, progress=lambda message: status.update(message))
    async with agent:
        console.rule(f"[bold]cma-qemu demo[/bold]: {board.description}")
        console.print(
            f"guest up in {agent.machine.boot_time or 0:.1f} s; every region is "
            "a /reserved-memory node the guest kernel honoured (checked in /proc/iomem)"
        )
        console.print(region_table(local_snapshot(agent.cma)[0]))
        console.print(f"map:      {agent.cma.map_text or '(unset)'}")
        console.print(f"asterisk: {agent.cma.asterisk_text or '(unset)'}\n")

        async with agent.shell.stub() as stub:
            held = await _session(agent, stub, console)
            verified = await _verify(agent, held, console)
            guest_ok = True
            for item in held:
                reply = await stub.send(f"verify {item.chunk_id} {item.pattern:#x}")
                guest_ok = guest_ok and reply == ""
            console.print(
                "guest re-reads every pattern through /dev/mem: "
                + ("[green]intact[/green]" if guest_ok else "[red]MISMATCH[/red]")
            )
            console.rule("regions with the guest's chunks")
            console.print(region_map(*local_snapshot(agent.cma)))
            for item in held[::2]:
                await stub.send(f"free {item.chunk_id}")
            console.rule("after freeing every other chunk")
            console.print(region_map(*local_snapshot(agent.cma)))
        console.rule("after the stub exits (it frees what it still holds)")
        console.print(region_map(*local_snapshot(agent.cma)))
        console.print(stats_table([dataclasses.asdict(s) for s in agent.cma.stats()]))
        leftover = agent.chunks_of_guest()
        if leftover:
            console.print(f"[red]{len(leftover)} guest chunk(s) were not released[/red]")
        good = verified and guest_ok and not leftover and bool(held)
        console.print(
            "[bold green]demo passed[/bold green]" if good else "[bold red]demo failed[/bold red]"
        )
        return 0 if good else 1


def cmd_demo(args: argparse.Namespace) -> int:
    """``cma-qemu demo [--board BOARD]``."""
    console = Console(highlight=False)
    console = Console(highlight=False, width=max(console.width, 100))  # tables need the room
    return run(_demo(load_board(args.board), console))
