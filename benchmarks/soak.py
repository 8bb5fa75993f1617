"""Soak: boot and shut down a board many times in one process, with a guest session each time.

A long-running host (the pytest plugin, a harness holding an :class:`~cma_qemu.agent.Agent`)
must not grow with every board it runs. After each cycle this measures the process's open
fds, threads and RSS, and checks that the cycle's runtime directory and RAM file are gone
and no QEMU child is left; at the end it compares the first ``--window`` cycles with the
last ones. Open fds, threads, leftover files and QEMU children must not grow at all; RSS may
move by noise (``--rss-slack``). Exit status 1 when something grew or a session failed.

    ./dev.sh soak                       # 200 cycles on virt (about 20 minutes)
    .venv/bin/python benchmarks/soak.py --cycles 20 --json /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from qemu.qmp import QMPClient

from cma_qemu import lifecycle
from cma_qemu.agent import Agent
from cma_qemu.boards import load_board

#: The guest session of each cycle: allocations through the map, a pattern written from the
#: guest and checked by the host, a free, and the stub's exit freeing the rest.
SCRIPT = """\
alloc vpu/dec 1M
alloc camera 2M
write 1 0xc0de0000
verify 1 0xc0de0000
free 2
list
"""


@dataclass(frozen=True)
class Cycle:
    """What one boot/session/shutdown cycle left behind in this process and on disk."""

    cycle: int
    seconds: float
    fds: int
    threads: int
    rss_kib: int
    files_left: int  # this cycle's runtime dir, RAM file and monitor socket still there
    qemu_children: int
    shm_files: int  # all cma-qemu-* in /dev/shm (other sessions' boards count here too)
    tmp_dirs: int  # all cma-qemu-* runtime dirs (likewise)


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _children() -> int:
    count = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            count += len((task / "children").read_text().split())
        except OSError:
            continue
    return count


def _runtime_parents() -> list[Path]:
    parents = [Path(os.environ.get("TMPDIR", "/tmp"))]
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        parents.append(Path(xdg))
    return parents


async def one_cycle(board: str, number: int) -> Cycle:
    """Boot, run the session, check it from the host and the monitor, shut down."""
    start = time.monotonic()
    agent = await Agent.boot(load_board(board))
    async with agent:
        ours = [agent.machine.runtime_dir, agent.monitor_path]  # type: ignore[union-attr]
        ram = agent.machine.ram_path  # type: ignore[union-attr]
        if ram is not None and not str(ram).startswith("/proc/"):
            ours.append(ram)
        result = await agent.shell.run_script(SCRIPT)
        if result.stderr or result.status or len(result.stdout.splitlines()) != 3:
            raise SystemExit(f"soak: cycle {number}: the guest session failed: {result}")
        client = QMPClient("soak")
        await client.connect(str(agent.monitor_path))
        try:
            if await client.execute("query-cma-chunks") != []:
                raise SystemExit(f"soak: cycle {number}: chunks left after the session")
        finally:
            await client.disconnect()
    seconds = time.monotonic() - start
    return Cycle(
        cycle=number,
        seconds=round(seconds, 2),
        fds=len(os.listdir("/proc/self/fd")),
        threads=_status("Threads"),
        rss_kib=_status("VmRSS"),
        files_left=sum(p.exists() for p in ours),
        qemu_children=_children(),
        shm_files=len(list(Path("/dev/shm").glob("cma-qemu-*"))),
        tmp_dirs=sum(len(list(p.glob("cma-qemu-*"))) for p in _runtime_parents()),
    )


def verdict(
    cycles: list[Cycle], window: int, rss_slack_kib: int
) -> list[tuple[str, str, str, bool]]:
    """(figure, first window, last window, held) rows; held is False when it grew."""
    first, last = cycles[:window], cycles[-window:]
    rows: list[tuple[str, str, str, bool]] = []
    for name in ("fds", "threads"):
        a = [getattr(c, name) for c in first]
        b = [getattr(c, name) for c in last]
        rows.append((f"{name} (max)", str(max(a)), str(max(b)), max(b) <= max(a)))
    a_rss = statistics.median(c.rss_kib for c in first)
    b_rss = statistics.median(c.rss_kib for c in last)
    rows.append(
        (
            "RSS MiB (median)",
            f"{a_rss / 1024:.1f}",
            f"{b_rss / 1024:.1f}",
            b_rss <= a_rss + rss_slack_kib,
        )
    )
    for name in ("files_left", "qemu_children"):
        a = [getattr(c, name) for c in first]
        b = [getattr(c, name) for c in last]
        held = all(getattr(c, name) == 0 for c in cycles)
        rows.append((f"{name} (max)", str(max(a)), str(max(b)), held))
    for name in ("shm_files", "tmp_dirs"):  # machine-wide, informational
        a = [getattr(c, name) for c in first]
        b = [getattr(c, name) for c in last]
        rows.append((f"{name}, machine-wide (max)", str(max(a)), str(max(b)), True))
    return rows


async def soak(args: argparse.Namespace) -> int:
    cycles: list[Cycle] = []
    try:
        for number in range(1, args.cycles + 1):
            cycle = await one_cycle(args.board, number)
            cycles.append(cycle)
            print(
                f"cycle {number:4d}: {cycle.seconds:6.2f} s  fds {cycle.fds:3d}  "
                f"threads {cycle.threads:2d}  rss {cycle.rss_kib / 1024:6.1f} MiB  "
                f"left {cycle.files_left}  qemu {cycle.qemu_children}  "
                f"shm {cycle.shm_files}  tmp {cycle.tmp_dirs}",
                flush=True,
            )
    except asyncio.CancelledError:  # Ctrl-C, SIGTERM: the cycle's board is shut down; report
        task = asyncio.current_task()
        if not cycles or task is None:
            raise
        task.uncancel()
        print(f"\nsoak: interrupted; {len(cycles)} whole cycles", file=sys.stderr)
    window = min(args.window, len(cycles))
    rows = verdict(cycles, window, args.rss_slack * 1024)
    print(f"\n{len(cycles)} cycles on {args.board}; first {window} vs last {window}:")
    print(f"| figure | first {window} | last {window} | held |")
    print("| --- | ---: | ---: | --- |")
    for name, a, b, held in rows:
        print(f"| {name} | {a} | {b} | {'yes' if held else 'GREW'} |")
    seconds = [c.seconds for c in cycles]
    print(f"\ncycle time: median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"board": args.board, "cycles": [asdict(c) for c in cycles]}, indent=1)
        )
    return 0 if all(held for *_, held in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=200, help="boot/shutdown cycles (200)")
    parser.add_argument("--board", default="virt", help="board to boot (virt)")
    parser.add_argument("--window", type=int, default=10, help="cycles compared at each end")
    parser.add_argument(
        "--rss-slack", type=int, default=8, help="MiB the RSS median may rise as noise (8)"
    )
    parser.add_argument("--json", help="write every cycle's figures to this file")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.window < 1:
        parser.error("--cycles and --window must be at least 1")
    try:
        return lifecycle.run(soak(args))  # SIGTERM and SIGHUP unwind like Ctrl-C
    except KeyboardInterrupt as interrupt:
        return lifecycle.exit_status(interrupt)


if __name__ == "__main__":
    sys.exit(main())
