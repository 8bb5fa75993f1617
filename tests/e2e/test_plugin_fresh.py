"""The plugin's fresh boards (``fresh_guest``/``fresh_agent``, ``--cma-fresh=restore``).

A small project runs in a subprocess (one boot of virt, for the session's snapshot): the
README's example suite under ``--cma-fresh=restore``, then a test that panics its guest and
leaves a file and a chunk behind, and a test after it that finds a healthy guest with neither.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).with_name("test_plugin_example.py")

POISON = """
import pytest


def test_a_poisons_its_guest(fresh_guest, fresh_agent):
    fresh_guest.check("echo left > /tmp/left-behind")
    fresh_guest.check(
        "((echo 'alloc vpu/dec 1M'; sleep 1000) | cma-test > /tmp/o 2>&1 &);"
        " for i in $(seq 20); do grep -q 1: /tmp/o && break; sleep 0.2; done"
    )
    assert len(fresh_agent.guest_chunks()) == 1
    with pytest.raises(Exception):  # the guest dies under the command: no answer
        fresh_guest.run("echo c > /proc/sysrq-trigger", timeout=3)


def test_b_next_test_gets_a_healthy_guest(fresh_guest, fresh_agent):
    assert fresh_guest.run("cat /tmp/left-behind").status != 0
    assert fresh_agent.guest_chunks() == []
    with fresh_guest.stub() as stub:
        assert stub.send("alloc vpu/dec 1M").startswith("1: 0x100000@")
"""


def test_example_suite_and_a_panic_under_fresh_boards(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    shutil.copy(EXAMPLE, tmp_path / "test_plugin_example.py")
    (tmp_path / "test_poison.py").write_text(POISON)
    snapshots_before = set(Path(tempfile.gettempdir()).glob("cma-qemu-snapshots-*"))
    t0 = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--cma-fresh=restore",
         "test_plugin_example.py", "test_poison.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    wall = time.monotonic() - t0
    out = result.stdout + result.stderr
    print(f"example suite + 2 tests under --cma-fresh=restore: {wall:.1f} s")
    assert result.returncode == 0, out
    assert "4 passed" in out, out
    assert set(Path(tempfile.gettempdir()).glob("cma-qemu-snapshots-*")) == snapshots_before
    assert not any(name.startswith("cma-qemu-") for name in os.listdir("/dev/shm"))
