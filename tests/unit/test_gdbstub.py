"""The gdbstub write backend against a fake QEMU 7.2 gdbstub and QMP (one layer, faked below).

The fake keeps QEMU's rules that matter here: connecting stops a running VM; while it runs,
any byte is an interrupt (stop + ``T02`` stop reply); packets are read only while stopped;
``c`` resumes without a reply; a QMP ``stop`` while a client is connected sends it a stop
reply; a client that goes away leaves the VM as it is. Every stop and resume emits the QMP
``STOP``/``RESUME`` event into a real :class:`EventHub`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cma_qemu.errors import EINVAL, EIO
from cma_qemu.machine.events import EventHub, QmpEvent
from cma_qemu.machine.gdbstub import (
    MAX_WRITE_PACKET,
    STOP_GROUP,
    GdbStubGuestMemory,
    checksum,
    decode_packet,
    encode_packet,
    gdb_args,
    recover_stopped_vm,
    stopped_marker,
)

BASE = 0x40000000
SIZE = 4 * 1024 * 1024


class FakeQemu:
    """Guest RAM, a run state, a gdbstub on a Unix socket and the QMP commands used."""

    def __init__(self, sock: Path, hub: EventHub) -> None:
        self.sock = sock
        self.hub = hub
        self.ram = bytearray(SIZE)
        self.running = True
        self.packets: list[str] = []
        self.stops = 0
        self.writer: asyncio.StreamWriter | None = None
        self.server: asyncio.AbstractServer | None = None
        self.hold_writes = asyncio.Event()
        self.hold_writes.set()
        self.write_reply = "OK"
        #: QEMU keeps its last packet until acked: a '+' or '-' then is no interrupt.
        self.unacked = False

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._client, str(self.sock))

    async def stop_server(self) -> None:
        assert self.server is not None
        self.server.close()
        if self.writer is not None:
            self.writer.close()

    def _event(self, name: str) -> None:
        self.hub.dispatch(QmpEvent(name))

    def _send(self, payload: str) -> None:
        assert self.writer is not None
        self.writer.write(encode_packet(payload))
        self.unacked = True

    def vm_stop(self, reply: bool) -> None:
        """QEMU's vm_stop: a STOP event, and a stop reply to a connected client."""
        if self.running:
            self.running = False
            self.stops += 1
            self._event("STOP")
            if reply and self.writer is not None:
                self._send("T02thread:p01.01;")

    def vm_start(self) -> None:
        if not self.running:
            self.running = True
            self._event("RESUME")

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.vm_stop(reply=True)  # connecting stops the VM, and the stub says so
        buf = b""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                buf += data
                while buf:
                    if buf[:1] in (b"+", b"-") and self.unacked:
                        self.unacked = False
                        buf = buf[1:]
                        continue
                    if self.running:  # any other byte is an interrupt
                        buf = buf[1:]
                        self.vm_stop(reply=True)
                        continue
                    if buf[:1] != b"$":
                        buf = buf[1:]
                        continue
                    end = buf.find(b"#")
                    if end < 0 or len(buf) < end + 3:
                        break
                    body = buf[1:end]
                    assert int(buf[end + 1 : end + 3], 16) == checksum(body)
                    assert len(buf[: end + 3]) <= 4096
                    buf = buf[end + 3 :]
                    writer.write(b"+")
                    await self._packet(body.decode())
        finally:
            self.writer = None

    async def _packet(self, p: str) -> None:
        self.packets.append(p[:40])
        if p.startswith("qSupported"):
            self._send("PacketSize=1000;multiprocess+")
        elif p == "Qqemu.PhyMemMode:1":
            self._send("OK")
        elif p.startswith("M"):
            await self.hold_writes.wait()
            head, hexdata = p[1:].split(":")
            addr, n = (int(x, 16) for x in head.split(","))
            data = bytes.fromhex(hexdata)
            assert len(data) == n <= MAX_WRITE_PACKET
            if self.write_reply == "OK":
                self.ram[addr - BASE : addr - BASE + n] = data
            self._send(self.write_reply)
        elif p.startswith("m"):
            addr, n = (int(x, 16) for x in p[1:].split(","))
            assert n <= 0x800
            self._send(self.ram[addr - BASE : addr - BASE + n].hex())
        elif p == "c":
            self.vm_start()
        else:
            self._send("")

    # -- QMP ------------------------------------------------------------------------------

    async def execute(
        self, cmd: str, arguments: dict[str, Any] | None = None, oob: bool = False
    ) -> object:
        if cmd == "query-status":
            return {"running": self.running, "status": "running" if self.running else "paused"}
        if cmd == "cont":
            self.vm_start()
            return {}
        if cmd == "stop":
            self.vm_stop(reply=True)
            return {}
        if cmd == "pmemsave":
            assert arguments is not None
            a, n = arguments["val"] - BASE, arguments["size"]
            Path(arguments["filename"]).write_bytes(self.ram[a : a + n])
            return {}
        raise AssertionError(cmd)


