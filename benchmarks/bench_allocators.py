"""Benchmark the shipped allocators on seeded random traces.

For each N (live chunks) the region is filled to N chunks of random page-multiple sizes (with
some larger alignments), then a long run of random alloc-or-free operations that keeps about
N chunks live is timed. Every allocator replays the same request trace, so the bitmap figures
in the same run are the baseline for best-fit. Run from the repository root:

    .venv/bin/python benchmarks/bench_allocators.py          # full run (a few minutes)
    .venv/bin/python benchmarks/bench_allocators.py --quick  # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rich.console import Console
from rich.table import Table

from cma_qemu.allocators.base import Allocator
from cma_qemu.allocators.registry import AllocatorRegistry

PAGE = 4096
BASE = 0x4000_0000
#: Chunk sizes in pages (uniform) and alignments with their weights: mostly page-aligned
#: requests, as drivers make, with a tail of 16 KiB..256 KiB ones to exercise the walk.
MAX_PAGES = 16
ALIGNMENTS = (PAGE, 16 << 10, 64 << 10, 256 << 10)
ALIGN_WEIGHTS = (85, 8, 5, 2)
#: The region is this many times the expected live bytes, so about half of it is free.
SLACK = 2


class NullAllocator(Allocator):
    """Hands out addresses without bookkeeping: times the harness itself (the loop, the
    list of live chunks), so it can be subtracted to get what the allocator costs."""

    name: ClassVar[str] = "(harness)"

    def __init__(self, start: int, size: int) -> None:
        super().__init__(start, size)
        self._next = start

    def alloc(self, size: int, alignment: int) -> int | None:
        self._next += size
        return self._next

    def free(self, start: int, size: int) -> None:
        pass

    def holes(self) -> Iterator[tuple[int, int]]:
        yield from ()

    def largest_free(self) -> int:
        return 0


@dataclass
class Trace:
    """Pre-drawn randomness, so the timed loop only calls the allocator."""

    n: int
    region_size: int
    sizes: list[int]
    aligns: list[int]
    coins: list[float]
    picks: list[float]


@dataclass
class Result:
    allocator: str
    n: int
    ops: int
    seconds: float
    failures: int
    live: int

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds

    @property
    def us_per_op(self) -> float:
        return self.seconds / self.ops * 1e6


def make_trace(n: int, ops: int, seed: int) -> Trace:
    """Requests for the fill (n) and the timed run (ops), all from one seeded generator."""
    rng = random.Random(f"{seed}:{n}")
    count = n + ops
    sizes = [rng.randint(1, MAX_PAGES) * PAGE for _ in range(count)]
    aligns = rng.choices(ALIGNMENTS, ALIGN_WEIGHTS, k=count)
    region = SLACK * n * (MAX_PAGES + 1) // 2 * PAGE
    return Trace(
        n,
        region,
        sizes,
        aligns,
        [rng.random() for _ in range(ops)],
        [rng.random() for _ in range(ops)],
    )


def run(cls: type[Allocator], trace: Trace, ops: int, budget: float) -> Result:
    """Fill to N live chunks (untimed), then time up to ``ops`` operations or ``budget`` s."""
    allocator = cls(BASE, trace.region_size)
    alloc = allocator.alloc
    free = allocator.free
    live: list[tuple[int, int]] = []
    sizes, aligns, coins, picks = trace.sizes, trace.aligns, trace.coins, trace.picks
    n = trace.n
    for i in range(n):
        start = alloc(sizes[i], aligns[i])
        if start is not None:
            live.append((start, sizes[i]))
    failures = 0
    done = 0
    check_every = 1000
    deadline = time.perf_counter() + budget
    t0 = time.perf_counter()
    while done < ops:
        for i in range(done, min(done + check_every, ops)):
            # Drift back towards N live: allocate more often below N, free more often above.
            if coins[i] < 0.5 + (n - len(live)) / (2 * n) or not live:
                size = sizes[n + i]
                start = alloc(size, aligns[n + i])
                if start is None:
                    failures += 1
                else:
                    live.append((start, size))
            else:
                j = int(picks[i] * len(live))
                live[j], live[-1] = live[-1], live[j]
                free(*live.pop())
        done = min(done + check_every, ops)
        if time.perf_counter() > deadline:
            break
    seconds = time.perf_counter() - t0
    result = Result(cls.name, n, done, seconds, failures, len(live))
    # Untimed consistency check: giving everything back must leave one whole-region hole.
    for start, size in live:
        free(start, size)
    allocator.cleanup()
    return result


def best_of(cls: type[Allocator], trace: Trace, ops: int, budget: float, repeat: int) -> Result:
    """The fastest of ``repeat`` runs (the machine is shared); one if a run hits the budget."""
    best = run(cls, trace, ops, budget)
    for _ in range(repeat - 1):
        if best.ops < ops:
            break
        again = run(cls, trace, ops, budget)
        if again.us_per_op < best.us_per_op:
            best = again
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--seed", type=int, default=2010)
    parser.add_argument("--ops", type=int, help="timed operations per run (default 200000)")
    parser.add_argument(
        "--budget",
        type=float,
        default=10.0,
        help="stop a timed run after this many seconds (bounds the bitmap at 100k; default 10)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="keep the best of this many runs")
    args = parser.parse_args(argv)
    ns = (1_000, 10_000) if args.quick else (1_000, 10_000, 100_000)
    ops = args.ops or (5_000 if args.quick else 200_000)
    registry = AllocatorRegistry.with_builtins()
    names = registry.names()
    console = Console()
    console.print(
        f"CPython {platform.python_version()} on {platform.machine()} "
        f"({os.cpu_count()} CPUs), seed {args.seed}, {ops:,} timed ops per run, best of "
        f"{args.repeat}, budget {args.budget:g} s per run; sizes 1..{MAX_PAGES} pages, "
        f"alignments {[a // 1024 for a in ALIGNMENTS]} KiB weighted {list(ALIGN_WEIGHTS)}, "
        f"region = {SLACK}x the expected live bytes"
    )
    results: dict[tuple[str, int], Result] = {}
    harness: dict[int, float] = {}
    table = Table(title="Allocator throughput (steady state, about N live chunks)")
    for col in ("allocator", "N live", "ops timed", "ops/s", "us/op", "net us/op", "failed"):
        table.add_column(col, justify="left" if col == "allocator" else "right")
    for n in ns:
        trace = make_trace(n, ops, args.seed)
        harness[n] = best_of(NullAllocator, trace, ops, args.budget, args.repeat).us_per_op
        table.add_row(NullAllocator.name, f"{n:,}", "", "", f"{harness[n]:.2f}", "", "")
        for name in names:
            cls = registry.get(name)
            assert cls is not None
            r = best_of(cls, trace, ops, args.budget, args.repeat)
            results[name, n] = r
            table.add_row(
                name,
                f"{n:,}",
                f"{r.ops:,}" + ("" if r.ops == ops else " (budget)"),
                f"{r.ops_per_s:,.0f}",
                f"{r.us_per_op:.2f}",
                f"{r.us_per_op - harness[n]:.2f}",
                f"{r.failures:,}",
            )
        table.add_section()
    console.print(table)
    console.print(
        "us/op is the whole timed loop; net us/op subtracts the harness row (the same loop "
        "with an allocator that does nothing), i.e. what the allocator itself costs."
    )

    def net(name: str, n: int) -> float:
        return results[name, n].us_per_op - harness[n]

    ratios = Table(title="Ratios")
    ratios.add_column("comparison")
    ratios.add_column("gross", justify="right")
    ratios.add_column("net", justify="right")
    lo, hi = ns[0], ns[-1]
    for name in names:
        gross = results[name, hi].us_per_op / results[name, lo].us_per_op
        ratios.add_row(
            f"{name}: cost per op at {hi:,} / at {lo:,}",
            f"{gross:.2f}x",
            f"{net(name, hi) / net(name, lo):.2f}x",
        )
    if "bf" in names and "bitmap" in names:
        for n in ns:
            speed = results["bf", n].ops_per_s / results["bitmap", n].ops_per_s
            ratios.add_row(
                f"bf speed vs bitmap at {n:,}",
                f"{speed:.2f}x",
                f"{net('bitmap', n) / net('bf', n):.2f}x",
            )
    console.print(ratios)

    if "bf" in names:
        if 10_000 in ns:
            rate = results["bf", 10_000].ops_per_s
            console.print(
                f"goal bf >= 100,000 ops/s at 10k live: {rate:,.0f} -> {_verdict(rate >= 1e5)}"
            )
        if hi != lo:
            gross = results["bf", hi].us_per_op / results["bf", lo].us_per_op
            growth = net("bf", hi) / net("bf", lo)
            console.print(
                f"goal bf cost at {hi:,} <= 2x at {lo:,}: net {growth:.2f}x -> "
                f"{_verdict(growth <= 2)} (gross {gross:.2f}x -> {_verdict(gross <= 2)})"
            )
    return 0


def _verdict(good: bool) -> str:
    return "[green]met[/green]" if good else "[red]MISSED[/red]"


if __name__ == "__main__":
    sys.exit(main())
