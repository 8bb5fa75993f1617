"""Benchmark a restore to a ready guest (``Agent.restore``) against a boot (``Agent.boot``).

Subject: ``await Agent.restore(DIR)`` in-process, from the call until it returns: the snapshot
checked, guest RAM copied into a new memfd, QEMU started with ``-incoming defer``, QMP and the
channel connected, the device state loaded, the chunks restored and the clock set at the
guest's prompt; then one ``true`` at the prompt. On smdkc210 there is no RAM copy: the stream
carries RAM (docs/snapshots.md). Baseline: ``await Agent.boot(board)`` to the
same point (QEMU's DTB dump, boot, the reservation check in the guest), measured in the same
run. Both are closed after each run (not timed). Runs are interleaved (A B A B ...) because the
machine is shared; figures are medians, the ratio is subject / baseline. Also reported: the
save (``agent.snapshot``) and the snapshot's size on disk. From the repo root:

    .venv/bin/python benchmarks/bench_restore.py              # 5 + 5 runs on virt
    .venv/bin/python benchmarks/bench_restore.py --runs 9 --board aquila
    .venv/bin/python benchmarks/bench_restore.py --runs 3 --board smdkc210
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from environment import machine_info

GOAL_RATIO = 0.15
GOAL_SECONDS = 0.3


def interleave(runs: int) -> list[str]:
    """``restore boot restore boot ...``: each kind ``runs`` times, alternating."""
    return [kind for _ in range(runs) for kind in ("restore", "boot")]


def spread(values: Sequence[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


async def _one(kind: str, board_name: str, snapshot: Path) -> float:
    from cma_qemu.agent import Agent
    from cma_qemu.boards import load_board

    t0 = time.perf_counter()
    if kind == "restore":
        agent = await Agent.restore(snapshot)
    else:
        agent = await Agent.boot(load_board(board_name))
    try:
        await agent.console.check("true")
        return time.perf_counter() - t0
    finally:
        await agent.close()


async def bench(board_name: str, runs: int) -> int:
    from cma_qemu.agent import Agent
    from cma_qemu.boards import load_board

    directory = Path(tempfile.mkdtemp(prefix="bench-restore-"))
    snapshot = directory / "snap"
    try:
        async with await Agent.boot(load_board(board_name)) as agent:
            t0 = time.perf_counter()
            await agent.snapshot(snapshot)
            save = time.perf_counter() - t0
        used = sum(p.stat().st_blocks * 512 for p in snapshot.iterdir()) / 2**20
        times: dict[str, list[float]] = {"restore": [], "boot": []}
        for kind in interleave(runs):
            times[kind].append(await _one(kind, board_name, snapshot))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    restore, boot = statistics.median(times["restore"]), statistics.median(times["boot"])
    ratio = restore / boot
    print(machine_info())
    print(f"board {board_name}, {runs} + {runs} runs, interleaved; medians (min-max), seconds")
    print(f"  save (agent.snapshot):     {save:.3f}   snapshot on disk {used:.1f} MiB")
    print(f"  restore to a ready guest:  {restore:.3f} ({spread(times['restore'])})")
    print(f"  boot to a ready guest:     {boot:.3f} ({spread(times['boot'])})")
    print(f"  ratio restore / boot:      {ratio:.3f} (goal <= {GOAL_RATIO})")
    print(
        f"  restore goal <= {GOAL_SECONDS} s on a quiet machine: "
        f"{'met' if restore <= GOAL_SECONDS else 'not met on this run'}"
    )
    return 0 if ratio <= GOAL_RATIO else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--board", default="virt")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    return asyncio.run(bench(args.board, args.runs))


if __name__ == "__main__":
    raise SystemExit(main())
