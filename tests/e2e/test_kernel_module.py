"""The cma_guest kernel module in a real guest: the /dev/cma ABI's error paths, mmap against
the host's reads, chunks of a killed process, and no daemon (virt, and smdkc210 on both channel
kinds: ``smdkc210``'s default net channel and ``smdkc210-uart``).

The guest program is tests/e2e/guest_programs/cma_dev_check.c, cross-compiled here and copied
in with the same code as ``boot --put``; the module's daemon is ``cma-test -k``.
"""

from __future__ import annotations

import re
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kmod_helpers import Daemon

from cma_qemu.guest_image.build import CROSS_CC, STUB_CFLAGS
from cma_qemu.guest_put import put
from cma_qemu.pytest_plugin import BoardSession

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
PROGRAM = Path(__file__).resolve().parent / "guest_programs" / "cma_dev_check.c"
GUEST_PROGRAM = "/tmp/cma_dev_check"

#: board -> (dev, kind) its map sends to a region, and that region's name
DEVICES = {
    "virt": ("vpu", "dec", "video"),
    "smdkc210": ("s5p-mfc", "a", "mfc_b1"),
    "smdkc210-uart": ("s5p-mfc", "a", "mfc_b1"),
}


@pytest.fixture(scope="session")
def dev_check(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cma_dev_check, cross-compiled -Werror clean against guest/include."""
    out = tmp_path_factory.mktemp("kmod") / "cma_dev_check"
    argv = [CROSS_CC, *STUB_CFLAGS, "-s", "-I", str(REPO / "guest/include"), "-o", str(out)]
    res = subprocess.run([*argv, str(PROGRAM)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    return out


@pytest.fixture(params=sorted(DEVICES))
def board(request: pytest.FixtureRequest, cma_boot, dev_check: Path) -> Iterator[BoardSession]:
    session: BoardSession = cma_boot(request.param)
    size = dev_check.stat().st_size
    if session.guest.run(f"stat -c %s {GUEST_PROGRAM}").output != str(size):  # once a boot
        session.agent.call(put(session.agent.agent, dev_check, GUEST_PROGRAM), 900)
    yield session
    session.agent.release_leftovers()


@pytest.fixture
def daemon(board: BoardSession) -> Iterator[Daemon]:
    d = Daemon(board)
    yield d
    d.stop()


def _chunks(output: str) -> list[tuple[int, int]]:
    return [(int(a, 16), int(s, 16)) for a, s in re.findall(r"^chunk (\S+) (\S+)$", output, re.M)]


def _dev(board: BoardSession) -> tuple[str, str, str]:
    return DEVICES[board.agent.board_name]


def test_abi_error_paths(board: BoardSession, daemon: Daemon) -> None:
    dev, kind, _ = _dev(board)
    result = board.guest.run(f"{GUEST_PROGRAM} errors {dev} {kind}")
    assert result.status == 0 and "FAIL" not in result.output, result.output
    oks = [line for line in result.output.splitlines() if line.startswith("ok ")]
    assert len(oks) == 17 and result.output.endswith("PASSED")
    [(addr, _)] = _chunks(result.output)
    assert all(c.start != addr for c in board.agent.guest_chunks()), "close freed it"


def test_mmap_writes_are_what_the_host_reads(board: BoardSession, daemon: Daemon) -> None:
    dev, kind, region = _dev(board)
    size, pattern = 0x40000, 0x5EED0000
    result = board.guest.run(f"{GUEST_PROGRAM} fill {dev} {kind} {size:#x} {pattern:#x}")
    assert result.status == 0, result.output
    [(addr, _)] = _chunks(result.output)
    assert any(r.name == region and r.start <= addr < r.end for r in board.agent.cma.regions)
    words = struct.unpack(f"<{size // 4}I", board.agent.read(addr, size))
    bad = [i for i, w in enumerate(words) if w != (pattern + i) & 0xFFFFFFFF]
    assert not bad, f"first wrong word at {bad[0]}"


def test_killed_process_gives_its_chunks_back(board: BoardSession, daemon: Daemon) -> None:
    dev, kind, _ = _dev(board)
    pid = board.guest.check(f"{GUEST_PROGRAM} hold 3 {dev} {kind} 0x10000 >/tmp/hold.out & echo $!")
    deadline = time.monotonic() + 30
    while "HOLDING" not in (out := board.guest.check("cat /tmp/hold.out")):
        assert time.monotonic() < deadline, out
        time.sleep(0.2)
    held = {addr for addr, _ in _chunks(out)}
    assert len(held) == 3 and held <= {c.start for c in board.agent.guest_chunks()}
    # /dev/cma's chunks are the kernel's: its daemon's session's owner plus "/kernel" (on a net
    # channel the daemon's connection is a session of its own, guest:net:N)
    owner = re.escape(f"guest:{board.agent.agent.port}")
    if board.agent.agent.board.channel.kind == "net":
        owner += r":\d+"
    owners = {str(board.agent.chunk_at(addr).owner) for addr in held}
    assert len(owners) == 1, owners
    assert re.fullmatch(owner + "/kernel", owners.pop()), owner
    board.guest.check(f"kill -9 {pid}")
    while held & {c.start for c in board.agent.guest_chunks()}:
        assert time.monotonic() < deadline + 30, "the killed process's chunks were not freed"
        time.sleep(0.2)


def test_without_daemon_enodev_at_once(board: BoardSession) -> None:
    dev, kind, _ = _dev(board)
    started = time.monotonic()
    result = board.guest.run(f"{GUEST_PROGRAM} fill {dev} {kind} 0x1000 0")
    assert result.status == 1 and "FAIL alloc: No such device" in result.output
    assert time.monotonic() - started < 10  # one console round trip; no reply timeout
