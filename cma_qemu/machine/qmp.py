"""QMP calls over ``qemu.qmp``: connecting, HMP commands, registers, memory backends, the
memory map, ROMs, character devices and the guest channel's chardev.

Everything here works on a plain :class:`qemu.qmp.QMPClient`, so the same helpers serve the
agent's own :class:`~cma_qemu.machine.launch.Machine` and a QEMU someone else launched
(:mod:`cma_qemu.machine.attached`). Events are in :mod:`cma_qemu.machine.events`, the parsers
of HMP text in :mod:`cma_qemu.machine.hmp_text`.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from qemu.qmp import ConnectError, QMPClient, QMPError

from cma_qemu.errors import EIO, ENODEV, ETIMEDOUT
from cma_qemu.machine.hmp_text import MtreeRange, RomEntry, parse_info_roms, parse_mtree
from cma_qemu.machine.profiles import BoardLike

__all__ = [
    "Chardev",
    "MemoryBackend",
    "VirtSerialPort",
    "chardevs",
    "connect_qmp",
    "find_channel_chardev",
    "find_virtserialport",
    "hmp",
    "machine_ram_backend",
    "memory_backends",
    "memory_map",
    "pmemsave",
    "qmp_call",
    "ram_ranges",
    "read_register",
    "rom_entries",
    "uart_rx_level",
    "virtserialports",
]


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


# -- the memory map and ROMs ------------------------------------------------------------------


async def memory_map(qmp: QMPClient, address_space: str = "memory") -> list[MtreeRange]:
    """The flat memory map of ``address_space`` (the CPU's view is ``"memory"``)."""
    views = parse_mtree(await hmp(qmp, "info mtree -f"))
    if address_space not in views:
        raise ENODEV(f"no address space {address_space!r} in info mtree", where="qmp")
    return views[address_space]


async def ram_ranges(qmp: QMPClient) -> list[MtreeRange]:
    """The RAM regions of the system address space (what the guest sees as DRAM)."""
    return [r for r in await memory_map(qmp) if r.kind == "ram"]


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