@contextlib.asynccontextmanager
async def machine(tmp: Path) -> AsyncIterator[tuple[FakeQemu, GdbStubGuestMemory, EventHub]]:
    hub = EventHub(cast(Any, None))
    fake = FakeQemu(tmp / "gdb.sock", hub)
    await fake.start()
    mem = GdbStubGuestMemory(fake, tmp, fake.sock, BASE, SIZE, events=hub, timeout=2.0)
    try:
        yield fake, mem, hub
    finally:
        await mem.close()
        await fake.stop_server()


def run_stop_events(hub: EventHub) -> list[str]:
    return [e.name for e in hub.history if e.name in ("STOP", "RESUME")]


async def test_a_word_written_is_read_back_and_the_vm_runs_on(tmp_path: Path) -> None:
    async with machine(tmp_path) as (fake, mem, hub):
        await mem.write(BASE + 0x100, b"\xde\xad\xbe\xef")
        assert fake.ram[0x100:0x104] == b"\xde\xad\xbe\xef"
        assert await mem.read(BASE + 0x100, 4) == b"\xde\xad\xbe\xef"
        await asyncio.sleep(0.01)
        assert fake.running
        assert "Qqemu.PhyMemMode:1" in fake.packets
        assert not stopped_marker(fake.sock).exists()
        # the stub's stops and continues (connect, the write, the small read) are not events
        assert fake.stops == 3
        assert run_stop_events(hub) == []


async def test_a_stop_over_qmp_is_still_reported_and_not_undone(tmp_path: Path) -> None:
    async with machine(tmp_path) as (fake, mem, hub):
        await mem.write(BASE, b"1234")
        await asyncio.sleep(0.01)
        await fake.execute("stop")
        await asyncio.sleep(0.01)
        await mem.write(BASE + 4, b"5678")
        await asyncio.sleep(0.01)
        assert not fake.running, "the write resumed a VM someone else paused"
        assert fake.ram[:8] == b"12345678"
        assert run_stop_events(hub) == ["STOP"]
        await fake.execute("cont")
        await mem.write(BASE + 8, b"9")
        await asyncio.sleep(0.01)
        assert fake.running and fake.ram[8:9] == b"9"
        assert run_stop_events(hub) == ["STOP", "RESUME"]


async def test_bulk_writes_are_split_into_packets_and_stop_groups(tmp_path: Path) -> None:
    data = os.urandom(STOP_GROUP + 3 * MAX_WRITE_PACKET + 5)
    async with machine(tmp_path) as (fake, mem, hub):
        await mem.write(BASE + 0x1000, data)
        assert bytes(fake.ram[0x1000 : 0x1000 + len(data)]) == data
        assert fake.stops == 1 + 2  # the connect, then one stop per 256 KiB group
        assert mem.last_write.nbytes == len(data)
        assert mem.last_write.seconds > 0 and mem.last_write.mb_per_s > 0
        await asyncio.sleep(0.01)
        assert fake.running and run_stop_events(hub) == []


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    addr=st.integers(min_value=BASE - 0x2000, max_value=BASE + SIZE + 0x2000),
    size=st.integers(min_value=0, max_value=0x3000),
)
def test_writes_outside_ram_are_einval_and_change_nothing(
    tmp_path: Path, addr: int, size: int
) -> None:
    async def go() -> None:
        sock_dir = Path(os.path.join(tmp_path, f"h{os.urandom(4).hex()}"))
        sock_dir.mkdir()
        async with machine(sock_dir) as (fake, mem, _hub):
            data = bytes([0xA5]) * size
            inside = addr >= BASE and addr + size <= BASE + SIZE
            if inside:
                await mem.write(addr, data)
                assert fake.ram[addr - BASE : addr - BASE + size] == data
            else:
                with pytest.raises(EINVAL, match="not inside guest RAM"):
                    await mem.write(addr, data)
                assert fake.ram == bytearray(SIZE)
            await asyncio.sleep(0.005)
            assert fake.running

    asyncio.run(go())


