"""A paced session (the UART channel) writes its replies in bursts no larger than asked."""

from __future__ import annotations

import asyncio
import json

from cma_qemu.channel import GuestSession, Pacing
from cma_qemu.framework import Cma


class _RecordingWriter:
    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    async def drain(self) -> None:
        return None


async def _serve(pacing: Pacing | None, request: bytes) -> list[bytes]:
    cma = Cma.from_attributes("a=16M", ram=[(0x40000000, 0x10000000)])
    reader = asyncio.StreamReader()
    reader.feed_data(request)
    reader.feed_eof()
    writer = _RecordingWriter()
    await GuestSession(cma, "guest:t").serve(reader, writer, pacing)  # type: ignore[arg-type]
    return writer.writes


async def test_paced_replies_come_in_bursts() -> None:
    request = b'{"execute": "cma-alloc", "arguments": {"dev": "d", "size": 4096}, "id": 7}\n'
    writes = await _serve(Pacing(burst=16, interval=0.0), request)
    assert len(writes) > 1
    assert all(len(w) <= 16 for w in writes)
    reply = json.loads(b"".join(writes))
    assert reply["id"] == 7 and reply["return"]["size"] == 4096


async def test_unpaced_replies_are_written_whole() -> None:
    writes = await _serve(None, b'{"execute": "guest-ping", "id": 1}\n')
    assert writes == [b'{"return":{},"id":1}\n']
