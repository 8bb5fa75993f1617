"""Shared by the machine-layer e2e tests: the board and its guest image.

Nothing here skips: a missing QEMU, compiler or image is an install step that failed, and the
suite must say so rather than pass without the tests that need it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pexpect
from qemu.qmp import QMPClient

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


async def until(predicate: Any, timeout: float = 10) -> None:
    """Wait until ``predicate()`` is true (a chunk freed by a closing port, say), polling."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


PROMPT = "cma# "
STUB_PROMPT = "cma-test> "


@dataclass
class HarnessQemu:
    """A QEMU a test started itself from ``qemu-command``'s argv: its console and QMP socket."""

    child: pexpect.spawn[str]
    control: Path  # the test's own QMP socket
    timeout: ClassVar[float] = 30

    def expect(self, pattern: Any, timeout: float | None = None) -> Any:
        self.child.expect(pattern, timeout=self.timeout if timeout is None else timeout)
        return self.child.match

    def shell(self, cmd: str, timeout: float | None = None) -> str:
        """Run a command at the guest prompt; what it printed (echo and all)."""
        self.child.sendline(cmd)
        self.expect(PROMPT, timeout)
        return str(self.child.before).replace("\r", "")

    def stub_alloc(self, line: str) -> int:
        """Start ``cma-test`` held open, allocate with ``line``; the chunk's start."""
        self.child.sendline("cma-test")
        self.expect(STUB_PROMPT)
        self.child.sendline(line)
        match = self.expect(r"1: 0x100000@(0x[0-9a-f]+)\r*\n")
        self.expect(STUB_PROMPT)
        return int(match.group(1), 16)

    def stub_end(self) -> None:
        """Ctrl-D: the stub frees its chunks and exits to the shell."""
        self.child.send("\x04")
        self.expect(PROMPT)

    async def qmp(self, command: str) -> Any:
        client = QMPClient("attach-test")
        await client.connect(str(self.control))
        try:
            return await client.execute(command)
        finally:
            with contextlib.suppress(EOFError):  # after `quit` QEMU closes the socket first
                await client.disconnect()
