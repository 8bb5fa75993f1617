"""The machine layer against real QEMU 7.2 on virt: one shared boot with two reservations,
plus short-lived QEMUs (no guest boot needed) for attach, kill -9 cleanup and cancellation."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from machine_helpers import board, guest_image

from cma_qemu.errors import EADDRINUSE, ETIMEDOUT, CmaError
from cma_qemu.machine.attached import attach
from cma_qemu.machine.launch import Machine
from cma_qemu.machine.loader import covering
from cma_qemu.machine.memory import MmapGuestMemory, PmemsaveGuestMemory
from cma_qemu.machine.qmp import (
    find_channel_chardev,
    memory_backends,
    ram_ranges,
    rom_entries,
)
from cma_qemu.machine.verify import parse_iomem, system_ram, verify_reservations

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.asyncio(loop_scope="module"),
]

MiB = 1 << 20
RESERVATIONS = [("mfc_b1", 0x50000000, 16 * MiB), (None, 0x52000000, MiB)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def virt() -> AsyncIterator[Machine]:
    b = board("virt")
    async with Machine(b, RESERVATIONS, image=guest_image(b.kernel_flavour)) as m:
        print(f"\nvirt: ready marker after {m.boot_time:.2f} s through Machine")
        yield m


async def test_reservations_are_holes_in_system_ram(virt: Machine) -> None:
    iomem, status = await virt.console.run("cat /proc/iomem")
    assert status == 0
    ram = [(e.start, e.end) for e in system_ram(parse_iomem(iomem))]
    assert ram == [(0x40000000, 0x50000000), (0x51000000, 0x52000000), (0x52100000, 0x60000000)]
    await verify_reservations(virt.console, RESERVATIONS)
    nodes, _ = await virt.console.run("ls /proc/device-tree/reserved-memory")
    assert sorted(nodes.split()) == sorted(["#address-cells", "#size-cells", "cma@52000000",
                                            "mfc_b1@50000000", "name", "ranges"])  # fmt: skip


async def test_loader_ranges_match_info_roms(virt: Machine) -> None:
    roms = {r.name.rsplit("/", 1)[-1]: r for r in await rom_entries(virt.qmp) if r.addr}
    image = guest_image("armmp-lpae")
    boot = covering(virt.loaded, "bootloader")
    assert roms["bootloader"].addr == boot.start and roms["bootloader"].size <= boot.size
    kernel = covering(virt.loaded, "kernel")
    zimage = roms[Path(image.kernel).name]
    assert zimage.addr is not None
    assert kernel.start <= zimage.addr and zimage.addr + zimage.size <= kernel.end
    initrd = covering(virt.loaded, "initrd")
    assert (roms[Path(image.initrd).name].addr, roms[Path(image.initrd).name].size) == (
        initrd.start, initrd.size)  # fmt: skip
    dtb = covering(virt.loaded, "dtb")
    assert (roms["dtb"].addr, roms["dtb"].size) == (dtb.start, dtb.size)


async def test_kernel_range_covers_what_the_guest_kernel_uses(virt: Machine) -> None:
    """The unpacked kernel lies beyond anything `info roms` shows; the loader range has it."""
    kernel = covering(virt.loaded, "kernel")
    iomem, _ = await virt.console.run("cat /proc/iomem")
    parts = [e for e in parse_iomem(iomem) if e.name in ("Kernel code", "Kernel data")]
    assert len(parts) == 2
    for e in parts:
        assert kernel.start <= e.start and e.end <= kernel.end, (e, kernel)
    roms = [r for r in await rom_entries(virt.qmp) if r.addr is not None]
    inside_kernel = parts[1].start  # kernel data: past the end of the loaded zImage
    assert not any(r.addr <= inside_kernel < r.addr + r.size for r in roms if r.addr)
    b = board("virt")
    with pytest.raises(EADDRINUSE, match=r"bad 0x.* overlaps the kernel 0x40010000-"):
        await Machine(b, [("bad", inside_kernel & ~(MiB - 1), MiB)],
                      image=guest_image(b.kernel_flavour)).start()  # fmt: skip


async def test_host_and_guest_share_reserved_memory(virt: Machine) -> None:
    assert isinstance(virt.memory, MmapGuestMemory)
    await virt.memory.write(0x50000000, (0xCAFEF00D).to_bytes(4, "little"))
    out, status = await virt.console.run("devmem 0x50000000 32")
    assert (out, status) == ("0xCAFEF00D", 0)
    out, status = await virt.console.run("devmem 0x52000010 32 0x12345678")
    assert status == 0, out
    assert await virt.memory.read(0x52000010, 4) == (0x12345678).to_bytes(4, "little")
    pmem = PmemsaveGuestMemory(virt.qmp, virt.runtime_dir, 0x40000000, 512 * MiB)
    assert await pmem.read(0x52000000, 0x100) == await virt.memory.read(0x52000000, 0x100)


async def test_qmp_discovery(virt: Machine) -> None:
    backends = await memory_backends(virt.qmp)
    assert [(b.id, b.mem_path, b.share) for b in backends] == [("ram0", str(virt.ram_path), True)]
    ram = await ram_ranges(virt.qmp)
    assert [(r.start, r.size) for r in ram] == [(0x40000000, 512 * MiB)]
    dev = await find_channel_chardev(virt.qmp, virt.channel_path, board("virt"))
    assert dev.label == "cma0"
    assert virt.guest_channel == "/dev/vport0p1"
    assert oct(virt.runtime_dir.stat().st_mode & 0o777) == "0o700"


async def test_events_follow_the_guest_port(virt: Machine) -> None:
    seen: list[bool] = []
    remove = virt.on_event(lambda e: seen.append(bool(e.data["open"])), "VSERPORT_CHANGE")
    with virt.subscribe("VSERPORT_CHANGE") as sub:
        await virt.console.check("exec 3<>/dev/vport0p1")
        opened = await sub.get(10)
        await virt.console.check("exec 3>&-")
        closed = await sub.get(10)
    remove()
    assert (opened.data["open"], closed.data["open"]) == (True, False)
    assert opened.data["id"] == "cmaport0"
    assert seen == [True, False]


async def test_console_exact_output(virt: Machine) -> None:
    assert await virt.console.run("echo one; echo two; sh -c 'exit 7'") == ("one\ntwo", 7)


async def test_reset_event_and_second_boot(virt: Machine) -> None:
    """system_reset: RESET arrives, the guest boots again, the console keeps working."""
    with virt.subscribe("RESET") as sub:
        await virt.qmp.execute("system_reset")
        event = await sub.get(10)
    assert event.data.get("guest") is False  # requested over QMP, not by the guest
    assert await virt.wait_ready(60) == "/dev/vport0p1"
    assert "Booting Linux" in virt.console.boot_log
    assert await virt.console.run("echo back") == ("back", 0)
    await verify_reservations(virt.console, RESERVATIONS)


async def test_verification_catches_a_node_the_kernel_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bypass the loader check and put a node on the kernel: the guest refuses, we notice."""
    from cma_qemu.machine import launch

    monkeypatch.setattr(launch, "check_reservations", lambda *_: None)
    b = board("virt")
    bad = [("on_kernel", 0x41000000, MiB)]
    with pytest.raises(CmaError, match="failed to reserve memory for node 'on_kernel@41000000'"):
        await Machine(b, bad, image=guest_image(b.kernel_flavour), runtime_parent=tmp_path).start()
    assert list(tmp_path.iterdir()) == []


