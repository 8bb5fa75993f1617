"""Random operation sequences against random region layouts, for both allocators.

Invariants after every step: chunks never overlap, stay in their region and are aligned to
max(alignment, PAGE_SIZE); each region's free_space equals its size minus its chunks and the
sum of its holes; an error changes nothing. Freeing everything leaves one hole per region.
Scripts replay deterministically, and random text never escapes the ScriptRunner.
"""

from __future__ import annotations

import io
import itertools
import re
from typing import Any

import pytest
from cma_helpers import allocator_registry
from cma_helpers import cma_state as snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cma_qemu.errors import CmaError
from cma_qemu.framework import Chunk, Cma
from cma_qemu.script import FrameworkBackend, ScriptRunner

P = 4096
BASE = 0x40000000
ALLOCATORS = ["bf", "bitmap"]
ALIGNMENTS = [0, 1, P, 2 * P, 4 * P, 16 * P, 64 * P, 3, 6 * P]
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def layouts(draw: st.DrawFn) -> list[tuple[str | None, int, int]]:
    """Up to four regions (name or None for private, start, size), gaps between them."""
    count = draw(st.integers(1, 4))
    regions: list[tuple[str | None, int, int]] = []
    cursor = BASE
    for i in range(count):
        cursor += draw(st.integers(0, 4)) * P
        pages = draw(st.integers(1, 48))
        private = i > 0 and draw(st.booleans())
        regions.append((None if private else f"r{i}", cursor, pages * P))
        cursor += pages * P
    return regions


def build(layout: list[tuple[str | None, int, int]], allocator: str) -> Cma:
    cma = Cma(allocator_registry())
    for name, start, size in layout:
        region = cma.region_register(start, size, name=name)
        cma.set_region_allocator(region, allocator)
    named = [n for n, _, _ in layout if n]
    cma.set_asterisk(",".join(reversed(named)))
    cma.set_map(f"d0={','.join(named)};d1/k=r1,nosuch;d2=*")
    return cma


def check_invariants(cma: Cma, alignments: dict[int, int]) -> None:
    chunks = cma.chunks
    for left, right in itertools.pairwise(chunks):
        assert left.end <= right.start
    for chunk in chunks:
        region = chunk.region
        assert region.start <= chunk.start and chunk.end <= region.end
        assert chunk.size % P == 0 and chunk.size >= chunk.requested
        assert chunk.start % max(alignments[chunk.start], P) == 0
        assert chunk.refcount >= 1
    for region in cma.regions:
        mine = [c for c in chunks if c.region is region]
        holes = region.holes()
        assert region.free_space == region.size - sum(c.size for c in mine)
        assert region.free_space == sum(size for _, size in holes)
        assert region.users == len(mine)
        # holes and chunks tile the region
        pieces = sorted([*holes, *((c.start, c.size) for c in mine)])
        cursor = region.start
        for start, size in pieces:
            assert start == cursor and size > 0
            cursor += size
        assert cursor == region.end


operation = st.one_of(
    st.tuples(
        st.just("alloc"),
        st.sampled_from(["d0", "d1", "d2", "d3"]),
        st.sampled_from(["", "k", "x"]),
        st.integers(1, 20 * P),
        st.sampled_from(ALIGNMENTS),
    ),
    st.tuples(
        st.just("alloc_from"),
        st.sampled_from(["r0", "r1,r0", "*", None, "r3,r2", "nosuch", "r0,,r1"]),
        st.integers(1, 20 * P),
        st.sampled_from(ALIGNMENTS),
    ),
    st.tuples(st.just("alloc_private"), st.integers(1, 8 * P), st.sampled_from(ALIGNMENTS)),
    st.tuples(st.sampled_from(["free", "get", "put"]), st.integers(0, 50)),
    st.tuples(st.sampled_from(["free", "get", "put"]), st.just(-1)),
)


