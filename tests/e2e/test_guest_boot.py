"""Build (cached) the virt guest image and boot it once: ready marker, modules, cma-test -h."""

from __future__ import annotations

import time
from pathlib import Path

import pexpect
import pytest

from cma_qemu.guest_image import build_guest

pytestmark = pytest.mark.e2e


def test_virt_guest_boots_to_ready_marker(tmp_path: Path) -> None:
    image = build_guest("armmp-lpae")  # cached; a failure here is a failed install step
    sock = tmp_path / "ch0.sock"
    args = [
        "-M", "virt", "-cpu", "cortex-a15", "-m", "512", "-nographic", "-no-reboot",
        "-nic", "none",  # the default virtio-net NIC wants efi-virtio.rom
        "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", "console=ttyAMA0 cma=0 cma_qemu.channel=org.cma.0",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=ch0,path={sock},server=on,wait=off",
        "-device", "virtserialport,chardev=ch0,name=org.cma.0",
    ]  # fmt: skip
    start = time.monotonic()
    child = pexpect.spawn("qemu-system-arm", args, encoding="utf-8", codec_errors="replace")
    try:
        child.expect(r"cma-qemu: ready channel=(\S+?)\r*\n", timeout=60)
        assert child.match.group(1) == "/dev/vport0p1"
        boot = time.monotonic() - start
        child.expect("cma# ", timeout=10)

        child.sendline("cma-test -h; echo rc=$?")
        child.expect(r"rc=(\d+)\r*\n", timeout=10)
        assert "usage: cma-test" in child.before
        assert child.match.group(1) == "0"
        child.expect("cma# ", timeout=10)

        child.sendline("cat /proc/modules | cut -d' ' -f1 | sort | tr '\\n' ' '; echo END")
        child.expect("END", timeout=10)  # the echoed command line
        child.expect("END", timeout=10)
        assert "virtio_console virtio_mmio" in child.before
        print(f"virt guest ready after {boot:.1f} s")

        child.sendline("exit")  # init powers the guest off when the shell exits
        child.expect(pexpect.EOF, timeout=30)
    finally:
        if child.isalive():
            child.terminate(force=True)
