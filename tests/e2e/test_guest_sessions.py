"""Serving guest allocations end to end: a guest allocates, writes, the host checks the bytes.

The shared virt board (``cma_board``) and one boot of each smdkc210 board (``smdkc210``, whose
default channel is the net one, and ``smdkc210-uart``; pmemsave reads) serve held ``cma-test``
sessions; the same scripts run in the guest and through
``cma-qemu replay`` must print the same bytes; a guest reset gives a running stub's chunks back.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from cma_qemu.boards import load_board
from cma_qemu.channel import ChannelServer
from cma_qemu.configuration import build_cma
from cma_qemu.pytest_plugin import BoardSession, SyncStub
from cma_qemu.replay import replay
from cma_qemu.script import parse_number

pytestmark = pytest.mark.e2e

DATA = Path(__file__).resolve().parent.parent / "data"
CLI = str(Path(sys.executable).with_name("cma-qemu"))
CHUNK_LINE = re.compile(r"(\d+): 0x([0-9a-f]+)@0x([0-9a-f]+)")


def _parse_chunk(line: str) -> tuple[int, int, int]:
    """``ID: 0xSIZE@0xSTART`` -> (id, size, start)."""
    match = CHUNK_LINE.fullmatch(line)
    assert match, f"not a chunk line: {line!r}"
    return int(match[1]), int(match[2], 16), int(match[3], 16)


@dataclass
class Held:
    """A held stub: ``say(line)`` is what it printed, without the final newline."""

    stub: SyncStub
    board: str

    def __call__(self, line: str) -> str:
        return self.stub.send(line).removesuffix("\n")


def _release(session: BoardSession) -> None:
    """What the shared ``agent`` fixture does after a test, for the other boards."""
    session.agent.release_leftovers()


@pytest.fixture
def board(
    request: pytest.FixtureRequest, cma_board: BoardSession, cma_boot: Any
) -> Iterator[BoardSession]:
    """virt is the shared ``cma_board``; any other board is booted once through cma_boot."""
    name = request.param
    session = cma_board if name == "virt" else cma_boot(name)
    assert session.agent.board_name == name
    _release(session)
    assert session.agent.cma.chunks == [], "a previous test left chunks behind"
    yield session
    _release(session)


# (dev/kind, size, pattern, the region the board's map sends it to)
PLANS = {
    "virt": [
        ("vpu/dec", "1M", 0xC0FFEE00, "video"),
        ("vpu/enc", "64K/64K", 0x1, "video"),
        ("vpu/f", "128K/128K", 0xFFFFFFF0, "fw"),  # wraps around 2^32 after 16 words
        ("camera", "4097", 0x12345678, "camera"),  # not a word multiple: 1025 words
        ("isp", "2M/1M", 0xA5A5A5A5, "camera"),
        ("gpu/tex", "256K", 0x0BADF00D, "video"),  # no rule: */*=* gives the asterisk list
    ],
    "smdkc210": [
        ("s5p-mfc/a", "1M", 0xC0FFEE00, "mfc_b1"),
        ("s5p-mfc/b", "64K/64K", 0x1, "mfc_b2"),
        ("s5p-mfc/f", "128K/128K", 0xFFFFFFF0, "mfc_fw"),
        ("s5p-fimc1", "4097", 0x12345678, "fimc"),
        ("g2d", "256K", 0x0BADF00D, "mfc_b1"),  # */*=* gives the asterisk list
    ],
}


def _owner_pattern(session: BoardSession) -> str:
    """The owner of one stub's chunks: the port's, or on a net channel the stub's own
    connection's (``guest:net:N``, a session per connection)."""
    owner = re.escape(ChannelServer.owner_for(session.agent.agent.port))
    return owner + r":\d+" if session.agent.agent.board.channel.kind == "net" else owner


