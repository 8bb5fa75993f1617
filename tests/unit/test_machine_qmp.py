"""QMP helpers against canned QEMU 7.2 output and a fake client (no QEMU needed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from qemu.qmp import ExecuteError

from cma_qemu.errors import ENODEV, ETIMEDOUT
from cma_qemu.machine.events import EventHub, QmpEvent
from cma_qemu.machine.hmp_text import parse_info_roms, parse_mtree
from cma_qemu.machine.qmp import (
    Chardev,
    find_channel_chardev,
    find_virtserialport,
    machine_ram_backend,
    memory_backends,
)

MTREE = """\
FlatView #0
 AS "gpex-root", root: bus master container
 Root memory region: (none)
  No rendered FlatView

FlatView #1
 AS "memory", root: system
 AS "cpu-memory-0", root: system
 Root memory region: system
  0000000000000000-0000000003ffffff (prio 0, romd): virt.flash0
  0000000009000000-0000000009000fff (prio 0, i/o): pl011
  0000000010000000-000000003efeffff (prio 0, i/o): gpex_mmio_window @0000000010000000
  0000000040000000-000000005fffffff (prio 0, ram): mach-virt.ram
  0000004010000000-000000401fffffff (prio 0, i/o): pcie-mmcfg-mmio

FlatView #2
 AS "I/O", root: io
 Root memory region: io
  0000000000000000-000000000000ffff (prio 0, i/o): io
