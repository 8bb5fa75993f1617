"""The soak's verdict: what counts as growth between the first and the last cycles (no QEMU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SOAK = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_bench_soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cycles(soak: ModuleType, n: int, **grow: int) -> list[object]:
    """n cycles at a steady state, with ``grow[name]`` added per cycle to that figure."""
    base = dict(fds=9, threads=3, rss_kib=50_000, files_left=0, qemu_children=0)
    return [
        soak.Cycle(
            cycle=i,
            seconds=4.0,
            shm_files=1,
            tmp_dirs=2,
            **{k: v + grow.get(k, 0) * i for k, v in base.items()},
        )
        for i in range(n)
    ]


def _held(rows: list[tuple[str, str, str, bool]]) -> dict[str, bool]:
    return {name.split(" ")[0]: held for name, _, _, held in rows}


def test_a_steady_process_holds(soak: ModuleType) -> None:
    assert all(_held(soak.verdict(_cycles(soak, 30), 10, 8 * 1024)).values())


@pytest.mark.parametrize("figure", ["fds", "threads"])
def test_one_more_fd_or_thread_per_cycle_is_growth(soak: ModuleType, figure: str) -> None:
    held = _held(soak.verdict(_cycles(soak, 30, **{figure: 1}), 10, 8 * 1024))
    assert held[figure] is False
    assert all(v for k, v in held.items() if k != figure)


def test_rss_may_move_within_the_slack_only(soak: ModuleType) -> None:
    # +100 KiB per cycle: the medians of cycles 0-9 and 20-29 are 2 MiB apart
    cycles = _cycles(soak, 30, rss_kib=100)
    assert _held(soak.verdict(cycles, 10, 8 * 1024))["RSS"] is True
    assert _held(soak.verdict(cycles, 10, 1024))["RSS"] is False


def test_any_leftover_file_or_qemu_fails_even_in_the_middle(soak: ModuleType) -> None:
    cycles = _cycles(soak, 30)
    cycles[15] = soak.Cycle(**{**vars(cycles[15]), "files_left": 1})
    cycles[16] = soak.Cycle(**{**vars(cycles[16]), "qemu_children": 1})
    held = _held(soak.verdict(cycles, 10, 8 * 1024))
    assert held["files_left"] is False and held["qemu_children"] is False
