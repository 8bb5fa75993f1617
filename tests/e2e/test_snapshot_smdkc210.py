"""Snapshot and restore of the smdkc210 boards: their RAM travels in the migration stream.

``smdkc210-uart``: one boot, a guest program is left holding a chunk it wrote a pattern into,
the board is saved and the booted agent closed. Two restores follow, one after the other, each
checked for independence, the held chunk (read back through pmemsave, then freed by the guest)
and leaks. A held session survives a restore only on the UART: on ``smdkc210``, whose default
channel is the net one, QEMU's user network does not save the held TCP session, so a save
while a guest connection holds chunks is refused (EBUSY, nothing written, the guest running
on); with none held it saves, and the restored guest's new connections are served.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_snapshot import _ours

from cma_qemu.agent import Agent
from cma_qemu.boards import load_board
from cma_qemu.errors import EBUSY
from cma_qemu.machine.gdbstub import GdbStubGuestMemory
from cma_qemu.snapshot import read_snapshot, restore_agent

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("smdkc210")]

PATTERN = 0xC0DE0000
#: A guest program holds one chunk in the background; its input stays open on the shell's fd 3.
HOLD = (
    "mkfifo /tmp/f; (cma-test < /tmp/f > /tmp/o 2>&1 &); exec 3>/tmp/f; "
    f"echo 'alloc s5p-fimc1 64K' >&3; echo 'write 1 {PATTERN:#x}' >&3; "
    "for i in 1 2 3 4 5 6 7 8 9 10; do grep -q 1: /tmp/o && break; sleep 0.2; done; cat /tmp/o"
)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("snapshot") / "smdkc210-uart"

    async def save() -> None:
        async with await Agent.boot(load_board("smdkc210-uart")) as agent:
            out, status = await agent.console.run(HOLD, timeout=60)
            assert status == 0 and out.startswith("1: 0x10000@"), out
            assert len(agent.chunks_of_guest()) == 1
            await agent.snapshot(path)

    asyncio.run(save())
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_two_restores_independent_chunk_intact_nothing_leaked(
    snapshot: Path, tmp_path: Path
) -> None:
    info = read_snapshot(snapshot)
    assert not (snapshot / "guest.ram").exists()  # the RAM is in the stream
    before = _ours()
    for n in range(2):
        agent = await restore_agent(snapshot, runtime_parent=tmp_path)
        try:
            assert len(_ours()[1]) == len(before[1]) + 1
            memory = agent.memory
            assert isinstance(memory, GdbStubGuestMemory)
            assert (await agent.guest_run("ls /tmp/mine"))[1] != 0, f"restore {n} saw a file"
            await agent._check("echo x > /tmp/mine")
            # no RTC driver in this guest: the clock is typed in from the host's
            assert abs(int(await agent._check("date +%s")) - time.time()) < 2.5
            chunks = agent.chunks_of_guest()
            assert [(c.start, c.size, c.refcount) for c in chunks] == [
                (start, size, refcount) for start, size, _, refcount, _ in info.chunks
            ]
            assert await agent.find_mismatch(chunks[0], PATTERN) is None  # pmemsave read
            chunk = chunks[0]
            # a host write through the restored QEMU's gdbstub, read back with pmemsave
            # (and put back, so the guest's own verify below still holds)
            tail = chunk.start + chunk.size - 16
            saved = await memory.pmemsave.read(tail, 16)
            await memory.write(tail, bytes(range(16)))
            assert await memory.pmemsave.read(tail, 16) == bytes(range(16))
            await memory.write(tail, saved)
            start = f"@{chunk.start:#x}"
            out = await agent._check(
                f"echo 'verify 1 {PATTERN:#x}' >&3; echo 'free 1' >&3; echo list >&3;"
                " for i in $(seq 20); do grep -q 'freed\\|^0 chunks' /tmp/o && break;"
                " sleep 0.2; done; cat /tmp/o",
                timeout=60,
            )
            assert "EINVAL" not in out and "mismatch" not in out, out
            for _ in range(50):  # the free reaches the agent over the channel
                if not agent.chunks_of_guest():
                    break
                await asyncio.sleep(0.1)
            assert agent.chunks_of_guest() == [], (start, out)
        finally:
            await agent.close()
        assert _ours() == before
        assert list(tmp_path.iterdir()) == []


async def test_net_channel_refuses_a_held_session_then_saves_and_restores(
    tmp_path: Path,
) -> None:
    path = tmp_path / "saved" / "smdkc210"
    before = _ours()
    async with await Agent.boot(load_board("smdkc210")) as agent:
        assert agent.board.channel.kind == "net"
        out, status = await agent.console.run(HOLD, timeout=60)
        assert status == 0 and out.startswith("1: 0x10000@"), out
        (held,) = agent.chunks_of_guest()
        assert str(held.owner).startswith("guest:net:")
        with pytest.raises(EBUSY, match=r"guest:net:\d+.*does not survive a restore") as info:
            await agent.snapshot(path)
        assert info.value.where == "snapshot" and "\n" not in str(info.value)
        # nothing written, the guest runs on and its session still holds the chunk
        assert not path.exists()
        assert agent.chunks_of_guest() == [held]
        out = await agent._check(
            "echo 'free 1' >&3; echo list >&3; exec 3>&-;"
            " for i in $(seq 20); do pidof cma-test >/dev/null || break; sleep 0.2; done;"
            " cat /tmp/o",
            timeout=60,
        )
        assert "EIO" not in out, out
        for _ in range(50):  # the free (and the stub's close) reach the agent
            if not agent.chunks_of_guest():
                break
            await asyncio.sleep(0.1)
        assert agent.cma.chunks == [], out
        await agent.snapshot(path)
    info = read_snapshot(path)
    assert info.board == "smdkc210" and info.key["channel"] == "net" and info.chunks == []
    (tmp_path / "run").mkdir()
    agent = await restore_agent(path, runtime_parent=tmp_path / "run")
    try:
        # a new stub is a new connection (QEMU starts a socat for it) and a session of its own
        out = await agent._check(
            "printf 'ping 3\\nalloc s5p-mfc/a 1M\\nlist\\n' | cma-test", timeout=60
        )
        lines = out.splitlines()
        assert lines[0].startswith("ping: n=3 ") and lines[1] == lines[2], out
        assert lines[1].startswith("1: 0x100000@0x60000000"), out
        for _ in range(50):  # the stub's exit gave its chunk back
            if not agent.cma.chunks:
                break
            await asyncio.sleep(0.1)
        assert agent.cma.chunks == []
    finally:
        await agent.close()
    assert _ours() == before
    assert list((tmp_path / "run").iterdir()) == []
