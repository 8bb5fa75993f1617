"""Host writes to guest-physical RAM through QEMU's gdbstub (smdkc210 has no shared RAM file).

QMP can read guest RAM (``pmemsave``) but not write it; QEMU's gdbstub can. With
``Qqemu.PhyMemMode:1`` its ``M`` packets take guest-physical addresses. QEMU 7.2's stub only
reads packets while the VM is stopped (any byte that arrives while it runs is an interrupt),
so every access is: ``\\x03`` -> the stop reply -> ``M`` packets -> ``c``. Connecting stops
the VM too. No Python library for the GDB remote serial protocol fits (PyPI has ``pyrsp``,
last released 2019, and ``pygdbremoteclient``, one 0.1.0 release; both blocking, neither knows
this stop/continue discipline), so this module speaks the few packets it needs itself.

What the stub's stops must not do:

* be taken for the guest's own: the QMP ``STOP``/``RESUME`` events a stop and continue cause
  are muted in the :class:`~cma_qemu.machine.events.EventHub` (``mute_next``) before the
  byte that causes them is sent;
* outlive the agent: the continue is in a ``finally`` and is one synchronous socket write, so
  cancellation (Ctrl-C, SIGTERM) cannot skip it; a finalizer (also run at interpreter exit)
  sends it if the process ends mid-access; and a marker file beside the socket says the VM
  is stopped by this pid, so after a SIGKILL (QEMU keeps a VM paused when the gdb client
  goes away) the next agent that opens this memory sends QMP ``cont``
  (:func:`recover_stopped_vm`).

Reads of more than 2 KiB stay on ``pmemsave`` (about 0.25 GB/s, 50x the stub at 1 MiB, and
the guest runs on); reads of up to 2 KiB (one ``m`` packet) go through the stub, which
measured 2-5x faster than a ``pmemsave`` round trip there (BENCHMARKS.md, "Host writes on
smdkc210").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cma_qemu.errors import EIO, ETIMEDOUT
from cma_qemu.machine.memory import GuestMemory, PmemsaveGuestMemory, QmpExecutor

__all__ = [
    "GDB_CHARDEV",
    "MAX_READ_PACKET",
    "MAX_WRITE_PACKET",
    "STOP_GROUP",
    "STUB_READ_MAX",
    "EventMuter",
    "GdbRemote",
    "GdbStubGuestMemory",
    "WriteStats",
    "checksum",
    "decode_packet",
    "encode_packet",
    "gdb_args",
    "recover_stopped_vm",
    "stopped_marker",
]

log = logging.getLogger(__name__)

GDB_CHARDEV = "gdb0"
#: Data bytes per ``M`` packet: QEMU 7.2's packet buffer is 4096 bytes, hex doubles the data.
MAX_WRITE_PACKET = 0x7F0
#: A bulk write continues the guest after this many bytes, so it is never frozen for long.
STOP_GROUP = 256 * 1024
#: Bytes per ``m`` reply (hex, within the same 4096-byte buffer).
MAX_READ_PACKET = 0x800
#: Reads up to this size go through the stub: measured faster than pmemsave (BENCHMARKS.md).
STUB_READ_MAX = MAX_READ_PACKET
_CONTINUE = b"$c#63"


def gdb_args(socket_path: str | os.PathLike[str]) -> list[str]:
    """QEMU options for a gdbstub on a Unix socket that does not wait for a client."""
    path = str(socket_path).replace(",", ",,")
    return [
        "-chardev",
        f"socket,id={GDB_CHARDEV},path={path},server=on,wait=off",
        "-gdb",
        f"chardev:{GDB_CHARDEV}",
    ]


def stopped_marker(socket_path: str | os.PathLike[str]) -> Path:
    """The file that says "this pid stopped the VM through the stub at ``socket_path``"."""
    return Path(f"{socket_path}.stopped")


def checksum(payload: bytes) -> int:
    """The RSP checksum: the sum of the payload bytes modulo 256."""
    return sum(payload) & 0xFF


def encode_packet(payload: str) -> bytes:
    """``$payload#cc`` (payloads here are ASCII without ``$#}*``)."""
    raw = payload.encode("ascii")
    return b"$" + raw + b"#" + f"{checksum(raw):02x}".encode()


