"""Machine profiles: every machine-type fact in one place, and the board files agree with it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cma_qemu.boards import list_boards
from cma_qemu.errors import EINVAL
from cma_qemu.machine.launch import console_device, machine_args, uses_ram_file
from cma_qemu.machine.loader import loader_ranges
from cma_qemu.machine.profiles import PROFILES, machine_profile, profile_of


def test_every_shipped_board_takes_its_facts_from_its_profile() -> None:
    boards = list_boards()
    assert {b.machine_type for b in boards} == set(PROFILES)
    for board in boards:
        profile = profile_of(board)
        assert board.console == profile.console == console_device(board)
        assert board.memory_access == profile.memory_access
        assert board.channel.kind in profile.channel_kinds
        assert uses_ram_file(board) == (profile.memory_access == "mmap")
        assert ("-m" in machine_args(board, None)) == profile.honours_ram_size


def test_the_profiles_differ_where_the_machines_do() -> None:
    virt, exynos = PROFILES["virt"], PROFILES["smdkc210"]
    assert (virt.dtb_source, exynos.dtb_source) == ("qemu", "image")
    assert virt.console_fifo_status is None and exynos.console_fifo_status == 0x13800018
    assert exynos.console_burst == 16 and exynos.drop_uart_dma and not virt.drop_uart_dma
    assert "virtio-serial" not in exynos.channel_kinds


@given(st.text(max_size=12).filter(lambda t: t not in PROFILES))
def test_an_unknown_machine_type_is_one_einval_naming_the_known_ones(name: str) -> None:
    with pytest.raises(EINVAL, match=r"no console known for QEMU machine .*\(known: virt, "):
        machine_profile(name, "console")
    with pytest.raises(EINVAL, match="no loader rules"):
        loader_ranges(name, 0x40000000, 1 << 28, Path("/no/kernel"), None, 0)


def test_the_board_loader_does_not_load_qemu_client_or_pexpect() -> None:
    """boards imports machine.profiles; the machine package loads its heavy modules lazily."""
    code = (
        "import sys, cma_qemu.boards; "
        "print(sorted(m for m in ('pexpect', 'qemu.qmp', 'cma_qemu.machine.launch') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_machine_package_still_names_its_parts() -> None:
    import cma_qemu.machine as machine
    from cma_qemu.machine.attached import attach
    from cma_qemu.machine.launch import Machine

    assert machine.Machine is Machine and machine.attach is attach
    for name in machine.__all__:
        assert getattr(machine, name) is not None
    with pytest.raises(AttributeError):
        machine.no_such_name  # noqa: B018
