"""Reading (and where possible writing) guest-physical RAM from the host.

Two ways in, one async interface, because one of them is a QMP round trip:

* :class:`MmapGuestMemory`: virt with ``memory-backend-file,share=on``; the RAM file is
  mapped and guest byte ``addr`` is file byte ``addr - ram_base`` (banks are contiguous), so
  reads and writes are plain memory copies that the guest sees at once. The async methods do
  no I/O of their own; the ``*_sync`` twins are there for hot loops and non-async callers.
* :class:`PmemsaveGuestMemory`: boards without a shareable backend (smdkc210); QMP
  ``pmemsave`` dumps the range into a host file that is then read. QMP has no matching
  write command, so writes raise EOPNOTSUPP here; smdkc210 writes through QEMU's gdbstub
  instead (:class:`cma_qemu.machine.gdbstub.GdbStubGuestMemory`, reads still on pmemsave).

Both bound-check against the RAM banks and raise EINVAL naming the offending range; reads
that span a hole between banks are refused too, because QEMU would return bus errors or zeros.
"""

from __future__ import annotations

import abc
import mmap
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from cma_qemu.errors import EBADFD, EINVAL, EIO, EOPNOTSUPP

__all__ = [
    "GuestMemory",
    "MmapGuestMemory",
    "PmemsaveGuestMemory",
    "QmpExecutor",
]

#: Largest single pmemsave; bigger reads are split so one QMP call stays well under a second.
PMEMSAVE_CHUNK = 64 * 1024 * 1024


class QmpExecutor(Protocol):
    """The part of ``qemu.qmp.QMPClient`` that pmemsave needs (easy to fake in tests)."""

    async def execute(
        self, cmd: str, arguments: dict[str, Any] | None = ..., oob: bool = ...
    ) -> object: ...


class GuestMemory(abc.ABC):
    """Guest-physical RAM of one machine: ``[ram_base, ram_base + ram_size)`` minus holes."""

    def __init__(self, ram_base: int, ram_size: int, banks: Sequence[tuple[int, int]] = ()) -> None:
        if ram_size <= 0 or ram_base < 0:
            raise EINVAL(f"bad RAM layout base={ram_base:#x} size={ram_size:#x}", where="memory")
        self.ram_base = ram_base
        self.ram_size = ram_size
        self.banks: tuple[tuple[int, int], ...] = tuple(banks) or ((ram_base, ram_size),)
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran; every access then raises EBADFD."""
        return self._closed

    def check(self, addr: int, size: int) -> None:
        """Raise EINVAL unless ``[addr, addr + size)`` lies inside one RAM bank."""
        if self._closed:
            raise EBADFD("guest memory is closed", where="memory")
        if size < 0:
            raise EINVAL(f"negative size {size}", where="memory")
        for base, bank_size in self.banks:
            if base <= addr and addr + size <= base + bank_size:
                return
        banks = ", ".join(f"{b:#x}-{b + s - 1:#x}" for b, s in self.banks)
        end = f"{addr + size - 1:#x}" if size else f"{addr:#x}"
        raise EINVAL(
            f"range {addr:#x}-{end} ({size} bytes) is not inside guest RAM ({banks})",
            where="memory",
        )

    @abc.abstractmethod
    async def read(self, addr: int, size: int) -> bytes:
        """``size`` bytes of guest RAM from guest-physical ``addr``."""

    @abc.abstractmethod
    async def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at guest-physical ``addr``; visible to the guest at once."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release host resources (mapping, temp files); idempotent."""


class MmapGuestMemory(GuestMemory):
    """Guest RAM through an mmap of QEMU's shared RAM backend file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        ram_base: int,
        ram_size: int,
        banks: Sequence[tuple[int, int]] = (),
        *,
        writable: bool = True,
    ) -> None:
        super().__init__(ram_base, ram_size, banks)
        self.path = Path(path)
        flags = os.O_RDWR if writable else os.O_RDONLY
        try:
            fd = os.open(self.path, flags)
        except OSError as exc:
            raise EIO(f"cannot open guest RAM file: {exc.strerror}", where=str(path)) from exc
        try:
            file_size = os.fstat(fd).st_size
            if file_size < ram_size:
                raise EINVAL(
                    f"RAM file has {file_size:#x} bytes, the board needs {ram_size:#x}",
                    where=str(path),
                )
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map: mmap.mmap | None = mmap.mmap(fd, ram_size, access=access)
        finally:
            os.close(fd)
        self.writable = writable

    def _offset(self, addr: int, size: int) -> int:
        self.check(addr, size)
        return addr - self.ram_base

    def read_sync(self, addr: int, size: int) -> bytes:
        """Synchronous :meth:`read` (no await needed: it is a memory copy)."""
        off = self._offset(addr, size)
        assert self._map is not None
        return self._map[off : off + size]

    def write_sync(self, addr: int, data: bytes) -> None:
        """Synchronous :meth:`write`."""
        if not self.writable:
            raise EOPNOTSUPP("guest RAM was mapped read-only", where="memory")
        off = self._offset(addr, len(data))
        assert self._map is not None
        self._map[off : off + len(data)] = data

    def view(self, addr: int, size: int) -> memoryview:
        """A zero-copy view (release it before :meth:`close`, or close raises BufferError)."""
        off = self._offset(addr, size)
        assert self._map is not None
        return memoryview(self._map)[off : off + size]

    async def read(self, addr: int, size: int) -> bytes:
        return self.read_sync(addr, size)

    async def write(self, addr: int, data: bytes) -> None:
        self.write_sync(addr, data)

    def close_sync(self) -> None:
        """Synchronous :meth:`close`, for finalizers."""
        if self._map is not None:
            self._map.close()
            self._map = None
        self._closed = True

    async def close(self) -> None:
        self.close_sync()


class PmemsaveGuestMemory(GuestMemory):
    """Guest RAM read through QMP ``pmemsave`` (about 600 MB/s); no writes.

    ``tmpdir`` must be writable by the QEMU process (it writes the dump files), which is why
    the machine's runtime directory is the natural place.
    """

    def __init__(
        self,
        qmp: QmpExecutor,
        tmpdir: str | os.PathLike[str],
        ram_base: int,
        ram_size: int,
        banks: Sequence[tuple[int, int]] = (),
    ) -> None:
        super().__init__(ram_base, ram_size, banks)
        self._qmp = qmp
        self.tmpdir = Path(tmpdir)

    async def read(self, addr: int, size: int) -> bytes:
        self.check(addr, size)
        if size == 0:
            return b""
        fd, name = tempfile.mkstemp(prefix="pmemsave-", suffix=".bin", dir=self.tmpdir)
        os.close(fd)
        path = Path(name)
        try:
            parts = []
            done = 0
            while done < size:
                n = min(PMEMSAVE_CHUNK, size - done)
                try:
                    await self._qmp.execute(
                        "pmemsave", {"val": addr + done, "size": n, "filename": str(path)}
                    )
                except Exception as exc:
                    msg = f"pmemsave {addr + done:#x}+{n:#x} failed: {exc}"
                    raise EIO(msg, where="qmp") from exc
                data = path.read_bytes()
                if len(data) != n:
                    raise EIO(f"pmemsave wrote {len(data)} bytes, asked for {n}", where="qmp")
                parts.append(data)
                done += n
            return b"".join(parts)
        finally:
            path.unlink(missing_ok=True)

    async def write(self, addr: int, data: bytes) -> None:
        self.check(addr, len(data))
        raise EOPNOTSUPP(
            "this board's RAM is read with QMP pmemsave, which cannot write guest memory",
            where="memory",
        )

    async def close(self) -> None:
        self._closed = True
