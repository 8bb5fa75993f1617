"""The agent's QMP monitor against a live board: events, queries and control while a guest works.

The board lives on the plugin's loop thread; the tests connect ``qemu.qmp.QMPClient`` from
their own loop to the monitor socket, and drive the guest through ``asyncio.to_thread``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qemu.qmp import QMPClient

from cma_qemu.channel import ChannelServer
from cma_qemu.pattern import expected_pattern
from cma_qemu.pytest_plugin import Guest, SyncAgent

pytestmark = pytest.mark.e2e

CLI = str(Path(sys.executable).with_name("cma-qemu"))
CHUNK_LINE = re.compile(r"(\d+): 0x([0-9a-f]+)@0x([0-9a-f]+)")


class Stub:
    """A held guest stub driven from async code (the stub itself runs on the plugin's loop)."""

    def __init__(self, guest: Guest) -> None:
        self._manager = guest.stub()
        self._stub: Any = None

    async def __aenter__(self) -> Stub:
        self._stub = await asyncio.to_thread(self._manager.__enter__)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self._manager.__exit__, None, None, None)

    async def say(self, line: str) -> str:
        out = await asyncio.to_thread(self._stub.send, line)
        return str(out).removesuffix("\n")

    async def alloc(self, line: str) -> tuple[int, int, int]:
        """(id, requested size, start) of a successful alloc line."""
        out = await self.say(line)
        match = CHUNK_LINE.fullmatch(out)
        assert match, f"{line!r} gave {out!r}"
        return int(match[1]), int(match[2], 16), int(match[3], 16)


@contextlib.asynccontextmanager
async def monitor(agent: SyncAgent) -> AsyncIterator[QMPClient]:
    client = QMPClient("test-monitor")
    await client.connect(agent.monitor_path)
    try:
        yield client
    finally:
        await client.disconnect()


async def _next(listener: Any, name: str, timeout: float = 10) -> dict[str, Any]:
    """The next event called ``name`` (others, like CMA_GUEST_RESET on port close, skipped)."""
    while True:
        event = await asyncio.wait_for(listener.get(), timeout)
        if event["event"] == name:
            return dict(event["data"])


