"""smdkc210's default channel, the net one: the stub reaches the agent over the board's LAN9215
and QEMU's user network, one TCP connection per stub.

Every stub is a session of its own (``guest:net:N``); a SIGKILLed stub's connection closes and
its chunks come back; the device tree and the kernel show the NIC. That the guest's output
equals ``cma-qemu replay``'s is checked on both smdkc210 boards in test_guest_sessions.py; the
UART kind (board ``smdkc210-uart``) keeps its own tests there, in test_guest_protocol.py,
test_machine_smdkc210.py, test_kernel_module.py and test_snapshot_smdkc210.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from cma_qemu.framework import Chunk
from cma_qemu.pytest_plugin import BoardSession

pytestmark = pytest.mark.e2e

BOARD = "smdkc210"


@pytest.fixture
def board(cma_boot: Any) -> Iterator[BoardSession]:
    session: BoardSession = cma_boot(BOARD)
    session.agent.release_leftovers()
    assert session.agent.cma.chunks == [], "a previous test left chunks behind"
    yield session
    session.guest.run("kill -9 $(pidof cma-test) 2>/dev/null; rm -f /tmp/net-*")
    session.agent.release_leftovers()


def _until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def _owners(board: BoardSession) -> dict[str, list[Chunk]]:
    out: dict[str, list[Chunk]] = {}
    for chunk in board.agent.cma.chunks:
        out.setdefault(str(chunk.owner), []).append(chunk)
    return out


def _stubs(board: BoardSession) -> set[int]:
    return {int(p) for p in board.guest.run("pidof cma-test").output.split()}


def _hold(board: BoardSession, name: str, lines: str) -> int:
    """Start a stub in the guest that sends ``lines`` and then keeps its connection open;
    its pid once it has answered every line."""
    before = _stubs(board)
    board.guest.check(f"(printf '{lines}'; sleep 1000) | cma-test >/tmp/net-{name}.out 2>&1 &")
    count = lines.count("\\n")
    _until(
        lambda: len(board.guest.check(f"cat /tmp/net-{name}.out").splitlines()) >= count,
        f"stub {name} did not answer",
    )
    (pid,) = _stubs(board) - before
    return pid


def test_two_stubs_are_two_sessions_and_sigkill_releases(board: BoardSession) -> None:
    assert board.agent.agent.board.channel.kind == "net"  # smdkc210's default
    first = _hold(board, "a", "alloc s5p-mfc/a 1M\\nalloc g2d 64K\\n")
    second = _hold(board, "b", "alloc s5p-mfc/b 128K\\n")
    owners = _owners(board)
    assert len(owners) == 2 and all(o.startswith("guest:net:") for o in owners), owners
    sizes = {tuple(sorted(c.requested for c in chunks)) for chunks in owners.values()}
    assert sizes == {(0x20000,), (0x10000, 0x100000)}
    # the first stub's chunk ids are 1 and 2; the second, a session of its own, starts at 1
    assert board.guest.check("cat /tmp/net-b.out").startswith("1: 0x20000@")
    (a_owner,) = [o for o, chunks in owners.items() if len(chunks) == 2]
    (b_owner,) = [o for o in owners if o != a_owner]

    board.guest.check(f"kill -9 {first}")
    _until(lambda: a_owner not in _owners(board), "the killed stub's chunks were not released")
    assert list(_owners(board)) == [b_owner]  # the other session keeps its chunk
    assert [c.requested for c in board.agent.guest_chunks()] == [0x20000]

    board.guest.check(f"kill -9 {second}")
    _until(lambda: board.agent.cma.chunks == [], "the second stub's chunk was not released")


def test_the_nic_is_in_the_device_tree_and_up(board: BoardSession) -> None:
    compatible = board.guest.check("cat /proc/device-tree/soc/ethernet@5000000/compatible")
    assert compatible.rstrip("\x00\n") == "smsc,lan9115"
    assert "inet addr:10.0.2.15" in board.guest.check("ifconfig eth0")
    assert "SMSC911x/921x identified" in board.guest.check("dmesg | grep smsc911x")
    assert "ping: n=20 " in board.guest.check("printf 'ping 20\\n' | cma-test")
