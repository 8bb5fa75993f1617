"""One place says the version (pyproject.toml); the package and the monitor take it from the
installed distribution's metadata."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import cma_qemu
from cma_qemu.monitor.protocol import PACKAGE_VERSION, VERSION_INFO

ROOT = Path(__file__).resolve().parents[2]


def test_the_version_is_pyprojects_as_installed() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert cma_qemu.__version__ == importlib.metadata.version("cma-qemu") == declared
    assert cma_qemu.__version__ == PACKAGE_VERSION
    assert VERSION_INFO["package"] == f"cma-qemu {declared}"


def test_an_uninstalled_checkout_says_so_instead_of_a_stale_number() -> None:
    code = (
        "import importlib.metadata as m\n"
        "def missing(name): raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import cma_qemu\n"
        "from cma_qemu.monitor.protocol import VERSION_INFO\n"
        "print(cma_qemu.__version__, VERSION_INFO)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    assert out.split(" ", 1)[0] == "0+unknown"
    assert "'package': 'cma-qemu 0+unknown'" in out
    assert "{'major': 0, 'minor': 0, 'micro': 0}" in out
