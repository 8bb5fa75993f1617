"""A stub killed with SIGKILL frees nothing itself: closing the port gives its chunks back."""

from __future__ import annotations

import time

import pytest

from cma_qemu.pytest_plugin import Guest, SyncAgent

pytestmark = pytest.mark.e2e


def _wait_until(predicate: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_killed_stub_releases_its_chunks(guest: Guest, agent: SyncAgent) -> None:
    guest.check("(echo 'alloc camera 2M'; sleep 600) | cma-test > /dev/null 2>&1 &")
    _wait_until(lambda: len(agent.guest_chunks()) == 1, "the background stub's chunk")
    held = agent.guest_chunks()[0]
    assert held.region.name == "camera" and held.requested == 2 << 20

    guest.check("kill -9 $(pidof cma-test)")  # no chance to free: only the port closes
    _wait_until(lambda: agent.guest_chunks() == [], "the port-closed release")
    assert agent.cma.region("camera").free_space == agent.cma.region("camera").size
    guest.run("kill $(pidof sleep) 2>/dev/null")
