"""Every board boots with its CMA regions reserved, checked from inside the guest.

One boot per board (the plugin's ``cma_boot`` shares it between the tests of that board). The
guest is asked directly, with busybox tools, instead of trusting the agent's own verifier:
``/proc/iomem`` (parsed here), the ``/proc/device-tree/reserved-memory`` nodes (their ``reg``
read with ``od``), the kernel log and the kernel command line.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable

import pytest

from cma_qemu.machine.devicetree import node_name, region_name
from cma_qemu.pytest_plugin import BoardSession

pytestmark = pytest.mark.e2e

BOARDS = ["virt", "aquila", "goni", "smdkc210"]
RMEM = "/proc/device-tree/reserved-memory"
MiB = 1 << 20

Boot = Callable[..., BoardSession]


@pytest.fixture(params=BOARDS)
def board(request: pytest.FixtureRequest, cma_boot: Boot) -> BoardSession:
    return cma_boot(request.param)


def _regions(board: BoardSession) -> list[tuple[str | None, int, int]]:
    regions = [(r.name, r.start, r.size) for r in board.agent.cma.regions]
    assert regions, "the agent reported no regions"
    return regions


def _iomem(board: BoardSession) -> list[tuple[int, int, str, int]]:
    """``(start, end exclusive, name, depth)`` of every /proc/iomem line in the guest."""
    text = board.guest.check("cat /proc/iomem")
    out = []
    for line in text.splitlines():
        m = re.fullmatch(r"( *)([0-9a-f]+)-([0-9a-f]+) : (.+)", line)
        assert m is not None, f"unexpected /proc/iomem line {line!r}"
        out.append((int(m[2], 16), int(m[3], 16) + 1, m[4], len(m[1]) // 2))
    return out


def _cells(board: BoardSession, path: str) -> list[int]:
    """A device-tree property as big-endian 32-bit cells (``od`` of the binary file)."""
    text = board.guest.check(f"od -An -v -tx1 {path}")
    raw = bytes(int(b, 16) for b in text.split())
    assert len(raw) % 4 == 0, (path, raw)
    return [int.from_bytes(raw[i : i + 4], "big") for i in range(0, len(raw), 4)]


def _join(cells: list[int]) -> int:
    value = 0
    for cell in cells:
        value = value << 32 | cell
    return value


def test_regions_are_holes_in_system_ram(board: BoardSession) -> None:
    entries = _iomem(board)
    ram = [(s, e) for s, e, name, depth in entries if name == "System RAM" and depth == 0]
    assert ram
    for name, start, size in _regions(board):
        for lo, hi in ram:
            assert hi <= start or start + size <= lo, (
                f"{name} {start:#x}+{size:#x} is System RAM {lo:#x}-{hi - 1:#x}"
            )
        banks = [(b.base, b.base + b.size) for b in board.agent.agent.board.ram]
        assert any(lo <= start and start + size <= hi for lo, hi in banks), (name, hex(start))


def test_reserved_memory_nodes_have_the_regions(board: BoardSession) -> None:
    acells = _cells(board, f"{RMEM}/#address-cells")
    scells = _cells(board, f"{RMEM}/#size-cells")
    assert (acells, scells) == (_cells(board, "/proc/device-tree/#address-cells"),
                                _cells(board, "/proc/device-tree/#size-cells"))  # fmt: skip
    na, ns = acells[0], scells[0]
    listing = board.guest.check(f"ls {RMEM}").split()
    nodes = {}
    for node in listing:
        if "@" in node:
            reg = _cells(board, f"{RMEM}/{node}/reg")
            assert len(reg) == na + ns, (node, reg)
            nodes[node] = (_join(reg[:na]), _join(reg[na:]))
    for name, start, size in _regions(board):
        node = node_name(name, start)
        assert nodes.get(node) == (start, size), f"{node}: {nodes}"
        assert region_name(node) == (name or "cma")  # the node name carries the region's
        board.guest.check(f"test -e {RMEM}/{node}/no-map")
        # the binding's properties only (dtschema's shared-dma-pool.yaml)
        props = board.guest.check(f"ls {RMEM}/{node}").split()
        assert sorted(props) == ["compatible", "name", "no-map", "reg"], props
    assert len(nodes) == len(_regions(board))  # nothing else reserved there


def test_kernel_log_and_command_line(board: BoardSession) -> None:
    dmesg = board.guest.check("dmesg")
    assert "failed to reserve" not in dmesg.lower()
    assert "OF: reserved mem" in dmesg  # the log does talk about the nodes
    cmdline = board.guest.check("cat /proc/cmdline").split()
    assert "cma=0" in cmdline
    # with cma=0 the kernel places no CMA area of its own
    assert not re.search(r"cma: Reserved \d+ MiB", dmesg), dmesg


def test_goni_regions_fall_in_its_banks(cma_boot: Boot) -> None:
    goni = cma_boot("goni")
    banks = [(b.base, b.base + b.size) for b in goni.agent.agent.board.ram]
    assert banks == [(0x40000000, 0x50000000), (0x50000000, 0x58000000)]
    for name, start, size in _regions(goni):
        assert any(lo <= start and start + size <= hi for lo, hi in banks), (name, hex(start))
    # System RAM and the regions tile the two banks exactly: no gap, no overlap
    ram = [(s, e) for s, e, n, d in _iomem(goni) if n == "System RAM" and d == 0]
    pieces = sorted(ram + [(s, s + n) for _, s, n in _regions(goni)])
    assert pieces[0][0] == 0x40000000 and pieces[-1][1] == 0x58000000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(pieces)), pieces


def test_aquila_mfc_b2_is_at_0x44000000(cma_boot: Boot) -> None:
    aquila = cma_boot("aquila")
    where = {name: (start, size) for name, start, size in _regions(aquila)}
    assert where["mfc_b2"] == (0x44000000, 16 * MiB)
    iomem = _iomem(aquila)
    assert any(s <= 0x44000000 - 1 < e for s, e, n, d in iomem if n == "System RAM" and d == 0)
    assert any(s <= 0x45000000 < e for s, e, n, d in iomem if n == "System RAM" and d == 0)
    assert "mfc_b2@44000000" in aquila.guest.check(f"ls {RMEM}").split()
