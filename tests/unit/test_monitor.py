"""The monitor through a real ``qemu.qmp.QMPClient``, and bad input through a raw socket."""

from __future__ import annotations

import asyncio
import base64
import importlib.metadata
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cma_helpers import cma_state as state
from cma_helpers import make_cma
from qemu.qmp import ExecuteError, QMPClient

from cma_qemu.channel import GuestSession
from cma_qemu.errors import EADDRINUSE, EIO
from cma_qemu.framework import Cma
from cma_qemu.monitor import MAX_READ, Monitor

MiB = 1024 * 1024


@pytest.fixture
def cma() -> Cma:
    return make_cma()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "monitor.sock"


@pytest.fixture
async def monitor(cma: Cma, sock_path: Path) -> AsyncIterator[Monitor]:
    async def read_memory(addr: int, size: int) -> bytes:
        if addr == 0xDEAD0000:
            raise OSError("bus error")
        return bytes((addr + i) & 0xFF for i in range(size))

    mon = Monitor(cma, read_memory=read_memory)
    await mon.start(sock_path)
    yield mon
    await mon.close()


@pytest.fixture
async def qmp(monitor: Monitor, sock_path: Path) -> AsyncIterator[QMPClient]:
    client = QMPClient("test")
    await client.connect(str(sock_path))
    yield client
    await client.disconnect()


async def next_event(qmp: QMPClient) -> Any:
    return await asyncio.wait_for(qmp.events.get(), 5)


async def test_socket_is_private(monitor: Monitor, sock_path: Path) -> None:
    assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(sock_path.parent).st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(sock_path).st_mode)


async def test_greeting_and_query_commands(qmp: QMPClient) -> None:
    assert qmp.greeting is not None
    version = importlib.metadata.version("cma-qemu")
    assert qmp.greeting.QMP.version["package"] == f"cma-qemu {version}"
    commands: Any = await qmp.execute("query-commands")
    names = {c["name"] for c in commands}
    assert {
        "qmp_capabilities",
        "query-commands",
        "query-cma-regions",
        "query-cma-chunks",
        "query-cma-map",
        "query-cma-stats",
        "cma-set-map",
        "cma-set-asterisk",
        "cma-alloc",
        "cma-alloc-from",
        "cma-free",
        "cma-read",
    } <= names


async def test_regions_chunks_stats(qmp: QMPClient, cma: Cma) -> None:
    chunk: Any = await qmp.execute("cma-alloc", {"dev": "dev", "kind": "k", "size": 5000})
    assert chunk["region"] == "a" and chunk["size"] == 8192 and chunk["requested"] == 5000
    assert chunk["owner"] == "monitor" and chunk["refcount"] == 1
    regions: Any = await qmp.execute("query-cma-regions", {"holes": True})
    by_name = {r["name"]: r for r in regions}
    assert by_name["a"]["free"] == 16 * MiB - 8192 and by_name["a"]["users"] == 1
    assert by_name["a"]["attached"] == "bf" and by_name["a"]["asterisk"] is True
    assert sum(h["size"] for h in by_name["a"]["holes"]) == 16 * MiB - 8192
    assert "holes" not in (await qmp.execute("query-cma-regions"))[0]  # type: ignore[index]
    chunks: Any = await qmp.execute("query-cma-chunks")
    assert chunks == [chunk]
    stats: Any = await qmp.execute("query-cma-stats")
    a = next(s for s in stats if s["name"] == "a")
    assert a == {
        "name": "a",
        "start": by_name["a"]["start"],
        "alloc_pages_success": 2,
        "alloc_pages_fail": 0,
        "release_pages_success": 0,
        "total_pages": 4096,
        "available_pages": 4094,
        "maxchunk": a["maxchunk"],
    }
    freed: Any = await qmp.execute("cma-free", {"addr": chunk["addr"]})
    assert freed["addr"] == chunk["addr"]
    assert await qmp.execute("query-cma-chunks") == []


