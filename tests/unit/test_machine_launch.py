"""QEMU command lines per board, and the Machine's checks before it launches anything."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cma_qemu.errors import EADDRINUSE, EINVAL, ENODEV
from cma_qemu.machine.launch import (
    LaunchFiles,
    Machine,
    _die_with,
    console_device,
    guest_ram,
    kernel_cmdline,
    machine_args,
    qemu_command,
    uses_ram_file,
)

MiB = 1 << 20


@dataclass(frozen=True)
class Bank:
    base: int
    size: int


@dataclass(frozen=True)
class Channel:
    kind: str
    name: str


@dataclass(frozen=True)
class FakeBoard:
    name: str = "virt"
    machine_type: str = "virt"
    cpu: str | None = "cortex-a15"
    kernel_flavour: str = "armmp-lpae"
    ram: tuple[Bank, ...] = (Bank(0x40000000, 512 * MiB),)
    channel: Channel = field(default_factory=lambda: Channel("virtio-serial", "org.cma.0"))
    memory_access: str = "mmap"


SMDK = FakeBoard(
    name="smdkc210",
    machine_type="smdkc210",
    cpu=None,
    kernel_flavour="armmp",
    ram=(Bank(0x40000000, 1 << 30),),
    channel=Channel("uart", "/dev/ttySAC1"),
    memory_access="pmemsave",
)
GOONI = FakeBoard(name="goni", ram=(Bank(0x40000000, 256 * MiB), Bank(0x50000000, 128 * MiB)))


@dataclass(frozen=True)
class Image:
    kernel: Path
    initrd: Path
    dtb: Path | None = None


def files(tmp: Path, ram: bool = True) -> LaunchFiles:
    return LaunchFiles.in_dir(tmp / "run", tmp / "shm.ram" if ram else None)


def opt_after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_virt_command_line(tmp_path: Path) -> None:
    b = FakeBoard()
    f = files(tmp_path)
    argv = qemu_command(b, Image(Path("/k"), Path("/i")), f, append=["quiet"])
    assert argv[0] == "qemu-system-arm"
    assert opt_after(argv, "-M") == ["virt,memory-backend=ram0"]
    assert opt_after(argv, "-cpu") == ["cortex-a15"]
    assert opt_after(argv, "-m") == ["512M"]
    assert opt_after(argv, "-object") == [
        f"memory-backend-file,id=ram0,size=512M,mem-path={tmp_path}/shm.ram,share=on"
    ]
    assert "-nodefaults" in argv
    assert opt_after(argv, "-serial") == ["chardev:console0"]
    assert opt_after(argv, "-device") == [
        "virtio-serial-device,id=vser0",
        "virtserialport,bus=vser0.0,chardev=cma0,id=cmaport0,name=org.cma.0",
    ]
    assert opt_after(argv, "-chardev") == [
        "stdio,id=console0,signal=off",
        f"socket,id=cma0,path={f.channel_socket},server=on,wait=off",
    ]
    assert opt_after(argv, "-qmp") == [f"unix:{f.qmp_socket},server=on,wait=off"]
    assert opt_after(argv, "-kernel") == ["/k"]
    assert opt_after(argv, "-initrd") == ["/i"]
    assert opt_after(argv, "-dtb") == [str(f.dtb)]
    assert opt_after(argv, "-append") == [
        "console=ttyAMA0 cma=0 panic=1 cma_qemu.channel=org.cma.0 quiet"
    ]


def test_smdkc210_command_line(tmp_path: Path) -> None:
    assert not uses_ram_file(SMDK)
    argv = qemu_command(SMDK, Image(Path("/k"), Path("/i"), Path("/d")), files(tmp_path, False))
    assert opt_after(argv, "-M") == ["smdkc210"]
    assert "-cpu" not in argv and "-m" not in argv and "-object" not in argv
    assert opt_after(argv, "-serial") == ["chardev:console0", "chardev:cma0"]
    assert "-device" not in argv
    assert "console=ttySAC0 cma=0 panic=1 cma_qemu.channel=/dev/ttySAC1" in argv


def test_banks_sum_to_m_and_commas_are_escaped(tmp_path: Path) -> None:
    assert opt_after(machine_args(GOONI, None), "-m") == ["384M"]
    margs = machine_args(GOONI, tmp_path / "a,b.ram")
    assert "mem-path=" + str(tmp_path / "a,,b.ram") in opt_after(margs, "-object")[0]
    with pytest.raises(EINVAL, match="multiple of 1 MiB"):
        machine_args(FakeBoard(ram=(Bank(0x40000000, MiB + 4096),)), None)


def test_console_and_cmdline() -> None:
    assert console_device(FakeBoard()) == "ttyAMA0"
    assert console_device(SMDK) == "ttySAC0"
    with pytest.raises(EINVAL):
        console_device(FakeBoard(machine_type="vexpress-a9"))
    assert kernel_cmdline(FakeBoard()).split() == [
        "console=ttyAMA0", "cma=0", "panic=1", "cma_qemu.channel=org.cma.0"]  # fmt: skip


def test_real_board_files_build(tmp_path: Path) -> None:
    from cma_qemu import boards

    for b in boards.list_boards():
        argv = qemu_command(b, Image(Path("/k"), Path("/i"), Path("/d")), files(tmp_path))
        assert opt_after(argv, "-M")[0].startswith(b.machine_type)
        assert f"console={b.console}" in opt_after(argv, "-append")[0]


def fake_zimage(path: Path) -> Path:
    data = bytearray(0x20000)
    struct.pack_into("<3I", data, 0x24, 0x016F2818, 0, len(data))
    struct.pack_into("<I", data, len(data) - 4, 8 * MiB)
    path.write_bytes(bytes(data))
    return path


async def test_machine_refuses_reservation_on_the_kernel(tmp_path: Path) -> None:
    """Checked before QEMU starts; nothing is left behind."""
    import fdt

    dtb = tmp_path / "board.dtb"
    tree = fdt.FDT()
    tree.header.version = 17
    tree.root.append(fdt.PropWords("#address-cells", 1))
    tree.root.append(fdt.PropWords("#size-cells", 1))
    aliases = fdt.Node("aliases")
    for index in range(2):
        uart = fdt.Node(f"serial@138{index}0000")
        uart.append(fdt.PropWords("dmas", 1, 2))
        tree.root.append(uart)
        aliases.append(fdt.PropStrings(f"serial{index}", f"/serial@138{index}0000"))
    tree.root.append(aliases)
    dtb.write_bytes(tree.to_dtb(version=17))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\0" * 4096)
    image = Image(fake_zimage(tmp_path / "zImage"), initrd, dtb)
    m = Machine(SMDK, [("mfc_b2", 0x40000000, 16 * MiB)], image=image, runtime_parent=tmp_path)
    with pytest.raises(EADDRINUSE, match="mfc_b2 0x40000000-0x40ffffff overlaps the bootloader"):
        await m.start()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.dtb", "initrd", "zImage"]
    assert not m.running


async def test_machine_without_dtb_for_smdkc210(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\0")
    image = Image(fake_zimage(tmp_path / "zImage"), initrd, None)
    with pytest.raises(ENODEV, match="no device tree"):
        async with Machine(SMDK, image=image, runtime_parent=tmp_path):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["initrd", "zImage"]


def test_guest_ram_has_no_name_and_goes_with_its_fd() -> None:
    """The RAM QEMU maps is an anonymous memfd reached through this process's fd table."""
    fd, path = guest_ram(4 * MiB, "cma-qemu-test")
    try:
        assert path == Path(f"/proc/{os.getpid()}/fd/{fd}")
        assert os.readlink(path) == "/memfd:cma-qemu-test (deleted)"  # on no file system
        assert os.fstat(fd).st_size == 4 * MiB
        with open(path, "r+b") as other:  # what QEMU does with mem-path: the same file
            other.write(b"\xc0\xde")
        assert os.pread(fd, 2, 0) == b"\xc0\xde"
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)
    assert not path.exists() or os.readlink(path) != "/memfd:cma-qemu-test (deleted)"


def _spawn_sleep(preexec: Callable[[], None]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "30"], preexec_fn=preexec)


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "Z":
            return True
        time.sleep(0.01)
    return False


def test_a_child_dies_with_the_thread_that_spawned_it() -> None:
    """PR_SET_PDEATHSIG follows the forking *thread*: why a Machine must start on a thread
    that lives as long as it does (the CLI's main thread, the plugin's loop thread)."""
    spawned: list[subprocess.Popen[bytes]] = []
    thread = threading.Thread(target=lambda: spawned.append(_spawn_sleep(_die_with(os.getpid()))))
    thread.start()
    thread.join()
    (child,) = spawned
    try:
        assert _gone(child.pid), "the child outlived the thread that forked it"
        assert child.wait(5) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()

    child = _spawn_sleep(_die_with(os.getpid()))  # this thread lives on: so does the child
    try:
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_a_child_whose_parent_is_already_gone_exits() -> None:
    """The prctl comes after the fork: a parent that died in between sent no signal."""
    child = _spawn_sleep(_die_with(os.getpid() + 1_000_000))  # "parent" is not ours
    assert child.wait(5) == 1
