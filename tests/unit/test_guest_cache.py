"""Guest build cache entries: published whole, replaced whole, and never half-built."""

from __future__ import annotations

from pathlib import Path

import pytest

from cma_qemu.guest_image.cache import COMPLETE, is_complete, publishing


def test_an_entry_appears_complete_and_leaves_no_temporary(tmp_path: Path) -> None:
    final = tmp_path / "kmod" / "0123abcd"
    with publishing(final) as tmp:
        assert tmp.parent == final.parent and not final.exists()
        (tmp / "cma_guest.ko").write_bytes(b"\x7fELF")
    assert is_complete(final)
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE, "cma_guest.ko"]
    assert [p.name for p in final.parent.iterdir()] == ["0123abcd"]


def test_an_old_entry_is_replaced_whole(tmp_path: Path) -> None:
    final = tmp_path / "stub"
    final.mkdir()
    (final / "stale").write_text("from a build that died")  # no .complete: not usable
    assert not is_complete(final)
    with publishing(final) as tmp:
        (tmp / "cma-test").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == [COMPLETE, "cma-test"]
    assert [p.name for p in tmp_path.iterdir()] == ["stub"]


def test_a_failed_build_keeps_the_old_entry_and_removes_its_own(tmp_path: Path) -> None:
    final = tmp_path / "kbuild"
    with publishing(final) as tmp:
        (tmp / "Makefile").write_text("old")
    with pytest.raises(RuntimeError, match="make failed"), publishing(final) as tmp:
        (tmp / "Makefile").write_text("half")
        raise RuntimeError("make failed")
    assert not tmp.exists()
    assert is_complete(final) and (final / "Makefile").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["kbuild"]
