"""Benchmark host reads of guest RAM: mmap of the shared RAM file against QMP pmemsave.

virt is booted once (``Agent.boot``: RAM is a shared file the agent mmaps). The guest stub
allocates a chunk and fills it with its ``write`` pattern; then, interleaved for several rounds:

* mmap copy: ``MmapGuestMemory.read_sync`` of the chunk (a ``bytes`` copy);
* mmap verify: ``Agent.find_mismatch`` on the chunk (zero-copy view + numpy pattern check),
  the host-side verification path;
* pmemsave copy / verify: a ``PmemsaveGuestMemory`` over the same QMP client, same chunk
  (``read``, and the pattern check on the bytes it returns).

smdkc210 (pmemsave only) is booted after that for the reference figure. Figures are GB/s
(10^9 bytes per second) from the median time; the ratio mmap/pmemsave is from the same run.
From the repository root:

    .venv/bin/python benchmarks/bench_memory.py
    .venv/bin/python benchmarks/bench_memory.py --size 32M --runs 9 --boards virt
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from environment import machine_info
from rich.console import Console
from rich.table import Table

GOAL_GBPS = 1.0
PATTERN = 0x5EED0000
#: board -> DEV[/KIND] whose region is big enough for the chunk
DEVICES = {"virt": "vpu/dec", "smdkc210": "s5p-mfc/a"}


# ------------------------------------------------------------------ pure helpers


def parse_size(text: str) -> int:
    """``32M`` / ``64m`` / ``1G`` / ``4096`` -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower()
    if text and text[-1] in units:
        return int(text[:-1], 0) * units[text[-1]]
    return int(text, 0)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


def spread_gbps(nbytes: int, times: Sequence[float]) -> str:
    """The range of per-run rates, slowest to fastest."""
    return f"{gbps(nbytes, max(times)):.2f}-{gbps(nbytes, min(times)):.2f}"


# ------------------------------------------------------------------ measuring


async def _time(fn: Callable[[], Awaitable[object]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def measure(
    board_name: str, size: int, runs: int, console: Console
) -> dict[str, list[float]]:
    """Seconds per run for each method on one booted board."""
    from cma_qemu.agent import Agent
    from cma_qemu.boards import load_board
    from cma_qemu.machine.memory import MmapGuestMemory, PmemsaveGuestMemory
    from cma_qemu.pattern import find_mismatch

    board = load_board(board_name)
    agent = await Agent.boot(board)
    times: dict[str, list[float]] = {}
    async with agent, agent.shell.stub(timeout=300) as stub:
        out = await stub.send(f"alloc {DEVICES[board_name]} {size}")
        if not out.startswith("1: "):
            raise RuntimeError(f"{board_name}: alloc printed {out!r}")
        err = await stub.send(f"write 1 {PATTERN:#x}")
        if err.strip():
            raise RuntimeError(f"{board_name}: write printed {err!r}")
        (chunk,) = agent.chunks_of_guest()
        addr = chunk.start
        memory = agent.memory
        machine = agent.machine
        pmem = PmemsaveGuestMemory(
            machine.qmp, machine.runtime_dir, memory.ram_base, memory.ram_size, memory.banks
        )

        async def pmem_copy() -> None:
            data = await pmem.read(addr, size)
            assert len(data) == size

        async def pmem_verify() -> None:
            data = await pmem.read(addr, size)
            if find_mismatch(data, size, PATTERN) is not None:
                raise RuntimeError("pmemsave: the pattern does not match")

        methods: dict[str, Callable[[], Awaitable[object]]] = {}
        if isinstance(memory, MmapGuestMemory):

            async def mmap_copy() -> None:
                data = memory.read_sync(addr, size)
                assert len(data) == size

            async def mmap_verify() -> None:
                if await agent.find_mismatch(chunk, PATTERN, size) is not None:
                    raise RuntimeError("mmap: the pattern does not match")

            methods["mmap copy"] = mmap_copy
            methods["mmap verify"] = mmap_verify
        methods["pmemsave copy"] = pmem_copy
        methods["pmemsave verify"] = pmem_verify

        for fn in methods.values():  # warm-up (page faults of the mapping, file cache)
            await fn()
        for r in range(runs):
            # rotate the order each round so no method always follows another
            names = list(methods)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                times.setdefault(name, []).append(await _time(methods[name]))
        console.print(f"[dim]{board_name}: {runs} rounds of {', '.join(methods)}[/dim]")
        await stub.send("free 1")
    return times


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="32M", help="chunk read per run (default 32M)")
    parser.add_argument("--runs", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--boards", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(machine_info())

    results: dict[str, dict[str, list[float]]] = {}
    for board in args.boards:
        results[board] = asyncio.run(measure(board, size, args.runs, console))

    table = Table(title=f"Reading {size >> 20} MiB of guest RAM ({args.runs} runs, GB = 1e9 B)")
    for col in ("board", "method", "median ms", "GB/s (median)", "GB/s range"):
        table.add_column(col, justify="left" if col in ("board", "method") else "right")
    for board, times in results.items():
        for name, ts in times.items():
            med = statistics.median(ts)
            table.add_row(
                board,
                name,
                f"{med * 1e3:.1f}",
                f"{gbps(size, med):.2f}",
                spread_gbps(size, ts),
            )
        table.add_section()
    console.print(table)

    virt = results.get("virt")
    if virt and "mmap verify" in virt:
        rate = {k: gbps(size, statistics.median(v)) for k, v in virt.items()}
        for kind in ("copy", "verify"):
            console.print(
                f"virt {kind}: mmap / pmemsave = "
                f"{rate[f'mmap {kind}'] / rate[f'pmemsave {kind}']:.1f}x"
            )
        good = rate["mmap verify"] >= GOAL_GBPS
        verdict = "[green]met[/green]" if good else "[red]MISSED[/red]"
        console.print(
            f"goal: host verification through mmap >= {GOAL_GBPS:g} GB/s: "
            f"{rate['mmap verify']:.2f} GB/s -> {verdict} "
            f"(plain copy {rate['mmap copy']:.2f} GB/s)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
