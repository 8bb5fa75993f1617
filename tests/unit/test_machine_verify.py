"""Parsing /proc/iomem and the kernel's reserved-memory lines; the verification rules."""

from __future__ import annotations

import pytest

from cma_qemu.errors import EADDRINUSE, EIO
from cma_qemu.machine.verify import (
    check_reservations,
    parse_iomem,
    parse_reserved_memory_log,
    system_ram,
    verify_reservations,
)

MiB = 1 << 20

IOMEM = """\
09000000-09000fff : pl011@9000000
  09000000-09000fff : 9000000.pl011 pl011@9000000
0a003e00-0a003fff : a003e00.virtio_mmio virtio_mmio@a003e00
40000000-4fffffff : System RAM
  40208000-415fffff : Kernel code
  41800000-4190ffff : Kernel data
51000000-51ffffff : System RAM
52100000-5fffffff : System RAM
4010000000-401fffffff : PCI ECAM
"""

DMESG = """\
[    0.000000] Booting Linux on physical CPU 0x0
[    0.000000] Reserved memory: created DMA memory pool at 0x0000000050000000, size 16 MiB
[    0.000000] OF: reserved mem: initialized node mfc_b1@50000000, compatible id shared-dma-pool
[    0.000000] Reserved memory: created DMA memory pool at 0x0000000052000000, size 1 MiB
[    0.000000] OF: reserved mem: initialized node cma@52000000, compatible id shared-dma-pool
"""

GOOD = [("mfc_b1", 0x50000000, 16 * MiB), (None, 0x52000000, MiB)]


def test_parse_iomem() -> None:
    entries = parse_iomem(IOMEM)
    assert entries[1].depth == 1 and entries[1].name == "9000000.pl011 pl011@9000000"
    ram = system_ram(entries)
    assert [(e.start, e.end) for e in ram] == [
        (0x40000000, 0x50000000),
        (0x51000000, 0x52000000),
        (0x52100000, 0x60000000),
    ]
    assert entries[-1].start == 0x4010000000


def test_parse_log() -> None:
    log = parse_reserved_memory_log(DMESG)
    assert log.errors == ()
    assert log.pools == ((0x50000000, 16 * MiB), (0x52000000, MiB))
    assert log.initialized == (("mfc_b1@50000000", 0x50000000), ("cma@52000000", 0x52000000))


def test_good_reservations_pass() -> None:
    check_reservations(DMESG, IOMEM, GOOD)


def test_range_still_in_system_ram() -> None:
    with pytest.raises(EADDRINUSE, match="x 0x4f000000-0x4f0fffff is still System RAM"):
        check_reservations(DMESG, IOMEM, [("x", 0x4F000000, MiB)])
    with pytest.raises(EADDRINUSE, match="private region"):
        check_reservations(DMESG, IOMEM, [(None, 0x52000000, 2 * MiB)])


@pytest.mark.parametrize(
    "line",
    [
        "[    0.000000] OF: fdt: Reserved memory: failed to reserve memory for node 'a@1': "
        "base 0x40000000, size 16 MiB",
        "[    0.000000] OF: fdt: Reserved memory: unsupported node format, ignoring",
        "[    0.000000] OF: reserved mem: OVERLAP DETECTED!",
    ],
)
def test_kernel_complaints_are_errors(line: str) -> None:
    with pytest.raises(EIO, match="rejected a reserved-memory node"):
        check_reservations(DMESG + line + "\n", IOMEM, GOOD)


def test_pool_size_mismatch() -> None:
    dmesg = DMESG.replace("size 16 MiB", "size 8 MiB")
    with pytest.raises(EIO, match="pool of 0x800000 bytes, the node asked for 0x1000000"):
        check_reservations(dmesg, IOMEM, GOOD)


def test_unreadable_iomem() -> None:
    zeroed = "00000000-00000000 : System RAM\n"
    with pytest.raises(EIO, match="no addresses"):
        check_reservations(DMESG, zeroed, GOOD)
    with pytest.raises(EIO, match="no System RAM"):
        check_reservations(DMESG, "09000000-09000fff : pl011\n", GOOD)


class FakeConsole:
    def __init__(self, outputs: dict[str, tuple[str, int]]) -> None:
        self.outputs = outputs

    async def run(self, cmd: str, timeout: float = 30.0) -> tuple[str, int]:
        return self.outputs[cmd]


def test_nodes_carry_the_region_names() -> None:
    nodes = ["mfc_b1@50000000", "cma@52000000", "region-mfc-left"]
    check_reservations(DMESG, IOMEM, GOOD, nodes)
    with pytest.raises(EIO, match=r"mfc_b1 at 0x50000000: .* no /proc/device-tree/reserved-mem"):
        check_reservations(DMESG, IOMEM, GOOD, nodes[1:])
    renamed = DMESG.replace("node mfc_b1@50000000", "node other@50000000")
    with pytest.raises(EIO, match="initialized node other@50000000 there, not mfc_b1@50000000"):
        check_reservations(renamed, IOMEM, GOOD, nodes)
    # escaped names (',XX') are whole node names in the log, commas included
    log = parse_reserved_memory_log(
        "Reserved memory: created DMA memory pool at 0x50000000, size 16 MiB\n"
        "OF: reserved mem: initialized node a,20b@50000000, compatible id shared-dma-pool\n"
    )
    assert log.initialized == (("a,20b@50000000", 0x50000000),)
    check_reservations(
        log_text := DMESG.replace("mfc_b1@", "a,20b@"), IOMEM, [("a b", 0x50000000, 16 * MiB)]
    )
    assert "a,20b@50000000" in log_text


async def test_verify_over_a_console() -> None:
    listing = ("mfc_b1@50000000\ncma@52000000\n", 0)
    await verify_reservations(
        FakeConsole(
            {
                "dmesg": (DMESG, 0),
                "cat /proc/iomem": (IOMEM, 0),
                "ls -1 /proc/device-tree/reserved-memory": listing,
            }
        ),
        GOOD,
    )
    with pytest.raises(EIO, match="no /proc/device-tree/reserved-memory/cma@52000000"):
        await verify_reservations(
            FakeConsole(
                {
                    "dmesg": (DMESG, 0),
                    "cat /proc/iomem": (IOMEM, 0),
                    "ls -1 /proc/device-tree/reserved-memory": ("mfc_b1@50000000\n", 0),
                }
            ),
            GOOD,
        )
    with pytest.raises(EIO, match="dmesg failed"):
        await verify_reservations(FakeConsole({"dmesg": ("", 1)}), GOOD)
