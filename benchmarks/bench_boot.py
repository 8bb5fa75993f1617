"""Benchmark ``cma-qemu boot virt --run true`` against plain QEMU booting the same guest.

Subject: the real CLI as a subprocess, from exec to exit (interpreter start, imports, region
placement, QEMU's DTB dump and the patch, boot, the reservation check in the guest, ``true``,
shutdown). Baseline: plain ``qemu-system-arm`` with the same kernel, initramfs, machine, CPU,
RAM backend and channel options (QEMU's own device tree, no reservations), driven with pexpect
to the same point: the guest's ready marker, ``true`` at the shell prompt, then ``poweroff -f``
and the QEMU process's exit. Runs are interleaved (A B A B ...) because the machine is shared;
the figures are medians, the ratio is subject / baseline from the same run. Optionally the
agent's phases are timed in-process to show where the difference goes. From the repo root:

    .venv/bin/python benchmarks/bench_boot.py            # 5 + 5 runs, 3 phase runs
    .venv/bin/python benchmarks/bench_boot.py --runs 9 --phase-runs 0
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pexpect
from environment import machine_info
from rich.console import Console
from rich.table import Table

GOAL = 1.25
READY = re.compile(r"cma-qemu: ready channel=\S+?\r*\n")
PROMPT = "cma# "


# ------------------------------------------------------------------ pure helpers


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> str:
    """``min-max (+-x% of the median)``: how far the runs scattered."""
    med = median(values)
    half = (max(values) - min(values)) / 2
    pct = 100 * half / med if med else 0.0
    return f"{min(values):.2f}-{max(values):.2f} (+-{pct:.0f}%)"


def interleave(kinds: Sequence[str], runs: dict[str, int]) -> list[str]:
    """A B C A B C ... until each kind has its ``runs[kind]`` turns (shared-machine fairness)."""
    left = dict(runs)
    order: list[str] = []
    while any(left.values()):
        for kind in kinds:
            if left.get(kind, 0) > 0:
                order.append(kind)
                left[kind] -= 1
    return order


# ------------------------------------------------------------------ baseline: plain QEMU


def plain_argv(board: Any, image: Any, runtime: Path, ram_file: Path | None) -> list[str]:
    """The agent's QEMU command line without the patched ``-dtb`` (QEMU makes its own tree)."""
    from cma_qemu.machine.launch import LaunchFiles, qemu_command

    argv = qemu_command(board, image, LaunchFiles.in_dir(runtime, ram_file))
    i = argv.index("-dtb")
    return argv[:i] + argv[i + 2 :]


def run_plain(board: Any, image: Any, timeout: float = 120.0) -> dict[str, float]:
    """One plain-QEMU boot to the ready marker, ``true`` at the prompt, ``poweroff -f``, exit."""
    runtime = Path(tempfile.mkdtemp(prefix="bench-boot-"))
    ram_file = None
    if board.machine_type == "virt":
        fd, name = tempfile.mkstemp(prefix="bench-boot-", suffix=".ram", dir="/dev/shm")
        os.close(fd)
        ram_file = Path(name)
    argv = plain_argv(board, image, runtime, ram_file)
    child = None
    try:
        t0 = time.perf_counter()
        child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace")
        child.delaybeforesend = None  # as the agent does (pexpect sleeps 50 ms per send)
        child.expect(READY, timeout=timeout)
        ready = time.perf_counter()
        child.expect_exact(PROMPT, timeout=timeout)
        child.sendline("true")
        child.expect_exact(PROMPT, timeout=timeout)
        ran = time.perf_counter()
        child.sendline("poweroff -f")
        child.expect(pexpect.EOF, timeout=timeout)
        child.wait()
        end = time.perf_counter()
        return {"ready": ready - t0, "true": ran - ready, "exit": end - ran, "total": end - t0}
    finally:
        if child is not None and child.isalive():
            child.close(force=True)
        shutil.rmtree(runtime, ignore_errors=True)
        if ram_file is not None:
            ram_file.unlink(missing_ok=True)


# ------------------------------------------------------------------ subject: the CLI


def cli_argv(board: str) -> list[str]:
    exe = Path(sys.executable).parent / "cma-qemu"
    prog = [str(exe)] if exe.exists() else [sys.executable, "-m", "cma_qemu.cli"]
    return [*prog, "boot", board, "--run", "true"]


def run_cli(board: str, timeout: float = 300.0) -> dict[str, float]:
    argv = cli_argv(board)
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    total = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return {"total": total}


# ------------------------------------------------------------------ the agent's phases


@contextlib.contextmanager
def _timed(module: Any, name: str, into: dict[str, float], key: str) -> Iterator[None]:
    """Wrap ``module.name`` (sync or async) so each call adds its duration to ``into[key]``."""
    original = getattr(module, name)
    if asyncio.iscoroutinefunction(original):

        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                into[key] += time.perf_counter() - t0

    else:

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                into[key] += time.perf_counter() - t0

    setattr(module, name, wrapper)
    try:
        yield
    finally:
        setattr(module, name, original)


PHASES = (
    "interpreter + imports",
    "placement",
    "QEMU dumpdtb",
    "DTB patch",
    "QEMU start -> QMP connected",
    "QMP -> ready marker (+ stty)",
    "verification (dmesg, iomem)",
    "monitor + channel connect",
    "run `true`",
    "shutdown (quit, cleanup)",
)


