"""Benchmark the whole ``cma-qemu replay`` process against a compiled best-fit baseline.

For each N (live chunks) a seeded churn trace (cma_qemu/churn.py: N allocations, then 200,000
rounds of "free a random live chunk, allocate one") is replayed by the real CLI as a
subprocess, ``cma-qemu replay FILE --cma t=2G --ram 0x40000000:2G > FILE.out``, exec to exit
(interpreter start-up, imports, parsing, printing all count), and by
``benchmarks/replay_baseline.cc``: the same placement policy as the ``bf`` allocator in C++
(red-black trees), built here with the host's g++. Both must print byte-identical allocation
lines (checked) and replay must print no error. Runs of the two alternate and each figure is
the best of ``--repeat``; wall-clock and CPU time (user+sys of the child) are both reported,
since the machine is shared and wall-clock follows its load. From the repository root:

    .venv/bin/python benchmarks/bench_replay.py            # 1k, 10k, 100k (a few minutes)
    .venv/bin/python benchmarks/bench_replay.py --quick    # smoke run (seconds)
    .venv/bin/python benchmarks/bench_replay.py --stub     # also the guest stub on virt

``--ceiling`` also runs, on the same traces and timed the same way, what bounds a CPython
replay from below: ``benchmarks/replay_floor.py`` (the baseline's program line for line in
Python, no checks, no framework; with no allocator, then with ``bf`` called directly) and
replay itself with its hot modules compiled to C by mypyc (built here into a temporary copy
of the package; needs mypy's mypyc, a C compiler and the Python headers).

``--stub`` boots virt with ``--cma t=300M --map */*=t`` and runs a 1,500-live-chunk churn trace
(~9,000 lines) through ``cma-test`` in the guest; it reports the stub's lines/s next to
1 / (alloc round trip), from ``ping``/``bench`` lines run in the same boot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from environment import machine_info
from rich.console import Console
from rich.table import Table

from cma_qemu.churn import ChurnShape, churn_script
from cma_qemu.configuration import build_cma
from cma_qemu.replay import parse_ram

HERE = Path(__file__).resolve().parent
BASELINE_SOURCE = HERE / "replay_baseline.cc"
CLI = str(Path(sys.executable).with_name("cma-qemu"))
#: One region for every N: 100k live chunks of up to 3 pages need about 1 GiB.
REGIONS = "t=2G"
RAM = "0x40000000:2G"
SHAPE = ChurnShape()  # 1 B..12 KiB requests, 8 % at 16K alignment, 2 % at 64K
GOAL_RATIO = 12.0
GOAL_GROWTH = 1.5
GOAL_LINES_PER_S = 60_000
#: The stub run: what tests/e2e/test_stub_scale.py runs, on the same attributes.
STUB_LIVE, STUB_ROUNDS = 1_500, 3_750
STUB_SHAPE = ChurnShape(min_size=4 << 10, max_size=128 << 10, dev="t", aliases=True)
STUB_ATTRIBUTES = {"regions": "t=300M", "map_text": "*/*=t"}
TIMING = re.compile(r"^(ping|bench): n=(\d+) p50=(\d+)us p99=(\d+)us$", re.MULTILINE)


# ------------------------------------------------------------------ pure helpers


@dataclass
class Timing:
    """One process run: wall-clock and CPU seconds (user + sys of the child)."""

    wall: float
    cpu: float


def best(runs: Sequence[Timing]) -> Timing:
    """The fastest wall and the smallest CPU time over the runs (the machine is shared)."""
    return Timing(min(r.wall for r in runs), min(r.cpu for r in runs))


def region_of(regions: str, ram: str) -> tuple[int, int]:
    """Where ``cma-qemu replay --cma REGIONS --ram RAM`` places its single region."""
    (region,) = build_cma(regions=regions, ram=[parse_ram(ram)]).regions
    return region.start, region.size


def allocation_lines(text: str) -> list[str]:
    """The ``ID: 0xSIZE@0xSTART`` lines of an output."""
    return [
        line for line in text.splitlines() if re.fullmatch(r"\d+: 0x[0-9a-f]+@0x[0-9a-f]+", line)
    ]


def build_baseline(out_dir: Path) -> Path:
    """Compile the C++ baseline with the host compiler (-O2, warnings are errors)."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise SystemExit("bench_replay: no g++ or c++ on PATH (apt-get install g++)")
    binary = out_dir / "replay_baseline"
    subprocess.run(
        [
            compiler,
            "-O2",
            "-std=c++17",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-o",
            str(binary),
            str(BASELINE_SOURCE),
        ],
        check=True,
    )
    return binary


