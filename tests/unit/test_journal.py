"""The journal of the agent's state (issue 8.3), and the framework hooks it stands on."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cma_qemu.allocators.best_fit import BestFitAllocator
from cma_qemu.allocators.bitmap import BitmapAllocator
from cma_qemu.errors import EADDRINUSE, EBUSY, EINVAL, EIO, ENOMEM
from cma_qemu.framework import Cma, CmaChange, RefcountEvent, SettingEvent
from cma_qemu.journal import (
    JOURNAL_NAME,
    Journal,
    JournalIdentity,
    RestoreReport,
    read_journal,
)

K = 1 << 10
M = 1 << 20
P = 4 * K
BASE = 0x40000000
ALLOCATORS = [BestFitAllocator, BitmapAllocator]


def make(allocator: str = "bf") -> Cma:
    return Cma.from_attributes(
        f"a=1M:{allocator};b=1M:{allocator}", "*/*=a,b", ram=[(BASE, 16 * M)]
    )


# ------------------------------------------------------------------------------ reserve
@pytest.mark.parametrize("cls", ALLOCATORS, ids=lambda c: c.name)
def test_reserve_takes_exactly_the_range_and_only_when_free(cls: type[BestFitAllocator]) -> None:
    allocator = cls(BASE, 64 * K)
    assert allocator.reserve(BASE + 8 * K, 8 * K)
    assert list(allocator.holes()) == [(BASE, 8 * K), (BASE + 16 * K, 48 * K)]
    before = list(allocator.holes())
    assert not allocator.reserve(BASE + 12 * K, 8 * K)  # overlaps the reserved range
    assert not allocator.reserve(BASE + 60 * K, 8 * K)  # leaves the region
    assert not allocator.reserve(BASE - P, 2 * P)
    assert list(allocator.holes()) == before
    assert allocator.reserve(BASE, 8 * K)  # a whole hole
    assert allocator.reserve(BASE + 60 * K, 4 * K)  # the end of the last one
    assert list(allocator.holes()) == [(BASE + 16 * K, 44 * K)]
    allocator.free(BASE + 8 * K, 8 * K)
    assert list(allocator.holes()) == [(BASE + 8 * K, 52 * K)]  # a reserved range frees


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 15), st.integers(1, 4)), max_size=12))
def test_reserve_agrees_between_allocators(ranges: list[tuple[int, int]]) -> None:
    bf = BestFitAllocator(BASE, 16 * P)
    bitmap = BitmapAllocator(BASE, 16 * P)
    for first, count in ranges:
        start, size = BASE + first * P, count * P
        assert bf.reserve(start, size) == bitmap.reserve(start, size)
        assert list(bf.holes()) == list(bitmap.holes())


# ------------------------------------------------------------------------------ restore
@pytest.mark.parametrize("allocator", ["bf", "bitmap"])
def test_restore_chunk_keeps_new_allocations_off_it(allocator: str) -> None:
    cma = make(allocator)
    a = cma.region("a")
    assert a is not None
    where = a.start + 4 * P
    chunk = cma.restore_chunk(where, 2 * P, 5 * K, owner="guest:x", refcount=2)
    assert (chunk.region, chunk.owner, chunk.refcount, chunk.requested) == (a, "guest:x", 2, 5 * K)
    assert cma.chunk(where) is chunk and a.users == 1 and a.free_space == 1 * M - 2 * P
    others = [cma.alloc("d", "", P) for _ in range(254)]
    assert all(o.end <= where or chunk.end <= o.start for o in others)
    assert cma.put(where) is False and cma.put(where) is True  # its refcount came back


def test_restore_chunk_refuses_a_used_or_bad_range_and_changes_nothing() -> None:
    cma = make()
    taken = cma.alloc("d", "", 2 * P)
    snapshot = (
        [(c.start, c.size) for c in cma.chunks],
        [(r.free_space, r.users) for r in cma.regions],
    )
    with pytest.raises(EADDRINUSE, match="overlaps memory in use"):
        cma.restore_chunk(taken.start + P, 2 * P, P)
    for start, size, requested in [(BASE + 1, P, P), (taken.start, P + 1, P), (0x100, P, P)]:
        with pytest.raises(EINVAL):
            cma.restore_chunk(start, size, requested)
    b = cma.region("b")
    assert b is not None
    with pytest.raises(EINVAL, match="not inside one region"):
        cma.restore_chunk(b.start - P, 2 * P, P)
    with pytest.raises(EINVAL):
        cma.restore_chunk(b.start, P, 2 * P)  # requested more than the chunk
    after = [(c.start, c.size) for c in cma.chunks], [(r.free_space, r.users) for r in cma.regions]
    assert after == snapshot


# ------------------------------------------------------------------------------ changes
def test_subscribe_changes_sees_refcounts_and_settings() -> None:
    cma = make()
    seen: list[CmaChange] = []
    unsubscribe = cma.subscribe_changes(seen.append)
    chunk = cma.alloc("d", "", P)
    cma.get(chunk.start)
    cma.put(chunk.start)
    cma.set_map("*/*=b")
    cma.set_asterisk("b")
    b = cma.region("b")
    assert b is not None
    cma.set_region_allocator(b, "bitmap")
    cma.put(chunk.start)
    names = [type(c).__name__ for c in seen]
    assert names == [
        "AllocEvent",
        "RefcountEvent",
        "RefcountEvent",
        "SettingEvent",
        "SettingEvent",
        "SettingEvent",
        "FreeEvent",
    ]
    assert isinstance(seen[1], RefcountEvent) and seen[1].chunk is chunk
    settings_seen = [(c.what, c.value) for c in seen if isinstance(c, SettingEvent)]
    assert settings_seen == [("map", "*/*=b"), ("asterisk", "b"), ("allocator", "bitmap")]
    unsubscribe()
    cma.alloc("d", "", P)
    assert len(seen) == 7


# ------------------------------------------------------------------------------ journal
QEMU = "1:42"


def identity(cma: Cma, board: str = "test") -> JournalIdentity:
    return JournalIdentity.of(board, "a=1M;b=1M", cma, None)


def state_of(cma: Cma) -> list[tuple[int, int, int, int, str | None]]:
    return [(c.start, c.size, c.requested, c.refcount, c.owner) for c in cma.chunks]


def open_journal(cma: Cma, path: Path, **kwargs: Any) -> tuple[Journal, RestoreReport]:
    return Journal.open(cma, path, identity(cma), QEMU, **kwargs)


def kill(journal: Journal) -> None:
    """What an agent's death leaves: close() writes nothing; it only drops the fds (and lock)."""
    journal.close()


