"""The net channel's host side: the agent listens, every connection is a session of its own.

Real unix sockets stand in for the ``socat`` QEMU starts per guest connection; the argv and
the device tree node are checked as data (the e2e tests in tests/e2e/test_smdkc210_net.py
boot them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from pathlib import Path
from typing import Any

import fdt
import pytest
from cma_helpers import make_cma
from hypothesis import given, settings
from hypothesis import strategies as st

from cma_qemu.channel import ChannelServer
from cma_qemu.errors import EADDRINUSE, EINVAL, ENODEV, ENOENT
from cma_qemu.framework import Chunk
from cma_qemu.machine.devicetree import LAN9118_NODE, add_lan9118
from cma_qemu.machine.launch import net_channel_args


class Stub:
    """One guest connection, as the socat of one guest TCP connection delivers it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.next_id = reader, writer, 0

    @classmethod
    async def connect(cls, path: Path) -> Stub:
        return cls(*await asyncio.open_unix_connection(str(path)))

    async def call(self, execute: str, **arguments: object) -> Any:
        self.next_id += 1
        msg = {"execute": execute, "arguments": arguments, "id": self.next_id}
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        reply: dict[str, Any] = json.loads(await asyncio.wait_for(self.reader.readline(), 5))
        assert reply["id"] == self.next_id
        return reply

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def _until(check: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_each_connection_is_a_session_released_when_it_closes(tmp_path: Path) -> None:
    cma = make_cma()
    resets: list[tuple[str, str, list[Chunk]]] = []
    server = ChannelServer(cma, on_reset=lambda *a: resets.append(a))
    path = tmp_path / "channel.sock"
    await server.add_listener("net", path)
    try:
        assert server.is_connected("net") and "net" in server.ports
        await server.wait_connected("net", timeout=0.1)  # listening is all it waits for
        one, two = await Stub.connect(path), await Stub.connect(path)
        a = (await one.call("cma-alloc", dev="dev", size=4096))["return"]
        b = (await two.call("cma-alloc", dev="dev", size=8192))["return"]
        assert set(server.connections("net")) == {"guest:net:1", "guest:net:2"}
        owners = {c.start: c.owner for c in cma.chunks}
        assert owners == {a["addr"]: "guest:net:1", b["addr"]: "guest:net:2"}
        # one stub cannot free the other's chunk
        assert (await two.call("cma-free", addr=a["addr"]))["error"]["class"] != ""
        await one.close()  # a killed stub: its connection closes, its chunks come back
        await _until(lambda: len(cma.chunks) == 1)
        assert [c.owner for c in cma.chunks] == ["guest:net:2"]
        assert resets == [("net:1", "port-closed", resets[0][2])]
        assert [c.start for c in resets[0][2]] == [a["addr"]]
        # a clean exit that freed its own chunks reports nothing
        assert (await two.call("cma-free", addr=b["addr"]))["return"] == {}
        await two.close()
        await _until(lambda: server.connections("net") == {})
        assert len(resets) == 1
        three = await Stub.connect(path)
        await three.call("cma-alloc", dev="dev", size=4096)
        assert set(server.connections("net")) == {"guest:net:3"}
        assert len(server.reset(reason="reset")) == 1 and cma.chunks == []
        await three.close()
    finally:
        await server.close()
    assert not path.exists()  # close removes the socket


async def test_a_connection_is_numbered_when_it_speaks_and_a_silent_one_is_no_session(
    tmp_path: Path,
) -> None:
    """Another agent's probe (connect, close, nothing sent) takes no number; a guest's first
    bytes, even half a request, are not lost to the numbering."""
    cma = make_cma()
    server = ChannelServer(cma)
    path = tmp_path / "channel.sock"
    await server.add_listener("net", path)
    try:
        for _ in range(3):  # probes, as free_for_bind makes them
            _, probe = await asyncio.open_unix_connection(str(path))
            probe.close()
            await probe.wait_closed()
        silent = await Stub.connect(path)  # open, nothing sent yet
        late = await Stub.connect(path)
        request = json.dumps({"execute": "cma-alloc", "arguments": {"dev": "d", "size": 4096}})
        late.writer.write(request[:10].encode())
        await late.writer.drain()
        await asyncio.sleep(0.05)
        assert set(server.connections("net")) == {"guest:net:1"}  # the first to speak
        late.writer.write(request[10:].encode() + b"\n")
        reply = json.loads(await asyncio.wait_for(late.reader.readline(), 5))
        assert reply["return"]["size"] == 4096
        assert [c.owner for c in cma.chunks] == ["guest:net:1"]
        assert set(server.connections("net")) == {"guest:net:1"}
        assert (await silent.call("guest-ping"))["return"] == {}
        assert set(server.connections("net")) == {"guest:net:1", "guest:net:2"}
        await late.close()
        await _until(lambda: cma.chunks == [])
        await silent.close()
        await _until(lambda: server.connections("net") == {})
        quiet = await Stub.connect(path)  # still silent when the server closes
        pinger = await Stub.connect(path)  # answered: the server has taken quiet in too
        assert (await pinger.call("guest-ping"))["return"] == {}
        await pinger.close()
    finally:
        await server.close()
    assert await asyncio.wait_for(quiet.reader.read(), 5) == b""  # closed, not left open
    await quiet.close()


async def test_listener_errors_leave_state_intact(tmp_path: Path) -> None:
    cma = make_cma()
    server = ChannelServer(cma)
    path = tmp_path / "channel.sock"
    try:
        await server.add_listener("net", path)
        with pytest.raises(EADDRINUSE):
            await server.add_listener("net", tmp_path / "other.sock")
        with pytest.raises(ENOENT):
            server.connections("nosuch")
        with pytest.raises(EADDRINUSE, match="cannot listen"):
            await server.add_listener("net2", tmp_path / "no" / "such" / "dir.sock")
        assert server.ports == ["net"]
        stub = await Stub.connect(path)
        assert (await stub.call("guest-ping"))["return"] == {}
        await stub.close()
    finally:
        await server.close()


async def test_a_live_listener_keeps_its_socket_and_a_stale_one_is_replaced(
    tmp_path: Path,
) -> None:
    """A second agent at the same path gets EADDRINUSE; the first keeps serving its guests."""
    path = tmp_path / "channel.sock"
    first, second = ChannelServer(make_cma()), ChannelServer(make_cma())
    try:
        await first.add_listener("net", path)
        inode = path.stat().st_ino
        with pytest.raises(EADDRINUSE, match="another process serves this channel") as err:
            await second.add_listener("net", path)
        assert err.value.where == "net"
        assert str(err.value).count("\n") == 0
        assert second.ports == [] and path.stat().st_ino == inode
        stub = await Stub.connect(path)  # the first agent still answers at its socket
        assert (await stub.call("cma-alloc", dev="dev", size=4096))["return"]["size"] == 4096
        assert [c.owner for c in first.cma.chunks] == ["guest:net:1"]  # the probe is none
        assert second.cma.chunks == []
        await stub.close()
    finally:
        await first.close()
        await second.close()
    # a dead agent's socket file (nobody listens: connection refused) is replaced
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    assert path.is_socket()
    try:
        await second.add_listener("net", path)
        stub = await Stub.connect(path)
        assert (await stub.call("guest-ping"))["return"] == {}
        await stub.close()
    finally:
        await second.close()
    assert not path.exists()


async def test_close_ends_live_connections(tmp_path: Path) -> None:
    cma = make_cma()
    server = ChannelServer(cma)
    path = tmp_path / "channel.sock"
    await server.add_listener("net", path)
    stub = await Stub.connect(path)
    await stub.call("cma-alloc", dev="dev", size=4096)
    await server.close()
    assert await asyncio.wait_for(stub.reader.read(), 5) == b""
    await stub.close()


def test_net_argv() -> None:
    argv = net_channel_args("tcp:10.0.2.100:1234", Path("/tmp/x/channel.sock"))
    assert argv == [
        "-nic",
        "user,model=lan9118,restrict=on,ipv6=off,"
        "guestfwd=tcp:10.0.2.100:1234-cmd:socat - UNIX-CONNECT:/tmp/x/channel.sock",
    ]


def test_net_argv_needs_socat() -> None:
    with pytest.raises(ENOENT, match="nosuch-socat is not installed"):
        net_channel_args("tcp:10.0.2.100:1234", Path("/tmp/x.sock"), socat="nosuch-socat")


@given(st.text(alphabet=st.sampled_from("/ab,c "), min_size=1, max_size=12))
@settings(max_examples=60)
def test_net_argv_refuses_what_qemu_would_split(path: str) -> None:
    if "," in path or " " in path:
        with pytest.raises(EINVAL, match="comma or a space"):
            net_channel_args("tcp:10.0.2.100:1234", Path(path))
    else:
        assert net_channel_args("tcp:10.0.2.100:1234", Path(path))[1].endswith(str(Path(path)))


def _exynos_like() -> bytes:
    tree = fdt.FDT()
    tree.root.append(fdt.PropWords("#address-cells", 1))
    soc = fdt.Node("soc")
    pinctrl = fdt.Node("pinctrl@11000000")
    gic = fdt.Node("interrupt-controller@10490000")
    gic.append(fdt.PropWords("phandle", 7))
    bank = fdt.Node("gpx0-gpio-bank")
    bank.append(fdt.Property("interrupt-controller"))
    pinctrl.append(bank)
    soc.append(pinctrl)
    soc.append(gic)
    tree.root.append(soc)
    out: bytes = tree.to_dtb(version=17)
    return out


def test_lan9118_node() -> None:
    tree = fdt.parse_dtb(add_lan9118(_exynos_like()))
    bank = tree.get_node("/soc/pinctrl@11000000/gpx0-gpio-bank")
    assert bank.get_property("phandle").value == 8  # a phandle no other node has
    node = tree.get_node(LAN9118_NODE)
    assert node.get_property("compatible").value == "smsc,lan9115"
    assert list(node.get_property("reg").data) == [0x05000000, 0x10000]
    assert node.get_property("interrupt-parent").value == 8
    assert list(node.get_property("interrupts").data) == [5, 8]  # pin 5, level low
    assert node.exist_property("smsc,irq-push-pull")
    assert not node.exist_property("smsc,irq-active-high")
    assert bytes(node.get_property("local-mac-address").data) == bytes.fromhex("525400123456")


def test_lan9118_node_errors() -> None:
    once = add_lan9118(_exynos_like())
    with pytest.raises(EADDRINUSE, match="already has /soc/ethernet@5000000"):
        add_lan9118(once)
    with pytest.raises(EINVAL, match="not a valid DTB"):
        add_lan9118(b"not a dtb")
    bare = fdt.FDT()
    with pytest.raises(ENODEV, match="gpx0-gpio-bank"):
        add_lan9118(bare.to_dtb(version=17))


class _Stop(Exception):
    """Raised where attach opens guest memory: the test needs no further."""


@pytest.mark.parametrize(("board_name", "looks_up"), [("smdkc210", False), ("smdkc210-uart", True)])
async def test_attach_looks_up_a_chardev_only_when_qemu_serves_the_channel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, board_name: str, looks_up: bool
) -> None:
    """A net channel's socket is the agent's own (guestfwd's socat connects to it), so attach
    finds no chardev for it; a UART or virtio channel's socket must be a QEMU chardev."""
    from cma_qemu.boards import load_board
    from cma_qemu.machine import attached

    class FakeQmp:
        async def disconnect(self) -> None:
            pass

    lookups: list[Path] = []

    async def connect_qmp(path: Any, **kwargs: Any) -> FakeQmp:
        return FakeQmp()

    async def find_channel_chardev(qmp: Any, path: Path, board: Any) -> Any:
        lookups.append(path)
        raise ENODEV(f"no chardev listens on {path}", where="qmp")

    async def open_guest_memory(*args: Any, **kwargs: Any) -> Any:
        raise _Stop

    monkeypatch.setattr(attached, "connect_qmp", connect_qmp)
    monkeypatch.setattr(attached, "find_channel_chardev", find_channel_chardev)
    monkeypatch.setattr(attached, "open_guest_memory", open_guest_memory)
    channel = tmp_path / "channel.sock"
    with pytest.raises(ENODEV if looks_up else _Stop):
        await attached.attach(tmp_path / "qmp.sock", channel, load_board(board_name))
    assert lookups == ([channel] if looks_up else [])


@pytest.mark.parametrize("turns", range(8))
async def test_close_ends_connections_accepted_but_not_yet_served(
    tmp_path: Path, turns: int
) -> None:
    # Connections accepted in the loop's last turns before close() may have a handler task
    # that has not started yet; close() must end those too (the loop goes on running in a
    # long-lived process such as the pytest plugin's, so nothing else would).
    server = ChannelServer(make_cma())
    path = tmp_path / "channel.sock"
    await server.add_listener("net", path)
    loop = asyncio.get_running_loop()
    clients = []
    for _ in range(4):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.setblocking(False)
        clients.append(client)
    for _ in range(turns):  # let the accepts and the handler tasks get this far
        await asyncio.sleep(0)
    await server.close()
    try:
        for client in clients:  # ended: EOF, or a reset if it was never accepted
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(loop.sock_recv(client, 1), 2) == b""
    finally:
        for client in clients:
            client.close()
