"""Chunk ids of the line format: the heap-based LiveChunks against the naive counting-up model.

The model is the code LiveChunks replaced: a new id is found by counting up from 1 over the
live ids, "the newest" is the last key of an insertion-ordered dict. Random operation
sequences must give the same ids, lookups, newest chunk and list order, both on the class
and through whole scripts run by ScriptRunner.
"""

from __future__ import annotations

import io

from hypothesis import given, settings
from hypothesis import strategies as st

from cma_qemu.framework import CmaInfo
from cma_qemu.script import LiveChunks, ScriptRunner


class Addresses:
    """A backend that hands out addresses 0x1000 apart, from 0x11000 (a fake: ids only)."""

    def __init__(self) -> None:
        self.next_start = 0x10000

    def alloc(self, dev: str, kind: str, size: int, alignment: int) -> int:
        self.next_start += 0x1000
        return self.next_start

    def alloc_from(self, regions: str, size: int, alignment: int) -> int:
        return self.alloc("", "", size, alignment)

    def free(self, addr: int) -> None:
        pass

    def info(self, dev: str, kind: str) -> CmaInfo:
        raise AssertionError("not used")

    def write(self, addr: int, size: int, pattern: int) -> None:
        pass

    def verify(self, addr: int, size: int, pattern: int) -> int | None:
        return None

    def ping(self) -> None:
        pass


class NaiveChunks:
    """The old O(n) logic: ids by scanning up from 1; a plain dict in allocation order."""

    def __init__(self) -> None:
        self.chunks: dict[int, tuple[int, int]] = {}

    def add(self, start: int, size: int) -> int:
        chunk_id = 1
        while chunk_id in self.chunks:
            chunk_id += 1
        self.chunks[chunk_id] = (start, size)
        return chunk_id

    def newest(self) -> int | None:
        return next(reversed(self.chunks), None)


# An operation: ("add", size), ("remove", pick) where pick chooses a live chunk (or a dead
# id when nothing is live), ("newest",), ("lookup", id).
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 1 << 20)),
        st.tuples(st.just("remove"), st.integers(0, 1 << 16)),
        st.tuples(st.just("remove_newest")),
        st.tuples(st.just("lookup"), st.integers(0, 40)),
    ),
    max_size=300,
)


@settings(max_examples=300, deadline=None)
@given(_ops)
def test_live_chunks_match_the_counting_up_model(ops: list[tuple[object, ...]]) -> None:
    fast, naive = LiveChunks(), NaiveChunks()
    start = 0x1000
    for op in ops:
        if op[0] == "add":
            size = op[1]
            assert isinstance(size, int)
            start += 0x1000
            assert fast.add(start, size) == naive.add(start, size)
        elif op[0] == "remove" and naive.chunks:
            pick = op[1]
            assert isinstance(pick, int)
            victim = list(naive.chunks)[pick % len(naive.chunks)]
            fast.remove(victim)
            del naive.chunks[victim]
        elif op[0] == "remove_newest" and naive.chunks:
            newest = naive.newest()
            assert newest is not None and fast.newest() == newest
            fast.remove(newest)
            del naive.chunks[newest]
        elif op[0] == "lookup":
            chunk_id = op[1]
            assert isinstance(chunk_id, int)
            found = fast.get(chunk_id)
            expected = naive.chunks.get(chunk_id)
            assert (found is None) == (expected is None)
            if found is not None and expected is not None:
                assert (found.start, found.size) == expected
            assert (chunk_id in fast) == (chunk_id in naive.chunks)
        assert fast.newest() == naive.newest()
        assert len(fast) == len(naive.chunks)
        assert [(i, c.start, c.size) for i, c in fast.items()] == [
            (i, s, z) for i, (s, z) in naive.chunks.items()
        ]


# Script lines: allocs, frees by id (live or not), frees of the newest, lists, writes.
_lines = st.lists(
    st.one_of(
        st.integers(1, 64).map(lambda pages: f"a dev {pages * 4096}"),
        st.integers(1, 40).map(lambda chunk_id: f"f {chunk_id}"),
        st.just("f"),
        st.just("l"),
        st.integers(1, 40).map(lambda chunk_id: f"w {chunk_id} 0x1"),
    ),
    max_size=200,
)


def _naive_script_output(lines: list[str]) -> tuple[str, str]:
    """What the stub prints for these lines, from the naive model and Recorder's addresses."""
    chunks = NaiveChunks()
    next_start = 0x10000
    out: list[str] = []
    err: list[str] = []
    for line in lines:
        words = line.split()
        if words[0] == "a":
            size = int(words[2])
            next_start += 0x1000
            chunk_id = chunks.add(next_start, size)
            out.append(f"{chunk_id}: {size:#x}@{next_start:#x}\n")
        elif words[0] == "l":
            out += [f"{i}: {z:#x}@{s:#x}\n" for i, (s, z) in chunks.chunks.items()]
        elif len(words) == 1:  # "f" with no id
            newest = chunks.newest()
            if newest is None:
                err.append("f: ENOENT: no chunks\n")
            else:
                del chunks.chunks[newest]
        else:
            chunk_id = int(words[1])
            if chunk_id not in chunks.chunks:
                err.append(f"{words[0]}: ENOENT: no chunk {chunk_id}\n")
            elif words[0] == "f":
                del chunks.chunks[chunk_id]
    return "".join(out), "".join(err)


@settings(max_examples=200, deadline=None)
@given(_lines)
def test_script_ids_match_the_counting_up_model(lines: list[str]) -> None:
    out, err = io.StringIO(), io.StringIO()
    ScriptRunner(Addresses(), out, err).run("".join(f"{line}\n" for line in lines))
    assert (out.getvalue(), err.getvalue()) == _naive_script_output(lines)


def test_ids_are_reused_lowest_first_after_many_frees() -> None:
    chunks = LiveChunks()
    ids = [chunks.add(0x1000 * i, 0x1000) for i in range(1, 101)]
    assert ids == list(range(1, 101))
    for chunk_id in (70, 3, 50, 4):
        chunks.remove(chunk_id)
    assert [chunks.add(0, 1) for _ in range(5)] == [3, 4, 50, 70, 101]
    assert chunks.newest() == 101


def test_newest_and_order_survive_many_frees_and_rebuilds() -> None:
    """Thousands of adds and frees (the dead-id list is rebuilt many times) against the model:
    the same ids, the same newest, the same allocation order."""
    import random

    rng = random.Random(3)
    fast, naive = LiveChunks(), NaiveChunks()
    for step in range(20_000):
        if naive.chunks and rng.random() < (0.6 if len(naive.chunks) > 50 else 0.4):
            victim = (
                naive.newest()
                if rng.random() < 0.3
                else rng.choice(list(naive.chunks))  # O(n) model, fine at this size
            )
            assert victim is not None
            fast.remove(victim)
            del naive.chunks[victim]
        else:
            assert fast.add(step, 1) == naive.add(step, 1)
        assert fast.newest() == naive.newest()
    assert [(i, c.start, c.size) for i, c in fast.items()] == [
        (i, s, n) for i, (s, n) in naive.chunks.items()
    ]
