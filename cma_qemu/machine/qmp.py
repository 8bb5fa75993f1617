"""QMP helpers over ``qemu.qmp``: discovery, the memory map, events, and attaching to a QEMU
that someone else started.

Everything here works on a plain :class:`qemu.qmp.QMPClient`, so the same helpers serve the
agent's own :class:`~cma_qemu.machine.launch.Machine` and a QEMU a test harness launched with
its own command line (:func:`attach`). Parsers of HMP text (``info mtree -f``, ``info roms``)
are pure functions so they can be tested without QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, cast

from qemu.qmp import ConnectError, QMPClient, QMPError
from qemu.qmp.message import Message

from cma_qemu.errors import EIO, ENODEV, ETIMEDOUT
from cma_qemu.machine import rundir
from cma_qemu.machine.memory import GuestMemory, MmapGuestMemory, PmemsaveGuestMemory

__all__ = [
    "AttachedMachine",
    "BoardLike",
    "Chardev",
    "EventHub",
    "MemoryBackend",
    "MtreeRange",
    "QmpEvent",
    "RomEntry",
    "Subscription",
    "VirtSerialPort",
    "attach",
    "chardevs",
    "connect_qmp",
    "find_channel_chardev",
    "find_virtserialport",
    "hmp",
    "machine_ram_backend",
    "memory_backends",
    "memory_map",
    "open_guest_memory",
    "parse_info_roms",
    "parse_mtree",
    "pmemsave",
    "read_register",
    "rom_entries",
    "uart_rx_level",
    "virtserialports",
]

log = logging.getLogger(__name__)


# -- what this module needs from a board (cma_qemu.boards.Board satisfies it) ----------------


class RamBankLike(Protocol):
    @property
    def base(self) -> int: ...
    @property
    def size(self) -> int: ...


class ChannelLike(Protocol):
    @property
    def kind(self) -> str: ...
    @property
    def name(self) -> str: ...


class BoardLike(Protocol):
    """The fields of a board the machine layer reads."""

    @property
    def name(self) -> str: ...
    @property
    def machine_type(self) -> str: ...
    @property
    def cpu(self) -> str | None: ...
    @property
    def kernel_flavour(self) -> str: ...
    @property
    def ram(self) -> Sequence[RamBankLike]: ...
    @property
    def channel(self) -> ChannelLike: ...
    @property
    def memory_access(self) -> str: ...


def ram_extent(board: BoardLike) -> tuple[int, int, tuple[tuple[int, int], ...]]:
    """``(base, total size, banks)`` of a board's RAM."""
    banks = tuple((b.base, b.size) for b in board.ram)
    return min(b for b, _ in banks), sum(s for _, s in banks), banks


# -- connection and plain commands -----------------------------------------------------------


async def connect_qmp(
    path: str | os.PathLike[str],
    *,
    timeout: float = 10.0,
    name: str = "cma-qemu",
    alive: Callable[[], bool] | None = None,
) -> QMPClient:
    """Connect to a QMP Unix socket, retrying while QEMU is still creating it.

    ``alive`` lets a launcher stop retrying as soon as its QEMU has exited.
    """
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while True:
        if os.path.exists(path):  # connecting earlier only makes qemu.qmp log errors
            client = QMPClient(name)
            try:
                await client.connect(str(path))
                return client
            except (ConnectError, OSError) as exc:
                last = exc
        else:
            last = FileNotFoundError(f"{path} does not exist yet")
        if alive is not None and not alive():
            raise EIO(f"QEMU exited before its QMP socket accepted ({last})", where="qmp")
        if time.monotonic() >= deadline:
            raise ETIMEDOUT(f"no QMP server at {path} after {timeout:g} s ({last})", where="qmp")
        await asyncio.sleep(0.05)


async def qmp_call(qmp: QMPClient, cmd: str, args: dict[str, Any] | None = None) -> Any:
    """``qmp.execute`` with QMP failures turned into EIO that names the command."""
    try:
        return await qmp.execute(cmd, args)
    except QMPError as exc:
        raise EIO(f"QMP {cmd} failed: {exc}", where="qmp") from exc


async def hmp(qmp: QMPClient, command: str) -> str:
    """Run an HMP command through ``human-monitor-command`` and return its text."""
    out = await qmp_call(qmp, "human-monitor-command", {"command-line": command})
    return str(out).replace("\r", "")


