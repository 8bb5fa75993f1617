"""Shared by the machine-layer e2e tests: the board and its guest image.

Nothing here skips: a missing QEMU, compiler or image is an install step that failed, and the
suite must say so rather than pass without the tests that need it.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from typing import Any

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


def read_json(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """The JSON document a ``cma-qemu ... --json`` process prints first, read as it arrives.

    Reads the pipe's fd, not the buffered reader, so ``select`` sees every byte; ends at EOF.
    """
    assert proc.stdout is not None
    fd, data, deadline = proc.stdout.fileno(), b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
            try:
                return dict(json.loads(data))
            except ValueError:
                continue
    raise AssertionError(f"no JSON from cma-qemu in {timeout} s: {data!r}")
