"""What the cma_guest kernel module costs: a /dev/cma ioctl alloc against ``cma-test``'s alloc,
and how long a module build takes.

* **in the guest on virt**: one boot; rounds of ``cma-test`` ``bench N vpu/dec 64K`` (the
  stub's alloc round trip over the channel, its baseline) and of ``cma_dev_check bench N vpu
  dec 0x10000`` (open, ``IOCTL_CMA_ALLOC`` timed alone, close), the second through the module
  and its daemon (``cma-test -k``): one more hop (ioctl -> /dev/cma-ctl -> daemon -> channel)
  per request. The daemon holds the channel, so it is started and stopped around each ioctl
  round; the modes alternate so that a shared machine's load falls on both. Printed: medians
  over rounds of each mode's p50 and p99, and their ratio.
* **module build**: ``make`` of guest/kernel (cma_guest) into a scratch cache, on the cached
  header tree, for both flavours (the seconds ``kmod.build_module`` reports).

From the repository root (after ``cma-qemu guest build``)::

    .venv/bin/python benchmarks/bench_kmod.py              # about two minutes
    .venv/bin/python benchmarks/bench_kmod.py --build-only # seconds
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REPO = Path(__file__).resolve().parent.parent
PROGRAM = REPO / "tests" / "e2e" / "guest_programs" / "cma_dev_check.c"
LINE = re.compile(r"(?:bench|ioctl): n=\d+ p50=(\d+)us p99=(\d+)us")


def build_times() -> dict[str, float]:
    """make seconds of cma_guest per flavour, built into a scratch cache."""
    from cma_qemu.guest_image import FLAVOURS, apt, default_cache_dir, kmod
    from cma_qemu.guest_image.build import guest_source_dir

    src = guest_source_dir()
    times: dict[str, float] = {}
    for flavour in sorted(FLAVOURS):
        kpkg, _ = apt.resolve_packages(flavour)
        release = apt.kernel_release(kpkg.name)
        tree = kmod.kbuild_tree(release, kpkg.version, default_cache_dir(), print)
        with tempfile.TemporaryDirectory() as scratch:
            built = kmod.build_module(
                tree, src / "kernel", Path(scratch), lambda _m: None, include=[src / "include"]
            )
        times[flavour] = built.seconds
    return times


def _compile(out: Path) -> None:
    from cma_qemu.guest_image.build import CROSS_CC, STUB_CFLAGS

    argv = [CROSS_CC, *STUB_CFLAGS, "-s", "-I", str(REPO / "guest/include"), "-o", str(out)]
    subprocess.run([*argv, str(PROGRAM)], check=True)


async def in_guest(n: int, rounds: int) -> dict[str, list[tuple[int, int]]]:
    from cma_qemu.agent import Agent
    from cma_qemu.boards import load_board
    from cma_qemu.guest_put import put

    results: dict[str, list[tuple[int, int]]] = {"cma-test": [], "ioctl": []}
    with tempfile.TemporaryDirectory() as scratch:
        program = Path(scratch) / "cma_dev_check"
        _compile(program)
        agent = await Agent.boot(load_board("virt"))
        async with agent:
            await put(agent, program, "/tmp/cma_dev_check")

            async def check(cmd: str) -> str:
                out, status = await agent.guest_run(cmd, 600)
                if status:
                    raise SystemExit(f"guest command {cmd!r} failed: {out}")
                return out

            for _ in range(rounds):
                out = await check(f"echo 'bench {n} vpu/dec 64K' | cma-test")
                m = LINE.search(out)
                assert m, out
                results["cma-test"].append((int(m[1]), int(m[2])))
                pid = await check("cma-test -k </dev/null >/dev/null 2>/tmp/kd.err & echo $!")
                await check("until grep -q serving /tmp/kd.err; do usleep 20000; done")
                out = await check(f"/tmp/cma_dev_check bench {n} vpu dec 0x10000")
                await check(f"kill {pid}; while kill -0 {pid} 2>/dev/null; do usleep 20000; done")
                m = LINE.search(out)
                assert m, out
                results["ioctl"].append((int(m[1]), int(m[2])))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=500, help="allocations per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args(argv)

    for flavour, seconds in build_times().items():
        print(f"module build (make, cma_guest) {flavour}: {seconds:.2f} s")
    if args.build_only:
        return 0
    results = asyncio.run(in_guest(args.n, args.rounds))
    med = {
        mode: (statistics.median(p for p, _ in r), statistics.median(q for _, q in r))
        for mode, r in results.items()
    }
    for mode, (p50, p99) in med.items():
        print(f"{mode:8} alloc round trip, median over {args.rounds} rounds of {args.n}: "
              f"p50 {p50:.0f} us, p99 {p99:.0f} us")  # fmt: skip
    ratio = med["ioctl"][0] / med["cma-test"][0]
    print(f"ioctl / cma-test p50: {ratio:.2f}x; per round: " + ", ".join(
        f"{i[0] / c[0]:.2f}" for i, c in zip(results["ioctl"], results["cma-test"], strict=True)
    ))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