_XP_WORD = re.compile(r":\s*0x([0-9a-fA-F]+)")


async def read_register(qmp: QMPClient, addr: int) -> int:
    """One 32-bit word of guest physical address space, device registers included (HMP ``xp``).

    Reading a status register this way has no side effects in QEMU's device models.
    """
    text = await hmp(qmp, f"xp /1wx {addr:#x}")
    match = _XP_WORD.search(text)
    if match is None:
        raise EIO(f"cannot read {addr:#x}: {text.strip()[:120]!r}", where="qmp")
    return int(match.group(1), 16)


async def uart_rx_level(qmp: QMPClient, ufstat: int, size: int = 64) -> int:
    """Bytes in a Samsung UART's receive FIFO (UFSTAT: count in bits 7:0, full in bit 8)."""
    value = await read_register(qmp, ufstat)
    return size if value & 0x100 else value & 0xFF


async def pmemsave(qmp: QMPClient, addr: int, size: int, path: str | os.PathLike[str]) -> None:
    """Dump guest-physical ``[addr, addr + size)`` into ``path`` (written by QEMU itself)."""
    await qmp_call(qmp, "pmemsave", {"val": addr, "size": size, "filename": str(path)})


# -- memory backends --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MemoryBackend:
    """One ``memory-backend-*`` object under ``/objects``."""

    id: str
    type: str
    size: int
    share: bool
    mem_path: str | None

    @property
    def qom_path(self) -> str:
        return f"/objects/{self.id}"


async def memory_backends(qmp: QMPClient) -> list[MemoryBackend]:
    """Every memory backend object, with its file for ``memory-backend-file``."""
    try:
        children = await qmp.execute("qom-list", {"path": "/objects"})
    except QMPError:  # no -object on the command line: QEMU has no /objects container
        return []
    found = []
    for child in cast(list[dict[str, Any]], children):
        ctype = str(child.get("type", ""))
        m = re.fullmatch(r"child<(memory-backend-[\w-]+)>", ctype)
        if not m:
            continue
        oid = str(child["name"])
        path = f"/objects/{oid}"
        size = int(await qmp_call(qmp, "qom-get", {"path": path, "property": "size"}))
        share = bool(await qmp_call(qmp, "qom-get", {"path": path, "property": "share"}))
        mem_path = None
        if m.group(1) == "memory-backend-file":
            mem_path = str(await qmp_call(qmp, "qom-get", {"path": path, "property": "mem-path"}))
        found.append(MemoryBackend(oid, m.group(1), size, share, mem_path))
    return found


async def machine_ram_backend(qmp: QMPClient) -> MemoryBackend | None:
    """The backend named by ``-machine memory-backend=``, or None for legacy ``-m`` RAM."""
    try:
        name = await qmp.execute("qom-get", {"path": "/machine", "property": "memory-backend"})
    except QMPError:
        return None
    name = str(name or "").removeprefix("/objects/")
    if not name:
        return None
    for backend in await memory_backends(qmp):
        if backend.id == name:
            return backend
    return None


# -- the memory map ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MtreeRange:
    """One line of a flat view from ``info mtree -f``: ``[start, end)`` of a region."""

    start: int
    end: int
    priority: int
    kind: str
    name: str
    offset: int | None = None

    @property
    def size(self) -> int:
        return self.end - self.start


_MTREE_LINE = re.compile(
    r"^\s*(?P<start>[0-9a-f]+)-(?P<end>[0-9a-f]+)\s+\(prio (?P<prio>-?\d+), (?P<kind>[\w/-]+)\):"
    r"\s*(?P<name>\S+)(?:\s+@(?P<off>[0-9a-f]+))?"
)
_MTREE_AS = re.compile(r'^\s*AS "(?P<name>[^"]+)"')


def parse_mtree(text: str) -> dict[str, list[MtreeRange]]:
    """Parse ``info mtree -f`` into flat ranges per address space name.

    Flat views are shared between address spaces (``AS "memory"`` and ``AS "cpu-memory-0"``
    name the same view), so every AS line of a view gets the same list.
    """
    views: dict[str, list[MtreeRange]] = {}
    names: list[str] = []
    ranges: list[MtreeRange] = []

    def flush() -> None:
        for n in names:
            views[n] = list(ranges)

    for line in text.replace("\r", "").splitlines():
        if line.startswith("FlatView #"):
            flush()
            names, ranges = [], []
            continue
        if (m := _MTREE_AS.match(line)) is not None:
            names.append(m.group("name"))
            continue
        if (m := _MTREE_LINE.match(line)) is not None:
            off = m.group("off")
            ranges.append(
                MtreeRange(
                    int(m.group("start"), 16),
                    int(m.group("end"), 16) + 1,
                    int(m.group("prio")),
                    m.group("kind"),
                    m.group("name"),
                    int(off, 16) if off else None,
                )
            )
    flush()
    return views


