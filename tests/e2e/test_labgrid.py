"""labgrid: the example project in examples/labgrid, run as a labgrid user runs it.

``pytest --lg-env env.yaml`` in a subprocess, with ``TMPDIR`` pointed at a directory of this
test's: labgrid's own temporary directory and the driver's (DTB, RAM file, sockets) both go
there, so after the run it must be empty and no QEMU of it may be left. One boot.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "labgrid"
PYTEST = [sys.executable, "-m", "pytest"]


def qemus_under(directory: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(directory) in line]


def test_the_labgrid_example_passes_and_leaves_nothing(tmp_path: Path) -> None:
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project)  # run outside the checkout, as a project of its own
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    result = subprocess.run(
        [*PYTEST, "--lg-env", "env.yaml", "-p", "no:cacheprovider", "-q"],
        cwd=project, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 passed" in result.stdout
    assert list(scratch.iterdir()) == []
    assert qemus_under(scratch) == []