@pytest.mark.parametrize("allocator", ALLOCATORS)
@SETTINGS
@given(layout=layouts(), ops=st.lists(operation, max_size=40))
def test_random_operations_keep_invariants(
    allocator: str, layout: list[tuple[str | None, int, int]], ops: list[tuple[Any, ...]]
) -> None:
    cma = build(layout, allocator)
    private = [r for r in cma.regions if r.name is None]
    alignments: dict[int, int] = {}
    for op in ops:
        before = snapshot(cma)
        kind = op[0]
        try:
            chunk: Chunk | None = None
            if kind == "alloc":
                _, dev, devkind, size, alignment = op
                chunk = cma.alloc(dev, devkind, size, alignment)
            elif kind == "alloc_from":
                _, regions, size, alignment = op
                chunk = cma.alloc_from(regions, size, alignment)
            elif kind == "alloc_private":
                if not private:
                    continue
                _, size, alignment = op
                chunk = cma.alloc_from_region(private[size % len(private)], size, alignment)
            else:
                live = cma.chunks
                index = op[1]
                addr = live[index % len(live)].start if live and index >= 0 else BASE - P
                if index >= 0 and live and index % 7 == 6:
                    addr += P  # inside a chunk (or past it): unknown
                getattr(cma, kind)(addr)
        except CmaError:
            assert snapshot(cma) == before
        else:
            if chunk is not None:
                alignments[chunk.start] = op[-1]
                assert chunk.region.attached == allocator
                assert chunk.requested == op[-2]
        check_invariants(cma, alignments)
    for chunk in cma.chunks:
        cma.free(chunk.start)
    for region in cma.regions:
        assert region.holes() == [(region.start, region.size)]
        assert region.free_space == region.size and region.users == 0
        assert region.largest_free() == region.size
    for stats in cma.stats():
        assert stats.available_pages == stats.total_pages


# ------------------------------------------------------------------------------ scripts
def script_line(op: tuple[Any, ...]) -> str:
    kind = op[0]
    if kind == "alloc":
        _, dev, devkind, size, alignment = op
        return f"a {dev}/{devkind} {size:#x}/{alignment}" if devkind else f"a {dev} {size}"
    if kind == "alloc_from":
        _, regions, size, alignment = op
        return f"r {regions or '*'} {size}/{alignment:#x}"
    if kind == "alloc_private":
        return "l"
    _, index = op[:2]
    if kind == "get":
        return "i d0" if index % 2 else f"w {index % 5 + 1} {index}"
    if kind == "put":
        return f"v {index % 5 + 1} {index}"
    return "f" if index < 0 or index % 3 == 0 else f"f {index % 6}"


def replay_once(
    layout: list[tuple[str | None, int, int]], allocator: str, script: str
) -> tuple[str, str, Any]:
    cma = build(layout, allocator)
    out, err = io.StringIO(), io.StringIO()
    ScriptRunner(FrameworkBackend(cma), out, err).run(script)
    return out.getvalue(), err.getvalue(), snapshot(cma)


@pytest.mark.parametrize("allocator", ALLOCATORS)
@SETTINGS
@given(
    layout=layouts(),
    ops=st.lists(operation, max_size=30),
    blanks=st.lists(st.integers(0, 30), max_size=4),
)
def test_script_replay_is_deterministic(
    allocator: str,
    layout: list[tuple[str | None, int, int]],
    ops: list[tuple[Any, ...]],
    blanks: list[int],
) -> None:
    lines = [script_line(op) for op in ops]
    for position in blanks:
        lines.insert(min(position, len(lines)), "")
    script = "\n".join(lines) + "\n"
    first = replay_once(layout, allocator, script)
    second = replay_once(layout, allocator, script)
    assert first == second


