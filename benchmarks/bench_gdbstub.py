"""Benchmark host writes (and reads) of smdkc210 guest RAM through QEMU's gdbstub.

smdkc210 is booted once (``Machine``, with a 16 MiB reservation at 0x62000000 that the guest
never touches, so writes cannot hurt it). Measured in the same boot:

* baseline: an empty QMP round trip (``query-status``);
* 4-byte write through the stub (stop, ``M``, continue): p50 and p99, and its ratio to the
  QMP round trip;
* bulk writes (1 MiB and 8 MiB): MB/s, from the median of the runs;
* reads of 4 B to 1 MiB through the stub (``m`` packets) against ``pmemsave``: the
  evidence for where ``read()`` switches from the stub to pmemsave.

MB = 10^6 bytes. From the repository root (about 1 minute):

    .venv/bin/python benchmarks/bench_gdbstub.py
    .venv/bin/python benchmarks/bench_gdbstub.py --words 500 --runs 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "e2e"))

from environment import machine_info

MiB = 1 << 20
SCRATCH = 0x62000000
SCRATCH_SIZE = 16 * MiB
READ_SIZES = ((4, "4 B"), (2048, "2 KiB"), (16 * 1024, "16 KiB"), (MiB, "1 MiB"))


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank of the sorted values."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def mb_per_s(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6


async def timed(make: Callable[[], Awaitable[object]], runs: int) -> list[float]:
    """Seconds of each of ``runs`` awaits of ``make()``, after one untimed warm-up."""
    await make()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        await make()
        out.append(time.perf_counter() - t0)
    return out


async def run(words: int, runs: int) -> None:
    from machine_helpers import board, guest_image

    from cma_qemu.machine.gdbstub import GdbStubGuestMemory
    from cma_qemu.machine.launch import Machine

    b = board("smdkc210")
    async with Machine(
        b, [("scratch", SCRATCH, SCRATCH_SIZE)], image=guest_image(b.kernel_flavour)
    ) as m:
        mem = m.memory
        assert isinstance(mem, GdbStubGuestMemory)
        load = os.getloadavg()[0]
        qmp_rt = await timed(lambda: m.qmp.execute("query-status"), words)
        word = await timed(lambda: mem.write(SCRATCH + 0x40, b"\x11\x22\x33\x44"), words)
        rows: list[tuple[str, str, str]] = []
        q50, w50 = percentile(qmp_rt, 0.5), percentile(word, 0.5)
        rows.append(("QMP round trip (baseline)", f"{q50 * 1e3:.3f} ms p50", ""))
        rows.append(
            (
                "4-byte write via gdbstub",
                f"{w50 * 1e3:.3f} ms p50, {percentile(word, 0.99) * 1e3:.3f} ms p99",
                f"{w50 / q50:.2f}x QMP round trip",
            )
        )
        for size in (MiB, 8 * MiB):
            data = os.urandom(size)
            times = await timed(lambda d=data: mem.write(SCRATCH, d), runs)  # type: ignore[misc]
            assert await mem.pmemsave.read(SCRATCH, size) == data
            rates = [mb_per_s(size, t) for t in times]
            rows.append(
                (
                    f"bulk write {size // MiB} MiB via gdbstub",
                    f"{mb_per_s(size, statistics.median(times)):.1f} MB/s",
                    f"range {min(rates):.1f}-{max(rates):.1f}",
                )
            )
        for size, label in READ_SIZES:
            n = words if size <= 16 * 1024 else runs
            stub = await timed(lambda s=size: mem.read_via_stub(SCRATCH, s), n)  # type: ignore[misc]
            pmem = await timed(lambda s=size: mem.pmemsave.read(SCRATCH, s), n)  # type: ignore[misc]
            s50, p50 = statistics.median(stub), statistics.median(pmem)
            rows.append(
                (
                    f"read {label}: gdbstub / pmemsave",
                    f"{s50 * 1e3:.3f} / {p50 * 1e3:.3f} ms",
                    f"gdbstub takes {s50 / p50:.2f}x pmemsave's time",
                )
            )
        status = await m.qmp.execute("query-status")
    print(machine_info())
    print(f"load average at start: {load:.2f}; {words} words, {runs} bulk runs")
    print("| what | figure | ratio / note |")
    print("| --- | ---: | --- |")
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")
    print(f"guest after the runs: {status}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=300, help="4-byte writes/reads timed")
    parser.add_argument("--runs", type=int, default=5, help="bulk writes/reads timed")
    args = parser.parse_args(argv)
    asyncio.run(run(args.words, args.runs))


if __name__ == "__main__":
    main()