async def test_alloc_from_info_and_map(qmp: QMPClient, cma: Cma) -> None:
    got: Any = await qmp.execute("cma-alloc-from", {"regions": "b", "size": 4096})
    assert got["region"] == "b"
    got = await qmp.execute("cma-alloc-from", {"size": 4096, "alignment": 1 << 20})
    assert got["addr"] % (1 << 20) == 0
    assert await qmp.execute("query-cma-map") == {"map": "dev/*=a", "asterisk": "a,b"}
    assert await qmp.execute("cma-set-map", {"map": "dev/*=b"}) == {}
    assert await qmp.execute("cma-set-asterisk", {"asterisk": "b"}) == {}
    assert await qmp.execute("query-cma-map") == {"map": "dev/*=b", "asterisk": "b"}
    info: Any = await qmp.execute("query-cma-info", {"dev": "dev"})
    assert info["count"] == 1
    info = await qmp.execute("query-cma-info-about", {"regions": "a,b"})
    assert info["count"] == 2 and info["total_size"] == 32 * MiB


async def test_cma_read(qmp: QMPClient, monitor: Monitor) -> None:
    got: Any = await qmp.execute("cma-read", {"addr": 0x40000010, "size": 4})
    assert base64.b64decode(got["data"]) == bytes([0x10, 0x11, 0x12, 0x13])
    for args, cls in [
        ({"addr": 0, "size": 0}, "EINVAL"),
        ({"addr": 0, "size": MAX_READ + 1}, "EINVAL"),
        ({"addr": 2**64 - 1, "size": 2}, "EINVAL"),
        ({"addr": 0xDEAD0000, "size": 1}, "EIO"),
        ({"addr": 0, "size": -1}, "GenericError"),
    ]:
        with pytest.raises(ExecuteError) as info:
            await qmp.execute("cma-read", args)
        assert info.value.error_class == cls, args
    monitor.read_memory = None
    with pytest.raises(ExecuteError) as info:
        await qmp.execute("cma-read", {"addr": 0, "size": 1})
    assert info.value.error_class == "EOPNOTSUPP"


async def test_errors_carry_errno_classes_and_keep_state(qmp: QMPClient, cma: Cma) -> None:
    await qmp.execute("cma-alloc", {"dev": "dev", "size": 4096})
    before = state(cma)
    cases: list[tuple[str, dict[str, object], str, str]] = [
        ("cma-alloc", {"dev": "dev", "size": 64 * MiB}, "ENOMEM", "cma-alloc: "),
        ("cma-alloc", {"dev": "dev", "size": 0}, "EINVAL", "size"),
        ("cma-alloc", {"dev": "dev", "size": True}, "GenericError", "got true"),
        ("cma-alloc", {"dev": "dev"}, "GenericError", "missing argument 'size'"),
        ("cma-alloc", {"dev": "dev", "size": 1, "bogus": 1}, "GenericError", "'bogus'"),
        ("cma-free", {"addr": 0x1234}, "ENOENT", "0x1234"),
        ("cma-free", {"addr": -1}, "GenericError", "argument 'addr'"),
        ("cma-set-map", {"map": "=oops"}, "EINVAL", "map"),
        ("cma-set-map", {"map": 5}, "GenericError", "argument 'map'"),
        ("query-cma-regions", {"holes": 1}, "GenericError", "expected a boolean"),
        ("query-cma-chunks", {"x": 1}, "GenericError", "unexpected argument"),
        ("no-such-command", {}, "CommandNotFound", "no-such-command"),
        ("qmp_capabilities", {}, "CommandNotFound", "already complete"),
    ]
    for command, args, cls, desc in cases:
        with pytest.raises(ExecuteError) as info:
            await qmp.execute(command, args)
        assert info.value.error_class == cls, (command, args, str(info.value))
        assert desc in str(info.value), (command, args, str(info.value))
    assert state(cma) == before


