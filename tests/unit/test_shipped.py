"""Finding the shipped board files and guest sources: package data first, then the checkout."""

from __future__ import annotations

from pathlib import Path

import pytest

import cma_qemu
from cma_qemu import shipped
from cma_qemu.boards import board_dirs
from cma_qemu.guest_image import guest_source_dir

CHECKOUT = Path(__file__).resolve().parents[2]
PACKAGE = Path(cma_qemu.__file__).resolve().parent


def test_an_editable_install_uses_the_checkout() -> None:
    assert not (PACKAGE / "data").exists(), "a checkout carries no cma_qemu/data/ copies"
    assert shipped.shipped_dir("boards") == CHECKOUT / "board_configs"
    assert shipped.shipped_dir("guest") == CHECKOUT / "guest"


def test_package_data_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An installed wheel: the package directory holds data/boards and data/guest.
    package = tmp_path / "site-packages" / "cma_qemu"
    (package / "data" / "boards").mkdir(parents=True)
    (package / "data" / "guest").mkdir()
    (package / "data" / "guest" / "cma-test.c").write_text("int main(void) { return 0; }\n")
    (package / "data" / "guest" / "init").write_text("#!/bin/sh\n")
    monkeypatch.setattr(shipped, "files", lambda _name: package)
    monkeypatch.delenv("CMA_QEMU_BOARDS", raising=False)
    monkeypatch.delenv("CMA_QEMU_GUEST_SRC", raising=False)
    assert shipped.shipped_dir("boards") == package / "data" / "boards"
    assert board_dirs() == [package / "data" / "boards"]
    assert guest_source_dir() == package / "data" / "guest"


def test_nothing_shipped_leaves_only_the_user_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shipped, "files", lambda _name: tmp_path / "cma_qemu")
    monkeypatch.setattr(shipped, "__file__", str(tmp_path / "cma_qemu" / "shipped.py"))
    monkeypatch.setenv("CMA_QEMU_BOARDS", str(tmp_path / "mine"))
    assert shipped.shipped_dir("boards") is None
    assert board_dirs() == [tmp_path / "mine"]