async def memory_map(qmp: QMPClient, address_space: str = "memory") -> list[MtreeRange]:
    """The flat memory map of ``address_space`` (the CPU's view is ``"memory"``)."""
    views = parse_mtree(await hmp(qmp, "info mtree -f"))
    if address_space not in views:
        raise ENODEV(f"no address space {address_space!r} in info mtree", where="qmp")
    return views[address_space]


async def ram_ranges(qmp: QMPClient) -> list[MtreeRange]:
    """The RAM regions of the system address space (what the guest sees as DRAM)."""
    return [r for r in await memory_map(qmp) if r.kind == "ram"]


@dataclass(frozen=True, slots=True)
class RomEntry:
    """One ``info roms`` line: a blob QEMU's loader copies into the machine at reset."""

    name: str
    addr: int | None
    size: int
    mem: str | None


_ROM_ADDR = re.compile(
    r"^addr=(?P<addr>[0-9a-f]+)\s+size=0x(?P<size>[0-9a-f]+)\s+mem=(?P<mem>\w+)\s+"
    r'name="(?P<name>.*)"\s*$'
)
_ROM_FW = re.compile(r'^(?P<fw>\S+)\s+size=0x(?P<size>[0-9a-f]+)\s+name="(?P<name>.*)"\s*$')


def parse_info_roms(text: str) -> list[RomEntry]:
    """Parse ``info roms``; fw_cfg files (no guest address) come back with ``addr=None``."""
    out = []
    for line in text.replace("\r", "").splitlines():
        if (m := _ROM_ADDR.match(line.strip())) is not None:
            out.append(
                RomEntry(
                    m.group("name"),
                    int(m.group("addr"), 16),
                    int(m.group("size"), 16),
                    m.group("mem"),
                )
            )
        elif (m := _ROM_FW.match(line.strip())) is not None:
            out.append(RomEntry(m.group("name"), None, int(m.group("size"), 16), None))
    return out


async def rom_entries(qmp: QMPClient) -> list[RomEntry]:
    """What QEMU's loader put (or will put at reset) into guest memory."""
    return parse_info_roms(await hmp(qmp, "info roms"))


# -- character devices and the channel --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Chardev:
    """One ``query-chardev`` entry."""

    label: str
    filename: str
    frontend_open: bool

    def uses_socket(self, path: str | os.PathLike[str]) -> bool:
        """True if this is a Unix socket chardev at ``path`` (QEMU prefixes e.g. ``unix:``)."""
        return re.search(rf"unix:{re.escape(str(path))}(,|$)", self.filename) is not None


async def chardevs(qmp: QMPClient) -> list[Chardev]:
    """All character devices."""
    return [
        Chardev(str(c["label"]), str(c["filename"]), bool(c.get("frontend-open", False)))
        for c in await qmp_call(qmp, "query-chardev")
    ]


@dataclass(frozen=True, slots=True)
class VirtSerialPort:
    """A ``virtserialport`` device: its QOM path, guest-visible name and chardev label."""

    qom_path: str
    name: str
    chardev: str


async def virtserialports(qmp: QMPClient) -> list[VirtSerialPort]:
    """Every virtserialport, named (``-device ...,id=``) or anonymous."""
    ports = []
    for parent in ("/machine/peripheral", "/machine/peripheral-anon"):
        try:
            children = await qmp.execute("qom-list", {"path": parent})
        except QMPError:
            continue
        for child in cast(list[dict[str, Any]], children):
            if child.get("type") not in ("child<virtserialport>", "child<virtconsole>"):
                continue
            path = f"{parent}/{child['name']}"
            name = await qmp_call(qmp, "qom-get", {"path": path, "property": "name"})
            chardev = await qmp_call(qmp, "qom-get", {"path": path, "property": "chardev"})
            ports.append(VirtSerialPort(path, str(name or ""), str(chardev or "")))
    return ports