async def test_events(qmp: QMPClient, monitor: Monitor, cma: Cma) -> None:
    chunk: Any = await qmp.execute("cma-alloc", {"dev": "dev", "kind": "k", "size": 4096})
    event = await next_event(qmp)
    assert event["event"] == "CMA_ALLOC"
    assert event["data"]["addr"] == chunk["addr"] and event["data"]["dev"] == "dev"
    assert set(event["timestamp"]) == {"seconds", "microseconds"}

    with pytest.raises(ExecuteError):
        await qmp.execute("cma-alloc", {"dev": "dev", "size": 64 * MiB})
    event = await next_event(qmp)
    assert event["event"] == "CMA_ALLOC_FAILED"
    assert event["data"]["error"]["class"] == "ENOMEM" and event["data"]["size"] == 64 * MiB

    await qmp.execute("cma-free", {"addr": chunk["addr"]})
    event = await next_event(qmp)
    assert event["event"] == "CMA_FREE" and event["data"]["addr"] == chunk["addr"]

    # a guest's allocation and its reset, as the channel reports it
    guest = GuestSession(cma, "guest:p0")
    guest.feed(b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "size": 8192}}\n')
    assert (await next_event(qmp))["data"]["owner"] == "guest:p0"
    released = guest.reset()
    monitor.guest_reset("p0", "reset", released)
    assert (await next_event(qmp))["event"] == "CMA_FREE"
    event = await next_event(qmp)
    assert event["event"] == "CMA_GUEST_RESET"
    assert event["data"] == {
        "port": "p0",
        "reason": "reset",
        "released": 1,
        "bytes": 8192,
        "chunks": [released[0].start],
    }


async def test_events_from_another_thread(qmp: QMPClient, cma: Cma) -> None:
    chunk = await asyncio.to_thread(cma.alloc, "dev", "", 4096)
    event = await next_event(qmp)
    assert event["event"] == "CMA_ALLOC" and event["data"]["addr"] == chunk.start


# ---------------------------------------------------------------------------------- raw socket


class Raw:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> dict[str, Any]:
        self.writer.write(data)
        await self.writer.drain()
        while True:  # events may come first
            reply: dict[str, Any] = json.loads(await asyncio.wait_for(self.reader.readline(), 5))
            if "event" not in reply:
                return reply


@pytest.fixture
async def raw(monitor: Monitor, sock_path: Path) -> AsyncIterator[Raw]:
    reader, writer = await asyncio.open_unix_connection(str(sock_path))
    greeting = json.loads(await reader.readline())
    assert greeting["QMP"]["version"]["qemu"] == {"major": 0, "minor": 1, "micro": 0}
    assert greeting["QMP"]["capabilities"] == []
    yield Raw(reader, writer)
    writer.close()


async def test_negotiation_is_required_first(raw: Raw) -> None:
    reply = await raw.send(b'{"execute": "query-cma-chunks", "id": "x"}\n')
    assert reply["error"]["class"] == "CommandNotFound" and reply["id"] == "x"
    reply = await raw.send(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n')
    assert reply["error"]["class"] == "GenericError" and "oob" in reply["error"]["desc"]
    assert await raw.send(b'{"execute": "qmp_capabilities", "id": {"any": [1]}}\n') == {
        "return": {},
        "id": {"any": [1]},
    }
    reply = await raw.send(b'{"execute": "query-cma-chunks"}\n')
    assert reply == {"return": []}


BAD = [
    (b"{garbage", "invalid JSON"),
    (b"\xfe\xfe", "invalid UTF-8"),
    (b"[]", "must be a JSON object"),
    (b'{"arguments": {}}', "'execute' is missing"),
    (b'{"execute": ["cma-free"]}', "'execute' must be a string"),
    (b'{"execute": "cma-free", "arguments": 3}', "'arguments' must be an object"),
    (b'{"execute": "cma-free", "arguments": {"addr": "0x1000"}}', "argument 'addr'"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "size": 1.5}}', "got 1.5"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "size": 1e400}}', "got inf"),
    (b'{"execute": "cma-set-asterisk", "arguments": {"asterisk": null}}', "got null"),
    (b'{"execute": "query-cma-map", "oob": true}', "'oob' is unexpected"),
]


