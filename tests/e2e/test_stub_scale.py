"""The guest stub at scale: a churn trace with 1,500 live chunks through ``cma-qemu boot``.

About 9,000 lines (1,500 allocations, then 3,750 rounds of "free a random live chunk, allocate
one") run by ``cma-test`` in a real virt guest must print exactly the allocation lines that
``cma-qemu replay`` prints for the same attributes: same ids (lowest unused, reused after
random frees), same sizes, same addresses. The stub's lines/s is measured by
benchmarks/bench_replay.py (``--stub``), not here.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_cli_boot import CLI, ENV, cli

from cma_qemu.churn import ChurnShape, churn_script

pytestmark = pytest.mark.e2e

LIVE = 1_500
ROUNDS = 3_750
#: 4K..128K requests: 1,500 of them average ~100 MiB, well inside the 300M region.
SHAPE = ChurnShape(min_size=4 << 10, max_size=128 << 10, dev="t", aliases=True)
ATTRIBUTES = ("--cma", "t=300M", "--map", "*/*=t")


def test_churn_at_1500_live_chunks_matches_replay(tmp_path: Path) -> None:
    script = tmp_path / "churn.cma"
    script.write_text(churn_script(LIVE, ROUNDS, seed=7, shape=SHAPE))
    assert script.read_text().count("\n") == LIVE + 2 * ROUNDS
    replay = subprocess.run(
        [CLI, "replay", str(script), "--board", "virt", *ATTRIBUTES],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
    )
    assert (replay.returncode, replay.stderr) == (0, "")
    lines = replay.stdout.splitlines()
    assert len(lines) == LIVE + ROUNDS  # one line per allocation, none failed
    # ids are reused: never more than LIVE chunks are live, so no id goes past LIVE, and the
    # churn reuses low ids freed at random (not only the last one)
    ids = [int(line.split(":")[0]) for line in lines]
    assert max(ids) == LIVE
    assert len(set(ids[LIVE:])) > LIVE // 2

    run = cli("boot", "virt", *ATTRIBUTES, "--script", str(script), "--timeout", "300")
    assert (run.proc.returncode, run.stderr) == (0, "")
    assert run.stdout == replay.stdout