async def find_virtserialport(qmp: QMPClient, name: str) -> VirtSerialPort:
    """The virtserialport the guest sees as ``name``; ENODEV listing the ports otherwise."""
    ports = await virtserialports(qmp)
    for port in ports:
        if port.name == name:
            return port
    have = ", ".join(p.name or "(unnamed)" for p in ports) or "none"
    raise ENODEV(f"no virtserialport named {name!r} (ports: {have})", where="qmp")


async def find_channel_chardev(
    qmp: QMPClient, channel_path: str | os.PathLike[str], board: BoardLike
) -> Chardev:
    """The chardev behind the guest channel at host socket ``channel_path``.

    On virtio boards the chardev must also back the virtserialport with the board's channel
    name, so a socket wired to the wrong port is reported instead of silently used.
    """
    devs = await chardevs(qmp)
    matches = [c for c in devs if c.uses_socket(channel_path)]
    if not matches:
        have = "; ".join(f"{c.label}={c.filename}" for c in devs)
        raise ENODEV(f"no chardev listens on {channel_path} (chardevs: {have})", where="qmp")
    dev = matches[0]
    if board.channel.kind == "virtio-serial":
        port = await find_virtserialport(qmp, board.channel.name)
        if port.chardev != dev.label:
            raise ENODEV(
                f"virtserialport {port.name!r} uses chardev {port.chardev!r}, but "
                f"{channel_path} is chardev {dev.label!r}",
                where="qmp",
            )
    return dev


# -- events -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """A QMP event: its name, data and QEMU's timestamp (seconds since the epoch)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0

    @classmethod
    def from_message(cls, msg: Message | dict[str, Any]) -> QmpEvent:
        raw = cast(dict[str, Any], dict(msg))
        ts = cast(dict[str, Any], raw.get("timestamp") or {})
        stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        return cls(str(raw["event"]), dict(raw.get("data") or {}), stamp)


EventCallback = Callable[[QmpEvent], "Awaitable[None] | None"]
_CLOSED = object()


class Subscription:
    """An async iterator of events with the given names (all events if none were given)."""

    def __init__(self, hub: EventHub, names: frozenset[str]) -> None:
        self._hub = hub
        self.names = names
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    def _offer(self, event: QmpEvent | object) -> None:
        if event is _CLOSED or not self.names or cast(QmpEvent, event).name in self.names:
            self._queue.put_nowait(event)

    def __aiter__(self) -> AsyncIterator[QmpEvent]:
        return self

    async def __anext__(self) -> QmpEvent:
        item = await self._queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        return cast(QmpEvent, item)

    async def get(self, timeout: float | None = None) -> QmpEvent:
        """The next event; ETIMEDOUT after ``timeout`` s, EIO if the hub closed."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            raise ETIMEDOUT(
                f"no QMP event {sorted(self.names) or 'at all'} in {timeout:g} s", where="qmp"
            ) from None
        except StopAsyncIteration:
            raise EIO("the QMP connection closed while waiting for an event", where="qmp") from None

    def close(self) -> None:
        self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Fans QEMU's events out to subscriptions and callbacks, and keeps a short history.

    It consumes the client's default listener (``qmp.events``), so it is the one place that
    reads events; RESET, SHUTDOWN, STOP, VSERPORT_CHANGE and friends all come through here.
    """

    def __init__(self, qmp: QMPClient, *, history: int = 256) -> None:
        self._qmp = qmp
        self.history: deque[QmpEvent] = deque(maxlen=history)
        self._subs: list[Subscription] = []
        self._callbacks: list[tuple[frozenset[str], EventCallback]] = []
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        """Start dispatching (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="qmp-events")

    async def _run(self) -> None:
        try:
            while True:
                msg = await self._qmp.events.get()
                self.dispatch(QmpEvent.from_message(msg))
        finally:
            for sub in list(self._subs):
                sub._offer(_CLOSED)

    def dispatch(self, event: QmpEvent) -> None:
        """Deliver one event (public so fakes and tests can inject events)."""
        self.history.append(event)
        for sub in list(self._subs):
            sub._offer(event)
        for names, cb in list(self._callbacks):
            if names and event.name not in names:
                continue
            try:
                result = cb(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
            except Exception:
                log.exception("QMP event callback %r failed on %s", cb, event.name)

    def subscribe(self, *names: str) -> Subscription:
        """A new subscription; use it as ``with hub.subscribe("RESET") as s: await s.get()``."""
        sub = Subscription(self, frozenset(names))
        self._subs.append(sub)
        if self._task is not None and self._task.done():
            sub._offer(_CLOSED)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    def on(self, callback: EventCallback, *names: str) -> Callable[[], None]:
        """Call ``callback(event)`` (sync or async) for each event; returns an unsubscriber."""
        entry = (frozenset(names), callback)
        self._callbacks.append(entry)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(entry)

        return remove

    def seen(self, name: str, predicate: Callable[[QmpEvent], bool] | None = None) -> bool:
        """True if the history holds an event ``name`` (matching ``predicate``)."""
        return any(e.name == name and (predicate is None or predicate(e)) for e in self.history)

    async def wait_for(
        self,
        name: str,
        timeout: float,
        predicate: Callable[[QmpEvent], bool] | None = None,
        *,
        include_history: bool = False,
    ) -> QmpEvent:
        """The next event ``name`` (or one already in the history) that matches ``predicate``."""
        if include_history:
            for e in reversed(self.history):
                if e.name == name and (predicate is None or predicate(e)):
                    return e
        deadline = time.monotonic() + timeout
        with self.subscribe(name) as sub:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ETIMEDOUT(f"no QMP event {name} in {timeout:g} s", where="qmp")
                event = await sub.get(left)
                if predicate is None or predicate(event):
                    return event

    async def close(self) -> None:
        """Stop dispatching; subscriptions end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for sub in list(self._subs):
            sub._offer(_CLOSED)
        for task in list(self._pending):
            task.cancel()