@pytest.mark.parametrize(("line", "desc"), BAD, ids=lambda v: repr(v)[:30])
async def test_bad_input_is_answered_and_state_kept(
    raw: Raw, cma: Cma, line: bytes, desc: str
) -> None:
    await raw.send(b'{"execute": "qmp_capabilities"}\n')
    cma.alloc("dev", "", 4096, owner="someone")
    before = state(cma)
    reply = await raw.send(line + b"\n")
    assert reply["error"]["class"] == "GenericError", reply
    assert desc in reply["error"]["desc"], reply
    assert state(cma) == before
    assert len((await raw.send(b'{"execute": "query-cma-chunks"}\n'))["return"]) == 1


async def test_qmp_client_framing_without_newlines(raw: Raw) -> None:
    # qemu.qmp sends objects back to back with no newline; garbage is answered at once
    await raw.send(b'{"execute":"qmp_capabilities"}')
    raw.writer.write(b'{"execute":"query-cma-map","id":1}{"execute":"query-cma-chunks","id":2}')
    first = await raw.send(b"")
    second = await raw.send(b"")
    assert (first["id"], second["id"]) == (1, 2)
    reply = await raw.send(b"{nonsense")
    assert reply["error"]["class"] == "GenericError" and "id" not in reply
    assert (await raw.send(b'\n{"execute":"query-cma-map","id":3}'))["id"] == 3


async def test_oversized_request_and_blank_lines(raw: Raw) -> None:
    await raw.send(b'{"execute": "qmp_capabilities"}\n')
    raw.writer.write(b"\n\n")
    reply = await raw.send(b'{"execute": "' + b"x" * (2 * MiB) + b'"}\n')
    assert reply["error"]["class"] == "GenericError" and "longer than" in reply["error"]["desc"]
    assert (await raw.send(b'{"execute": "query-cma-map", "id": 1}\n'))["id"] == 1


async def test_internal_errors_do_not_kill_the_monitor(qmp: QMPClient, cma: Cma) -> None:
    def broken() -> list[object]:
        raise RuntimeError("boom")

    cma.stats = broken  # type: ignore[method-assign,assignment]
    with pytest.raises(ExecuteError) as info:
        await qmp.execute("query-cma-stats")
    assert info.value.error_class == EIO.errno_name and "boom" in str(info.value)
    assert await qmp.execute("query-cma-chunks") == []


async def test_a_taken_monitor_path_is_one_line_eaddrinuse_and_left_alone(
    cma: Cma, sock_path: Path
) -> None:
    first = Monitor(cma)
    await first.start(sock_path)
    try:
        inode = sock_path.stat().st_ino
        with pytest.raises(EADDRINUSE) as info:
            await Monitor(cma).start(sock_path)
        assert str(info.value) == f"monitor: another process serves {sock_path}"
        assert sock_path.stat().st_ino == inode
        client = QMPClient("still")  # the first monitor still answers
        await client.connect(str(sock_path))
        assert await client.execute("query-cma-chunks") == []
        await client.disconnect()
    finally:
        await first.close()
    sock_path.write_text("somebody's file")
    with pytest.raises(EADDRINUSE) as info:
        await Monitor(cma).start(sock_path)
    assert str(info.value) == f"monitor: {sock_path} exists and is not a socket"
    assert sock_path.read_text() == "somebody's file"


async def test_stale_socket_is_replaced_and_live_one_refused(cma: Cma, sock_path: Path) -> None:
    first = Monitor(cma)
    await first.start(sock_path)
    second = Monitor(cma)
    with pytest.raises(Exception, match="another process"):
        await second.start(sock_path)
    await first.close()
    assert not sock_path.exists()
    # a leftover socket file nobody listens on
    import socket

    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(str(sock_path))
    leftover.close()
    await second.start(sock_path)
    client = QMPClient("again")
    await client.connect(str(sock_path))
    assert await client.execute("query-cma-chunks") == []
    await client.disconnect()
    await second.close()
