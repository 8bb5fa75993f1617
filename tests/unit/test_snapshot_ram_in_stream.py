"""Snapshots whose RAM is in the migration stream (smdkc210): read, and matched to the board.

No QEMU: a mismatch between the board's RAM and the snapshot's files is refused before any
process starts.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path

import pytest

from cma_qemu.errors import EINVAL
from cma_qemu.snapshot import SNAPSHOT_FILE, read_snapshot, restore_agent


def _snapshot(path: Path, board: str, *, ram: bool) -> Path:
    path.mkdir()
    state = b"s" * 100
    (path / "state.mig").write_bytes(state)
    (path / "guest.dtb").write_bytes(b"d" * 10)
    files: dict[str, dict[str, object]] = {
        "state.mig": {"size": 100, "sha256": hashlib.sha256(state).hexdigest()},
        "guest.dtb": {"size": 10},
    }
    if ram:
        (path / "guest.ram").write_bytes(b"r" * 4096)
        files["guest.ram"] = {"size": 4096}
    doc = {
        "format": "cma-qemu-snapshot",
        "version": 1,
        "created": 0.0,
        "key": {"board": board},
        "allocators": {},
        "chunks": [],
        "files": files,
    }
    (path / SNAPSHOT_FILE).write_text(json.dumps(doc))
    return path


def test_a_snapshot_without_a_ram_file_reads(tmp_path: Path) -> None:
    info = read_snapshot(_snapshot(tmp_path / "s", "smdkc210", ram=False))
    assert info.board == "smdkc210" and "guest.ram" not in info.files


@pytest.mark.parametrize(
    ("board", "ram", "match"),
    [
        ("virt", False, "a snapshot without guest.ram does not fit"),
        ("smdkc210", True, "a snapshot with guest.ram does not fit"),
    ],
)
def test_ram_kind_not_matching_the_board_is_refused_before_qemu(
    tmp_path: Path, board: str, ram: bool, match: str
) -> None:
    path = _snapshot(tmp_path / "s", board, ram=ram)
    with pytest.raises(EINVAL, match=match) as caught:
        asyncio.run(restore_agent(path, runtime_parent=tmp_path / "run"))
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()