def decode_packet(body: bytes, cs: bytes) -> str:
    """The payload of ``$body#cs``: checksum checked, ``}`` escapes and ``*`` runs expanded."""
    try:
        want = int(cs, 16)
    except ValueError:
        raise EIO(f"bad checksum field {cs!r}", where="gdbstub") from None
    if checksum(body) != want:
        raise EIO(f"checksum {checksum(body):02x} != {want:02x}", where="gdbstub")
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c == 0x7D and i + 1 < len(body):  # '}' escape
            out.append(body[i + 1] ^ 0x20)
            i += 2
        elif c == 0x2A and out and i + 1 < len(body):  # '*' run length
            out += out[-1:] * (body[i + 1] - 29)
            i += 2
        else:
            out.append(c)
            i += 1
    return out.decode("latin-1")


class EventMuter(Protocol):
    """What the backend needs of :class:`~cma_qemu.machine.events.EventHub`."""

    def mute_next(self, name: str) -> None: ...
    def unmute(self, name: str) -> None: ...


class GdbRemote:
    """One connection to a gdbstub: packets out, packets in (a reader task queues them).

    ``+``/``-`` acknowledgements are handled by the reader; stop replies that arrive while
    the client believes the VM runs (someone stopped it over QMP) are counted in
    :attr:`unsolicited_stops`.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._packets: asyncio.Queue[str | None] = asyncio.Queue()
        self._last_sent = b""
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name="gdbstub")
        sock = writer.get_extra_info("socket")
        self.fileno: int = sock.fileno() if sock is not None else -1

    @classmethod
    async def connect(cls, path: str | os.PathLike[str], timeout: float = 5.0) -> GdbRemote:
        """Connect to the stub's Unix socket (this stops a running VM). O(1) round trips."""
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(path), limit=1 << 20), timeout
            )
        except (OSError, TimeoutError) as exc:
            raise EIO(f"cannot connect to QEMU's gdbstub: {exc}", where=str(path)) from exc
        return cls(reader, writer)

    async def _read_loop(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                buf += data
                while buf:
                    if buf[0] == ord("$"):
                        end = buf.find(b"#")
                        if end < 0 or len(buf) < end + 3:
                            break
                        body, cs = bytes(buf[1:end]), bytes(buf[end + 1 : end + 3])
                        del buf[: end + 3]
                        try:
                            payload = decode_packet(body, cs)
                        except EIO:
                            self._writer.write(b"-")
                            continue
                        self._writer.write(b"+")
                        self._packets.put_nowait(payload)
                    elif buf[0] == ord("-"):
                        del buf[:1]
                        self._writer.write(self._last_sent)
                    else:  # '+' and noise
                        del buf[:1]
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._packets.put_nowait(None)

    def send_raw(self, data: bytes) -> None:
        """Queue bytes on the socket now (synchronous: cancellation cannot split it)."""
        self._writer.write(data)

    def send(self, payload: str) -> None:
        self._last_sent = encode_packet(payload)
        self._writer.write(self._last_sent)

    async def reply(self, timeout: float) -> str:
        """The next packet from the stub; ETIMEDOUT, or EIO if the connection closed."""
        try:
            packet = await asyncio.wait_for(self._packets.get(), timeout)
        except TimeoutError:
            raise ETIMEDOUT(f"gdbstub sent nothing in {timeout:g} s", where="gdbstub") from None
        if packet is None:
            self._packets.put_nowait(None)
            raise EIO("QEMU closed the gdbstub connection", where="gdbstub")
        return packet

    def pending(self) -> list[str]:
        """Packets already received and not yet taken (no waiting)."""
        out = []
        while not self._packets.empty():
            p = self._packets.get_nowait()
            if p is None:
                self._packets.put_nowait(None)
                break
            out.append(p)
        return out

    async def command(self, payload: str, timeout: float = 5.0) -> str:
        """Send one packet and return the stub's reply packet."""
        self.send(payload)
        return await self.reply(timeout)

    def abort(self) -> None:
        """Close now, without waiting (what is queued, such as a continue, is still sent)."""
        self._task.cancel()
        self._writer.close()

    async def close(self) -> None:
        """Close the socket (no ``D``: detaching resumes a VM someone else paused)."""
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()


@dataclass
class WriteStats:
    """The last write: bytes, seconds (stop to continue, all groups) and MB/s."""

    nbytes: int = 0
    seconds: float = 0.0

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e6 if self.seconds > 0 else 0.0


class _StopGuard:
    """What the finalizer needs: the raw socket and whether this process stopped the VM."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker
        self.fileno = -1
        self.stopped_by_us = False

    def __call__(self) -> None:
        """Process end or a dropped backend mid-access: continue the VM, drop the marker."""
        if self.stopped_by_us and self.fileno >= 0:
            with contextlib.suppress(OSError):
                s = socket.socket(fileno=os.dup(self.fileno))
                try:
                    s.send(_CONTINUE)
                finally:
                    s.close()
            self.stopped_by_us = False
        with contextlib.suppress(OSError):
            if _marker_pid(self.marker) == os.getpid():
                self.marker.unlink()


def _marker_pid(marker: Path) -> int | None:
    try:
        return int(marker.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def recover_stopped_vm(qmp: QmpExecutor, socket_path: str | os.PathLike[str]) -> bool:
    """If an agent died while it held the VM stopped through the stub, ``cont`` it over QMP.

    The marker names the pid that stopped the VM; when that process is gone (SIGKILL: no
    finally, no finalizer) the VM is still paused, and this sends ``cont``. Returns True when
    it did. Cost: a file read, plus one QMP command when there is something to recover.
    """
    marker = stopped_marker(socket_path)
    pid = _marker_pid(marker)
    if pid is None or (pid != os.getpid() and _pid_alive(pid)):
        return False
    status = await qmp.execute("query-status")
    if isinstance(status, dict) and status.get("status") == "paused":
        await qmp.execute("cont")
        log.warning("guest was left stopped by gdbstub client %d, which is gone: continued", pid)
        resumed = True
    else:
        resumed = False
    marker.unlink(missing_ok=True)
    return resumed


class GdbStubGuestMemory(GuestMemory):
    """Guest RAM read with QMP ``pmemsave`` and written through QEMU's gdbstub.

    The stub is connected on the first write (connecting stops the VM, so a machine that is
    never written to never sees the stub). A write of N bytes costs one stop, one ``M``
    packet per 2032 bytes and one continue, repeated per 256 KiB so a bulk write never
    freezes the guest for long: about 0.5 ms for a word, 8-18 MB/s in bulk
    (BENCHMARKS.md). :attr:`last_write` reports the last write's throughput.
    """

    def __init__(
        self,
        qmp: QmpExecutor,
        tmpdir: str | os.PathLike[str],
        gdb_socket: str | os.PathLike[str],
        ram_base: int,
        ram_size: int,
        banks: Sequence[tuple[int, int]] = (),
        *,
        events: EventMuter | None = None,
        timeout: float = 5.0,
    ) -> None:
        super().__init__(ram_base, ram_size, banks)
        self._qmp = qmp
        #: The pmemsave reader :meth:`read` uses above :data:`STUB_READ_MAX`.
        self.pmemsave = PmemsaveGuestMemory(qmp, tmpdir, ram_base, ram_size, banks)
        self.gdb_socket = Path(gdb_socket)
        self._events = events
        self.timeout = timeout
        self._remote: GdbRemote | None = None
        self._lock = asyncio.Lock()
        #: False while the VM is stopped (by us or by someone we saw stop it).
        self._running = True
        #: Someone else (QMP ``stop``) stopped it: ask QMP before each access until it runs.
        self._stopped_by_other = False
        self._guard = _StopGuard(stopped_marker(gdb_socket))
        self._finalizer = weakref.finalize(self, self._guard)
        self.last_write = WriteStats()
        self.on_write: Callable[[WriteStats], Any] | None = None
        #: Small reads through the stub (False: every read on pmemsave, the guest never
        #: stopped by a read).
        self.small_reads_via_stub = True

    async def read(self, addr: int, size: int) -> bytes:
        """Up to :data:`STUB_READ_MAX` bytes through the stub (one ``m`` packet: 2-5x faster
        than a ``pmemsave`` round trip), more with ``pmemsave`` (50x faster at 1 MiB, and
        the guest keeps running)."""
        self.check(addr, size)
        if 0 < size <= STUB_READ_MAX and self.small_reads_via_stub:
            return await self.read_via_stub(addr, size)
        return await self.pmemsave.read(addr, size)

    async def write(self, addr: int, data: bytes) -> None:
        """Store ``data`` at ``addr`` (stop, ``M`` packets, continue; per 256 KiB)."""
        self.check(addr, len(data))
        if not data:
            return
        async with self._lock:
            remote = await self._connected()
            t0 = time.perf_counter()
            for start in range(0, len(data), STOP_GROUP):
                group = data[start : start + STOP_GROUP]
                async with self._stopped(remote):
                    for off in range(0, len(group), MAX_WRITE_PACKET):
                        part = group[off : off + MAX_WRITE_PACKET]
                        where = addr + start + off
                        reply = await remote.command(
                            f"M{where:x},{len(part):x}:{part.hex()}", self.timeout
                        )
                        if reply != "OK":
                            raise EIO(
                                f"gdbstub refused to write {len(part)} bytes at {where:#x}: "
                                f"{reply!r}",
                                where="gdbstub",
                            )
            self.last_write = WriteStats(len(data), time.perf_counter() - t0)
        if len(data) >= STOP_GROUP:
            log.info(
                "gdbstub write of %d bytes at %#x: %.1f MB/s",
                len(data),
                addr,
                self.last_write.mb_per_s,
            )
        if self.on_write is not None:
            self.on_write(self.last_write)

    async def read_via_stub(self, addr: int, size: int) -> bytes:
        """``size`` bytes through the stub (``m`` packets of 2 KiB, the guest stopped).

        Not :meth:`read`: ``pmemsave`` is faster from a few KiB up and never stops the guest
        (BENCHMARKS.md); this is here so that is measured, not assumed.
        """
        self.check(addr, size)
        out = bytearray()
        async with self._lock:
            remote = await self._connected()
            async with self._stopped(remote):
                for off in range(0, size, MAX_READ_PACKET):
                    n = min(MAX_READ_PACKET, size - off)
                    reply = await remote.command(f"m{addr + off:x},{n:x}", self.timeout)
                    try:
                        part = bytes.fromhex(reply)
                    except ValueError:
                        part = b""
                    if len(part) != n:
                        raise EIO(
                            f"gdbstub read {addr + off:#x}+{n:#x}: {reply[:16]!r}", where="gdbstub"
                        )
                    out += part
        return bytes(out)

    @contextlib.asynccontextmanager
    async def _stopped(self, remote: GdbRemote) -> AsyncIterator[None]:
        """The VM stopped for the body (unless it already was), and continued after it.

        On any exception, cancellation included, the continue is sent first; then, since a
        reply may still be on its way and this connection can no longer pair packets with
        replies, the connection goes and the next access connects anew.
        """
        we_stopped = await self._stop(remote)
        try:
            yield
        except BaseException:
            if we_stopped:
                self._continue(remote)
            remote.abort()
            self._remote = None
            raise
        if we_stopped:
            self._continue(remote)

    async def _vm_running(self) -> bool:
        status = await self._qmp.execute("query-status")
        return bool(isinstance(status, dict) and status.get("running"))

    async def _connected(self) -> GdbRemote:
        """The stub connection, made on first use: physical addresses, VM left as it was."""
        if self._remote is not None:
            return self._remote
        await recover_stopped_vm(self._qmp, self.gdb_socket)
        running = await self._vm_running()
        if running:
            self._mute("STOP")
            self._mark_stopped()
        try:
            remote = await GdbRemote.connect(self.gdb_socket, self.timeout)
        except BaseException:
            if running:
                self._unmute("STOP")
                self._unmark()
            raise
        self._guard.fileno = remote.fileno
        self._remote = remote
        self._running = False
        try:
            if running:  # QEMU reports the stop the connection caused
                await self._stop_reply(remote)
            await remote.command("qSupported:multiprocess+", self.timeout)
            reply = await remote.command("Qqemu.PhyMemMode:1", self.timeout)
            if reply != "OK":
                raise EIO(f"gdbstub has no physical memory mode: {reply!r}", where="gdbstub")
        finally:
            if running:
                self._continue(remote)
        return remote

    async def _stop(self, remote: GdbRemote) -> bool:
        """Stop the VM unless it is stopped; True if this call stopped it."""
        if any(p[:1] in ("T", "S") for p in remote.pending()) or self._stopped_by_other:
            # stopped over QMP (the stub told us); QMP may have resumed it since, silently
            self._running = await self._vm_running()
            self._stopped_by_other = not self._running
        if not self._running:
            return False
        self._mute("STOP")
        self._mark_stopped()
        remote.send_raw(b"\x03")
        try:
            await self._stop_reply(remote)
        except BaseException:
            # the VM may or may not have stopped: continue it to be safe (muted either way)
            self._continue(remote)
            raise
        self._running = False
        return True

    async def _stop_reply(self, remote: GdbRemote) -> None:
        while (await remote.reply(self.timeout))[:1] not in ("T", "S"):
            pass

    def _continue(self, remote: GdbRemote) -> None:
        """``c``: one synchronous socket write, then the marker goes."""
        if not self._guard.stopped_by_us:  # the finalizer continued it already
            self._running = True
            return
        self._mute("RESUME")
        remote.send_raw(_CONTINUE)
        self._running = True
        self._unmark()

    def _mute(self, name: str) -> None:
        if self._events is not None:
            self._events.mute_next(name)

    def _unmute(self, name: str) -> None:
        if self._events is not None:
            self._events.unmute(name)

    def _mark_stopped(self) -> None:
        self._guard.stopped_by_us = True
        with contextlib.suppress(OSError):
            self._guard.marker.write_text(f"{os.getpid()}\n")

    def _unmark(self) -> None:
        self._guard.stopped_by_us = False
        with contextlib.suppress(OSError):
            self._guard.marker.unlink()

    async def disconnect(self) -> None:
        """Let go of the stub (another client may connect); the next write connects again."""
        async with self._lock:
            if self._remote is not None:
                if self._guard.stopped_by_us:
                    self._continue(self._remote)
                await self._remote.close()
                self._remote = None
                self._guard.fileno = -1

    async def close(self) -> None:
        """Continue the VM if this backend holds it stopped, then close the socket."""
        if self._closed:
            return
        self._closed = True
        if self._remote is not None:
            if self._guard.stopped_by_us:
                self._continue(self._remote)
            with contextlib.suppress(Exception):
                await self._remote.close()
            self._remote = None
        self._guard.fileno = -1
        self._finalizer()
        await self.pmemsave.close()