@pytest.mark.parametrize("board", ["virt", "smdkc210", "smdkc210-uart"], indirect=True)
def test_guest_chunks_checked_from_host_and_guest(board: BoardSession) -> None:
    agent, guest = board.agent, board.guest
    owner = _owner_pattern(board)
    plan = PLANS[agent.board_name.removesuffix("-uart")]
    held: list[tuple[int, Any, int]] = []  # (id, chunk, pattern)
    with guest.stub() as stub:
        say = Held(stub, agent.board_name)
        for dev, size, pattern, region in plan:
            chunk_id, requested, start = _parse_chunk(say(f"alloc {dev} {size}"))
            chunk = agent.chunk_at(start)
            assert (chunk.region.name, chunk.requested) == (region, requested)
            assert re.fullmatch(owner, str(chunk.owner)), (owner, chunk.owner)
            if "/" in size:
                alignment = parse_number(size.split("/")[1])
                assert alignment and start % alignment == 0
            assert say(f"write {chunk_id} {pattern:#x}") == ""
            held.append((chunk_id, chunk, pattern))
        assert len({c.start for _, c, _ in held}) == len(plan)
        assert len({c.owner for _, c, _ in held}) == 1  # one stub, one owner
        assert sorted(agent.guest_chunks(), key=lambda c: c.start) == sorted(
            (c for _, c, _ in held), key=lambda c: c.start
        )

        # The host sees every guest pattern in guest memory (mmap on virt, pmemsave here).
        for _, chunk, pattern in held:
            assert agent.find_mismatch(chunk, pattern) is None, chunk
            assert agent.find_mismatch(chunk, (pattern + 1) & 0xFFFFFFFF) == 0
            words = (chunk.requested + 3) // 4
            last = agent.read(chunk.start + (words - 1) * 4, 4)
            assert int.from_bytes(last, "little") == (pattern + words - 1) & 0xFFFFFFFF
        # The guest checks its own writes, and catches a wrong pattern.
        for chunk_id, _, pattern in held:
            assert say(f"verify {chunk_id} {pattern:#x}") == ""
        assert say(f"verify {held[1][0]} 2") == "verify: EIO: mismatch at offset 0x0"

        # virt's RAM is shared with the host: a word the host changes in the middle of a chunk
        # is found at its offset by both sides, and the guest's rewrite repairs it.
        if agent.board_name == "virt":
            first_id, first, pattern = held[0]
            agent.call(agent.agent.memory.write(first.start + 0x800, b"\xef\xbe\xad\xde"))
            assert agent.find_mismatch(first, pattern) == 0x800
            assert say(f"v {first_id} {pattern}") == "v: EIO: mismatch at offset 0x800"
            assert say(f"w {first_id} {pattern}") == ""
            assert agent.find_mismatch(first, pattern) is None

        listing = say("list").splitlines()
        assert [_parse_chunk(line)[0] for line in listing] == [i for i, _, _ in held]

        # Free by id (the second chunk), then the most recent one, then the rest by id.
        assert say(f"free {held[1][0]}") == ""
        assert say("free") == ""
        remaining = {c.start for c in agent.guest_chunks()}
        assert remaining == {c.start for _, c, _ in held[:1] + held[2:-1]}
        for chunk_id, _, _ in held[:1] + held[2:-1]:
            assert say(f"free {chunk_id}") == ""
        assert say("free") == "free: ENOENT: no chunks"
        assert say("list") == ""
        assert agent.guest_chunks() == []
    assert agent.cma.chunks == []


def _script(board: str) -> str:
    """The board's script; its last line is left without a newline on purpose."""
    return (DATA / f"guest_{board}.txt").read_text().rstrip("\n")


