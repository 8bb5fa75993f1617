"""The monitor against clients that never end a request: one error, then the door.

A request over MAX_REQUEST is answered and the client may resync at its next newline; a client
that streams on past MAX_UNENDED without ending any request is disconnected, and the others
are not disturbed.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from cma_qemu.framework import Cma
from cma_qemu.monitor.protocol import MAX_REQUEST
from cma_qemu.monitor.server import MAX_UNENDED, Monitor

MiB = 1024 * 1024


@pytest.fixture
async def monitor(tmp_path: Path) -> AsyncIterator[Monitor]:
    cma = Cma.from_attributes(
        regions="a=16M", map="*/*=a", asterisk=None, ram=[(0x40000000, 0x20000000)]
    )
    mon = Monitor(cma)
    await mon.start(tmp_path / "run" / "monitor.sock")
    yield mon
    await mon.close()


def _flood(path: str, head: bytes, filler: bytes) -> tuple[list[dict[str, Any]], int]:
    """Negotiate, send ``head`` then ``filler`` until the monitor hangs up.

    Its replies and how many bytes were sent. A blocking socket (run in a thread): replies
    that arrived stay readable after the send fails, where a stream reader would drop them.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        block = filler * (65536 // len(filler))
        sent = 0
        try:
            sock.sendall(head)
            sent = len(head)
            while sent < 3 * MAX_UNENDED:  # far more than the monitor may read
                sock.sendall(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass
        received = b""
        try:
            while data := sock.recv(65536):
                received += data
        except ConnectionResetError:  # Linux: the peer closed with our bytes unread
            pass
    greeting, negotiated, *replies = received.splitlines()
    assert b"QMP" in greeting and b"return" in negotiated
    return [json.loads(line) for line in replies], sent


@pytest.mark.parametrize(
    ("head", "filler", "first"),
    [
        (b'{"execute": "cma-set-map", "arguments": {"map": "', b"a", "longer than"),
        (b"", b"x", "invalid JSON"),
        (b"", b" ", "longer than"),
    ],
    ids=["json-string", "garbage", "spaces"],
)
async def test_a_request_that_never_ends_is_cut_off(
    monitor: Monitor, head: bytes, filler: bytes, first: str
) -> None:
    assert monitor.path is not None
    bystander = QMPClient("bystander")
    await bystander.connect(str(monitor.path))
    try:
        before = await bystander.execute("query-cma-map")
        replies, sent = await asyncio.to_thread(_flood, str(monitor.path), head, filler)
        assert sent < 3 * MAX_UNENDED, "the monitor kept reading"
        assert [r["error"]["class"] for r in replies] == ["GenericError", "GenericError"]
        assert first in replies[0]["error"]["desc"]
        assert replies[1]["error"]["desc"] == (
            f"no end of request in {MAX_UNENDED} bytes; closing the connection"
        )
        assert monitor.cma.map_text == "*/*=a"  # nothing changed
        assert await bystander.execute("query-cma-map") == before  # and the others are served
    finally:
        await bystander.disconnect()


async def test_an_oversized_request_that_ends_still_resyncs(monitor: Monitor) -> None:
    # over MAX_REQUEST but ended within MAX_UNENDED: an error, and the connection goes on
    assert monitor.path is not None
    reader, writer = await asyncio.open_unix_connection(str(monitor.path), limit=MiB)
    await reader.readline()
    writer.write(b'{"execute": "qmp_capabilities"}\n')
    await reader.readline()
    writer.write(b'{"execute": "' + b"x" * (MAX_REQUEST + MiB) + b'"}\n')
    writer.write(b'{"execute": "query-cma-map", "id": 1}\n')
    error = json.loads(await reader.readline())
    assert "longer than" in error["error"]["desc"]
    assert json.loads(await reader.readline())["id"] == 1
    writer.close()
