"""Seeded churn traces in the line format (docs/line-format.md), for benchmarks and scale tests.

The shape of a long-running driver workload: ``live`` allocations, then ``rounds`` rounds of
"free a random live chunk, allocate one", so about ``live`` chunks stay live throughout. The
generator predicts the ids the runner will hand out (lowest unused, like file descriptors) with
a heap of its own, so every ``free ID`` names a live chunk as long as no allocation fails; a
failed one shows up as ``ENOENT`` lines on stderr, which callers check is empty.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

__all__ = ["ChurnShape", "churn_script"]


@dataclass(frozen=True)
class ChurnShape:
    """Request sizes (bytes, as typed: not page multiples) and the share of aligned requests."""

    min_size: int = 1
    max_size: int = 12 << 10
    #: (alignment, probability): the rest use the default (page) alignment.
    alignments: tuple[tuple[int, float], ...] = ((16 << 10, 0.08), (64 << 10, 0.02))
    dev: str = "bench"
    #: Write ``a``/``f`` instead of ``alloc``/``free`` (a smaller file to copy into a guest).
    aliases: bool = False


def churn_script(live: int, rounds: int, seed: int = 2010, shape: ChurnShape | None = None) -> str:
    """``live`` allocs then ``rounds`` (free random, alloc) pairs: ``live + 2 * rounds`` lines.

    Cost: O((live + rounds) log live).
    """
    shape = shape or ChurnShape()
    rng = random.Random(f"churn:{seed}:{live}:{rounds}")
    lines: list[str] = []
    ids: list[int] = []  # live ids, in no particular order
    freed: list[int] = []  # min-heap of ids below next_fresh that are free
    next_fresh = 1
    alloc_word, free_word = ("a", "f") if shape.aliases else ("alloc", "free")

    def alloc() -> None:
        nonlocal next_fresh
        size = rng.randint(shape.min_size, shape.max_size)
        coin = rng.random()
        suffix = ""
        for alignment, share in shape.alignments:
            if coin < share:
                suffix = f"/{alignment >> 10}K"
                break
            coin -= share
        lines.append(f"{alloc_word} {shape.dev} {size}{suffix}")
        if freed:
            ids.append(heapq.heappop(freed))
        else:
            ids.append(next_fresh)
            next_fresh += 1

    for _ in range(live):
        alloc()
    for _ in range(rounds):
        if ids:
            pick = rng.randrange(len(ids))
            ids[pick], ids[-1] = ids[-1], ids[pick]
            victim = ids.pop()
            heapq.heappush(freed, victim)
            lines.append(f"{free_word} {victim}")
        alloc()
    return "".join(f"{line}\n" for line in lines)
