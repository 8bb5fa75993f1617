"""Allocators loaded while the agent runs, through the monitor's command table."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from cma_qemu.allocators.best_fit import BestFitAllocator
from cma_qemu.errors import EINVAL, ENOENT, ENOMEM
from cma_qemu.framework import Cma
from cma_qemu.monitor.commands import MonitorCommands
from cma_qemu.wire.arguments import Arguments


class LowestFirst(BestFitAllocator):
    """A third-party allocator: best fit under another name."""

    name = "lowest"


@pytest.fixture
def plugin_module() -> Iterator[str]:
    module = types.ModuleType("cma_test_plugin")
    module.LowestFirst = LowestFirst  # type: ignore[attr-defined]
    sys.modules["cma_test_plugin"] = module
    yield "cma_test_plugin:LowestFirst"
    del sys.modules["cma_test_plugin"]


def run(commands: MonitorCommands, name: str, **arguments: object) -> object:
    return commands.table[name](Arguments(arguments))


def test_region_waits_for_its_allocator_then_works(plugin_module: str) -> None:
    cma = Cma.from_attributes("a=16M:lowest;b=16M", ram=[(0x40000000, 0x10000000)])
    commands = MonitorCommands(cma)
    with pytest.raises(ENOMEM):
        cma.alloc_from("a", 4096)
    names = [a["name"] for a in run(commands, "query-cma-allocators")]  # type: ignore[index, union-attr]
    assert "lowest" not in names and names[0] == "bf"

    reply = run(commands, "cma-allocator-register", **{"class": plugin_module})
    assert reply == {"name": "lowest", "regions": ["a"]}
    chunk = cma.alloc_from("a", 4096)
    assert chunk.region.attached == "lowest"


def test_bad_targets_are_refused_and_nothing_changes() -> None:
    cma = Cma.from_attributes("a=16M", ram=[(0x40000000, 0x10000000)])
    commands = MonitorCommands(cma)
    before = cma.registry.names()
    with pytest.raises(EINVAL, match=r"package\.module:Class"):
        run(commands, "cma-allocator-register", **{"class": "no-colon"})
    with pytest.raises(ENOENT, match="cannot load"):
        run(commands, "cma-allocator-register", **{"class": "no_such_module_xyz:Thing"})
    with pytest.raises(EINVAL):
        run(commands, "cma-allocator-register", **{"class": "collections:OrderedDict"})
    assert cma.registry.names() == before
