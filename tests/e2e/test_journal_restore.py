"""An attached agent killed with SIGKILL and started again loses nothing (issue 8.3).

QEMU is started by the test, as a harness would (the fixture of test_attach.py); the agent is
``cma-qemu attach --state FILE`` in a subprocess. A guest stub holds chunks while the agent is
killed; the next agent restores the journal and serves the same stub as if nothing happened.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from test_attach import CLI, Qemu, qemu

from cma_qemu.channel import ChannelServer
from cma_qemu.first_json import read_first_json
from cma_qemu.journal import read_journal

pytestmark = [pytest.mark.e2e]

__all__ = ["qemu"]  # the module-scoped QEMU fixture, imported for this module's own boot

OWNER = ChannelServer.owner_for("org.cma.0")
ALLOC = re.compile(r"^(\d+): (0x[0-9a-f]+)@(0x[0-9a-f]+)$", re.MULTILINE)


def _attach(qemu: Qemu, state: Path, *extra: str) -> subprocess.Popen[str]:
    f = qemu.files
    return subprocess.Popen(
        [CLI, "attach", "--qmp", str(f.qmp_socket), "--channel", str(f.channel_socket),
         "--board", "virt", "--json", "--state", str(state), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


async def _chunks(monitor_path: str) -> list[dict[str, Any]]:
    client = QMPClient("journal-test")
    await client.connect(monitor_path)
    try:
        chunks: Any = await client.execute("query-cma-chunks")
        return list(chunks)
    finally:
        await client.disconnect()


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> tuple[str, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    return out, err


def _alloc(qemu: Qemu, line: str) -> tuple[int, int, int]:
    """(id, size, start) the stub printed for one allocation line."""
    out = qemu.stub_send(line)
    match = ALLOC.search(out)
    assert match, out
    return int(match[1]), int(match[2], 16), int(match[3], 16)


async def test_a_killed_agent_comes_back_with_the_guest_chunks(qemu: Qemu, tmp_path: Path) -> None:
    state = tmp_path / "agent.journal"
    first = _attach(qemu, state)
    second: subprocess.Popen[str] | None = None
    try:
        info = await asyncio.to_thread(read_first_json, first, 30)
        assert info["state"] == str(state) and info["restore"]["fresh"]
        qemu.child.sendline("cma-test")
        await asyncio.to_thread(qemu.expect, "cma-test> ")
        held = [
            await asyncio.to_thread(_alloc, qemu, line)
            for line in ("alloc vpu/dec 1M", "alloc camera 2M", "alloc-from common 64K/64K")
        ]
        chunks_before = await _chunks(info["monitor"])
        assert sorted(c["addr"] for c in chunks_before) == sorted(h[2] for h in held)

        first.send_signal(signal.SIGKILL)  # no cleanup of any kind
        await asyncio.to_thread(first.wait, 10)
        journal = state.read_text()
        assert journal.count("\na ") == 3  # every allocation was in the file before its reply
        with state.open("a") as out:
            out.write("a 5f000000 1000 1000 1 ")  # and the agent died in the middle of a record

        # Another board's or other attributes' journal: refused, one line, file untouched.
        refused = await asyncio.to_thread(
            subprocess.run,
            [CLI, "attach", "--qmp", str(qemu.files.qmp_socket), "--channel",
             str(qemu.files.channel_socket), "--board", "virt", "--cma", "t=16M",
             "--state", str(state)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 1
        assert refused.stderr.startswith(
            f"cma-qemu: EINVAL: journal {state}: it is for another board or other attributes: "
        )
        assert refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
        assert state.read_text().endswith("a 5f000000 1000 1000 1 ")

        recording = tmp_path / "after-restart.cma"
        second = _attach(qemu, state, "--record", str(recording))
        info = await asyncio.to_thread(read_first_json, second, 30)
        assert info["restore"] == {
            "path": str(state),
            "restored": 3,
            "truncated": True,
            "stale": False,
            "fresh": False,
        }
        restored = await _chunks(info["monitor"])
        assert [(c["addr"], c["size"], c["requested"], c["owner"]) for c in restored] == [
            (c["addr"], c["size"], c["requested"], c["owner"]) for c in chunks_before
        ]
        assert {c["owner"] for c in restored} == {OWNER}

        # The guest's next request is answered, and never overlaps what it still holds.
        _, size, start = await asyncio.to_thread(_alloc, qemu, "alloc vpu/dec 3M")
        assert all(start + size <= h[2] or h[2] + h[1] <= start for h in held)
        # The guest frees an old chunk: the new agent knows it is the guest's.
        assert await asyncio.to_thread(qemu.stub_send, "free 1") == "free 1\n"
        left = {c["addr"] for c in await _chunks(info["monitor"])}
        assert left == {held[1][2], held[2][2], start}
        await asyncio.to_thread(qemu.stub_end)  # the stub frees the rest as it exits
        for _ in range(100):
            if not await _chunks(info["monitor"]):
                break
            await asyncio.sleep(0.1)
        assert await _chunks(info["monitor"]) == []
        _, err = await asyncio.to_thread(_stop, second)
        assert second.returncode in (0, 130), err
        assert "Traceback" not in err
        # attach --record: the restored chunks are noted, what was served since is replayable.
        text = recording.read_text()
        assert text.count("# live before recording (not replayed): ") == 3
        body = [ln for ln in text.splitlines() if not ln.startswith("#")]
        assert body == ["alloc vpu/dec 0x300000", "free 1"]
        assert text.count("# free of a chunk not in this recording") == 3
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert qemu.child.isalive()
    assert os.path.exists(state)  # kept for the next agent


async def test_a_port_closed_while_no_agent_was_attached_gives_the_chunks_back(
    qemu: Qemu, tmp_path: Path
) -> None:
    state = tmp_path / "agent.journal"
    first = _attach(qemu, state)
    second: subprocess.Popen[str] | None = None
    try:
        info = await asyncio.to_thread(read_first_json, first, 30)
        await asyncio.to_thread(
            qemu.shell, "(echo 'alloc camera 1M'; sleep 600) | cma-test > /dev/null 2>&1 &"
        )
        for _ in range(100):
            if await _chunks(info["monitor"]):
                break
            await asyncio.sleep(0.1)
        assert len(await _chunks(info["monitor"])) == 1
        first.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.wait, 10)
        # The stub dies while nobody serves the port: nothing frees its chunk, the port closes.
        await asyncio.to_thread(qemu.shell, "kill -9 $(pidof cma-test); kill $(pidof sleep)")
        second = _attach(qemu, state)
        info = await asyncio.to_thread(read_first_json, second, 30)
        assert info["restore"]["restored"] == 1  # the journal still had it ...
        assert await _chunks(info["monitor"]) == []  # ... but no guest program holds it now
        assert read_journal(state).chunks == {}
        _, err = await asyncio.to_thread(_stop, second)
        assert second.returncode in (0, 130), err
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