@pytest.mark.parametrize("board", ["virt", "aquila", "smdkc210", "smdkc210-uart"], indirect=True)
def test_script_in_guest_equals_replay(board: BoardSession, tmp_path: Path) -> None:
    name = board.agent.board_name
    text = _script(name.removesuffix("-uart"))  # smdkc210's two channels: one script
    assert not text.endswith("\n") and any(len(line) > 1023 for line in text.splitlines())

    guest = board.guest.run_script(text)
    offline = replay(text, build_cma(board=load_board(name)))
    assert guest.stdout == offline.stdout
    assert guest.stderr == offline.stderr
    assert board.agent.cma.chunks == []  # the stub gave everything back at its exit

    # The CLI prints the same bytes (the script file ends without a newline, too).
    script = tmp_path / "script.txt"
    script.write_bytes(text.encode())
    cli = subprocess.run(
        [CLI, "replay", "--board", name, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (cli.stdout, cli.stderr) == (guest.stdout, guest.stderr)
    assert guest.status == cli.returncode == 1  # the script has errors

    # What the script exercises, so the comparison is not vacuous.
    out, err = guest.stdout.splitlines(), guest.stderr.splitlines()
    assert out[0] == f"1: 0x100000@{_parse_chunk(out[0])[2]:#x}"
    assert sum(line.startswith("info: count=") for line in out) == 3
    # 5 allocs, 3 infos, a list of 5, then `a DEV 4K` and two blank lines that repeat it
    assert [_parse_chunk(line)[:2] for line in out[13:16]] == [(6, 4096), (7, 4096), (8, 4096)]
    for expected in (
        "verify: EIO: mismatch at offset 0x0",
        "r: ENOMEM: no room for 0x1000 bytes (alignment 0x1000) in nosuch",
        "input: EINVAL: line too long",
        "frobnicate: EINVAL: unknown command",
        "alloc: EINVAL: missing argument",
        "alloc: EINVAL: unknown arguments at the end",
        "alloc: EINVAL: name or kind too long",
        "alloc: EINVAL: invalid size",
        "alloc: EINVAL: invalid alignment",
        "free: EINVAL: invalid chunk id",
        "free: ENOENT: no chunk 99",
        "write: EINVAL: invalid pattern",
        "verify: ENOENT: no chunk 99",
        "ping: EINVAL: invalid count",
        "bench: EINVAL: invalid count",
        "list: EINVAL: unknown arguments at the end",
        "info: EINVAL: missing argument",
        "free: ENOENT: no chunks",
    ):
        assert expected in err, expected
    enomem = [line for line in err if line.startswith("alloc: ENOMEM: no room for 0x25800000")]
    assert len(enomem) == 2  # the blank line after the too-long line repeats the line before it
    assert err[-1] == "input: EINVAL: no new line at EOF"


# (script, its one error line or "" for none): each ends the stub with 1 if it has one, else 0.
EXIT_SCRIPTS = {
    "clean": ("alloc vpu/dec 1M\nwrite 1 0x5\nverify 1 0x5\na camera 4K\nlist\nfree 1\n", ""),
    "a request fails": (
        "alloc vpu/dec 1M\nalloc vpu/dec 900M\nlist\n",
        "alloc: ENOMEM: no room for 0x38400000 bytes (alignment 0x1000) in video, common",
    ),
    "a bad line": ("alloc vpu/dec 1M\nfree 7\nlist\n", "free: ENOENT: no chunk 7"),
    "a verify fails": ("a camera 8K\nw 1 0x10\nv 1 0x11\n", "v: EIO: mismatch at offset 0x0"),
    "too long": ("alloc vpu/dec 1M\n" + "#" * 1024 + "\nlist\n", "input: EINVAL: line too long"),
    "no new line at EOF": ("alloc vpu/dec 1M\nlist", "input: EINVAL: no new line at EOF"),
}


@pytest.mark.parametrize("case", EXIT_SCRIPTS)
def test_stub_exit_status_says_whether_every_line_succeeded(
    cma_board: BoardSession, case: str
) -> None:
    text, error = EXIT_SCRIPTS[case]
    _release(cma_board)
    guest = cma_board.guest.run_script(text)
    assert guest.stderr == (error + "\n" if error else ""), guest
    assert guest.status == (1 if error else 0), guest
    assert guest.stdout.startswith("1: 0x"), guest  # the lines before the failure ran
    assert cma_board.agent.cma.chunks == []  # and the stub freed what it held as it exited

    # cma-qemu replay, the stub's byte-for-byte oracle, agrees on the status too.
    cli = subprocess.run(
        [CLI, "replay", "--board", "virt", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (cli.stdout, cli.stderr, cli.returncode) == (guest.stdout, guest.stderr, guest.status)


def test_map_fallback_and_errors_reach_the_guest(agent: Any, guest: Any) -> None:
    cma = agent.cma
    old_map, old_asterisk = cma.map_text, cma.asterisk_text
    asterisk = cma.asterisk
    assert asterisk and "fw" not in asterisk  # the private region is not in it
    try:
        with guest.stub() as stub:
            say = Held(stub, "virt")
            # ENOMEM from the framework reaches the guest as an error line.
            assert say("alloc camera 64M") == (
                "alloc: ENOMEM: no room for 0x4000000 bytes (alignment 0x1000) in camera, common"
            )
            # No rule at all for gpu: it gets the asterisk regions, in their order.
            cma.set_map("vpu/*=video")
            line = say("alloc gpu 1M")
            chunk = agent.chunk_at(_parse_chunk(line)[2])
            assert chunk.region.name == asterisk[0]
            assert say("info gpu").startswith(f"info: count={len(asterisk)} ")
            # Without an asterisk list such a device has nowhere to go.
            cma.set_asterisk("")
            assert say("alloc gpu 1M") == (
                "alloc: ENOENT: no region list for gpu: no map rule and no asterisk list"
            )
            assert say("alloc vpu/dec 4K").startswith("2: 0x1000@")
            cma.set_asterisk("common")
            assert agent.chunk_at(_parse_chunk(say("a gpu 4K"))[2]).region.name == "common"
    finally:
        cma.set_map(old_map)
        cma.set_asterisk(old_asterisk)
    assert agent.guest_chunks() == []
    assert (cma.map_text, cma.asterisk_text) == (old_map, old_asterisk)


async def test_guest_reset_releases_a_running_stubs_chunks(cma_boot: Any) -> None:
    # A board of its own: the reset must not disturb the shared one.
    session: BoardSession = await asyncio.to_thread(
        cma_boot, "virt", regions="-fw=1M/128K;video=16M;common=16M"
    )
    agent, guest = session.agent, session.guest
    await asyncio.to_thread(_release, session)
    client = QMPClient("test-reset")
    await client.connect(agent.monitor_path)
    try:
        with client.listener(("CMA_GUEST_RESET",)) as listener:
            await asyncio.to_thread(
                guest.check,
                "(echo 'alloc vpu/dec 1M'; sleep 600) | cma-test > /tmp/held.out 2>&1 &",
            )
            deadline = time.monotonic() + 60
            while not agent.guest_chunks():
                assert time.monotonic() < deadline, "the background stub never allocated"
                await asyncio.sleep(0.1)
            (chunk,) = agent.guest_chunks()
            assert (chunk.requested, chunk.region.name) == (0x100000, "video")
            assert (await asyncio.to_thread(guest.check, "cat /tmp/held.out")).startswith(
                f"1: 0x100000@{chunk.start:#x}"
            )

            await asyncio.to_thread(agent.reset_guest)
            assert agent.guest_chunks() == []
            assert agent.cma.chunks == []
            # QEMU's RESET gives the chunk back; the virtio port closing as the guest goes
            # down may report too (reason "port-closed"), but the chunk is released once.
            seen: list[dict[str, Any]] = []
            while not any(data["reason"] == "reset" for data in seen):
                seen.append(dict((await asyncio.wait_for(listener.get(), 30))["data"]))
            assert {data["port"] for data in seen} == {agent.agent.port}
            assert [c for data in seen for c in data["chunks"]] == [chunk.start]
            assert sum(data["released"] for data in seen) == 1
            assert sum(data["bytes"] for data in seen) == 0x100000
            assert seen[0]["released"] == 1  # the first report is the one that freed it
    finally:
        await client.disconnect()

    # The guest came back and is served again; the same address is free.
    result = await asyncio.to_thread(guest.run_script, "alloc vpu/dec 1M\nlist\n")
    assert result.stdout == f"1: 0x100000@{chunk.start:#x}\n" * 2
    assert (result.stderr, result.status) == ("", 0)
    await asyncio.to_thread(_release, session)
