"""Copies the board files and the guest sources into the wheel as package data.

They live at the top of the repository (``board_configs/``, ``guest/``), outside the package
directory, which setuptools cannot package by itself; ``cma_qemu/shipped.py`` finds the copies
(or, in an editable install, the originals). Everything else is in ``pyproject.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent

#: package-data directory -> (top-level source directory, the files to copy)
SHIPPED = {
    "boards": ("board_configs", ("*.toml",)),
    "guest": (
        "guest",
        ("*.c", "*.h", "init", "Makefile", "include/*.h", "kernel/Kbuild", "kernel/*.c",
         "kernel/examples/Kbuild", "kernel/examples/*.c"),
    ),
}


class BuildPyWithShipped(build_py):
    """build_py, plus copies of the shipped directories under ``cma_qemu/data/``."""

    def run(self) -> None:
        super().run()
        for name, (source, patterns) in SHIPPED.items():
            src = HERE / source
            if not src.is_dir():
                raise SystemExit(f"setup.py: {src} is missing; cannot package {name}")
            dest = Path(self.build_lib) / "cma_qemu" / "data" / name
            dest.mkdir(parents=True, exist_ok=True)
            for pattern in patterns:
                for path in sorted(src.glob(pattern)):
                    if path.is_file():
                        target = dest / path.relative_to(src)  # kernel/, include/ kept
                        target.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, target)


setup(cmdclass={"build_py": BuildPyWithShipped})
