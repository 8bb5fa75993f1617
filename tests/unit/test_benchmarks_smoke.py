"""The benchmark scripts import cleanly and their pure helpers compute what they claim (no QEMU)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))  # the scripts import their sibling modules, as when run


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def boot() -> ModuleType:
    return _load("bench_boot")


@pytest.fixture(scope="module")
def channel() -> ModuleType:
    return _load("bench_channel")


@pytest.fixture(scope="module")
def memory() -> ModuleType:
    return _load("bench_memory")


def test_interleave_alternates_until_each_kind_has_its_runs(boot: ModuleType) -> None:
    order = boot.interleave(("a", "b", "c"), {"a": 3, "b": 3, "c": 1})
    assert order == ["a", "b", "c", "a", "b", "a", "b"]
    assert boot.interleave(("a", "b"), {"a": 0, "b": 0}) == []


def test_spread_reports_range_and_half_width_of_the_median(boot: ModuleType) -> None:
    assert boot.spread([1.0, 2.0, 3.0]) == "1.00-3.00 (+-50%)"
    assert boot.median([3.0, 1.0, 2.0, 10.0]) == 2.5


def test_plain_argv_is_the_agent_command_without_the_patched_dtb(boot: ModuleType) -> None:
    from cma_qemu.boards import load_board
    from cma_qemu.guest_image import GuestImage

    board = load_board("virt")
    image = GuestImage("armmp-lpae", Path("/k"), Path("/i"), None)
    argv = boot.plain_argv(board, image, Path("/run/x"), Path("/dev/shm/r.ram"))
    assert "-dtb" not in argv
    assert argv[argv.index("-kernel") + 1] == "/k"
    assert argv[argv.index("-initrd") + 1] == "/i"
    assert any("virtserialport" in a for a in argv)
    assert any("mem-path=/dev/shm/r.ram" in a for a in argv)


def test_cli_argv_runs_true_on_the_board(boot: ModuleType) -> None:
    assert boot.cli_argv("virt")[-4:] == ["boot", "virt", "--run", "true"]


def test_parse_timing_reads_the_stub_lines(channel: ModuleType) -> None:
    out = "ping: n=2000 p50=118us p99=262us\nbench: n=2000 p50=151us p99=386us\n"
    assert channel.parse_timing(out) == {"ping": (2000, 118, 262), "bench": (2000, 151, 386)}
    assert channel.parse_timing("bench: ETIMEDOUT: no reply from the agent\n") == {}


def test_nearest_rank_matches_the_stub(channel: ModuleType) -> None:
    values = list(range(1, 101))
    assert channel.nearest_rank(values, 50) == 50
    assert channel.nearest_rank(values, 99) == 99
    assert channel.nearest_rank([7], 99) == 7
    assert channel.nearest_rank([1, 2, 3], 50) == 2


def test_board_result_ratio_is_bench_p50_over_ping_p50(channel: ModuleType) -> None:
    r = channel.BoardResult("virt", "vpu/dec", 10, "virtio-serial")
    r.ping = [(100, 200), (120, 300), (110, 250)]
    r.bench = [(130, 400), (150, 500), (140, 450)]
    assert r.p50("ping") == 110 and r.p99("bench") == 450
    assert r.ratio == pytest.approx(140 / 110)
    assert r.round_ratios() == pytest.approx([1.3, 1.25, 140 / 110])


def test_agent_side_costs_are_positive_and_replies_sized(channel: ModuleType) -> None:
    side = channel.agent_side("virt", "vpu/dec", n=50)
    assert side["ping"] > 0 and side["alloc"] > 0 and side["free"] > 0
    assert side["ping reply bytes"] < side["alloc reply bytes"]


def test_memory_helpers(memory: ModuleType) -> None:
    assert memory.parse_size("32M") == 32 << 20
    assert memory.parse_size("1g") == 1 << 30
    assert memory.parse_size("4096") == 4096
    assert memory.gbps(2_000_000_000, 2.0) == 1.0
    assert memory.spread_gbps(1_000_000_000, [0.5, 1.0, 2.0]) == "0.50-2.00"


@pytest.fixture(scope="module")
def replay_bench() -> ModuleType:
    return _load("bench_replay")


def test_replay_bench_helpers(replay_bench: ModuleType) -> None:
    assert replay_bench.region_of("t=2G", "0x40000000:2G") == (0x40000000, 2 << 30)
    out = "1: 0x1000@0x40000000\nalloc: ENOMEM: no room\n12: 0x2a@0x50000000\n"
    assert replay_bench.allocation_lines(out) == ["1: 0x1000@0x40000000", "12: 0x2a@0x50000000"]
    best = replay_bench.best([replay_bench.Timing(2.0, 1.0), replay_bench.Timing(3.0, 0.5)])
    assert (best.wall, best.cpu) == (2.0, 0.5)


def test_replay_bench_tiny_run_builds_the_baseline_and_matches(replay_bench: ModuleType) -> None:
    # N = 100 and 1,000 with 300 rounds: the C++ baseline is compiled, both programs run, and
    # main() exits non-zero if their allocation lines differ.
    assert replay_bench.main(["--quick", "--rounds", "300"]) == 0


def test_replay_floor_prints_what_replay_prints(replay_bench: ModuleType) -> None:
    # --ceiling's bare Python loop: with bf called directly it must print replay's lines byte
    # for byte (it is only a floor if it does the same work); with no allocator the same ids
    # and sizes at other addresses.
    import subprocess

    from cma_qemu.churn import churn_script
    from cma_qemu.configuration import build_cma
    from cma_qemu.replay import parse_ram, replay

    text = churn_script(300, 2_000, seed=7, shape=replay_bench.SHAPE)
    expected = replay(text, build_cma(regions="t=2G", ram=[parse_ram(replay_bench.RAM)])).stdout
    start, size = replay_bench.region_of(replay_bench.REGIONS, replay_bench.RAM)
    outputs = {}
    for mode in ("bf", "none"):
        run = subprocess.run(
            [sys.executable, str(replay_bench.FLOOR_SCRIPT), mode, hex(start), hex(size)],
            input=text,
            capture_output=True,
            text=True,
            check=True,
        )
        assert run.stderr == ""
        outputs[mode] = run.stdout
    assert outputs["bf"] == expected
    ids_and_sizes = [line.partition("@")[0] for line in expected.splitlines()]
    assert [line.partition("@")[0] for line in outputs["none"].splitlines()] == ids_and_sizes
    assert outputs["none"] != expected  # nothing is reused without an allocator
