"""Region names a node name cannot hold as they are reach the guest escaped, and decode back.

The agent's own verification runs at boot (each region's node must be in the guest's live
tree under :func:`node_name`'s name); here the guest is also asked directly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from cma_qemu.machine.devicetree import node_name, region_name
from cma_qemu.pytest_plugin import BoardSession

pytestmark = pytest.mark.e2e

RMEM = "/proc/device-tree/reserved-memory"
#: '/' and ':' are escaped, '_' cannot start a node name, 'é' is two UTF-8 bytes.
REGIONS = "vpu/dec=8M;_scratch=4M;caméra:0=4M;plain=4M"


def test_escaped_names_boot_and_decode(cma_boot: Callable[..., BoardSession]) -> None:
    board = cma_boot("virt", regions=REGIONS, map_text="*/*=plain")
    regions = {r.name: r for r in board.agent.cma.regions}
    assert set(regions) == {"vpu/dec", "_scratch", "caméra:0", "plain"}
    listed = set(board.guest.check(f"ls {RMEM}").split())
    expected = {
        "vpu/dec": "vpu,2fdec",
        "_scratch": "cma,,_scratch",
        "caméra:0": "cam,c3,a9ra,3a0",
        "plain": "plain",
    }
    for name, region in regions.items():
        node = node_name(name, region.start)
        assert node == f"{expected[name]}@{region.start:x}"
        assert node in listed
        assert region_name(node) == name
    dmesg = board.guest.check("dmesg")
    for name, region in regions.items():  # the kernel took each node by that name
        assert f"initialized node {node_name(name, region.start)}, compatible id" in dmesg
