"""Shared by the machine-layer e2e tests: the board and its guest image.

Nothing here skips: a missing QEMU, compiler or image is an install step that failed, and the
suite must say so rather than pass without the tests that need it.
"""

from __future__ import annotations

from cma_qemu.boards import Board, load_board
from cma_qemu.errors import ENODEV
from cma_qemu.guest_image import GuestImage, build_guest, find_guest


def board(name: str) -> Board:
    """A shipped board file."""
    return load_board(name)


def guest_image(flavour: str) -> GuestImage:
    """The cached guest image, built first when it is missing."""
    try:
        return find_guest(flavour)
    except ENODEV:
        return build_guest(flavour)
