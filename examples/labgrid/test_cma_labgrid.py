"""Tests a labgrid user writes: the guest through labgrid's shell, the host through the agent's
QMP monitor (``strategy.monitor_path``), so they run the same on a board here and on a board
of a farm's host (``remote-env.yaml``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from qemu.qmp import QMPClient

Monitor = Callable[..., Any]


@pytest.fixture(scope="module")
def shell(target: Any, strategy: Any) -> Any:
    strategy.transition("shell")
    return target.get_driver("ShellDriver")


@pytest.fixture
def monitor(strategy: Any, shell: Any) -> Monitor:
    """``monitor("query-cma-regions")``: one command to the agent's monitor."""

    def execute(command: str, arguments: dict[str, Any] | None = None) -> Any:
        async def run() -> Any:
            client = QMPClient("labgrid-example")
            await client.connect(strategy.monitor_path)
            try:
                return await client.execute(command, arguments)
            finally:
                await client.disconnect()

        return asyncio.run(run())

    return execute


def test_every_region_is_a_hole_in_system_ram(shell: Any, monitor: Monitor) -> None:
    lines = shell.run_check("cat /proc/iomem")
    ram = [
        tuple(int(x, 16) for x in line.split(" : ")[0].strip().split("-"))
        for line in lines
        if line.endswith(" : System RAM")
    ]
    assert ram
    regions = monitor("query-cma-regions")
    assert regions
    for region in regions:
        start, end = region["start"], region["start"] + region["size"] - 1
        assert all(end < low or high < start for low, high in ram)


def allocated_pages(monitor: Monitor) -> int:
    return sum(region["alloc_pages_success"] for region in monitor("query-cma-stats"))


def test_a_guest_allocation_is_counted_by_the_agent(shell: Any, monitor: Monitor) -> None:
    before = allocated_pages(monitor)
    out = shell.run_check("echo 'alloc vpu/dec 1M' | cma-test")
    assert out and out[0].startswith("1: 0x100000@"), out
    assert allocated_pages(monitor) == before + 256  # 1 MiB of 4 KiB pages
    assert monitor("query-cma-chunks") == []  # cma-test freed it when its input ended


def test_the_monitor_is_the_agents(monitor: Monitor) -> None:
    assert monitor("query-version")["package"].startswith("cma-qemu ")
