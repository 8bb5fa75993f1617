"""What the benchmarks record about the machine they ran on (BENCHMARKS.md quotes it)."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

__all__ = ["machine_info"]


def machine_info() -> str:
    """CPUs, CPU model, CPython, QEMU version and load: the context a figure needs."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = "qemu-system-arm not found"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["qemu-system-arm", "--version"], capture_output=True, text=True, timeout=10
        ).stdout
        qemu = out.splitlines()[0] if out else qemu
    return (
        f"{os.cpu_count()} CPUs ({cpu}), CPython {platform.python_version()}, {qemu}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