def run_phases(board_name: str) -> dict[str, float]:
    """The CLI's steps in this process, each timed (plus a subprocess import-time run)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import cma_qemu.cli"], check=True)
    phases: dict[str, float] = defaultdict(float)
    phases["interpreter + imports"] = time.perf_counter() - t0
    phases.update(asyncio.run(_agent_phases(board_name)))
    return dict(phases)


async def _agent_phases(board_name: str) -> dict[str, float]:
    import cma_qemu.agent as agent_mod
    import cma_qemu.machine.launch as launch
    from cma_qemu.agent import Agent
    from cma_qemu.boards import load_board

    t: dict[str, float] = defaultdict(float)
    board = load_board(board_name)
    stamps: dict[str, float] = {}

    def stamp(message: str) -> None:
        stamps.setdefault(message.split()[0], time.perf_counter())

    with contextlib.ExitStack() as stack:
        stack.enter_context(_timed(agent_mod, "build_cma", t, "placement"))
        stack.enter_context(_timed(launch, "dump_qemu_dtb", t, "QEMU dumpdtb"))
        stack.enter_context(_timed(launch, "add_reserved_memory", t, "DTB patch"))
        stack.enter_context(_timed(launch, "connect_qmp", t, "QEMU start -> QMP connected"))
        stack.enter_context(_timed(launch, "verify_reservations", t, "verification (dmesg, iomem)"))
        t0 = time.perf_counter()
        agent = await Agent.boot(board, progress=stamp)
        booted = time.perf_counter()
        machine = agent.machine
        try:
            t1 = time.perf_counter()
            out, status = await agent.shell.run("true")
            t["run `true`"] = time.perf_counter() - t1
            if status:
                raise RuntimeError(f"`true` exited {status} in the guest: {out}")
        finally:
            t2 = time.perf_counter()
            await agent.close()
            t["shutdown (quit, cleanup)"] = time.perf_counter() - t2
    boot_time = getattr(machine, "boot_time", None) or 0.0
    prepared = stamps.get("booting", t0)
    # Machine.start: prepare (dumpdtb, patch, files) + spawn + QMP + ready; boot_time covers
    # all of it, so ready waiting is what is left after the QMP connection.
    t["QMP -> ready marker (+ stty)"] = (
        boot_time - t["QEMU start -> QMP connected"] - (t["QEMU dumpdtb"] + t["DTB patch"])
    )
    start_to_verified = booted - prepared
    serve = start_to_verified - boot_time - t["verification (dmesg, iomem)"]
    t["monitor + channel connect"] = max(serve, 0.0)
    return dict(t)


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each (default 5)")
    parser.add_argument(
        "--phase-runs", type=int, default=3, help="in-process phase runs (default 3; 0: none)"
    )
    parser.add_argument("--board", default="virt")
    args = parser.parse_args(argv)

    from cma_qemu.boards import load_board
    from cma_qemu.guest_image import find_guest

    board = load_board(args.board)
    image = find_guest(board.kernel_flavour)
    console = Console(width=None if sys.stdout.isatty() else 150)
    console.print(machine_info())
    console.print(f"subject: {' '.join(cli_argv(args.board))}")
    ram = Path("/dev/shm/<ram>") if board.machine_type == "virt" else None
    console.print("baseline: " + " ".join(plain_argv(board, image, Path("<tmp>"), ram)))

    results: dict[str, list[dict[str, float]]] = {"plain": [], "cli": [], "phases": []}
    runners: dict[str, Callable[[], dict[str, float]]] = {
        "plain": lambda: run_plain(board, image),
        "cli": lambda: run_cli(args.board),
        "phases": lambda: run_phases(args.board),
    }
    order = interleave(
        ("plain", "cli", "phases"),
        {"plain": args.runs, "cli": args.runs, "phases": args.phase_runs},
    )
    for i, kind in enumerate(order, 1):
        r = runners[kind]()
        results[kind].append(r)
        console.print(
            f"[dim]{i}/{len(order)} {kind}: {r.get('total', sum(r.values())):.2f} s[/dim]"
        )

    plain = [r["total"] for r in results["plain"]]
    cli = [r["total"] for r in results["cli"]]
    pairs = [c / p for p, c in zip(plain, cli, strict=True)]
    table = Table(
        title=f"boot {args.board} to `true` and exit (wall seconds, {args.runs} runs each)"
    )
    for col in ("", "median", "min-max (spread)", "runs"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("plain QEMU", f"{median(plain):.2f}", spread(plain), _runs(plain))
    table.add_row("cma-qemu boot --run true", f"{median(cli):.2f}", spread(cli), _runs(cli))
    for key in ("ready", "true", "exit"):
        vals = [r[key] for r in results["plain"]]
        table.add_row(f"  plain: {key}", f"{median(vals):.2f}", spread(vals), "")
    console.print(table)

    ratio = median(cli) / median(plain)
    verdict = "[green]met[/green]" if ratio <= GOAL else "[red]MISSED[/red]"
    console.print(
        f"ratio of medians cli/plain: {ratio:.3f}x (goal <= {GOAL}x: {verdict}); "
        f"per interleaved pair: median {median(pairs):.3f}x, range "
        f"{min(pairs):.3f}-{max(pairs):.3f}x"
    )

    if results["phases"]:
        ph = Table(title=f"cma-qemu phases (in-process, median of {len(results['phases'])})")
        ph.add_column("phase")
        ph.add_column("median s", justify="right")
        ph.add_column("min-max", justify="right")
        total = 0.0
        for name in PHASES:
            vals = [r.get(name, 0.0) for r in results["phases"]]
            total += median(vals)
            ph.add_row(name, f"{median(vals):.3f}", f"{min(vals):.3f}-{max(vals):.3f}")
        ph.add_row("sum of medians", f"{total:.3f}", "")
        console.print(ph)
    return 0


def _runs(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    sys.exit(main())
