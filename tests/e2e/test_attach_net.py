"""Attaching to a net-channel QEMU a harness started: ``cma-qemu qemu-command smdkc210``
then ``Agent.attach`` and ``cma-qemu attach``.

A net channel has no QEMU chardev: QEMU's guestfwd runs ``socat - UNIX-CONNECT:DIR/channel.sock``
for every guest connection, so the attaching agent listens at the ``--channel`` path that
``qemu-command`` printed. One QEMU boot serves the module; the guest's stubs before the agent
listens fail to connect, those after it are sessions ``guest:net:N`` of the attached agent.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pexpect
import pytest
from machine_helpers import PROMPT, HarnessQemu, until
from qemu.qmp import QMPClient

from cma_qemu.agent import Agent
from cma_qemu.boards import load_board
from cma_qemu.configuration import build_cma
from cma_qemu.first_json import read_first_json
from cma_qemu.framework import Chunk

pytestmark = [pytest.mark.e2e]

CLI = str(Path(sys.executable).with_name("cma-qemu"))
BOARD = load_board("smdkc210")  # its default channel is the net one
RESERVATIONS = [(r.name, r.start, r.size) for r in build_cma(board=BOARD).regions]


@dataclass
class Qemu(HarnessQemu):
    qmp_socket: Path = field(kw_only=True)
    channel_socket: Path = field(kw_only=True)
    attach: list[str] = field(kw_only=True)  # the `cma-qemu attach` command qemu-command printed
    timeout: ClassVar[float] = 60


@pytest.fixture(scope="module")
def qemu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Qemu]:
    run = tmp_path_factory.mktemp("attnet")
    argv = [CLI, "qemu-command", BOARD.name, "--dir", str(run), "--json"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60).stdout
    info = json.loads(out)
    assert [(r["name"], r["start"], r["size"]) for r in info["regions"]] == RESERVATIONS
    channel = Path(info["channel"])
    assert any(f"UNIX-CONNECT:{channel}" in arg for arg in info["argv"]), info["argv"]
    control = run / "control.sock"
    argv = [*info["argv"], "-qmp", f"unix:{control},server=on,wait=off"]
    child = pexpect.spawn(argv[0], argv[1:], encoding="utf-8", codec_errors="replace")
    q = Qemu(
        child,
        control,
        qmp_socket=Path(info["qmp"]),
        channel_socket=channel,
        attach=info["attach"],
    )
    try:
        ready = q.expect(r"cma-qemu: ready channel=(\S+?)\r*\n", 240).group(1)
        assert ready == BOARD.channel.name
        q.expect(PROMPT)
        yield q
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.close(force=True)


async def first_guest_allocates_then_ends(qemu: Qemu, agent: Agent) -> Chunk:
    """A stub allocates 1M through ``agent``, as the guest's first connection to it
    (``guest:net:1``), and ends; its chunk is released. Returns the chunk."""
    start = await asyncio.to_thread(qemu.stub_alloc, "alloc camera 1M")
    chunk = agent.cma.chunk(start)
    assert chunk.owner == "guest:net:1"
    await asyncio.to_thread(qemu.stub_end)
    await until(lambda: agent.cma.chunks == [])
    return chunk


async def test_agent_attach_listens_at_the_channel_path(qemu: Qemu) -> None:
    # No agent yet: socat finds nobody at the socket and the guest's connection gets no reply.
    out = await asyncio.to_thread(qemu.shell, "echo 'alloc camera 1M' | cma-test")
    assert not qemu.channel_socket.exists()
    assert "alloc: ETIMEDOUT: no reply from the agent" in out, out
    agent = await Agent.attach(BOARD, qemu.qmp_socket, qemu.channel_socket)
    try:
        assert agent.machine.channel_path == qemu.channel_socket
        assert qemu.channel_socket.is_socket()
        chunk = await first_guest_allocates_then_ends(qemu, agent)
        assert chunk.requested == 0x100000
    finally:
        await agent.close()
    assert not qemu.channel_socket.exists()
    assert (await qemu.qmp("query-status"))["status"] == "running"


async def test_a_second_attach_leaves_the_first_agents_channel_alone(
    qemu: Qemu, tmp_path: Path
) -> None:
    # The second attach comes in through the harness's own QMP socket (QEMU serves one client
    # per QMP socket) with a monitor and journal of its own, so the channel is what collides.
    agent = await Agent.attach(BOARD, qemu.qmp_socket, qemu.channel_socket)
    try:
        argv = [
            CLI, "attach", "--board", BOARD.name, "--qmp", str(qemu.control),
            "--channel", str(qemu.channel_socket), "--monitor", str(tmp_path / "second.sock"),
            "--no-state",
        ]  # fmt: skip
        done = await asyncio.to_thread(
            subprocess.run, argv, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1, done.stderr
        assert done.stderr.splitlines() == [
            f"cma-qemu: EADDRINUSE: net: another process serves this channel at "
            f"{qemu.channel_socket}"
        ]
        assert not (tmp_path / "second.sock").exists()
        # the first agent still serves the guest at its socket, and the second attach's probe
        # of the socket was no guest connection
        await first_guest_allocates_then_ends(qemu, agent)
    finally:
        await agent.close()
    assert not qemu.channel_socket.exists()
    assert (await qemu.qmp("query-status"))["status"] == "running"


async def test_cli_attach_serves_a_net_board_and_exits_with_qemu(qemu: Qemu) -> None:
    assert qemu.attach[:2] == ["cma-qemu", "attach"]
    proc = subprocess.Popen(
        [CLI, *qemu.attach[1:], "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        info = await asyncio.to_thread(read_first_json, proc, 30)
        assert info["channel"] == str(qemu.channel_socket)
        monitor = QMPClient("attach-net-monitor")
        await monitor.connect(info["monitor"])
        try:
            start = await asyncio.to_thread(qemu.stub_alloc, "alloc camera 1M")
            chunks = await monitor.execute("query-cma-chunks")
            assert [c["addr"] for c in chunks] == [start]
            await asyncio.to_thread(qemu.stub_end)
            deadline = time.monotonic() + 10
            while await monitor.execute("query-cma-chunks"):
                assert time.monotonic() < deadline, "the stub's chunk was not freed"
                await asyncio.sleep(0.05)
        finally:
            await monitor.disconnect()
        await qemu.qmp("quit")
        await asyncio.to_thread(qemu.expect, pexpect.EOF, 30)
        _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert not qemu.channel_socket.exists()
