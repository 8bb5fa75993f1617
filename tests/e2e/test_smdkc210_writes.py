"""Host writes on smdkc210 through QEMU's gdbstub, checked by the guest, on one boot.

The guest's ``cma-test`` checks with ``verify`` what the host wrote into its chunk; the stub's
stops are not reported as guest events; and a gdb client killed while it holds the VM stopped
(QEMU keeps it paused) is recovered with QMP ``cont`` from the marker it left.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from cma_qemu.machine.gdbstub import (
    GdbStubGuestMemory,
    recover_stopped_vm,
    stopped_marker,
)
from cma_qemu.pytest_plugin import BoardSession, SyncStub

pytestmark = pytest.mark.e2e

PATTERN = 0xC0DE2222


@pytest.fixture
def smdk(cma_boot: object) -> BoardSession:
    session: BoardSession = cma_boot("smdkc210")  # type: ignore[operator]
    session.agent.release_leftovers()
    return session


def _memory(session: BoardSession) -> GdbStubGuestMemory:
    memory = session.agent.agent.memory
    assert isinstance(memory, GdbStubGuestMemory)
    return memory


def _words(pattern: int, count: int) -> bytes:
    """What ``write ID PATTERN`` stores: word[i] = pattern + i, little-endian."""
    return b"".join(((pattern + i) & 0xFFFFFFFF).to_bytes(4, "little") for i in range(count))


def _alloc(stub: SyncStub, line: str) -> tuple[int, int, int]:
    """``(id, start, size)`` of the chunk the stub printed."""
    reply = stub.send(line).strip()
    match = re.fullmatch(r"(\d+): 0x([0-9a-f]+)@0x([0-9a-f]+)", reply)
    assert match, reply
    return int(match[1]), int(match[3], 16), int(match[2], 16)


def _status(session: BoardSession) -> str:
    return str(session.agent.qmp("query-status")["status"])


def test_host_write_verified_by_guest(smdk: BoardSession) -> None:
    agent, memory = smdk.agent, _memory(smdk)
    events = agent.agent.machine.events
    with smdk.guest.stub() as stub:
        chunk_id, start, size = _alloc(stub, "alloc s5p-fimc1 64K")
        assert stub.send(f"verify {chunk_id} {PATTERN:#x}").strip().startswith("verify: EIO")

        seen_before = len(events.history)
        agent.call(memory.write(start, _words(PATTERN, size // 4)))  # one bulk write
        print(f"\nbulk gdbstub write: {size} bytes at {memory.last_write.mb_per_s:.1f} MB/s")
        assert memory.last_write.nbytes == size
        assert stub.send(f"verify {chunk_id} {PATTERN:#x}").strip() == ""
        assert agent.read(start, size) == _words(PATTERN, size // 4)  # pmemsave agrees

        # a word the host changes in the middle is found there by the guest
        agent.call(memory.write(start + 0x800, b"\xef\xbe\xad\xde"))
        assert stub.send(f"v {chunk_id} {PATTERN:#x}").strip() == "v: EIO: mismatch at offset 0x800"
        assert stub.send(f"w {chunk_id} {PATTERN:#x}").strip() == ""
        assert agent.find_mismatch(agent.chunk_at(start), PATTERN) is None

        names = [e.name for e in list(events.history)[seen_before:]]
        assert "STOP" not in names and "RESUME" not in names, names
        assert _status(smdk) == "running"
        assert stub.send("free").strip() == ""


def test_a_client_killed_while_the_vm_is_stopped_is_recovered(smdk: BoardSession) -> None:
    memory = _memory(smdk)
    sock = memory.gdb_socket
    smdk.agent.call(memory.disconnect())  # QEMU's stub takes one client at a time
    # a stand-in for an agent SIGKILLed mid-write: connected (which stops the VM), marker left
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "open(sys.argv[2], 'w').write(f'{os.getpid()}\\n')\n"
            "print('stopped', flush=True); time.sleep(600)\n",
            str(sock),
            str(stopped_marker(sock)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "stopped\n"
        deadline = time.monotonic() + 10
        while _status(smdk) != "paused" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _status(smdk) == "paused"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    time.sleep(0.5)
    assert _status(smdk) == "paused", "QEMU resumed the VM on its own: the guard is moot"
    assert smdk.agent.call(recover_stopped_vm(smdk.agent.agent.machine.qmp, sock))
    assert _status(smdk) == "running"
    assert not stopped_marker(sock).exists()
    assert smdk.guest.check("echo alive").strip().endswith("alive")
    with smdk.guest.stub() as stub:  # and the backend connects again and writes
        chunk_id, start, size = _alloc(stub, "alloc s5p-fimc1 4K")
        smdk.agent.call(memory.write(start, _words(PATTERN + 7, size // 4)))
        assert stub.send(f"verify {chunk_id} {PATTERN + 7:#x}").strip() == ""
        assert stub.send("free").strip() == ""
    assert _status(smdk) == "running"