def _own_qemu(tmp: Path, share: bool) -> tuple[subprocess.Popen[bytes], Path, Path, Path]:
    """QEMU with a test-made command line, paused (-S): enough for QMP, ROMs are in RAM."""
    qmp, chan, ram = tmp / "q.sock", tmp / "c.sock", tmp / "guest.ram"
    backend = (
        f"memory-backend-file,id=mem,size=512M,mem-path={ram},share={'on' if share else 'off'}"
    )
    args = [
        "qemu-system-arm", "-M", "virt,memory-backend=mem", "-cpu", "cortex-a15", "-m", "512M",
        "-object", backend,
        "-nodefaults", "-display", "none", "-S",
        "-kernel", str(guest_image("armmp-lpae").kernel),
        "-device", "virtio-serial-device,id=bus0",
        "-chardev", f"socket,id=port0,path={chan},server=on,wait=off",
        "-device", "virtserialport,bus=bus0.0,chardev=port0,name=org.cma.0",
        "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return proc, qmp, chan, ram


@pytest.mark.parametrize("share", [True, False])
async def test_attach_to_a_qemu_started_elsewhere(tmp_path: Path, share: bool) -> None:
    proc, qmp, chan, ram = _own_qemu(tmp_path, share)
    try:
        async with await attach(qmp, chan, board("virt")) as a:
            assert a.channel_chardev.label == "port0"
            if share:
                assert isinstance(a.memory, MmapGuestMemory) and a.memory.path == ram
            else:
                assert isinstance(a.memory, PmemsaveGuestMemory)
            stub = await a.memory.read(0x40000000, 0x1C)  # QEMU's boot stub, ROM-loaded at reset
            assert stub != bytes(0x1C)
            assert (await a.qmp.execute("query-status"))["status"] == "prelaunch"  # type: ignore[index]
        assert proc.poll() is None  # attach never stops a QEMU it does not own
    finally:
        proc.kill()
        proc.wait()


async def test_cleanup_after_qemu_is_killed(tmp_path: Path) -> None:
    b = board("virt")
    m = Machine(b, image=guest_image(b.kernel_flavour), wait_ready=False, runtime_parent=tmp_path)
    async with m:
        pid, run_dir, ram = m.pid, m.runtime_dir, m.ram_path
        assert pid is not None and ram is not None and ram.exists() and run_dir.is_dir()
        os.kill(pid, signal.SIGKILL)
        assert await m.wait_exit(10)
        assert not m.running
    assert not run_dir.exists() and not ram.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    assert m.exit_status == -signal.SIGKILL


async def test_timeout_and_cancellation_clean_up(tmp_path: Path) -> None:
    b = board("virt")
    image = guest_image(b.kernel_flavour)
    m = Machine(b, image=image, boot_timeout=0.5, runtime_parent=tmp_path)
    with pytest.raises(ETIMEDOUT, match="ready marker"):
        await m.start()
    assert list(tmp_path.iterdir()) == [] and m.ram_path is not None and not m.ram_path.exists()

    m = Machine(b, image=image, runtime_parent=tmp_path)
    task = asyncio.create_task(m.start())
    deadline = time.monotonic() + 10
    while m.pid is None and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    pid = m.pid
    assert pid is not None
    task.cancel()  # what Ctrl-C does to asyncio.run()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_qemu_error_is_reported_with_its_message(tmp_path: Path) -> None:
    b = board("virt")
    m = Machine(b, image=guest_image(b.kernel_flavour), runtime_parent=tmp_path,
                extra_args=["-device", "no-such-device"])  # fmt: skip
    with pytest.raises(CmaError, match="'no-such-device' is not a valid device model name"):
        await m.start()
    assert list(tmp_path.iterdir()) == []
