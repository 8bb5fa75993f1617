"""Serving a QEMU the test started itself: ``Agent.attach`` and ``cma-qemu attach``.

The test does what any harness does: ``cma-qemu qemu-command virt --dir DIR --json`` writes the
patched DTB and the RAM file into DIR and prints the argv, which the test starts as a process
of its own (pexpect, so it can drive the guest console; no descriptor of the CLI is involved),
with a second QMP socket of its own added (QEMU serves one client per QMP socket and the agent
holds the first). One QEMU boot serves the whole module; the last test shuts it down and
checks that ``cma-qemu attach`` notices.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pexpect
import pytest
from machine_helpers import PROMPT, STUB_PROMPT, HarnessQemu, until
from qemu.qmp import QMPClient

from cma_qemu.agent import Agent
from cma_qemu.boards import load_board
from cma_qemu.channel import ChannelServer
from cma_qemu.configuration import build_cma
from cma_qemu.first_json import read_first_json

pytestmark = [
    pytest.mark.e2e,
]

CLI = str(Path(sys.executable).with_name("cma-qemu"))
BOARD = load_board("virt")
RESERVATIONS = [(r.name, r.start, r.size) for r in build_cma(board=BOARD).regions]


@dataclass(frozen=True)
class Files:
    """What ``qemu-command --json`` names."""

    qmp_socket: Path
    channel_socket: Path
    ram: Path


@dataclass
class Qemu(HarnessQemu):
    files: Files = field(kw_only=True)
    attach: list[str] = field(kw_only=True)  # the `cma-qemu attach` command qemu-command printed

    def stub_send(self, line: str) -> str:
        self.child.sendline(line)
        self.expect(STUB_PROMPT)
        return str(self.child.before).replace("\r", "")


def qemu_command(run: Path) -> dict[str, Any]:
    """``cma-qemu qemu-command virt --dir RUN --json``, as a harness runs it."""
    out = subprocess.run(
        [CLI, "qemu-command", "virt", "--dir", str(run), "--json"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    return dict(json.loads(out))


@pytest.fixture(scope="module")
def qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qemu]:
    run = tmp_path_factory.mktemp("att")
    info = qemu_command(run)
    assert [(r["name"], r["start"], r["size"]) for r in info["regions"]] == RESERVATIONS
    files = Files(Path(info["qmp"]), Path(info["channel"]), Path(info["ram"]))
    assert files.ram.parent == run and files.ram.is_file()  # the harness's file, not a memfd
    control = run / "control.sock"
    argv = [*info["argv"], "-qmp", f"unix:{control},server=on,wait=off"]
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace")
    q = Qemu(child, control, files=files, attach=info["attach"])
    try:
        assert q.expect(r"cma-qemu: ready channel=(\S+?)\r*\n", 120).group(1) == "/dev/vport0p1"
        q.expect(PROMPT)
        ram = re.findall(r"^([0-9a-f]+)-([0-9a-f]+) : System RAM", q.shell("cat /proc/iomem"), re.M)
        for _, start, size in RESERVATIONS:  # booted with the regions reserved
            assert all(int(b, 16) < start or start + size <= int(a, 16) for a, b in ram), ram
        yield q
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close(force=True)


async def test_agent_attach_serves_the_guest_and_leaves_qemu_running(qemu: Qemu) -> None:
    agent = await Agent.attach(BOARD, qemu.files.qmp_socket, qemu.files.channel_socket)
    try:
        assert [(r.name, r.start, r.size) for r in agent.cma.regions] == RESERVATIONS
        start = await asyncio.to_thread(qemu.stub_alloc, "alloc vpu/dec 1M")
        chunk = agent.cma.chunk(start)
        assert chunk.region.name == "video" and chunk.requested == 0x100000
        assert chunk.owner == ChannelServer.owner_for(BOARD.channel.name)
        assert await asyncio.to_thread(qemu.stub_send, "write 1 0xc0ffee") == "write 1 0xc0ffee\n"
        assert await agent.find_mismatch(chunk, 0xC0FFEE) is None  # guest bytes, host view
        await asyncio.to_thread(qemu.stub_end)
        await until(lambda: agent.cma.chunks == [])
    finally:
        await agent.close()
    assert qemu.child.isalive()
    assert (await qemu.qmp("query-status"))["status"] == "running"
    out = await asyncio.to_thread(qemu.shell, "echo alive-$((40 + 2))")
    assert "alive-42" in out


async def test_cli_attach_monitor_sees_the_guest_and_exits_with_qemu(qemu: Qemu) -> None:
    f = qemu.files
    assert qemu.attach[:2] == ["cma-qemu", "attach"]
    proc = subprocess.Popen(
        [CLI, *qemu.attach[1:], "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        info = await asyncio.to_thread(read_first_json, proc, 30)
        assert (info["qmp"], info["channel"]) == (str(f.qmp_socket), str(f.channel_socket))
        assert [(r["name"], r["start"], r["size"]) for r in info["regions"]] == RESERVATIONS
        monitor = QMPClient("attach-test-monitor")
        await monitor.connect(info["monitor"])
        try:
            start = await asyncio.to_thread(qemu.stub_alloc, "alloc camera 1M")
            chunks = await monitor.execute("query-cma-chunks")
            assert [(c["addr"], c["region"]) for c in chunks] == [(start, "camera")]
            event = await asyncio.wait_for(monitor.events.get(), 5)
            assert event["event"] == "CMA_ALLOC"
            await asyncio.to_thread(qemu.stub_end)
            deadline = time.monotonic() + 10
            while await monitor.execute("query-cma-chunks"):
                assert time.monotonic() < deadline, "the stub's chunk was not freed"
                await asyncio.sleep(0.05)
        finally:
            await monitor.disconnect()

        t0 = time.monotonic()
        await qemu.qmp("quit")
        await asyncio.to_thread(qemu.expect, pexpect.EOF, 30)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not Path(info["monitor"]).exists()