# ------------------------------------------------------------------------------ bad input
WORDS = [
    "a",
    "alloc",
    "r",
    "alloc-from",
    "f",
    "free",
    "l",
    "list",
    "i",
    "info",
    "w",
    "v",
    "b",
    "p",
    "x",
    "#",
    "A",
    "\uff41",
]
TOKENS = [
    "d0",
    "d1/k",
    "d0/",
    "/k",
    "r0",
    "r1,r0",
    "*",
    "nosuch",
    "r0,,r1",
    "4K",
    "0x1000/0x2000",
    "1/3",
    "08",
    "0",
    "-1",
    "+1",
    "1",
    "2",
    "2147483648",
    "0xffffffff",
    "0x100000000",
    "4K/0",
    "1G",
    "d" * 17,
    "é" * 9,
    "",
    "\r",
    "\x0b",
    "\x00",
    "\udcff",
    "1K/1K/1K",
]
SEPARATORS = [" ", "\t", "  ", " \t "]

token_lines = st.builds(
    lambda lead, word, args, seps: (
        lead + word + "".join(sep + arg for sep, arg in zip(seps, args, strict=False))
    ),
    st.sampled_from(["", " ", "\t", " \t"]),
    st.sampled_from(WORDS),
    st.lists(st.sampled_from(TOKENS), max_size=4),
    st.lists(st.sampled_from(SEPARATORS), min_size=4, max_size=4),
)
random_lines = st.one_of(
    token_lines,
    st.text(max_size=40).map(lambda s: s.replace("\n", " ")),
    st.text(alphabet=" \t\r\x0b\x0cabfilprvw0123456789xK/#,*", max_size=30),
    st.just("x" * 1100),
)

STATE_CHANGING = {"a", "alloc", "r", "alloc-from", "f", "free"}


@SETTINGS
@given(lines=st.lists(random_lines, min_size=1, max_size=25), allocator=st.sampled_from(ALLOCATORS))
def test_random_lines_never_escape_and_only_alloc_free_change_state(
    lines: list[str], allocator: str
) -> None:
    layout = [("r0", BASE, 16 * P), ("r1", BASE + 32 * P, 16 * P)]
    cma = build(layout, allocator)
    cma.alloc_from("r1", P)  # a chunk the script does not know about
    out, err = io.StringIO(), io.StringIO()
    runner = ScriptRunner(FrameworkBackend(cma), out, err)
    for line in lines:
        before = snapshot(cma)
        previous = runner.previous
        err_before = err.tell()
        runner.run_line(line)  # must not raise
        stripped = line.lstrip(" \t")
        effective = (
            previous
            if not stripped and not len(line.encode("utf-8", "surrogateescape")) > 1023
            else stripped
        )
        if snapshot(cma) != before:
            assert effective is not None and not effective.startswith("#")
            word = re.split(r"[ \t]+", effective)[0]
            assert word in STATE_CHANGING, (line, word)
            assert err.getvalue()[err_before:] == "", line
        check_invariants(cma, {c.start: 0 for c in cma.chunks})
    # all output lines have the documented shapes
    for line in out.getvalue().splitlines():
        assert re.fullmatch(r"\d+: 0x[0-9a-f]+@0x[0-9a-f]+|info: .*|(bench|ping): n=\d+ .*", line)
    for line in err.getvalue().split("\n")[:-1]:
        assert re.fullmatch(r"[^\n]*: (EINVAL|ENOENT|ENOMEM|EIO|EADDRINUSE): [^\n]*", line), line
    assert err.getvalue().count("\n") == runner.failures


@SETTINGS
@given(text=st.text(max_size=300))
def test_run_whole_random_text_never_raises(text: str) -> None:
    cma = build([("r0", BASE, 16 * P)], "bf")
    out, err = io.StringIO(), io.StringIO()
    ScriptRunner(FrameworkBackend(cma), out, err).run(text)
    check_invariants(cma, {c.start: 0 for c in cma.chunks})
    last = text.split("\n")[-1]
    if len(last.encode("utf-8", "surrogateescape")) > 1023:
        assert err.getvalue().endswith("input: EINVAL: line too long\n")
    elif last:
        assert err.getvalue().endswith("input: EINVAL: no new line at EOF\n")