async def test_events_queries_and_control_follow_the_guest(agent: SyncAgent, guest: Guest) -> None:
    owner = ChannelServer.owner_for(agent.agent.port)
    async with monitor(agent) as qmp:
        stats_before = {s["name"]: s for s in await qmp.execute("query-cma-stats")}
        map_before = await qmp.execute("query-cma-map")
        assert map_before["map"] == agent.cma.map_text and map_before["map"]
        names = ("CMA_ALLOC", "CMA_FREE", "CMA_ALLOC_FAILED")
        with qmp.listener(names) as events:
            try:
                async with Stub(guest) as stub:
                    # Two guest allocations: the events say where, how big, whose.
                    one, size1, addr1 = await stub.alloc("alloc vpu/dec 1M")
                    event = await _next(events, "CMA_ALLOC")
                    assert event == {
                        "addr": addr1,
                        "size": 0x100000,
                        "requested": size1,
                        "region": "video",
                        "owner": owner,
                        "dev": "vpu",
                        "kind": "dec",
                    }
                    two, _, addr2 = await stub.alloc("alloc isp 5000/64K")
                    event = await _next(events, "CMA_ALLOC")
                    assert (event["addr"], event["size"], event["requested"]) == (addr2, 8192, 5000)
                    assert (event["region"], event["owner"], event["kind"]) == ("camera", owner, "")

                    # Queries show the guest's chunks as the framework has them.
                    chunks = {c["addr"]: c for c in await qmp.execute("query-cma-chunks")}
                    assert chunks[addr1] == {
                        "addr": addr1,
                        "size": 0x100000,
                        "region": "video",
                        "requested": 0x100000,
                        "refcount": 1,
                        "owner": owner,
                    }
                    assert chunks[addr2]["owner"] == owner and len(chunks) == 2
                    regions = {
                        r["name"]: r
                        for r in await qmp.execute("query-cma-regions", {"holes": True})
                    }
                    assert regions["video"]["users"] == 1 and regions["camera"]["users"] == 1
                    assert regions["video"]["free"] == regions["video"]["size"] - 0x100000
                    assert (
                        sum(h["size"] for h in regions["video"]["holes"])
                        == (regions["video"]["free"])
                    )
                    stats = {s["name"]: s for s in await qmp.execute("query-cma-stats")}
                    for name, pages in (("video", 256), ("camera", 2)):
                        assert stats[name]["alloc_pages_success"] == (
                            stats_before[name]["alloc_pages_success"] + pages
                        )
                        assert stats[name]["available_pages"] == (
                            stats_before[name]["available_pages"] - pages
                        )

                    # cma-read returns what the guest wrote into its chunk.
                    assert await stub.say(f"write {one} 0xc0ffee00") == ""
                    assert await stub.say(f"write {two} 7") == ""
                    reply = await qmp.execute("cma-read", {"addr": addr1, "size": 4096})
                    data = base64.b64decode(reply["data"])
                    assert (reply["addr"], reply["size"], len(data)) == (addr1, 4096, 4096)
                    words = np.frombuffer(data, "<u4")
                    assert np.array_equal(words, expected_pattern(0xC0FFEE00, 1024))
                    reply = await qmp.execute("cma-read", {"addr": addr2, "size": 5000})
                    words = np.frombuffer(base64.b64decode(reply["data"]), "<u4")
                    assert np.array_equal(words, expected_pattern(7, 1250))

                    # cma-set-map moves the guest's next vpu allocation to common.
                    await qmp.execute("cma-set-map", {"map": "vpu/*=common;*/*=*"})
                    assert (await qmp.execute("query-cma-map"))["map"] == "vpu/*=common;*/*=*"
                    three, _, addr3 = await stub.alloc("alloc vpu/dec 64K")
                    event = await _next(events, "CMA_ALLOC")
                    assert (event["addr"], event["region"]) == (addr3, "common")
                    await qmp.execute("cma-set-map", {"map": map_before["map"]})
                    four, _, addr4 = await stub.alloc("alloc vpu/dec 64K")
                    assert (await _next(events, "CMA_ALLOC"))["region"] == "video"

                    # A guest ENOMEM is an error line there and CMA_ALLOC_FAILED here.
                    assert await stub.say("alloc camera 64M") == (
                        "alloc: ENOMEM: no room for 0x4000000 bytes (alignment 0x1000) "
                        "in camera, common"
                    )
                    event = await _next(events, "CMA_ALLOC_FAILED")
                    assert event == {
                        "dev": "camera",
                        "kind": "",
                        "regions": ["camera", "common"],
                        "size": 0x4000000,
                        "alignment": 0x1000,  # the effective one, as in the message
                        "error": {
                            "class": "ENOMEM",
                            "desc": "no room for 0x4000000 bytes (alignment 0x1000) "
                            "in camera, common",
                        },
                    }
                    after_fail = {s["name"]: s for s in await qmp.execute("query-cma-stats")}
                    assert after_fail["camera"]["alloc_pages_fail"] == (
                        stats_before["camera"]["alloc_pages_fail"] + 0x4000
                    )

                    # Frees by the guest: CMA_FREE with the chunk's address, size and owner.
                    assert await stub.say(f"free {one}") == ""
                    event = await _next(events, "CMA_FREE")
                    assert event == {
                        "addr": addr1,
                        "size": 0x100000,
                        "region": "video",
                        "owner": owner,
                    }
                    for chunk_id, addr in ((three, addr3), (four, addr4)):
                        assert await stub.say(f"free {chunk_id}") == ""
                        assert (await _next(events, "CMA_FREE"))["addr"] == addr
                # The stub's exit frees what it still held.
                event = await _next(events, "CMA_FREE")
                assert (event["addr"], event["region"], event["owner"]) == (addr2, "camera", owner)
            finally:
                await qmp.execute("cma-set-map", {"map": map_before["map"]})
        assert await qmp.execute("query-cma-chunks") == []
        assert await qmp.execute("query-cma-map") == map_before
        stats = {s["name"]: s for s in await qmp.execute("query-cma-stats")}
        for name in ("video", "camera", "common"):
            assert stats[name]["available_pages"] == stats_before[name]["available_pages"]
            assert (
                stats[name]["release_pages_success"] > stats_before[name]["release_pages_success"]
            )
    assert agent.guest_chunks() == []


