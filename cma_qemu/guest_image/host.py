"""Running host tools, behind two names the unit tests replace with fakes.

The other modules call ``host.run`` and ``host.which`` through this module (never a copy
imported by name), so replacing them here reaches every caller.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cma_qemu.errors import ENODEV

__all__ = ["require_tool", "run", "tail", "which"]


def run(argv: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs a command in the C locale and captures its output."""
    env = dict(os.environ, LC_ALL="C", LANG="C")
    return subprocess.run(list(argv), cwd=cwd, env=env, capture_output=True, text=True, check=False)


def which(name: str) -> str | None:
    """The path of a host tool, or None."""
    return shutil.which(name)


def require_tool(name: str, fix: str) -> None:
    """ENODEV naming ``fix`` (the command that installs it) when ``name`` is missing."""
    if which(name) is None:
        raise ENODEV(f"{name} not found; {fix}", where="guest build")


def tail(text: str, lines: int = 8) -> str:
    """The last lines of a tool's output, for an error message."""
    return "\n".join(text.strip().splitlines()[-lines:])
