"""``cma-qemu guest module build DIR``: cross-build a guest kernel module of one's own."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rich.console import Console

from cma_qemu.errors import EINVAL
from cma_qemu.guest_image import FLAVOURS, default_cache_dir
from cma_qemu.guest_image.build import guest_source_dir
from cma_qemu.guest_image.kmod import build_user_module

__all__ = ["cmd_guest_module_build"]


def cmd_guest_module_build(args: argparse.Namespace) -> int:
    """Builds DIR (a ``Kbuild`` directory) for each flavour; prints ``FLAVOUR: PATH.ko``.

    With ``--out OUT`` the modules are copied to ``OUT/FLAVOUR/``; else the paths are the
    cache's (read-only by convention: a rebuild replaces them).
    """
    src = Path(args.dir)
    console = Console(stderr=True, highlight=False)
    cache = Path(args.cache) if args.cache else default_cache_dir()
    for flavour in args.flavour or sorted(FLAVOURS):
        if flavour not in FLAVOURS:
            known = ", ".join(FLAVOURS)
            raise EINVAL(f"unknown kernel flavour {flavour!r} (known: {known})", where="module")

        def progress(message: str, flavour: str = flavour) -> None:
            console.print(f"module {flavour}: {message}", soft_wrap=True)

        built = build_user_module(src, flavour, guest_source_dir(), cache, progress)
        for ko in built.modules:
            path = ko
            if args.out:
                dest = Path(args.out) / flavour
                dest.mkdir(parents=True, exist_ok=True)
                path = dest / ko.name
                shutil.copyfile(ko, path)
            print(f"{flavour}: {path}", flush=True)
    return 0