def timed(
    argv: Sequence[str], stdin: Path, stdout: Path, env: dict[str, str] | None = None
) -> tuple[Timing, int, str]:
    """Run ``argv`` from exec to exit; its timing, exit status and stderr."""
    with stdin.open("rb") as fin, stdout.open("wb") as fout:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=subprocess.PIPE, env=env)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would sum all children)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        assert proc.stderr is not None
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        proc.returncode = os.waitstatus_to_exitcode(status)
    return Timing(wall, usage.ru_utime + usage.ru_stime), proc.returncode, err


@dataclass
class SizeResult:
    """Both programs on one trace."""

    n: int
    lines: int
    replay: Timing
    compiled: Timing
    #: ``--ceiling``: program -> its timing on the same trace, in measure_ceiling's order.
    ceiling: dict[str, Timing] = field(default_factory=dict)

    def rate(self, which: str, clock: str) -> float:
        """Script lines per second."""
        timing: Timing = getattr(self, which)
        return self.lines / getattr(timing, clock)

    def per_line_us(self, which: str, clock: str) -> float:
        timing: Timing = getattr(self, which)
        return getattr(timing, clock) / self.lines * 1e6

    def ratio(self, clock: str) -> float:
        """replay time / compiled time."""
        return float(getattr(self.replay, clock) / getattr(self.compiled, clock))

    def ceiling_ratio(self, program: str, clock: str) -> float:
        """A ``--ceiling`` program's time / compiled time."""
        return float(getattr(self.ceiling[program], clock) / getattr(self.compiled, clock))


# ------------------------------------------------------------------ --ceiling

FLOOR_SCRIPT = HERE / "replay_floor.py"
#: The hot path of a replay: the line runner, the framework, the allocator and what they import.
MYPYC_MODULES = (
    "cma_qemu/script.py",
    "cma_qemu/framework.py",
    "cma_qemu/allocators/base.py",
    "cma_qemu/allocators/best_fit.py",
    "cma_qemu/errors.py",
    "cma_qemu/regions.py",
    "cma_qemu/units.py",
)


