"""The least a replay in CPython can cost: the compiled baseline's program, line for line, in
Python, with none of replay's checks and no framework.

It reads the subset of the line format ``replay_baseline.cc`` reads (``alloc DEV SIZE[/ALIGN]``
and ``free ID``, trusted to be well formed), hands out ids the same way (lowest free first),
and prints the same allocation lines. ``bench_replay.py --ceiling`` runs it as a whole process
on the same traces, to show how much of replay's time any CPython program of this shape pays:

    python benchmarks/replay_floor.py none START SIZE < trace   # no allocator: a bump pointer
    python benchmarks/replay_floor.py bf START SIZE < trace     # cma_qemu's bf, called directly

With ``none`` the addresses differ from the baseline's (nothing is ever reused); with ``bf``
they are the same, byte for byte (the benchmark checks).
"""

from __future__ import annotations

import gc
import sys
from heapq import heappop, heappush

PAGE = 4096
UNITS = {"K": 10, "k": 10, "M": 20, "m": 20, "G": 30, "g": 30}


def number(text: str) -> int:
    """A decimal size with an optional K/M/G suffix (the traces use nothing else)."""
    shift = UNITS.get(text[-1])
    return int(text[:-1]) << shift if shift else int(text)


def main(argv: list[str]) -> int:
    mode, start, size = argv[0], int(argv[1], 0), int(argv[2], 0)
    gc.disable()
    if mode == "bf":
        from cma_qemu.allocators.best_fit import BestFitAllocator

        allocator = BestFitAllocator(start, size)
        alloc, free = allocator.alloc, allocator.free
    else:
        bump = [start]

        def alloc(size: int, alignment: int) -> int:
            at = (bump[0] + alignment - 1) & -alignment
            bump[0] = at + size
            return at

        def free(start: int, size: int) -> None:
            return None

    live: dict[int, tuple[int, int]] = {}
    freed: list[int] = []
    next_id = 1
    out: list[str] = []
    write = out.append
    for line in sys.stdin.read().split("\n")[:-1]:
        words = line.split(" ")
        if words[0] in ("alloc", "a"):
            request, _, align_text = words[2].partition("/")
            requested = number(request)
            rounded = (requested + PAGE - 1) & -PAGE
            alignment = max(number(align_text), PAGE) if align_text else PAGE
            at = alloc(rounded, alignment)
            if at is None:
                raise SystemExit(f"{words[0]}: ENOMEM: no room (the floor stops here)")
            if freed:
                chunk_id = heappop(freed)
            else:
                chunk_id, next_id = next_id, next_id + 1
            live[chunk_id] = (at, rounded)
            write(f"{chunk_id}: {requested:#x}@{at:#x}\n")
        else:
            chunk_id = int(words[1])
            at, rounded = live.pop(chunk_id)
            free(at, rounded)
            heappush(freed, chunk_id)
    sys.stdout.write("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
