"""CPU milliseconds per case of fuzz targets, and where they go: a driver outside pytest.

``./dev.sh fuzz`` runs 100,000 cases per target, so a target's cost per case decides whether
the run fits in the time there is. This runs a few hundred cases of each named target with the
``fuzz`` profile's settings (no shrinking, no database), counts the cases Hypothesis ran (as
the progress files of a long run do) and divides the CPU time the target used by them.
``--profile`` prints cProfile's top functions too.

    .venv/bin/python tests/fuzz/measure.py --cases 500 test_monitor_lines BestFitMachine
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import cProfile
import importlib
import importlib.util
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

_HERE = Path(__file__).resolve().parent
#: Where each target lives (file stem), in the order ``./dev.sh fuzz`` reaches the slow ones.
TARGETS = {
    "test_line_splitter_matches_the_byte_model": "test_fuzz_channel",
    "test_arguments_return_the_type_asked_for_or_name_the_argument": "test_fuzz_channel",
    "test_mutated_alloc_requests": "test_fuzz_channel",
    "test_one_request_line_one_reply": "test_fuzz_channel",
    "test_json_splitter_never_passes_on_more_than_its_limit": "test_fuzz_monitor",
    "test_json_splitter_does_not_depend_on_how_bytes_arrive": "test_fuzz_monitor",
    "test_board_files_load_or_fail_with_one_line": "test_fuzz_boards",
    "test_script_lines": "test_fuzz_script",
    "test_whole_scripts": "test_fuzz_script",
    "test_boot_from_attributes": "test_fuzz_attributes",
    "test_guest_session_survives_any_stream": "test_fuzz_channel",
    "test_monitor_lines": "test_fuzz_monitor",
    "test_runtime_map_and_asterisk_writes": "test_fuzz_attributes",
    "BestFitMachine": "test_fuzz_framework",
    "BitmapMachine": "test_fuzz_framework",
}


def _setup(cases: int) -> None:
    """The paths pytest's conftest files set up, a progress directory, and a short profile."""
    for path in (_HERE.parent / "unit", _HERE.parent, _HERE):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    scratch = tempfile.mkdtemp(prefix="fuzz-measure-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)  # after fuzzing's own atexit
    os.environ["CMA_QEMU_FUZZ_PROGRESS"] = scratch
    os.environ["CMA_QEMU_FUZZ_PROFILE"] = "fuzz-measure"
    from hypothesis import Phase, settings

    spec = importlib.util.spec_from_file_location("fuzz_conftest", _HERE / "conftest.py")
    assert spec and spec.loader
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # registers "fuzz"
    settings.register_profile(
        "fuzz-measure",
        settings.get_profile("fuzz"),
        max_examples=cases,
        phases=[Phase.generate],
    )


def _runner(target: str) -> Callable[[], None]:
    module = importlib.import_module(TARGETS[target])
    if target.endswith("Machine"):
        from hypothesis.stateful import run_state_machine_as_test

        machine = getattr(module, target)
        return lambda: run_state_machine_as_test(machine, settings=module._machine_settings)
    test = getattr(module, target)
    if target == "test_monitor_lines":
        loop = asyncio.new_event_loop()
        return lambda: test(loop=loop)
    if target == "test_board_files_load_or_fail_with_one_line":
        board_path = Path(os.environ["CMA_QEMU_FUZZ_PROGRESS"], f"{module.STEM}.toml")
        return lambda: test(board_path=board_path)
    return test  # type: ignore[no-any-return]


def measure(target: str, profile: bool) -> tuple[int, float]:
    """Run ``target`` once (its ``max_examples`` cases); return cases and CPU seconds."""
    import fuzzing

    run = _runner(target)
    profiler = cProfile.Profile() if profile else None
    started = time.process_time()
    if profiler:
        profiler.enable()
    run()
    if profiler:
        profiler.disable()
    cpu = time.process_time() - started
    cases = int(fuzzing._counts[target][0])
    if profiler:
        stats = pstats.Stats(profiler, stream=sys.stdout)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("cumulative").print_stats("cma_qemu|tests|json|asyncio", 40)
        stats.sort_stats("tottime").print_stats(25)
    return cases, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=500)
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    parser.add_argument("targets", nargs="*", default=list(TARGETS), metavar="TARGET")
    args = parser.parse_args(argv)
    _setup(args.cases)
    for target in args.targets:
        cases, cpu = measure(target, args.profile)
        print(f"{target}: {cases} cases, {cpu:.2f} s CPU, {1000 * cpu / cases:.1f} ms/case")
    return 0


if __name__ == "__main__":
    sys.exit(main())
