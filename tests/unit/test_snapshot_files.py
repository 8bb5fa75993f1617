"""Snapshot directories without QEMU: the sparse RAM copy and the checks before a restore."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cma_qemu.errors import EINVAL, EIO, ENOENT
from cma_qemu.machine.migration import copy_sparse
from cma_qemu.snapshot import SNAPSHOT_FILE, list_snapshots, read_snapshot, remove_snapshot

PAGE = 4096


@settings(max_examples=40, deadline=None)
@given(
    writes=st.lists(st.tuples(st.integers(0, 63), st.binary(min_size=1, max_size=PAGE)), max_size=8)
)
def test_copy_sparse_copies_the_data_and_keeps_holes(
    writes: list[tuple[int, bytes]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    size = 64 * PAGE
    src = os.memfd_create("test-src")
    directory = tmp_path_factory.mktemp("sparse")
    dst = os.open(directory / "ram", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(src, size)
        for page, data in writes:
            os.pwrite(src, data, page * PAGE)
        copied = copy_sparse(src, dst, size)
        assert os.fstat(dst).st_size == size
        assert os.pread(dst, size, 0) == os.pread(src, size, 0)
        assert copied <= len({page for page, _ in writes}) * PAGE * 2 + PAGE
    finally:
        os.close(src)
        os.close(dst)


def _snapshot(path: Path) -> Path:
    path.mkdir()
    (path / "state.mig").write_bytes(b"s" * 100)
    (path / "guest.ram").write_bytes(b"")
    os.truncate(path / "guest.ram", 1 << 20)
    (path / "guest.dtb").write_bytes(b"d" * 10)
    import hashlib

    doc = {
        "format": "cma-qemu-snapshot",
        "version": 1,
        "created": 0.0,
        "key": {"board": "virt"},
        "allocators": {},
        "chunks": [[0x5DF00000, 0x100000, 0x100000, 1, "guest:org.cma.0"]],
        "files": {
            "state.mig": {"size": 100, "sha256": hashlib.sha256(b"s" * 100).hexdigest()},
            "guest.ram": {"size": 1 << 20},
            "guest.dtb": {"size": 10},
        },
    }
    (path / SNAPSHOT_FILE).write_text(json.dumps(doc))
    return path


def test_a_good_directory_reads(tmp_path: Path) -> None:
    info = read_snapshot(_snapshot(tmp_path / "s"))
    assert info.board == "virt"
    assert info.chunks == [(0x5DF00000, 0x100000, 0x100000, 1, "guest:org.cma.0")]
    assert list_snapshots(tmp_path) == [info]


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (lambda p: os.truncate(p / "guest.ram", 4096), EIO, "guest.ram is 4096 bytes"),
        (lambda p: (p / "state.mig").write_bytes(b"t" * 100), EIO, "corrupt"),
        (lambda p: (p / "state.mig").unlink(), ENOENT, "state.mig"),
        (lambda p: (p / SNAPSHOT_FILE).write_text("{"), EINVAL, "unreadable"),
        (lambda p: (p / SNAPSHOT_FILE).write_text("[1]"), EINVAL, "not a cma-qemu snapshot"),
        (lambda p: (p / SNAPSHOT_FILE).unlink(), EINVAL, "not a cma-qemu snapshot"),
    ],
)
def test_damage_is_one_clear_error(tmp_path: Path, damage, error, match) -> None:  # type: ignore[no-untyped-def]
    path = _snapshot(tmp_path / "s")
    damage(path)
    with pytest.raises(error, match=match) as caught:
        read_snapshot(path)
    assert "\n" not in str(caught.value)


@settings(max_examples=30, deadline=None)
@given(data=st.binary(max_size=200))
def test_any_bytes_as_the_key_file_are_refused_cleanly(
    data: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("k") / "s"
    _snapshot(path)
    (path / SNAPSHOT_FILE).write_bytes(data)
    with pytest.raises((EINVAL, EIO)):
        read_snapshot(path)


def test_remove_refuses_what_is_not_a_snapshot(tmp_path: Path) -> None:
    with pytest.raises(ENOENT):
        remove_snapshot(tmp_path / "none")
    with pytest.raises(EINVAL, match="not removed"):
        remove_snapshot(tmp_path)
    assert tmp_path.is_dir()
    remove_snapshot(_snapshot(tmp_path / "s"))
    assert not (tmp_path / "s").exists()