def test_a_new_agent_gets_back_every_chunk_and_setting(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    first = make()
    journal, report = open_journal(first, path)
    assert report.fresh and report.describe() == f"new journal {path}"
    held = [first.alloc("d", "", (i + 1) * 3 * K, owner=f"guest:{i % 2}") for i in range(6)]
    first.free(held[2].start)
    first.get(held[0].start)
    first.get(held[0].start)
    first.put(held[0].start)
    first.set_asterisk("b,a")
    first.set_map("x/*=b")
    kill(journal)  # what it wrote is in the file already
    second = make()
    journal2, report = open_journal(second, path)
    assert (report.fresh, report.stale, report.truncated, report.restored) == (
        False,
        False,
        False,
        5,
    )
    assert state_of(second) == state_of(first)
    assert (second.map_text, second.asterisk_text) == (first.map_text, first.asterisk_text)
    for region, before in zip(second.regions, first.regions, strict=True):
        assert (region.free_space, region.users) == (before.free_space, before.users)
    fresh = [second.alloc("x", "", 8 * K, owner="guest:0") for _ in range(10)]
    old = {(c.start, c.end) for c in second.chunks if c not in fresh}
    assert all(f.end <= s or e <= f.start for f in fresh for s, e in old)
    second.free(held[1].start)  # the guest frees an old chunk
    assert second.put(held[0].start) is False and second.put(held[0].start) is True
    journal2.close()
    third = make()
    open_journal(third, path)[0].close()
    assert state_of(third) == state_of(second)


def test_a_record_cut_short_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    first = make()
    journal, _ = open_journal(first, path)
    kept = first.alloc("d", "", 8 * K, owner="guest:g")
    journal.close()
    whole = state_of(first)
    with path.open("a") as out:
        out.write(f"a {kept.start + 0x10000:x} 2000 2000 1")  # the agent died mid-write
    second = make()
    journal2, report = open_journal(second, path)
    assert report.truncated and report.restored == 1
    assert "cut short" in report.describe()
    assert state_of(second) == whole
    journal2.close()
    assert path.read_text().endswith("\n")  # rewritten whole on open


def test_another_board_or_attributes_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    first = make()
    open_journal(first, path)[0].close()
    first.alloc("d", "", P)
    before = path.read_bytes()
    other = make()
    with pytest.raises(EINVAL) as error:
        Journal.open(other, path, identity(other, board="goni"), QEMU)
    message = f"{error.value.errno_name}: {error.value}"
    assert "\n" not in message
    assert message.startswith(f"EINVAL: journal {path}: it is for another board")
    assert "board 'test' in the journal, 'goni' here" in message
    assert "layout" not in message  # it follows from the board: not repeated
    with pytest.raises(EINVAL, match="regions 'a=1M;b=1M' in the journal, 'a=1M' here"):
        Journal.open(other, path, JournalIdentity.of("test", "a=1M", other, None), QEMU)
    # The same names and attributes, but the regions ask for another allocator: the board
    # file changed under the same name.
    bitmap = make("bitmap")
    with pytest.raises(EINVAL, match=r"placed differently \(the board file changed\?\)$"):
        Journal.open(bitmap, path, identity(bitmap), QEMU)
    assert path.read_bytes() == before and other.chunks == [] and bitmap.chunks == []


def test_a_journal_of_an_earlier_qemu_starts_afresh(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    first = make()
    journal, _ = open_journal(first, path)
    first.alloc("d", "", P, owner="guest:g")
    kill(journal)
    second = make()
    journal, report = Journal.open(second, path, identity(second), "1:43")
    assert report.stale and "earlier QEMU" in report.describe() and second.chunks == []
    journal.close()
    assert read_journal(path).chunks == {}


def test_not_a_journal_and_a_bad_middle_record_are_errors(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    path.write_text("hello\n")
    with pytest.raises(EINVAL, match="not a cma-qemu journal"):
        read_journal(path)
    path.unlink()
    first = make()
    open_journal(first, path)[0].close()
    with path.open("a") as out:
        out.write("z nonsense\nf 1000\n")
    with pytest.raises(EIO, match="line 2: bad record 'z nonsense': unknown record"):
        open_journal(make(), path)


def test_compaction_keeps_the_file_proportional_to_the_state(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    cma = make()
    journal, _ = open_journal(cma, path, compact_at=64)
    keep = [cma.alloc("d", "", P, owner="guest:g") for _ in range(5)]
    for _ in range(500):
        cma.free(cma.alloc("d", "", 2 * P).start)
    assert journal.compactions > 5
    assert len(path.read_text().splitlines()) <= 64 + 2
    kill(journal)
    again = make()
    open_journal(again, path)
    assert state_of(again) == state_of(cma) and len(keep) == 5
    assert not path.with_name(path.name + ".new").exists()


def test_allocator_choices_come_back(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    cma = make()
    journal, _ = open_journal(cma, path)
    b = cma.region("b")
    assert b is not None
    cma.set_region_allocator(b, "bitmap")
    chunk = cma.alloc_from("b", 3 * P, owner="guest:g")
    kill(journal)
    again = make()
    open_journal(again, path)
    b2 = again.region("b")
    assert b2 is not None and b2.allocator_name == "bitmap" and b2.attached == "bitmap"
    assert again.chunk(chunk.start).region is b2


def test_a_chunk_that_no_longer_fits_restores_nothing(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    cma = make()
    journal, _ = open_journal(cma, path)
    a = cma.alloc("d", "", 2 * P, owner="g")
    kill(journal)
    with path.open("a") as out:  # a record inside a: a journal written by a bug
        out.write(f'a {a.start + P:x} 1000 1000 1 "g"\n')
    again = make()
    with pytest.raises(EADDRINUSE, match="cannot restore"):
        open_journal(again, path)
    assert again.chunks == []


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alloc", "free", "get", "put", "map", "asterisk"]),
            st.integers(0, 50),
        ),
        max_size=60,
    )
)
def test_any_history_restores_to_the_same_state(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / JOURNAL_NAME
        cma = make()
        journal, _ = open_journal(cma, path, compact_at=8)
        for op, n in ops:
            live = cma.chunks
            if op == "alloc":
                with contextlib.suppress(ENOMEM):
                    cma.alloc("d", "", (n + 1) * K, owner=f"o{n % 3}")
            elif op == "map":
                cma.set_map(["*/*=a,b", "*/*=b", "d/*=a;*/*=b"][n % 3])
            elif op == "asterisk":
                cma.set_asterisk(["a,b", "b", ""][n % 3])
            elif live:
                chunk = live[n % len(live)]
                getattr(cma, op)(chunk.start)
        kill(journal)
        again = make()
        open_journal(again, path)[0].close()
        assert state_of(again) == state_of(cma)
        assert (again.map_text, again.asterisk_text) == (cma.map_text, cma.asterisk_text)


def test_one_agent_at_a_time_and_the_lock_goes_with_it(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL_NAME
    cma = make()
    journal, _ = open_journal(cma, path)
    cma.alloc("d", "", P, owner="g")
    other = make()
    with pytest.raises(EBUSY, match="another agent is using it"):
        open_journal(other, path)
    assert other.chunks == [] and len(read_journal(path).chunks) == 1
    journal.close()
    again, report = open_journal(other, path)
    assert report.restored == 1
    again.close()
