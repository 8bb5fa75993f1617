"""Saving a running QEMU's device state to a file and starting a new QEMU from it.

Guest RAM on virt is a shared memory backend, so with QEMU's ``x-ignore-shared`` capability
the migration stream carries only device state (a few hundred KB, mostly virt's flash), and
the RAM is copied separately, sparse-aware (only the pages the guest touched). A restore
fills a new anonymous RAM file from that copy before QEMU starts, then starts the very same
argv with ``-incoming defer``. smdkc210 has no RAM backend to share (QEMU ignores ``-m`` and
memory backends there), so its stream carries the RAM too (tens of MiB: zero pages are a
few bytes each) and there is no RAM file to copy. Why it is done this way, and the
pitfalls, are in docs/snapshots.md.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shlex
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from qemu.qmp import QMPClient

from cma_qemu.errors import EINVAL, EIO, ETIMEDOUT, from_os_error
from cma_qemu.machine import rundir
from cma_qemu.machine.devicetree import Reservation
from cma_qemu.machine.launch import (
    QEMU,
    GuestImageLike,
    LaunchFiles,
    Machine,
    guest_ram,
    qemu_command,
    uses_ram_file,
)
from cma_qemu.machine.profiles import BoardLike, ram_extent
from cma_qemu.machine.qmp import qmp_call

__all__ = ["RestoredMachine", "copy_sparse", "load_state", "save_state"]

_IGNORE_SHARED = {"capabilities": [{"capability": "x-ignore-shared", "state": True}]}


def copy_sparse(src_fd: int, dst_fd: int, size: int) -> int:
    """Copy the data extents of ``src_fd`` into ``dst_fd`` (holes stay holes); bytes copied.

    Cost: proportional to the pages in use, not to ``size`` (SEEK_DATA/SEEK_HOLE, then
    ``copy_file_range``, or ``sendfile`` where the kernel refuses a copy across file systems).
    """
    os.ftruncate(dst_fd, size)
    copied = pos = 0
    while pos < size:
        try:
            data = os.lseek(src_fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        hole = min(os.lseek(src_fd, data, os.SEEK_HOLE), size)
        offset = data
        while offset < hole:
            try:
                n = os.copy_file_range(src_fd, dst_fd, hole - offset, offset, offset)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                os.lseek(dst_fd, offset, os.SEEK_SET)
                n = os.sendfile(dst_fd, src_fd, offset, hole - offset)
            if n <= 0:
                raise EIO(f"short copy at {offset:#x}", where="snapshot")
            offset += n
        copied += hole - data
        pos = hole
    return copied


async def _wait_migration(qmp: QMPClient, what: str, timeout: float) -> None:
    """Poll ``query-migrate`` until ``completed``; EIO on ``failed``/``cancelled``."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        info = await qmp_call(qmp, "query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            detail = info.get("error-desc", status)
            raise EIO(f"{what} failed: {detail}", where="migration")
        if time.monotonic() > deadline:
            raise ETIMEDOUT(f"{what} still {status} after {timeout:g} s", where="migration")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def save_state(
    qmp: QMPClient,
    state_file: Path,
    *,
    timeout: float = 60.0,
    settle: float = 0.02,
    ignore_shared: bool = True,
) -> None:
    """Stop the guest and write QEMU's device state to ``state_file``.

    With ``ignore_shared`` the shared RAM backend is left out (virt); without it the stream
    carries all of RAM (smdkc210: about 0.5 s for 57 MiB, BENCHMARKS.md). Between the stop
    and the save the event loop runs for ``settle`` seconds, so a request
    the guest sent before it stopped is read and answered into QEMU first (and saved with
    it). The guest stays stopped: the caller copies RAM, then resumes it with ``cont``.
    Cost: ``settle`` plus 20 to 90 ms on virt (the stream is about 345 KB).
    """
    if ignore_shared:
        await qmp_call(qmp, "migrate-set-capabilities", _IGNORE_SHARED)
    await qmp_call(qmp, "stop")
    await asyncio.sleep(settle)
    await qmp_call(qmp, "migrate", {"uri": f"exec:cat > {shlex.quote(str(state_file))}"})
    await _wait_migration(qmp, "saving the device state", timeout)


async def load_state(
    qmp: QMPClient, state_file: Path, *, timeout: float = 60.0, ignore_shared: bool = True
) -> None:
    """Load ``state_file`` into a QEMU started with ``-incoming defer`` and run the guest.

    ``ignore_shared`` must be what the save used (QEMU refuses a mismatch).
    """
    if ignore_shared:
        await qmp_call(qmp, "migrate-set-capabilities", _IGNORE_SHARED)
    await qmp_call(qmp, "migrate-incoming", {"uri": f"exec:cat {shlex.quote(str(state_file))}"})
    await _wait_migration(qmp, "loading the device state", timeout)
    status = await qmp_call(qmp, "query-status")
    if not status.get("running"):
        await qmp_call(qmp, "cont")


class RestoredMachine(Machine):
    """A :class:`Machine` started from a snapshot instead of booted.

    ``start()`` fills a new anonymous RAM file from ``ram_source`` (``None`` on a machine
    without one, whose RAM is in the saved stream), puts the saved patched DTB
    in the runtime directory (QEMU wants the file; the tree it uses is in RAM), starts the
    same argv as the boot plus ``-incoming defer`` and connects QMP. The guest does not run
    until :meth:`resume`, so the agent can connect the channel first (connected later, the
    guest would see its host end close).
    """

    def __init__(
        self,
        board: BoardLike,
        reservations: Sequence[Reservation],
        *,
        image: GuestImageLike,
        ram_source: Path | None,
        dtb: Path,
        qemu: str = QEMU,
        runtime_parent: str | os.PathLike[str] | None = None,
    ) -> None:
        if uses_ram_file(board) != (ram_source is not None):
            raise EINVAL(
                f"{board.machine_type}: a saved RAM file is needed exactly when the board "
                "has a shared RAM backend",
                where="snapshot",
            )
        super().__init__(
            board,
            reservations,
            image=image,
            qemu=qemu,
            extra_args=("-incoming", "defer"),
            wait_ready=False,
            verify=False,
            runtime_parent=runtime_parent,
        )
        self._ram_source = ram_source
        self._saved_dtb = dtb

    async def _prepare(self) -> None:
        board = self.board
        _, total, _ = ram_extent(board)
        parent = self._runtime_parent or rundir.default_parent()
        rundir.sweep({parent, rundir.default_parent()})
        runtime = rundir.create(parent)
        self._leftovers.paths.append(runtime)
        ram_file = None
        if self._ram_source is not None:
            fd, ram_file = guest_ram(total, f"cma-qemu-{board.name}")
            self._leftovers.fds.append(fd)
            try:
                src = os.open(self._ram_source, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    await asyncio.to_thread(copy_sparse, src, fd, total)
                finally:
                    os.close(src)
            except OSError as err:
                raise from_os_error(err, f"snapshot {self._ram_source}") from None
        self.files = files = LaunchFiles.in_dir(runtime, ram_file)
        shutil.copyfile(self._saved_dtb, files.dtb)
        image = self._image
        assert image is not None
        self.argv = qemu_command(board, image, files, extra_args=self._extra, qemu=self._qemu)

    async def resume(self, state_file: Path, *, timeout: float = 60.0) -> None:
        """Load the saved device state and run the guest; its console goes on draining."""
        await load_state(
            self.qmp, state_file, timeout=timeout, ignore_shared=self._ram_source is not None
        )
        self.guest_channel = self.board.channel.name
        self.console.start_pump()