async def test_a_refused_write_is_eio_and_the_vm_is_continued(tmp_path: Path) -> None:
    async with machine(tmp_path) as (fake, mem, hub):
        fake.write_reply = "E14"
        with pytest.raises(EIO, match="refused"):
            await mem.write(BASE, b"abcd")
        await asyncio.sleep(0.01)
        assert fake.running and run_stop_events(hub) == []
        assert not stopped_marker(fake.sock).exists()


async def test_a_cancelled_write_still_continues_the_vm(tmp_path: Path) -> None:
    async with machine(tmp_path) as (fake, mem, _hub):
        await mem.write(BASE, b"x")
        fake.hold_writes.clear()
        task = asyncio.create_task(mem.write(BASE, b"y" * 16))
        await asyncio.sleep(0.05)
        assert not fake.running and stopped_marker(fake.sock).exists()
        task.cancel()  # Ctrl-C / SIGTERM take this path
        with pytest.raises(asyncio.CancelledError):
            await task
        fake.hold_writes.set()
        await asyncio.sleep(0.05)
        assert fake.running
        assert not stopped_marker(fake.sock).exists()


async def test_the_finalizer_continues_a_vm_stopped_mid_write(tmp_path: Path) -> None:
    """What runs at interpreter exit (or when the backend is dropped) while it holds a stop."""
    async with machine(tmp_path) as (fake, mem, _hub):
        await mem.write(BASE, b"x")
        fake.hold_writes.clear()
        task = asyncio.create_task(mem.write(BASE, b"y"))
        await asyncio.sleep(0.05)
        assert not fake.running
        mem._finalizer()  # the atexit path, called as the interpreter would
        fake.hold_writes.set()
        await asyncio.sleep(0.05)
        assert fake.running
        assert not stopped_marker(fake.sock).exists()
        await task


async def test_a_vm_left_stopped_by_a_killed_agent_is_continued_by_the_next(
    tmp_path: Path,
) -> None:
    """SIGKILL: no finally, no finalizer; the socket closes and QEMU keeps the VM paused."""
    async with machine(tmp_path) as (fake, mem, _hub):
        proc = await asyncio.create_subprocess_exec("true")
        await proc.wait()
        fake.vm_stop(reply=False)
        stopped_marker(fake.sock).write_text(f"{proc.pid}\n")  # a gone pid held the stop
        assert await recover_stopped_vm(fake, fake.sock)
        assert fake.running and not stopped_marker(fake.sock).exists()
        # and the next backend does it on its own before its first write
        fake.vm_stop(reply=False)
        stopped_marker(fake.sock).write_text(f"{proc.pid}\n")
        await mem.write(BASE, b"z")
        await asyncio.sleep(0.01)
        assert fake.running


async def test_a_live_agents_stop_is_not_undone(tmp_path: Path) -> None:
    async with machine(tmp_path) as (fake, _mem, _hub):
        fake.vm_stop(reply=False)
        stopped_marker(fake.sock).write_text(f"{os.getppid()}\n")
        assert not await recover_stopped_vm(fake, fake.sock)
        assert not fake.running


async def test_a_gone_stub_is_one_eio_line(tmp_path: Path) -> None:
    hub = EventHub(cast(Any, None))
    fake = FakeQemu(tmp_path / "nosuch.sock", hub)
    mem = GdbStubGuestMemory(fake, tmp_path, fake.sock, BASE, SIZE, events=hub, timeout=1.0)
    with pytest.raises(EIO, match="gdbstub") as info:
        await mem.write(BASE, b"a")
    assert "\n" not in str(info.value)
    assert run_stop_events(hub) == []
    await asyncio.sleep(0)
    hub.dispatch(QmpEvent("STOP"))  # nothing is left muted by the failed connect
    assert run_stop_events(hub) == ["STOP"]
    await mem.close()


@given(st.binary(max_size=300).map(lambda b: b.hex()))
def test_packets_round_trip(payload: str) -> None:
    raw = encode_packet(payload)
    body, cs = raw[1:-3], raw[-2:]
    assert decode_packet(body, cs) == payload


def test_run_length_and_escapes_decode() -> None:
    body = b"0* }]"  # '0' repeated 3 more times (' ' = 32 - 29), then an escaped '}'
    assert decode_packet(body, f"{checksum(body):02x}".encode()) == "0000}"
    with pytest.raises(EIO, match="checksum"):
        decode_packet(b"OK", b"00")


