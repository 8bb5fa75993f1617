"""``qmp-shell -H`` against a booted agent's monitor: the guest's chunk shows in ``info``.

tests/unit/test_qmp_shell.py covers the shell in depth against a monitor without QEMU; this
is the same tool on the real thing (the plugin's shared board, a chunk the guest stub holds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pexpect
import pytest

from cma_qemu.pytest_plugin import Guest, SyncAgent

pytestmark = pytest.mark.e2e

QMP_SHELL = Path(sys.executable).with_name("qmp-shell")
PROMPT = "(QEMU) "


def _hmp(child: pexpect.spawn[str], line: str) -> list[str]:
    child.send(line + "\r")
    child.expect_exact(PROMPT)
    lines = (child.before or "").replace("\r", "").splitlines()[1:]  # without the echo
    return [line for line in lines if line.strip()]  # qmp-shell ends its output with " "


def test_hmp_shell_sees_the_guest_chunk(agent: SyncAgent, guest: Guest, tmp_path: Path) -> None:
    # qmp-shell keeps its history in ~/.qmp-shell_history: a HOME of the test's own
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "dumb", "HOME": str(tmp_path)}
    child = pexpect.spawn(
        str(QMP_SHELL), ["-H", agent.monitor_path], encoding="utf-8", timeout=30, env=env
    )
    try:
        child.expect_exact(PROMPT)
        regions = {line.split()[0]: line.split() for line in _hmp(child, "info cma")[1:]}
        for region in agent.cma.regions:
            assert regions[region.name or "(private)"][1] == f"{region.start:#x}"
        with guest.stub() as stub:
            line = stub.send("alloc vpu/dec 1M")
            addr = int(line.split("@")[1], 16)
            rows = _hmp(child, "info chunks")
            owner = agent.chunk_at(addr).owner
            assert [f"{addr:#x}", "1M", "video", owner, "1"] in [r.split() for r in rows[1:]]
        assert _hmp(child, "info chunks") == ["no live chunks"]
        child.sendeof()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
