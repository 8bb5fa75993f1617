"""``--record``: a guest session on a real virt board, recorded, then replayed offline.

The recording must hold what the agent served in the guest's order, and ``cma-qemu replay``
of it must print exactly the allocation lines the stub printed in the guest.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]

CLI = str(Path(sys.executable).with_name("cma-qemu"))
ENV = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
ALLOC_LINE = re.compile(r"^\d+: 0x[0-9a-f]+@0x[0-9a-f]+$")

# Churn over three regions, with ids freed and reused, an aligned request, a failure, and
# chunks still held at the end of input (the stub frees them as it exits: recorded too).
SCRIPT = """\
alloc vpu/dec 6M
a vpu/dec 3M/1M
alloc-from common 8M
alloc camera 1M
a isp 64K/64K
free 2
alloc vpu/dec 1M
alloc vpu/dec 900M
free
r video,common 12K
write 1 0x1234
verify 1 0x1234
free 1
a vpu/f 256K
alloc vpu/dec 5M/2M
"""


def _run(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *argv], capture_output=True, text=True, timeout=timeout, env=ENV, check=False
    )


def test_a_recorded_guest_session_replays_to_the_same_allocation_lines(tmp_path: Path) -> None:
    script = tmp_path / "session.txt"
    script.write_text(SCRIPT)
    recording = tmp_path / "session.cma"
    guest = _run("boot", "virt", "--script", str(script), "--record", str(recording))
    assert guest.returncode == 1, guest.stderr  # the 900M request fails, as it should
    assert guest.stderr.startswith("alloc: ENOMEM: ") and guest.stderr.count("\n") == 1
    printed = [ln for ln in guest.stdout.splitlines() if ALLOC_LINE.match(ln)]
    assert len(printed) == 9

    text = recording.read_text()
    assert text.startswith("# cma-qemu recording")
    assert "# board: virt\n" in text
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert body[:3] == ["alloc vpu/dec 0x600000", "alloc vpu/dec 0x300000/0x100000",
                        "alloc-from common 0x800000"]  # fmt: skip
    assert body.count("alloc vpu/dec 0x38400000") == 1  # the failed request, replayed as one
    assert sum(ln.startswith("free ") for ln in body) == 9  # three by the script, six at exit
    assert text.endswith("# stopped: 9 allocations, 9 frees, 0 chunks still live\n")

    offline = _run("replay", str(recording), "--board", "virt")
    assert offline.stdout.splitlines() == printed
    assert offline.stderr == guest.stderr
    assert offline.returncode == 1


def test_record_to_an_unwritable_path_is_one_line_and_nothing_left(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "rec.cma"
    result = _run("boot", "virt", "--run", "true", "--record", str(target), "--json")
    assert result.returncode == 1
    assert result.stderr.startswith("cma-qemu: ENOENT: record: ")
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