def test_qemu_options_name_the_socket() -> None:
    assert gdb_args("/r/a,b/gdb.sock") == [
        "-chardev",
        "socket,id=gdb0,path=/r/a,,b/gdb.sock,server=on,wait=off",
        "-gdb",
        "chardev:gdb0",
    ]


async def test_reads_through_the_stub_match_pmemsave(tmp_path: Path) -> None:
    data = os.urandom(3 * 0x800 + 7)
    async with machine(tmp_path) as (fake, mem, hub):
        fake.ram[0x10 : 0x10 + len(data)] = data
        assert await mem.read_via_stub(BASE + 0x10, len(data)) == data
        stops = fake.stops
        assert await mem.read(BASE + 0x10, len(data)) == data  # > 2 KiB: pmemsave
        assert fake.stops == stops
        assert await mem.read(BASE + 0x10, 0x800) == data[:0x800]  # one packet: the stub
        assert fake.stops == stops + 1
        mem.small_reads_via_stub = False
        assert await mem.read(BASE + 0x10, 4) == data[:4]
        assert fake.stops == stops + 1
        await asyncio.sleep(0.01)
        assert fake.running and run_stop_events(hub) == []


async def test_attach_finds_the_stub_and_continues_a_vm_a_killed_agent_left_stopped(
    tmp_path: Path,
) -> None:
    from cma_qemu.boards import load_board
    from cma_qemu.machine.attached import open_guest_memory

    sock = tmp_path / "gdb.sock"
    calls: list[str] = []

    class Qmp:
        running = False

        async def execute(
            self, cmd: str, arguments: dict[str, Any] | None = None, oob: bool = False
        ) -> object:
            calls.append(cmd)
            if cmd == "query-chardev":
                return [
                    {"label": "cma0", "filename": "unix:/x/channel.sock,server=on"},
                    {"label": "gdb0", "filename": f"unix:{sock},server=on"},
                ]
            if cmd == "query-status":
                return {"running": self.running, "status": "running" if self.running else "paused"}
            if cmd == "cont":
                self.running = True
                return {}
            raise AssertionError(cmd)

    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    stopped_marker(sock).write_text(f"{proc.pid}\n")
    qmp = Qmp()
    memory = await open_guest_memory(cast(Any, qmp), load_board("smdkc210"), tmp_path)
    assert isinstance(memory, GdbStubGuestMemory) and memory.gdb_socket == sock
    assert calls == ["query-chardev", "query-status", "cont"] and qmp.running
    assert not stopped_marker(sock).exists()
    await memory.close()


_EXITING_CHILD = """
import asyncio, sys
from cma_qemu.machine.gdbstub import GdbStubGuestMemory

class Qmp:
    async def execute(self, cmd, arguments=None, oob=False):
        assert cmd == "query-status", cmd
        return {"running": True, "status": "running"}

loop = asyncio.new_event_loop()
mem = GdbStubGuestMemory(Qmp(), sys.argv[2], sys.argv[1], 0x40000000, 4 << 20, timeout=30)
task = loop.create_task(mem.write(0x40000000, b"abcd"))
loop.run_until_complete(asyncio.sleep(0.5))  # the write is now waiting for its reply
print("mid-write", flush=True)
sys.exit(0)  # the loop is abandoned with the write pending; what runs at exit must continue
"""


async def test_a_process_exiting_mid_write_continues_the_vm(tmp_path: Path) -> None:
    """Interpreter exit for real: a child leaves its loop while a write holds the VM stopped.

    At exit the pending write is dropped (its ``except`` sends the continue) and the finalizer
    runs (it would send it if that had not); without both the VM stays stopped here, as it
    does in QEMU. The finalizer alone is tested above.
    """
    async with machine(tmp_path) as (fake, _mem, _hub):
        fake.hold_writes.clear()
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _EXITING_CHILD,
            str(fake.sock),
            str(tmp_path),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(child.communicate(), 30)
        assert out == b"mid-write\n" and child.returncode == 0
        assert not fake.running  # held by the write the child never finished
        fake.hold_writes.set()
        for _ in range(100):
            if fake.running:
                break
            await asyncio.sleep(0.01)
        assert fake.running, "the child's exit left the VM stopped"
        assert not stopped_marker(fake.sock).exists()
