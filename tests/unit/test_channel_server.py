"""Guest sessions over real streams: a socketpair, and QEMU-like chardev sockets."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from cma_helpers import make_cma

from cma_qemu.channel import ChannelServer, GuestSession
from cma_qemu.errors import ENOENT, ETIMEDOUT
from cma_qemu.framework import Chunk


class Guest:
    """The guest end of a channel: send a request, read one reply line."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.next_id = 0

    async def raw(self, data: bytes) -> dict[str, Any]:
        self.writer.write(data)
        await self.writer.drain()
        line = await asyncio.wait_for(self.reader.readline(), 5)
        reply: dict[str, Any] = json.loads(line)
        return reply

    async def call(self, execute: str, **arguments: object) -> Any:
        self.next_id += 1
        msg = {"execute": execute, "arguments": arguments, "id": self.next_id}
        reply = await self.raw(json.dumps(msg).encode() + b"\n")
        assert reply["id"] == self.next_id
        return reply


async def test_session_over_a_socketpair() -> None:
    cma = make_cma()
    session = GuestSession(cma, "guest:sp")
    host_sock, guest_sock = socket.socketpair()
    host_r, host_w = await asyncio.open_unix_connection(sock=host_sock)
    guest = Guest(*await asyncio.open_unix_connection(sock=guest_sock))
    task = asyncio.create_task(session.serve(host_r, host_w))
    try:
        assert await guest.call("guest-ping") == {"return": {}, "id": 1}
        got = (await guest.call("cma-alloc", dev="dev", size=4096))["return"]
        assert got["region"] == "a"
        bad = await guest.raw(b"\xff{not json\n")
        assert bad["error"]["class"] == "GenericError"
        assert (await guest.call("cma-free", addr=got["addr"]))["return"] == {}
        # many pipelined requests in one write come back in order
        burst = b"".join(b'{"execute": "guest-ping", "id": %d}\n' % i for i in range(100, 200))
        guest.writer.write(burst)
        ids = [json.loads(await guest.reader.readline())["id"] for _ in range(100)]
        assert ids == list(range(100, 200))
    finally:
        guest.writer.close()
        await asyncio.wait_for(task, 5)  # EOF ends serve()
        host_w.close()


class FakeQemuChardev:
    """A ``-chardev socket,server=on,wait=off``: accepts the agent, exposes the guest end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections: asyncio.Queue[Guest] = asyncio.Queue()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.connections.put(Guest(reader, writer))

        self.server = await asyncio.start_unix_server(accept, path=str(self.path))

    async def guest(self) -> Guest:
        return await asyncio.wait_for(self.connections.get(), 5)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "port0.sock"


async def test_server_connects_later_reconnects_and_keeps_chunks(sock_path: Path) -> None:
    cma = make_cma()
    resets: list[tuple[str, str, list[Chunk]]] = []
    server = ChannelServer(cma, on_reset=lambda *a: resets.append(a), retry_delay=0.01)
    async with server:
        server.add_port("port0", sock_path)  # QEMU is not there yet: keeps retrying
        with pytest.raises(ETIMEDOUT):
            await server.wait_connected("port0", timeout=0.05)
        qemu = FakeQemuChardev(sock_path)
        await qemu.start()
        guest = await qemu.guest()
        await server.wait_connected("port0", timeout=5)
        assert server.is_connected("port0")
        first = (await guest.call("cma-alloc", dev="dev", size=8192))["return"]
        assert [c.owner for c in cma.chunks] == ["guest:port0"]

        # the host side of the socket drops: the agent reconnects, the guest keeps its chunk
        guest.writer.close()
        guest = await qemu.guest()
        listed = (await guest.call("cma-list"))["return"]
        assert listed == [first]
        assert resets == []

        # guest reset (QMP RESET): chunks go back, the hook reports them
        released = server.reset()
        assert [c.start for c in released] == [first["addr"]]
        assert cma.chunks == []
        assert [(p, r, [c.start for c in cs]) for p, r, cs in resets] == [
            ("port0", "reset", [first["addr"]])
        ]
        assert (await guest.call("cma-list"))["return"] == []

        # port closed by the guest (VSERPORT_CHANGE open=false)
        await guest.call("cma-alloc", dev="dev", size=4096)
        assert len(server.port_closed("port0")) == 1
        assert resets[-1][1] == "port-closed"
        guest.writer.close()
        await qemu.stop()


async def test_two_ports_are_two_owners(tmp_path: Path) -> None:
    cma = make_cma()
    async with ChannelServer(cma, retry_delay=0.01) as server:
        qemus = []
        guests = []
        for name in ("p0", "p1"):
            qemu = FakeQemuChardev(tmp_path / f"{name}.sock")
            await qemu.start()
            server.add_port(name, qemu.path)
            qemus.append(qemu)
            guests.append(await qemu.guest())
        g0, g1 = guests
        c0 = (await g0.call("cma-alloc", dev="dev", size=4096))["return"]
        c1 = (await g1.call("cma-alloc", dev="dev", size=4096))["return"]
        assert (await g0.call("cma-free", addr=c1["addr"]))["error"]["class"] == "ENOENT"
        server.reset("p1")
        assert [c.start for c in cma.chunks] == [c0["addr"]]
        assert server.session("p0").chunks[0].start == c0["addr"]
        released = await server.remove_port("p0")
        assert [c.start for c in released] == [c0["addr"]]
        assert server.ports == ["p1"]
        with pytest.raises(ENOENT):
            server.reset("p0")
        for g in guests:
            g.writer.close()
        for qemu in qemus:
            await qemu.stop()
