"""Where the files shipped beside the code are: the board files and the guest sources.

The repository keeps them at the top level (``board_configs/``, ``guest/``); a built wheel or
sdist carries copies inside the package as ``cma_qemu/data/boards`` and ``cma_qemu/data/guest``
(``setup.py`` copies them in at build time). An installed package finds its copies with
:mod:`importlib.resources`; an editable install has none and uses the checkout's directories.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path
from typing import Literal

__all__ = ["CHECKOUT_DIRS", "shipped_dir"]

Shipped = Literal["boards", "guest"]

#: Package-data name -> the top-level directory of a checkout it is copied from.
CHECKOUT_DIRS: dict[Shipped, str] = {"boards": "board_configs", "guest": "guest"}


def shipped_dir(name: Shipped) -> Path | None:
    """The shipped ``name`` directory: the package data first, then the checkout's; or None.

    Runtime complexity: O(1) (two ``stat`` calls at most).
    """
    packaged = files("cma_qemu") / "data" / name
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parent.parent / CHECKOUT_DIRS[name]
    return checkout if checkout.is_dir() else None