"""

ROMS = """\
/rom@etc/acpi/tables size=0x200000 name="etc/acpi/tables"
addr=0000000040000000 size=0x00001c mem=ram name="bootloader"
addr=0000000040010000 size=0x545200 mem=ram name="/tmp/vmlinuz"
addr=0000000048000000 size=0x0e35b4 mem=ram name="initrd.gz"
addr=00000000480e4000 size=0x204e20 mem=ram name="dtb"
"""


def test_parse_mtree() -> None:
    views = parse_mtree(MTREE)
    assert views["memory"] == views["cpu-memory-0"]
    ram = [r for r in views["memory"] if r.kind == "ram"]
    assert len(ram) == 1
    assert (ram[0].start, ram[0].size, ram[0].name) == (0x40000000, 0x20000000, "mach-virt.ram")
    window = next(r for r in views["memory"] if r.name == "gpex_mmio_window")
    assert window.offset == 0x10000000
    assert views["gpex-root"] == []
    assert views["I/O"][0].kind == "i/o"


def test_parse_info_roms() -> None:
    roms = parse_info_roms(ROMS)
    assert roms[0].addr is None and roms[0].name == "etc/acpi/tables"
    assert [(r.name, r.addr, r.size) for r in roms[1:]] == [
        ("bootloader", 0x40000000, 0x1C),
        ("/tmp/vmlinuz", 0x40010000, 0x545200),
        ("initrd.gz", 0x48000000, 0xE35B4),
        ("dtb", 0x480E4000, 0x204E20),
    ]


def test_chardev_socket_match() -> None:
    c = Chardev("cma0", "disconnected:unix:/run/x/channel.sock,server=on", False)
    assert c.uses_socket("/run/x/channel.sock")
    assert not c.uses_socket("/run/x/channel")
    assert Chardev("s", "unix:/a.sock", True).uses_socket("/a.sock")


class FakeQmp:
    """Answers qom-list / qom-get / query-chardev from a dict tree."""

    def __init__(self, tree: dict[str, Any], chardevs: list[dict[str, Any]] | None = None) -> None:
        self.tree = tree
        self.chardevs = chardevs or []
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def execute(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        args = args or {}
        if cmd == "query-chardev":
            return self.chardevs
        node = self.tree.get(args.get("path", ""))
        if node is None:
            raise ExecuteError(
                {"error": {"class": "DeviceNotFound", "desc": "not found"}},  # type: ignore[arg-type]
                {},  # type: ignore[arg-type]
                {},  # type: ignore[arg-type]
            )
        if cmd == "qom-list":
            return node["children"]
        if cmd == "qom-get":
            return node[args["property"]]
        raise AssertionError(cmd)


TREE = {
    "/objects": {"children": [{"name": "ram0", "type": "child<memory-backend-file>"},
                              {"name": "other", "type": "child<rng-random>"}]},
    "/objects/ram0": {"size": 512 << 20, "share": True, "mem-path": "/dev/shm/x.ram"},
    "/machine": {"memory-backend": "ram0"},
    "/machine/peripheral": {"children": []},
    "/machine/peripheral-anon": {"children": [
        {"name": "device[0]", "type": "child<virtio-serial-device>"},
        {"name": "device[1]", "type": "child<virtserialport>"}]},
    "/machine/peripheral-anon/device[1]": {"name": "org.cma.0", "chardev": "cma0"},
}  # fmt: skip


async def test_memory_backends_and_machine_backend() -> None:
    qmp: Any = FakeQmp(TREE)
    backends = await memory_backends(qmp)
    assert len(backends) == 1
    b = backends[0]
    assert (b.id, b.type, b.size, b.share, b.mem_path) == (
        "ram0", "memory-backend-file", 512 << 20, True, "/dev/shm/x.ram")  # fmt: skip
    assert (await machine_ram_backend(qmp)) == b
    assert await memory_backends(FakeQmp({})) == []  # type: ignore[arg-type]
    assert await machine_ram_backend(FakeQmp({})) is None  # type: ignore[arg-type]


class Chan:
    def __init__(self, kind: str, name: str) -> None:
        self.kind, self.name = kind, name


class Board:
    def __init__(self, kind: str, name: str) -> None:
        self.name = "b"
        self.channel = Chan(kind, name)


async def test_channel_discovery() -> None:
    devs: list[dict[str, Any]] = [
        {"label": "cma0", "filename": "disconnected:unix:/r/ch.sock,server=on"},
        {"label": "console0", "filename": "stdio", "frontend-open": True},
    ]
    qmp: Any = FakeQmp(TREE, devs)
    port = await find_virtserialport(qmp, "org.cma.0")
    assert port.chardev == "cma0"
    with pytest.raises(ENODEV, match=r"ports: org\.cma\.0"):
        await find_virtserialport(qmp, "org.cma.9")
    board: Any = Board("virtio-serial", "org.cma.0")
    assert (await find_channel_chardev(qmp, "/r/ch.sock", board)).label == "cma0"
    with pytest.raises(ENODEV, match=r"no chardev listens on /r/other\.sock"):
        await find_channel_chardev(qmp, "/r/other.sock", board)
    wrong: Any = FakeQmp(TREE, [{"label": "x", "filename": "unix:/r/x.sock,server=on"}])
    with pytest.raises(ENODEV, match="uses chardev 'cma0'"):
        await find_channel_chardev(wrong, "/r/x.sock", board)
    uart: Any = Board("uart", "/dev/ttySAC1")
    assert (await find_channel_chardev(wrong, "/r/x.sock", uart)).label == "x"


async def test_event_hub() -> None:
    qmp: Any = FakeQmp({})
    hub = EventHub(qmp, history=3)
    hub.start()
    seen: list[str] = []
    async_seen: list[str] = []

    async def acb(e: QmpEvent) -> None:
        async_seen.append(e.name)

    remove = hub.on(lambda e: seen.append(e.name), "RESET")
    hub.on(acb)
    with hub.subscribe("VSERPORT_CHANGE") as sub:
        await qmp.events.put({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 5}})
        await qmp.events.put({"event": "RESET", "data": {"guest": True}})
        await qmp.events.put({"event": "VSERPORT_CHANGE", "data": {"id": "p", "open": True}})
        ev = await sub.get(2)
        assert ev.name == "VSERPORT_CHANGE" and ev.data["open"] is True
    assert seen == ["RESET"]
    remove()
    hub.dispatch(QmpEvent("RESET"))
    assert seen == ["RESET"]
    assert not hub.seen("STOP")  # the history is bounded
    assert hub.seen("VSERPORT_CHANGE", lambda e: bool(e.data["open"]))
    assert [e.name for e in hub.history] == ["RESET", "VSERPORT_CHANGE", "RESET"]  # bounded
    got = await hub.wait_for("RESET", 1, include_history=True)
    assert got.name == "RESET"
    waiter = asyncio.create_task(hub.wait_for("SHUTDOWN", 2, lambda e: bool(e.data.get("guest"))))
    await asyncio.sleep(0)
    await qmp.events.put({"event": "SHUTDOWN", "data": {"guest": False}})
    await qmp.events.put({"event": "SHUTDOWN", "data": {"guest": True}})
    assert (await waiter).data["guest"] is True
    with pytest.raises(ETIMEDOUT):
        await hub.wait_for("POWERDOWN", 0.05)
    await asyncio.sleep(0.01)
    assert "STOP" in async_seen
    sub2 = hub.subscribe()
    await hub.close()
    assert [e async for e in sub2] == []  # iteration ends when the hub closes