def _inspect(agent: SyncAgent, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200", NO_COLOR="1")
    return subprocess.run(
        [CLI, "inspect", "--monitor", agent.monitor_path, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


async def _inspect_async(agent: SyncAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(_inspect, agent, *args)


async def test_inspect_cli_against_the_live_board(agent: SyncAgent, guest: Guest) -> None:
    owner = ChannelServer.owner_for(agent.agent.port)
    async with Stub(guest) as stub:
        one, _, addr = await stub.alloc("alloc vpu/dec 256K")
        assert await stub.say(f"write {one} 0x41424344") == ""  # "DCBA", "ECBA", ...

        result = await _inspect_async(agent, "regions")
        assert result.returncode == 0 and result.stderr == ""
        for region in agent.cma.regions:
            line = next(x for x in result.stdout.splitlines() if f"{region.start:#010x}" in x)
            assert (region.name or "(private)") in line
        video = next(x for x in result.stdout.splitlines() if x.startswith("│ video"))
        assert "32M" in video and "32512K" in video  # size, and free with the chunk out

        result = await _inspect_async(agent, "chunks")
        assert result.returncode == 0, result.stderr
        row = next(x for x in result.stdout.splitlines() if f"{addr:#010x}" in x)
        assert "video" in row and owner in row and "0x40000" in row

        result = await _inspect_async(agent, "map")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            f"map:      {agent.cma.map_text}",
            f"asterisk: {agent.cma.asterisk_text}",
        ]

        result = await _inspect_async(agent, "stats")
        assert result.returncode == 0, result.stderr
        assert "alloc pages success" in result.stdout and "maxchunk" in result.stdout
        for stat in agent.cma.stats():
            assert any(
                x.startswith(f"│ {stat.name}") and str(stat.available_pages) in x
                for x in result.stdout.splitlines()
            ), (stat, result.stdout)

        result = await _inspect_async(agent, "dump", hex(addr), "32")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [
            f"{addr:#010x}: 44 43 42 41 45 43 42 41 46 43 42 41 47 43 42 41 |DCBAECBAFCBAGCBA|",
            f"{addr + 16:#010x}: 48 43 42 41 49 43 42 41 4a 43 42 41 4b 43 42 41 "
            "|HCBAICBAJCBAKCBA|",
        ]

        result = await _inspect_async(agent, "plot")
        assert result.returncode == 0, result.stderr
        assert f"{addr:#x}+256K" in result.stdout
        for region in agent.cma.regions:
            if region.name:
                assert region.name in result.stdout

        # watch: one event, printed as a JSON line; allocate until the watcher has seen one.
        watcher = await asyncio.create_subprocess_exec(
            CLI,
            "inspect",
            "--monitor",
            agent.monitor_path,
            "watch",
            "--count",
            "1",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out = b""
            for _ in range(40):
                two, _, addr2 = await stub.alloc("alloc camera 4K")
                assert await stub.say(f"free {two}") == ""
                with contextlib.suppress(TimeoutError):
                    out, err = await asyncio.wait_for(watcher.communicate(), 0.5)
                    break
            assert watcher.returncode == 0, err
        finally:
            if watcher.returncode is None:
                watcher.kill()
                await watcher.wait()
        (line,) = out.decode().splitlines()
        event = json.loads(line)
        assert event["event"] in ("CMA_ALLOC", "CMA_FREE")
        assert (event["data"]["addr"], event["data"]["owner"]) == (addr2, owner)
        assert event["data"]["region"] == "camera"

    # Bad input: one error line, exit status 1, no traceback.
    for args, words in (
        (("dump", "0x1", "16"), "EINVAL: monitor cma-read: memory: range 0x1-0x10 (16 bytes)"),
        (("frobnicate",), "unknown 'frobnicate'"),
        (("dump", "0x40000000"), "needs ADDR and LEN"),
        (("regions", "extra"), "takes no operands"),
    ):
        result = await _inspect_async(agent, *args)
        assert result.returncode == 1, (args, result)
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()
        assert line.startswith("cma-qemu: E") and words in line, (args, line)
        assert line.count("cma-read") <= 1, line  # the command is named once
    result = await asyncio.to_thread(
        subprocess.run,
        [CLI, "inspect", "--monitor", "/nonexistent/monitor.sock", "map"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert agent.guest_chunks() == []
