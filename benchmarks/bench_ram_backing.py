"""Guest RAM as an anonymous memfd against a named file in /dev/shm: boot time and mmap reads.

Two measurements, each with its baseline in the same run:

* boot: ``cma-qemu boot virt --run true`` from exec to exit, from this tree (memfd RAM)
  against the same command from a git revision that still used a ``/dev/shm`` file
  (``--baseline REV``, extracted with ``git archive`` and put first on ``PYTHONPATH``), runs
  interleaved. Skipped with ``--boot-runs 0``.
* mmap reads, no QEMU: ``MmapGuestMemory`` over a 512 MiB memfd (opened as
  ``/proc/self/fd/N``, as QEMU and the agent open it) and over a 512 MiB file in /dev/shm;
  a 32 MiB chunk filled with the stub's pattern, then copy (``read_sync``) and verify (the
  numpy pattern check the agent uses), interleaved.

Figures are medians; ratios are memfd / file. From the repository root:

    .venv/bin/python benchmarks/bench_ram_backing.py --baseline a80c602
    .venv/bin/python benchmarks/bench_ram_backing.py --boot-runs 0 --runs 21
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from environment import machine_info

from cma_qemu.machine.launch import guest_ram
from cma_qemu.machine.memory import MmapGuestMemory
from cma_qemu.pattern import expected_pattern, find_mismatch

ROOT = Path(__file__).resolve().parent.parent
RAM = 512 << 20
BASE = 0x40000000
PATTERN = 0x5EED0000


def median_ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.1f} ms"


def _boot_once(pythonpath: str | None) -> float:
    env = dict(os.environ)
    env.pop("XDG_RUNTIME_DIR", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    exe = str(Path(sys.executable).with_name("cma-qemu"))
    t0 = time.perf_counter()
    done = subprocess.run(
        [exe, "boot", "virt", "--run", "true"], env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"boot failed ({pythonpath or 'this tree'}): {done.stderr[-1000:]}")
    return elapsed


def boot(baseline: str, runs: int) -> None:
    tree = Path(tempfile.mkdtemp(prefix="bench-ram-baseline-"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", baseline], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        times: dict[str, list[float]] = {"memfd (this tree)": [], f"/dev/shm file ({baseline})": []}
        for run in range(runs):
            kinds = list(times) if run % 2 == 0 else list(reversed(times))
            for kind in kinds:
                seconds = _boot_once(None if kind.startswith("memfd") else str(tree))
                times[kind].append(seconds)
                print(f"  boot {kind}: {seconds:.2f} s", flush=True)
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    (ours, theirs) = (statistics.median(v) for v in times.values())
    for kind, values in times.items():
        print(f"boot, {kind}: median {statistics.median(values):.2f} s over {len(values)} runs")
    print(f"boot ratio memfd / file: {ours / theirs:.3f}x")


def _fill(memory: MmapGuestMemory, size: int) -> None:
    memory.write_sync(BASE, expected_pattern(PATTERN, size // 4).tobytes())


def mmap_reads(size: int, runs: int) -> None:
    fd, path = guest_ram(RAM, "bench-ram")
    shm = Path(tempfile.mkstemp(prefix="bench-ram-", suffix=".ram", dir="/dev/shm")[1])
    try:
        os.truncate(shm, RAM)
        memories = {
            "memfd": MmapGuestMemory(path, BASE, RAM),
            "/dev/shm file": MmapGuestMemory(shm, BASE, RAM),
        }
        methods: dict[str, Callable[[MmapGuestMemory], object]] = {
            "copy": lambda m: m.read_sync(BASE, size),
            "verify": lambda m: find_mismatch(m.view(BASE, size), size, PATTERN),
        }
        for memory in memories.values():
            _fill(memory, size)
            assert find_mismatch(memory.view(BASE, size), size, PATTERN) is None
        times: dict[tuple[str, str], list[float]] = {}
        for run in range(runs):
            order = list(memories.items())
            order = order[run % 2 :] + order[: run % 2]
            for name, memory in order:
                for method, fn in methods.items():
                    t0 = time.perf_counter()
                    fn(memory)
                    times.setdefault((name, method), []).append(time.perf_counter() - t0)
        for memory in memories.values():
            memory.close_sync()
    finally:
        os.close(fd)
        shm.unlink(missing_ok=True)
    for method in methods:
        ours = statistics.median(times[("memfd", method)])
        theirs = statistics.median(times[("/dev/shm file", method)])
        print(
            f"mmap {method} of {size >> 20} MiB: memfd {ours * 1e3:.1f} ms "
            f"({size / ours / 1e9:.2f} GB/s), /dev/shm file {theirs * 1e3:.1f} ms "
            f"({size / theirs / 1e9:.2f} GB/s); ratio memfd / file {theirs / ours:.2f}x speed"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="a80c602", help="revision with /dev/shm RAM")
    parser.add_argument("--boot-runs", type=int, default=5, help="boots of each (default 5)")
    parser.add_argument("--runs", type=int, default=15, help="mmap rounds (default 15)")
    parser.add_argument("--size", type=int, default=32, help="MiB read per round (default 32)")
    args = parser.parse_args(argv)
    print(machine_info())
    mmap_reads(args.size << 20, args.runs)
    if args.boot_runs:
        boot(args.baseline, args.boot_runs)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