# -- guest memory and attach ------------------------------------------------------------------


async def open_guest_memory(
    qmp: QMPClient, board: BoardLike, tmpdir: str | os.PathLike[str]
) -> GuestMemory:
    """mmap of the shared RAM backend file when there is one, otherwise QMP pmemsave."""
    base, size, banks = ram_extent(board)
    if board.memory_access == "mmap":
        backend = await machine_ram_backend(qmp)
        if backend is not None and backend.share and backend.mem_path:
            if backend.size < size:
                raise EIO(
                    f"RAM backend {backend.id} has {backend.size:#x} bytes, board {board.name} "
                    f"needs {size:#x}",
                    where="qmp",
                )
            return MmapGuestMemory(backend.mem_path, base, size, banks)
        log.info("no shared RAM backend file: reading guest memory with pmemsave")
    return PmemsaveGuestMemory(qmp, tmpdir, base, size, banks)


@dataclass
class AttachedMachine:
    """A QEMU this process does not own: QMP, guest memory, the channel, events.

    Closing it disconnects and frees host resources; it never stops QEMU.
    """

    board: BoardLike
    qmp: QMPClient
    qmp_path: Path
    channel_path: Path
    channel_chardev: Chardev
    memory: GuestMemory
    events: EventHub
    _tmpdir: tempfile.TemporaryDirectory[str] | None = None

    async def close(self) -> None:
        """Disconnect; QEMU keeps running."""
        await self.events.close()
        await self.memory.close()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None

    async def __aenter__(self) -> AttachedMachine:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def attach(
    qmp_path: str | os.PathLike[str],
    channel_path: str | os.PathLike[str],
    board: BoardLike,
    *,
    timeout: float = 10.0,
) -> AttachedMachine:
    """Attach to a running QEMU through its QMP socket (see :class:`AttachedMachine`).

    Finds the RAM backend file for mmap when it is ``share=on`` (pmemsave otherwise) and the
    chardev serving ``channel_path``; raises ENODEV when the channel is not there.
    """
    qmp = await connect_qmp(qmp_path, timeout=timeout, name="cma-qemu-attach")
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        chardev = await find_channel_chardev(qmp, channel_path, board)
        rundir.sweep({tempfile.gettempdir(), rundir.default_parent()})  # dead agents' dirs
        tmp = tempfile.TemporaryDirectory(prefix="cma-qemu-attach-")
        os.chmod(tmp.name, 0o700)
        rundir.claim(tmp.name)  # swept by the next start if this process is killed
        memory = await open_guest_memory(qmp, board, tmp.name)
        hub = EventHub(qmp)
        hub.start()
        return AttachedMachine(
            board, qmp, Path(qmp_path), Path(channel_path), chardev, memory, hub, tmp
        )
    except BaseException:
        if tmp is not None:
            tmp.cleanup()
        with contextlib.suppress(Exception):
            await qmp.disconnect()
        raise
