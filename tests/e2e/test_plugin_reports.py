"""The plugin's test reports: a failed test's guest console, in the terminal, JUnit and files.

A small project of its own runs in a subprocess (one boot of virt): the first test prints a
marker on the guest console and passes, the second prints another and fails. The failure's
report must hold the second marker and not the first (the console since *that* test started),
in the terminal and in JUnit ``system-out``; ``--cma-log-dir`` must hold one file per test.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

TESTS = """
def test_passes(guest):
    assert guest.check("echo first-$((1 + 1))") == "first-2"


def test_fails(guest):
    assert guest.check("echo second-$((2 + 2))") == "second-5"
"""


def test_a_failed_tests_report_holds_its_guest_console(tmp_path: Path) -> None:
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -p no:cacheprovider\n")
    (tmp_path / "test_two.py").write_text(TESTS)
    logs, junit = tmp_path / "logs", tmp_path / "junit.xml"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", f"--cma-log-dir={logs}",
         f"--junitxml={junit}", "-o", "junit_logging=system-out"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    assert "1 failed, 1 passed" in out
    section = out.split("Captured stdout: guest console (virt) call", 1)[1]
    assert "second-4" in section and "first-2" not in section

    cases = {c.get("name"): c for c in ET.parse(junit).getroot().iter("testcase")}
    failed_out = cases["test_fails"].findtext("system-out") or ""
    assert "second-4" in failed_out and "first-2" not in failed_out

    files = sorted(p.name for p in logs.iterdir())
    assert files == ["test_two.py_test_fails.virt.log", "test_two.py_test_passes.virt.log"]
    passed_log = (logs / "test_two.py_test_passes.virt.log").read_text()
    assert "cma-qemu: ready" in passed_log  # booted during its setup: the boot log is its own
    assert "first-2" in passed_log and "second-4" not in passed_log
    failed_log = (logs / "test_two.py_test_fails.virt.log").read_text()
    assert "second-4" in failed_log and "first-2" not in failed_log
