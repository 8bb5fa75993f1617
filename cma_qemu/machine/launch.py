"""Launching QEMU for a board: the command line and the :class:`Machine` that owns the process.

One ``Machine`` owns everything it creates and removes all of it on exit, whatever the exit
(clean, exception, KeyboardInterrupt/cancellation, SIGTERM/SIGHUP through
:mod:`cma_qemu.lifecycle`, QEMU killed under it): the QEMU process, the guest RAM, and a 0700
runtime directory (:mod:`cma_qemu.machine.rundir`) with the QMP and channel sockets and the
patched DTB. Even SIGKILL of the agent leaves nothing for long:

* guest RAM (virt) is an anonymous ``memfd_create`` file, so it has no name on any file
  system: QEMU opens it as ``/proc/AGENT_PID/fd/N`` at start, the agent maps the same file,
  and the pages are freed when the last of the two lets go. A file in ``/dev/shm`` unlinked
  once both have mapped it would do the same, but only after a window in which a kill leaks
  it. Reaching the fd through the agent's ``/proc`` entry instead of passing it to QEMU keeps
  the spawn as it is (ptyprocess closes inherited fds) and keeps QEMU's ``mem-path``
  meaningful to another process while the agent runs (``cma-qemu attach`` maps it from
  there); a harness that starts QEMU itself gets a RAM file of its own in the directory
  :func:`prepare_launch` fills (``cma-qemu qemu-command``).
  Boot time and mmap reads are the same as with the ``/dev/shm`` file (BENCHMARKS.md);
* QEMU gets ``PR_SET_PDEATHSIG`` (SIGKILL). The kernel sends it when the *thread* that forked
  QEMU ends, so ``start()`` must run on a thread that lives as long as the machine: the
  CLI's main thread, or the pytest plugin's event-loop thread;
* the runtime directory names its owner and the next launch sweeps it.

A ``weakref.finalize`` kills QEMU and removes the files if a ``Machine`` is dropped or the
interpreter exits without ``close()``.

Command-line choices:

* ``-nodefaults -display none``: virt's default NIC wants ``efi-virtio.rom`` (not installed
  without ipxe-qemu) and the default monitor would share the console; the console is
  ``-chardev stdio,signal=off`` so Ctrl-C in interactive mode reaches the guest.
* the channel chardev is always ``-chardev socket,id=cma0,...,server=on,wait=off``, wired to a
  ``virtserialport`` (virt) or to the second ``-serial`` (smdkc210, ``/dev/ttySAC1``). The
  port gets ``id=cmaport0`` because QEMU emits VSERPORT_CHANGE only for ports with an id.
* virt RAM comes from ``memory-backend-file,share=on`` so the host mmaps guest RAM; smdkc210
  ignores ``-m`` and memory backends, so it gets neither and is read with ``pmemsave``.
* smdkc210 also gets ``-chardev socket,id=gdb0,...,server=on,wait=off -gdb chardev:gdb0``:
  host writes go through QEMU's gdbstub (:mod:`cma_qemu.machine.gdbstub`), connected on the
  first write only.
* the DTB is QEMU's own (``dumpdtb`` with the very same machine options) or, on smdkc210, the
  guest image's; either way patched with ``/reserved-memory`` and passed with ``-dtb``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pexpect
from qemu.qmp import QMPClient, QMPError

from cma_qemu.closing import AsyncClosing
from cma_qemu.errors import EINVAL, EIO, ENODEV, ENOENT, CmaError
from cma_qemu.machine import rundir
from cma_qemu.machine.console import Console
from cma_qemu.machine.devicetree import (
    Reservation,
    add_lan9118,
    add_reserved_memory,
    drop_uart_dma,
    dump_qemu_dtb,
)
from cma_qemu.machine.events import EventHub, QmpEvent, Subscription
from cma_qemu.machine.gdbstub import GdbStubGuestMemory, gdb_args
from cma_qemu.machine.loader import (
    LoadedRange,
    check_reservations,
    dtb_load_size,
    loader_ranges,
)
from cma_qemu.machine.memory import GuestMemory, MmapGuestMemory, PmemsaveGuestMemory
from cma_qemu.machine.profiles import BoardLike, profile_of, ram_extent
from cma_qemu.machine.qmp import connect_qmp, uart_rx_level
from cma_qemu.machine.verify import verify_reservations
from cma_qemu.units import MiB

__all__ = [
    "CHANNEL_CHARDEV",
    "CHANNEL_PORT_ID",
    "CONSOLE_CHARDEV",
    "RAM_BACKEND_ID",
    "GuestImageLike",
    "LaunchFiles",
    "Machine",
    "PreparedLaunch",
    "console_device",
    "guest_ram",
    "kernel_cmdline",
    "machine_args",
    "prepare_launch",
    "qemu_command",
    "uses_ram_file",
    "write_patched_dtb",
]

log = logging.getLogger(__name__)

QEMU = "qemu-system-arm"
CONSOLE_CHARDEV = "console0"
CHANNEL_CHARDEV = "cma0"
RAM_BACKEND_ID = "ram0"
VIRTIO_SERIAL_ID = "vser0"
#: QEMU only sends VSERPORT_CHANGE for ports that have an ``id``.
CHANNEL_PORT_ID = "cmaport0"


class GuestImageLike(Protocol):
    """What a launch needs from a guest image (``guest_image.GuestImage`` fits)."""

    @property
    def kernel(self) -> Path: ...
    @property
    def initrd(self) -> Path: ...
    @property
    def dtb(self) -> Path | None: ...


@dataclass(frozen=True, slots=True)
class LaunchFiles:
    """Host paths one launch uses; all but ``ram_file`` live in ``runtime_dir``."""

    runtime_dir: Path
    qmp_socket: Path
    channel_socket: Path
    dtb: Path
    ram_file: Path | None
    #: QEMU's gdbstub, on machines whose host writes go through it (smdkc210).
    gdb_socket: Path | None = None

    @classmethod
    def in_dir(cls, runtime_dir: Path, ram_file: Path | None) -> LaunchFiles:
        return cls(
            runtime_dir,
            runtime_dir / "qmp.sock",
            runtime_dir / "channel.sock",
            runtime_dir / "guest.dtb",
            ram_file,
            runtime_dir / "gdb.sock",
        )


def _opt(value: str | os.PathLike[str]) -> str:
    """A QemuOpts value: commas are doubled."""
    return str(value).replace(",", ",,")


def _size(nbytes: int) -> str:
    if nbytes <= 0 or nbytes % MiB:
        raise EINVAL(f"RAM size {nbytes:#x} is not a positive multiple of 1 MiB", where="board")
    return f"{nbytes // MiB}M"


def console_device(board: BoardLike) -> str:
    """The guest's console tty (``console=``), from the machine's profile."""
    return profile_of(board, "console").console


def uses_ram_file(board: BoardLike) -> bool:
    """True when guest RAM is a shared file the host maps (a machine that takes a memory
    backend, with mmap access)."""
    return profile_of(board).honours_ram_size and board.memory_access == "mmap"


def machine_args(board: BoardLike, ram_file: Path | None) -> list[str]:
    """Machine, CPU and RAM options: shared by the real launch and the ``dumpdtb`` run."""
    _, total, _ = ram_extent(board)
    mopts = board.machine_type
    args: list[str] = []
    if ram_file is not None:
        mopts += f",memory-backend={RAM_BACKEND_ID}"
        args += [
            "-object",
            f"memory-backend-file,id={RAM_BACKEND_ID},size={_size(total)},"
            f"mem-path={_opt(ram_file)},share=on",
        ]
    args = ["-M", mopts, *args]
    if board.cpu:
        args += ["-cpu", board.cpu]
    if profile_of(board).honours_ram_size:  # smdkc210: a fixed 1 GiB, QEMU ignores -m
        args += ["-m", _size(total)]
    return [*args, "-nodefaults", "-no-user-config", "-display", "none"]


def kernel_cmdline(board: BoardLike, extra: Sequence[str] = ()) -> str:
    """``console=... cma=0 panic=1 cma_qemu.channel=NAME``: no kernel CMA area, the channel.

    ``panic=1``: a panicked guest reboots after a second instead of hanging, so QEMU reports
    ``RESET`` and the agent releases the chunks the dead guest held (RELIABILITY.md).
    """
    parts = [
        f"console={console_device(board)}",
        "cma=0",
        "panic=1",
        f"cma_qemu.channel={board.channel.name}",
    ]
    return " ".join([*parts, *extra])


def channel_args(board: BoardLike, socket_path: Path) -> list[str]:
    """The guest channel: a virtserialport (virt) or the second UART (smdkc210)."""
    chardev = f"socket,id={CHANNEL_CHARDEV},path={_opt(socket_path)},server=on,wait=off"
    if board.channel.kind == "virtio-serial":
        return [
            "-device",
            f"virtio-serial-device,id={VIRTIO_SERIAL_ID}",
            "-chardev",
            chardev,
            "-device",
            f"virtserialport,bus={VIRTIO_SERIAL_ID}.0,chardev={CHANNEL_CHARDEV},id={CHANNEL_PORT_ID},"
            f"name={_opt(board.channel.name)}",
        ]
    if board.channel.kind == "uart":
        return ["-chardev", chardev, "-serial", f"chardev:{CHANNEL_CHARDEV}"]
    if board.channel.kind == "net":
        return net_channel_args(board.channel.name, socket_path)
    raise EINVAL(f"unknown channel kind {board.channel.kind!r}", where="board")


def net_channel_args(address: str, socket_path: Path, socat: str = "socat") -> list[str]:
    """The board's NIC on QEMU's user network, ``address`` (``tcp:A.B.C.D:PORT``) forwarded.

    ``guestfwd=...-cmd:`` starts one ``socat`` per guest connection, joined to the agent's
    unix socket at ``socket_path`` (the agent listens there), so every connection and its
    close reach the agent; ``-chardev`` would share one stream and never show a close.
    """
    if shutil.which(socat) is None:
        raise ENOENT(f"{socat} is not installed (the net channel needs it)", where="board")
    path = str(socket_path)
    if "," in path or " " in path:
        raise EINVAL(f"the channel socket path {path!r} has a comma or a space", where="board")
    forward = f"guestfwd={address}-cmd:{socat} - UNIX-CONNECT:{path}"
    return ["-nic", f"user,model=lan9118,restrict=on,ipv6=off,{forward}"]


def qemu_command(
    board: BoardLike,
    image: GuestImageLike,
    files: LaunchFiles,
    *,
    append: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    qemu: str = QEMU,
    console: bool = True,
) -> list[str]:
    """The full QEMU argv (``argv[0]`` is ``qemu``); the console on stdio unless not ``console``."""
    stdio = ["-chardev", f"stdio,id={CONSOLE_CHARDEV},signal=off"]
    stdio += ["-serial", f"chardev:{CONSOLE_CHARDEV}"]
    return [
        qemu,
        *machine_args(board, files.ram_file),
        *(stdio if console else []),
        *channel_args(board, files.channel_socket),
        "-qmp",
        f"unix:{_opt(files.qmp_socket)},server=on,wait=off",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-dtb",
        str(files.dtb),
        "-append",
        kernel_cmdline(board, append),
        *_gdb_options(board, files),
        *extra_args,
    ]


def _gdb_writes(board: BoardLike, files: LaunchFiles) -> bool:
    """The machine's host writes go through QEMU's gdbstub (smdkc210)."""
    return profile_of(board).gdbstub_writes and files.gdb_socket is not None


def _gdb_options(board: BoardLike, files: LaunchFiles) -> list[str]:
    if not _gdb_writes(board, files) or files.gdb_socket is None:
        return []
    return gdb_args(files.gdb_socket)


def write_patched_dtb(
    board: BoardLike,
    image: GuestImageLike,
    files: LaunchFiles,
    reservations: Sequence[Reservation],
    *,
    compatible: str | None = "shared-dma-pool",
    qemu: str = QEMU,
) -> list[LoadedRange]:
    """Write ``files.dtb``: the board's tree with ``/reserved-memory``; the loader's ranges.

    Raises (and writes nothing) when the guest files are missing or a reservation overlaps
    what QEMU's loader places (kernel, initrd, DTB): ``EADDRINUSE``, as at boot. Cost: one
    ``qemu-system-arm -M ...,dumpdtb`` run on virt (about 0.1 s), a file read on smdkc210.
    """
    base, total, _ = ram_extent(board)
    for p in (image.kernel, image.initrd):
        if not Path(p).is_file():
            raise ENODEV(f"guest file {p} is missing; run `cma-qemu guest build`")
    profile = profile_of(board)
    if profile.dtb_source == "qemu":
        dtb = dump_qemu_dtb(machine_args(board, files.ram_file), qemu=qemu)
    else:
        if image.dtb is None or not Path(image.dtb).is_file():
            raise ENODEV(f"the guest image has no device tree for {board.machine_type}")
        dtb = Path(image.dtb).read_bytes()
    if profile.drop_uart_dma:
        # The console (UART0) and a UART channel receive through the UART's FIFO only.
        dtb = drop_uart_dma(dtb, _uart_index(f"/dev/{profile.console}"))
        if board.channel.kind == "uart":
            dtb = drop_uart_dma(dtb, _uart_index(board.channel.name))
    if board.channel.kind == "net":
        dtb = add_lan9118(dtb)
    patched = add_reserved_memory(dtb, reservations, compatible=compatible)
    loaded = loader_ranges(
        board.machine_type,
        base,
        total,
        Path(image.kernel),
        Path(image.initrd),
        dtb_load_size(len(patched)),
    )
    check_reservations(loaded, reservations)
    files.dtb.write_bytes(patched)
    return loaded


@dataclass(frozen=True, slots=True)
class PreparedLaunch:
    """A QEMU command line and the files it needs, for a harness that starts QEMU itself."""

    argv: list[str]
    files: LaunchFiles
    loaded: list[LoadedRange]


def prepare_launch(
    board: BoardLike,
    reservations: Sequence[Reservation],
    directory: Path,
    *,
    image: GuestImageLike | None = None,
    console: bool = True,
    qemu: str = QEMU,
) -> PreparedLaunch:
    """Write into ``directory`` what QEMU needs and return the argv that starts it; no spawn.

    Unlike a :class:`Machine`, nothing here belongs to this process: guest RAM (virt) is the
    file ``guest.ram`` in ``directory`` (sparse, mode 0600), so the argv runs as is from any
    process of this user, and the harness removes the directory when QEMU is gone. Without
    ``console`` the argv has no serial console (a harness such as labgrid adds its own as
    the first ``-serial``). The reservations are checked against the loader as at boot.
    Cost: :func:`write_patched_dtb`, plus creating the (sparse) RAM file.
    """
    made_dir = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    if image is None:
        from cma_qemu.guest_image import find_guest

        image = find_guest(board.kernel_flavour)
    ram_file = directory / "guest.ram" if uses_ram_file(board) else None
    files = LaunchFiles.in_dir(directory, ram_file)
    created = False
    if ram_file is not None and not ram_file.exists():
        _, total, _ = ram_extent(board)
        fd = os.open(ram_file, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        created = True
        try:
            os.ftruncate(fd, total)
        finally:
            os.close(fd)
    try:
        loaded = write_patched_dtb(board, image, files, reservations, qemu=qemu)
    except BaseException:
        with contextlib.suppress(OSError):
            if created and ram_file is not None:
                ram_file.unlink()
            if made_dir:
                directory.rmdir()
        raise
    argv = qemu_command(board, image, files, qemu=qemu, console=console)
    return PreparedLaunch(argv, files, loaded)


def _uart_index(device: str) -> int:
    """``/dev/ttySAC1`` -> 1: the UART's number, as ``/aliases/serialN`` counts them."""
    match = re.fullmatch(r"/dev/tty[A-Za-z]*?(\d+)", device)
    if match is None:
        raise EINVAL(f"channel device {device!r} is not a /dev/ttyXXXN UART", where="board")
    return int(match.group(1))


_PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the forked child gets SIGKILL when its parent (thread) ends.

    A parent that died between the fork and the ``prctl`` sent no signal: the child checks
    and exits then instead of running as an orphan. libc is looked up here, in the parent:
    the forked child of a threaded process should not take the dynamic loader's locks.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def pdeathsig() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return pdeathsig


def guest_ram(size: int, name: str = "cma-qemu-ram") -> tuple[int, Path]:
    """An anonymous RAM file of ``size`` bytes: ``(fd, path QEMU opens it by)``.

    The path is ``/proc/PID/fd/N`` of this process, so it opens the file (from any process
    of this user) only while this process keeps ``fd``; the pages go with the last fd or
    mapping. Cost: one ``memfd_create`` and one ``ftruncate``; pages are allocated on touch.
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd, Path(f"/proc/{os.getpid()}/fd/{fd}")


class _Leftovers:
    """What the finalizer must undo if a Machine is dropped without ``close()``."""

    def __init__(self) -> None:
        self.pid: int | None = None
        self.paths: list[Path] = []
        self.fds: list[int] = []

    def __call__(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.pid, 0)
            self.pid = None
        for p in self.paths:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
        self.paths.clear()
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class Machine(AsyncClosing):
    """A QEMU guest this process launched and owns; ``async with Machine(board) as m: ...``.

    After start: ``qmp`` (a connected ``QMPClient``), ``console``, ``memory``,
    ``channel_path`` (the host end of the guest channel), ``qmp_path``, ``events``
    (RESET/SHUTDOWN/STOP/VSERPORT_CHANGE/... via :meth:`subscribe`/:meth:`on_event`),
    ``loaded`` (the loader's ranges) and ``boot_time`` (start to ready marker, seconds).
    """

    def __init__(
        self,
        board: BoardLike,
        reservations: Sequence[Reservation] = (),
        *,
        image: GuestImageLike | None = None,
        qemu: str = QEMU,
        append: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        boot_timeout: float = 120.0,
        qmp_timeout: float = 15.0,
        wait_ready: bool = True,
        verify: bool = True,
        dtb_compatible: str | None = "shared-dma-pool",
        runtime_parent: str | os.PathLike[str] | None = None,
    ) -> None:
        self.board = board
        self.reservations: tuple[Reservation, ...] = tuple(reservations)
        self._image = image
        self._qemu = qemu
        self._append = tuple(append)
        self._extra = tuple(extra_args)
        self.boot_timeout = boot_timeout
        self.qmp_timeout = qmp_timeout
        self._wait_ready = wait_ready
        self._verify = verify
        self._compatible = dtb_compatible
        self._runtime_parent = runtime_parent

        self.files: LaunchFiles | None = None
        self.argv: list[str] = []
        self.loaded: list[LoadedRange] = []
        self.boot_time: float | None = None
        self.guest_channel: str | None = None
        self._child: pexpect.spawn[str] | None = None
        self._qmp: QMPClient | None = None
        self._console: Console | None = None
        self._memory: GuestMemory | None = None
        self._events: EventHub | None = None
        self._exited = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pidfd: int | None = None
        self._closing = False
        self._closed = False
        self._started = False
        self._leftovers = _Leftovers()
        self._finalizer = weakref.finalize(self, self._leftovers)
        self.exit_status: int | None = None

    # -- accessors ------------------------------------------------------------------------

    def _need(self, value: Any, what: str) -> Any:
        if value is None:
            raise EIO(f"machine {self.board.name} is not running ({what})", where="machine")
        return value

    @property
    def qmp(self) -> QMPClient:
        q: QMPClient = self._need(self._qmp, "qmp")
        return q

    @property
    def console(self) -> Console:
        c: Console = self._need(self._console, "console")
        return c

    @property
    def memory(self) -> GuestMemory:
        m: GuestMemory = self._need(self._memory, "memory")
        return m

    @property
    def events(self) -> EventHub:
        e: EventHub = self._need(self._events, "events")
        return e

    @property
    def runtime_dir(self) -> Path:
        f: LaunchFiles = self._need(self.files, "files")
        return f.runtime_dir

    @property
    def qmp_path(self) -> Path:
        f: LaunchFiles = self._need(self.files, "files")
        return f.qmp_socket

    @property
    def channel_path(self) -> Path:
        f: LaunchFiles = self._need(self.files, "files")
        return f.channel_socket

    @property
    def ram_path(self) -> Path | None:
        """Where guest RAM opens (``/proc/PID/fd/N`` of this process) while the machine runs."""
        return self.files.ram_file if self.files else None

    @property
    def pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def running(self) -> bool:
        """True while the QEMU process exists."""
        return self._child is not None and not self._exited.is_set()

    def subscribe(self, *names: str) -> Subscription:
        """Events with these names (all if none), as an async iterator."""
        return self.events.subscribe(*names)

    def on_event(self, callback: Callable[[QmpEvent], Any], *names: str) -> Callable[[], None]:
        """Call ``callback`` for each event with these names; returns an unsubscriber."""
        return self.events.on(callback, *names)

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Machine:
        return await self.start()

    async def start(self) -> Machine:
        """Prepare files, launch QEMU, connect QMP, wait for the guest (cleans up on failure)."""
        if self._child is not None or self._closed:
            raise EIO("a Machine starts once", where="machine")
        t0 = time.monotonic()
        try:
            await self._prepare()
            self._spawn()
            assert self.files is not None
            self._qmp = await connect_qmp(
                self.files.qmp_socket,
                timeout=self.qmp_timeout,
                name=f"cma-qemu-{self.board.name}",
                alive=self._alive,
            )
            self._events = EventHub(self._qmp)
            self._events.start()
            self._memory = self._open_memory()
            if self._wait_ready:
                self.guest_channel = await self.console.wait_ready(self.boot_timeout)
                self.boot_time = time.monotonic() - t0
                if self._verify and self.reservations:
                    await verify_reservations(self.console, self.reservations)
        except CmaError as exc:
            booted = self.guest_channel is not None  # later errors are about the guest
            if self._console is not None and isinstance(exc, EIO) and not booted:
                # QEMU's own error (bad option, missing file) is on the console: collect it
                await asyncio.to_thread(self._console.drain, 1.0)
            await self._fail_close()
            if isinstance(exc, EIO | ENODEV) and self._console is not None and not booted:
                tail = self._console.tail()
                if tail and tail not in exc.message:
                    exc.message += f"; last console lines:\n{tail}"
            raise
        except BaseException:
            await self._fail_close()
            raise
        self._started = True
        return self

    async def _fail_close(self) -> None:
        with contextlib.suppress(Exception):
            await self.close(timeout=2.0)

    async def _prepare(self) -> None:
        """Runtime dir, RAM file, guest image, DTB; checks reservations against the loader."""
        board = self.board
        _, total, _ = ram_extent(board)
        parent = self._runtime_parent or rundir.default_parent()
        for swept in rundir.sweep({parent, rundir.default_parent()}):
            log.info("removed %s: its agent is gone", swept)
        runtime = rundir.create(parent)
        self._leftovers.paths.append(runtime)
        ram_file = None
        if uses_ram_file(board):
            fd, ram_file = guest_ram(total, f"cma-qemu-{board.name}")
            self._leftovers.fds.append(fd)
        self.files = files = LaunchFiles.in_dir(runtime, ram_file)

        image = self._image
        if image is None:
            from cma_qemu.guest_image import find_guest

            image = self._image = find_guest(board.kernel_flavour)
        self.loaded = await asyncio.to_thread(
            write_patched_dtb,
            board,
            image,
            files,
            self.reservations,
            compatible=self._compatible,
            qemu=self._qemu,
        )
        self.argv = qemu_command(
            board, image, files, append=self._append, extra_args=self._extra, qemu=self._qemu
        )

    def _spawn(self) -> None:
        if shutil.which(self._qemu) is None:
            raise ENODEV(f"{self._qemu} not found: install qemu-system-arm", where="qemu")
        log.info("launching %s", " ".join(self.argv))
        child = pexpect.spawn(
            self.argv[0],
            self.argv[1:],
            encoding="utf-8",
            codec_errors="replace",
            timeout=None,
            echo=False,
            dimensions=(50, 250),
            preexec_fn=_die_with(os.getpid()),
        )
        child.delaybeforesend = None
        self._child = child
        pid = child.pid
        assert pid is not None
        self._leftovers.pid = pid
        # A console UART with a FIFO register (the profile's; Exynos: QEMU 7.2 loses a receive
        # FIFO filled to 64 bytes): type lines in bursts, each once the FIFO has room.
        profile = profile_of(self.board)
        if profile.console_fifo_status is not None:
            self._console = Console(
                child,
                pacing=(profile.console_burst, 0.001),
                fifo_level=self._console_fifo_level,
            )
        else:
            self._console = Console(child)
        self._loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, AttributeError):
            self._pidfd = os.pidfd_open(pid)
            asyncio.get_running_loop().add_reader(self._pidfd, self._on_exit)

    def _console_fifo_level(self) -> int:
        """The console UART's receive FIFO level, from a console thread (0 before QMP is up)."""
        qmp, loop = self._qmp, self._loop
        if qmp is None or loop is None or not loop.is_running():
            return 0
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is loop:
                return 0  # typed from the loop itself: cannot wait on it here
        status = profile_of(self.board).console_fifo_status
        if status is None:
            return 0
        future = asyncio.run_coroutine_threadsafe(uart_rx_level(qmp, status), loop)
        try:
            return future.result(timeout=5)
        except Exception:  # QMP gone: the console will fail on its own terms
            return 0

    def _alive(self) -> bool:
        """QEMU still exists (pidfd when the kernel has it, else pexpect's waitpid poll)."""
        if self._exited.is_set():
            return False
        return self._pidfd is not None or (self._child is not None and self._child.isalive())

    def _on_exit(self) -> None:
        """pidfd readable: QEMU exited (reaping stays with pexpect)."""
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
        self._exited.set()
        if not self._closing and self._started:
            log.warning("QEMU for %s exited unexpectedly", self.board.name)
        if self._events is not None:
            task = asyncio.ensure_future(self._events.close())
            task.add_done_callback(lambda _t: None)

    def _open_memory(self) -> GuestMemory:
        assert self.files is not None and self._qmp is not None
        base, total, banks = ram_extent(self.board)
        if self.files.ram_file is not None:
            return MmapGuestMemory(self.files.ram_file, base, total, banks)
        if _gdb_writes(self.board, self.files):
            assert self.files.gdb_socket is not None
            return GdbStubGuestMemory(
                self._qmp,
                self.files.runtime_dir,
                self.files.gdb_socket,
                base,
                total,
                banks,
                events=self._events,
            )
        return PmemsaveGuestMemory(self._qmp, self.files.runtime_dir, base, total, banks)

    async def wait_ready(self, timeout: float | None = None, *, since: int | None = None) -> str:
        """Wait for the guest's next ready marker (after a reset, say); returns its channel."""
        self.guest_channel = await self.console.wait_ready(
            self.boot_timeout if timeout is None else timeout, since=since
        )
        return self.guest_channel

    async def wait_exit(self, timeout: float | None = None) -> bool:
        """Wait until QEMU exits; False on timeout."""
        if self._child is None:
            return True
        if self._pidfd is None:  # no pidfd: poll
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._child.isalive():
                if deadline is not None and time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.05)
            self._exited.set()
            return True
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def quit(self, timeout: float = 5.0) -> bool:
        """Ask QEMU to quit over QMP; True if it exited within ``timeout``."""
        if self._qmp is not None and not self._exited.is_set():
            with contextlib.suppress(QMPError, OSError, EOFError, TimeoutError, RuntimeError):
                await asyncio.wait_for(self._qmp.execute("quit"), timeout)
        return await self.wait_exit(timeout)

    def kill(self) -> None:
        """SIGKILL QEMU now (cleanup still happens on close)."""
        pid = self.pid
        if pid is not None and not self._exited.is_set():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def close(self, timeout: float = 5.0) -> None:
        """Quit QEMU (QMP ``quit``, then SIGKILL) and remove every file; idempotent."""
        if self._closed:
            return
        self._closed = self._closing = True
        try:
            if self._child is not None and not await self.quit(timeout):
                log.warning("QEMU for %s ignored quit; killing it", self.board.name)
                self.kill()
                await self.wait_exit(timeout)
            if self._events is not None:
                await self._events.close()
            if self._qmp is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._qmp.disconnect(), timeout)
            if self._memory is not None:
                await self._memory.close()
        finally:
            self._teardown()

    def _teardown(self) -> None:
        """The synchronous, always-run part of close: process, console, files."""
        if self._pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._pidfd)
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = None
        if isinstance(self._memory, MmapGuestMemory):
            with contextlib.suppress(Exception):
                self._memory.close_sync()
        if self._console is not None:
            self._console.close()
        if self._child is not None:
            if self._exited.is_set():
                # QEMU is gone already (pidfd): skip ptyprocess's 0.1 s "give the kernel
                # time" sleep in close(), a tenth of a second on every shutdown
                ptyproc = getattr(self._child, "ptyproc", None)
                if ptyproc is not None:
                    ptyproc.delayafterclose = 0
            with contextlib.suppress(Exception):
                self._child.close(force=True)
            self.exit_status = self._child.exitstatus
            if self._child.signalstatus is not None:
                self.exit_status = -self._child.signalstatus
        self._leftovers()
        self._finalizer.detach()
