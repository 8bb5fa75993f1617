"""Tests a labgrid user writes: the guest through labgrid's shell, the host through the agent."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from qemu.qmp import QMPClient


@pytest.fixture(scope="module")
def shell(target: Any, strategy: Any) -> Any:
    strategy.transition("shell")
    return target.get_driver("ShellDriver")


@pytest.fixture
def agent(strategy: Any, shell: Any) -> Any:
    return strategy.agent


def test_every_region_is_a_hole_in_system_ram(shell: Any, agent: Any) -> None:
    lines = shell.run_check("cat /proc/iomem")
    ram = [
        tuple(int(x, 16) for x in line.split(" : ")[0].strip().split("-"))
        for line in lines
        if line.endswith(" : System RAM")
    ]
    assert ram
    for region in agent.cma.regions:
        assert all(region.end <= low or high < region.start for low, high in ram)


def allocated_pages(agent: Any) -> int:
    return sum(region.alloc_pages_success for region in agent.cma.stats())


def test_a_guest_allocation_is_counted_by_the_agent(shell: Any, agent: Any) -> None:
    before = allocated_pages(agent)
    out = shell.run_check("echo 'alloc vpu/dec 1M' | cma-test")
    assert out and out[0].startswith("1: 0x100000@"), out
    assert allocated_pages(agent) == before + 256  # 1 MiB of 4 KiB pages
    assert agent.guest_chunks() == []  # cma-test freed it when its input ended


def test_the_monitor_answers_query_cma_regions(agent: Any) -> None:
    async def query() -> Any:
        client = QMPClient("labgrid-example")
        await client.connect(agent.monitor_path)
        try:
            return await client.execute("query-cma-regions")
        finally:
            await client.disconnect()

    regions = asyncio.run(query())
    assert sorted(r["name"] for r in regions) == sorted(r.name for r in agent.cma.regions)