def build_mypyc(work: Path) -> Path:
    """A copy of the package with :data:`MYPYC_MODULES` compiled by mypyc; its directory."""
    root = work / "mypyc"
    package = Path(__file__).resolve().parent.parent / "cma_qemu"
    shutil.copytree(package, root / "cma_qemu", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "mypy.ini").write_text(
        "[mypy]\nstrict = True\n[mypy-sortedcontainers,sortedcontainers.*]\n"
        "ignore_missing_imports = True\n"
    )
    build = subprocess.run(
        [sys.executable, "-m", "mypyc", *MYPYC_MODULES],
        cwd=root,
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        raise SystemExit(
            f"bench_replay: mypyc failed:\n{build.stdout[-2000:]}{build.stderr[-2000:]}"
        )
    return root


def measure_ceiling(
    result: SizeResult,
    script: Path,
    region: tuple[int, int],
    repeat: int,
    work: Path,
    mypyc_root: Path,
    expected: str,
) -> None:
    """Time the --ceiling programs on ``script``; fill ``result.ceiling``."""
    where = [hex(region[0]), hex(region[1])]
    mypyc_env = {**os.environ, "PYTHONPATH": str(mypyc_root)}
    # name, argv, environment, whether its allocation lines must equal the baseline's
    floor = [sys.executable, str(FLOOR_SCRIPT)]
    replay = [CLI, "replay", "-", "--cma", REGIONS, "--ram", RAM]
    programs: list[tuple[str, list[str], dict[str, str] | None, bool]] = [
        ("Python loop, no allocator", [*floor, "none", *where], None, False),
        ("Python loop + bf", [*floor, "bf", *where], None, True),
        ("replay, mypyc-compiled", replay, mypyc_env, True),
    ]
    for name, argv, env, same_lines in programs:
        runs: list[Timing] = []
        for _ in range(repeat):
            timing, status, err = timed(argv, script, work / "ceiling.out", env)
            if status != 0 or err:
                raise SystemExit(f"{name} on the {result.n:,} trace failed ({status}): {err[:500]}")
            runs.append(timing)
        out = (work / "ceiling.out").read_text()
        if same_lines and out != expected:
            raise SystemExit(f"N={result.n:,}: {name} printed other lines than the baseline")
        if out.count("\n") != expected.count("\n"):
            raise SystemExit(f"N={result.n:,}: {name} printed another number of lines")
        result.ceiling[name] = best(runs)


def measure_size(
    n: int,
    rounds: int,
    seed: int,
    repeat: int,
    work: Path,
    baseline: Path,
    region: tuple[int, int],
    mypyc_root: Path | None = None,
) -> SizeResult:
    script = work / f"churn-{n}.cma"
    text = churn_script(n, rounds, seed, SHAPE)
    script.write_text(text)
    lines = text.count("\n")
    replay_argv = [CLI, "replay", "-", "--cma", REGIONS, "--ram", RAM]
    compiled_argv = [str(baseline), hex(region[0]), hex(region[1])]
    replay_runs: list[Timing] = []
    compiled_runs: list[Timing] = []
    for _ in range(repeat):  # alternate, so both see the same load
        timing, status, err = timed(replay_argv, script, work / "replay.out")
        if status != 0 or err:
            raise SystemExit(f"replay of the {n:,} trace failed ({status}): {err[:500]}")
        replay_runs.append(timing)
        timing, status, err = timed(compiled_argv, script, work / "compiled.out")
        if status != 0 or err:
            raise SystemExit(f"baseline on the {n:,} trace failed ({status}): {err[:500]}")
        compiled_runs.append(timing)
    replay_out = (work / "replay.out").read_text()
    compiled_out = (work / "compiled.out").read_text()
    if allocation_lines(replay_out) != allocation_lines(compiled_out) or not replay_out:
        raise SystemExit(f"N={n:,}: replay and the compiled baseline printed different lines")
    if replay_out != compiled_out:
        raise SystemExit(f"N={n:,}: the outputs differ outside the allocation lines")
    result = SizeResult(n, lines, best(replay_runs), best(compiled_runs))
    if mypyc_root is not None:
        measure_ceiling(result, script, region, repeat, work, mypyc_root, compiled_out)
    return result


# ------------------------------------------------------------------ the stub in a guest


@dataclass
class StubResult:
    lines: int
    seconds: float
    identical: bool
    ping_p50_us: int
    alloc_p50_us: int

    @property
    def lines_per_s(self) -> float:
        return self.lines / self.seconds


async def measure_stub(seed: int, work: Path, console: Console) -> StubResult:
    """Boot virt, run the churn trace through cma-test, time it in the guest's shell."""
    from cma_qemu.agent import Agent
    from cma_qemu.boards import load_board
    from cma_qemu.replay import replay

    text = churn_script(STUB_LIVE, STUB_ROUNDS, seed, STUB_SHAPE)
    board = load_board("virt")
    expected = replay(text, build_cma(board=board, **STUB_ATTRIBUTES)).stdout
    agent = await Agent.boot(board, **STUB_ATTRIBUTES)
    async with agent:
        await agent.shell.put_file("/tmp/churn.cma", text.encode())
        await agent.shell.put_file("/tmp/rtt.cma", b"ping 2000\nbench 2000 t 64K\n")
        _, status = await agent.shell.run("true")  # warm the shell
        t0 = time.perf_counter()
        _, status = await agent.shell.run("cma-test < /tmp/churn.cma > /tmp/churn.out", 600)
        seconds = time.perf_counter() - t0
        if status != 0:
            raise SystemExit(f"cma-test exited {status} on the churn trace")
        out = (await agent.shell.get_file("/tmp/churn.out")).decode()
        rtt, _ = await agent.shell.run("cma-test < /tmp/rtt.cma", 600)
    timings = {m[1]: int(m[3]) for m in TIMING.finditer(rtt)}
    console.print(f"[dim]stub: {seconds:.1f} s for {text.count(chr(10)):,} lines; {rtt}[/dim]")
    return StubResult(text.count("\n"), seconds, out == expected, timings["ping"], timings["bench"])


# ------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--seed", type=int, default=2010)
    parser.add_argument("--rounds", type=int, help="churn rounds per trace (default 200000)")
    parser.add_argument("--repeat", type=int, default=3, help="keep the best of this many runs")
    parser.add_argument("--stub", action="store_true", help="also time cma-test in a virt guest")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also time what bounds a CPython replay: a bare Python loop, and mypyc",
    )
    args = parser.parse_args(argv)
    ns = (100, 1_000) if args.quick else (1_000, 10_000, 100_000)
    rounds = args.rounds or (2_000 if args.quick else 200_000)
    repeat = 1 if args.quick else args.repeat
    console = Console(width=160)
    console.print(f"[dim]{machine_info()}[/dim]")
    console.print(
        f"seed {args.seed}, {rounds:,} churn rounds per trace, best of {repeat}; region "
        f"--cma {REGIONS} --ram {RAM}; requests {SHAPE.min_size}..{SHAPE.max_size} bytes, "
        f"alignments {[(a >> 10, p) for a, p in SHAPE.alignments]} (KiB, share)"
    )
    region = region_of(REGIONS, RAM)
    results: list[SizeResult] = []
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        work = Path(tmp)
        baseline = build_baseline(work)
        startup, status, err = timed(
            [CLI, "replay", "-", "--cma", REGIONS, "--ram", RAM],
            Path(os.devnull),
            work / "empty.out",
        )
        if status != 0:
            raise SystemExit(f"replay of an empty script failed: {err}")
        mypyc_root = build_mypyc(work) if args.ceiling else None
        for n in ns:
            results.append(
                measure_size(n, rounds, args.seed, repeat, work, baseline, region, mypyc_root)
            )
            console.print(f"[dim]N={n:,} done[/dim]")
        stub = asyncio.run(measure_stub(args.seed, work, console)) if args.stub else None

    table = Table(title="cma-qemu replay (whole process) vs compiled best fit, same trace")
    for col in (
        "N live",
        "lines",
        "replay s (cpu)",
        "replay lines/s (cpu)",
        "us/line (cpu)",
        "compiled s (cpu)",
        "compiled lines/s (cpu)",
        "ratio wall",
        "ratio cpu",
    ):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(
            f"{r.n:,}",
            f"{r.lines:,}",
            f"{r.replay.wall:.2f} ({r.replay.cpu:.2f})",
            f"{r.rate('replay', 'wall'):,.0f} ({r.rate('replay', 'cpu'):,.0f})",
            f"{r.per_line_us('replay', 'wall'):.2f} ({r.per_line_us('replay', 'cpu'):.2f})",
            f"{r.compiled.wall:.3f} ({r.compiled.cpu:.3f})",
            f"{r.rate('compiled', 'wall'):,.0f} ({r.rate('compiled', 'cpu'):,.0f})",
            f"{r.ratio('wall'):.1f}x",
            f"{r.ratio('cpu'):.1f}x",
        )
    console.print(table)
    console.print(
        f"replay of an empty script (start-up, imports, building the framework): "
        f"{startup.wall:.2f} s wall, {startup.cpu:.2f} s CPU; allocation lines identical at "
        f"every N"
    )
    lo, hi = results[0], results[-1]
    for clock in ("wall", "cpu"):
        growth = hi.per_line_us("replay", clock) / lo.per_line_us("replay", clock)
        console.print(
            f"{clock}: replay cost per line at {hi.n:,} / at {lo.n:,}: {growth:.2f}x "
            f"(goal <= {GOAL_GROWTH}x) -> {_verdict(growth <= GOAL_GROWTH)}"
        )
    for r in results:
        if r.n == 10_000:
            for clock in ("wall", "cpu"):
                rate, ratio = r.rate("replay", clock), r.ratio(clock)
                console.print(
                    f"{clock} at 10k: {rate:,.0f} lines/s (goal >= {GOAL_LINES_PER_S:,}) -> "
                    f"{_verdict(rate >= GOAL_LINES_PER_S)}; replay/compiled {ratio:.1f}x "
                    f"(goal <= {GOAL_RATIO:g}x) -> {_verdict(ratio <= GOAL_RATIO)}"
                )
    if args.ceiling:
        console.print(_ceiling_table(results))
    if stub is not None:
        console.print(
            f"cma-test in the guest (virt, {STUB_LIVE:,} live chunks): {stub.lines:,} lines in "
            f"{stub.seconds:.1f} s = {stub.lines_per_s:,.0f} lines/s; 1 / (alloc round trip "
            f"p50 {stub.alloc_p50_us} us) = {1e6 / stub.alloc_p50_us:,.0f}/s, 1 / (ping p50 "
            f"{stub.ping_p50_us} us) = {1e6 / stub.ping_p50_us:,.0f}/s; output identical to "
            f"replay: {stub.identical}"
        )
        if not stub.identical:
            return 1
    return 0


def _ceiling_table(results: Sequence[SizeResult]) -> Table:
    """--ceiling: every program's cost per line and its ratio to the compiled baseline."""
    table = Table(title="What bounds a CPython replay: same traces, whole process, vs compiled")
    table.add_column("program")
    for r in results:
        table.add_column(f"us/line at {r.n:,} (cpu)", justify="right")
        table.add_column(f"/compiled at {r.n:,}", justify="right")
    rows: list[tuple[str, list[Timing]]] = [
        (name, [r.ceiling[name] for r in results]) for name in results[0].ceiling
    ]
    rows.insert(2, ("cma-qemu replay", [r.replay for r in results]))
    rows.append(("compiled baseline (C++)", [r.compiled for r in results]))
    for name, timings in rows:
        cells: list[str] = []
        for r, timing in zip(results, timings, strict=True):
            cells.append(f"{timing.wall / r.lines * 1e6:.2f} ({timing.cpu / r.lines * 1e6:.2f})")
            cells.append(f"{timing.wall / r.compiled.wall:.1f}x")
        table.add_row(name, *cells)
    return table


def _verdict(good: bool) -> str:
    return "[green]met[/green]" if good else "[red]MISSED[/red]"


if __name__ == "__main__":
    sys.exit(main())
