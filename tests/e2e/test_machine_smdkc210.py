"""One boot of each smdkc210 board (``smdkc210``, the net channel, and ``smdkc210-uart``):
reservations honoured in a DTB QEMU did not make, the channel, pmemsave reads, and the loader
rules on a second machine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from machine_helpers import board, guest_image

from cma_qemu.machine.gdbstub import GdbStubGuestMemory
from cma_qemu.machine.launch import Machine
from cma_qemu.machine.loader import covering
from cma_qemu.machine.qmp import find_channel_chardev, memory_backends, ram_ranges, rom_entries
from cma_qemu.machine.verify import parse_iomem, system_ram

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="module"),
]

MiB = 1 << 20
RESERVATIONS = [("fimc", 0x60000000, 16 * MiB), (None, 0x62000000, MiB)]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["smdkc210", "smdkc210-uart"])
async def smdk(request: pytest.FixtureRequest) -> AsyncIterator[Machine]:
    b = board(request.param)
    async with Machine(b, RESERVATIONS, image=guest_image(b.kernel_flavour)) as m:
        print(f"\n{b.name}: ready marker after {m.boot_time:.2f} s through Machine")
        yield m


async def test_holes_and_channel(smdk: Machine) -> None:
    iomem, _ = await smdk.console.run("cat /proc/iomem")
    ram = system_ram(parse_iomem(iomem))
    for _, start, size in RESERVATIONS:
        assert not any(e.overlaps(start, size) for e in ram)
    assert any(e.end == 0x60000000 for e in ram) and any(e.start == 0x61000000 for e in ram)
    assert any(e.start == 0x62100000 for e in ram)
    assert smdk.guest_channel == smdk.board.channel.name
    if smdk.board.channel.kind == "uart":
        assert smdk.guest_channel == "/dev/ttySAC1"
        dev = await find_channel_chardev(smdk.qmp, smdk.channel_path, smdk.board)
        assert dev.label == "cma0"
    else:  # smdkc210's default: the LAN9215, up at the guest's user-network address
        assert smdk.board.channel.kind == "net"
        out, status = await smdk.console.run("ifconfig eth0")
        assert status == 0 and "inet addr:10.0.2.15" in out, out


async def test_pmemsave_reads_what_the_guest_wrote(smdk: Machine) -> None:
    assert isinstance(smdk.memory, GdbStubGuestMemory)  # reads on pmemsave, writes on gdbstub
    assert smdk.ram_path is None and await memory_backends(smdk.qmp) == []
    out, status = await smdk.console.run("devmem 0x62000040 32 0xA5A55A5A")
    assert status == 0, out
    assert await smdk.memory.read(0x62000040, 4) == (0xA5A55A5A).to_bytes(4, "little")
    await smdk.memory.write(0x62000044, b"\x11\x22\x33\x44")  # in the test's reservation
    out, status = await smdk.console.run("devmem 0x62000044 32")
    assert status == 0 and out.strip().lower().endswith("0x44332211"), out
    ram = {(r.name, r.start, r.size) for r in await ram_ranges(smdk.qmp)}
    assert ("exynos4210.dram0", 0x40000000, 1 << 30) in ram  # plus the 128 KiB iram at 0x2020000


async def test_loader_ranges_match_info_roms(smdk: Machine) -> None:
    image = guest_image("armmp")
    roms = {r.name.rsplit("/", 1)[-1]: r for r in await rom_entries(smdk.qmp) if r.addr}
    assert roms["bootloader"].addr == covering(smdk.loaded, "bootloader").start
    kernel = covering(smdk.loaded, "kernel")
    zimage = roms[Path(image.kernel).name]
    assert zimage.addr is not None and kernel.start <= zimage.addr
    assert zimage.addr + zimage.size <= kernel.end
    initrd, dtb = covering(smdk.loaded, "initrd"), covering(smdk.loaded, "dtb")
    assert (roms[Path(image.initrd).name].addr, roms[Path(image.initrd).name].size) == (
        initrd.start, initrd.size)  # fmt: skip
    assert (roms["dtb"].addr, roms["dtb"].size) == (dtb.start, dtb.size)
