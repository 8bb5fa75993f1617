"""Fuzz the monitor protocol: JSON splitting and the Monitor's handle_line.

Checked on every example: the splitter cuts a stream the same way however it arrives and
holds at most its limit; every reply is one JSON line whose error class is an errno name or
one of QMP's; an error (or any query) changes nothing; no command reports an internal error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any, cast

import pytest
from fuzzing import fuzz, no_hang
from hypothesis import given
from hypothesis import strategies as st
from strategies import chunked, monitor_lines, mutated_bytes
from test_framework_properties import build, check_invariants, snapshot  # type: ignore[import-not-found]

from cma_qemu.errors import error_class
from cma_qemu.framework import Cma
from cma_qemu.monitor import Monitor
from cma_qemu.monitor.protocol import COMMAND_NOT_FOUND
from cma_qemu.monitor.server import _Client
from cma_qemu.wire.framing import OVERSIZED, JsonSplitter, Marker

BASE = 0x40000000
P = 4096
QMP_CLASSES = {COMMAND_NOT_FOUND, "GenericError"}
READ_ONLY = {"query-commands", "query-cma-allocators", "cma-read"}


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


async def _read_memory(addr: int, size: int) -> bytes:
    """Guest memory for cma-read: zeros below 0x50000000, a failing read above (a fake of
    the machine layer's reader, which this target does not test)."""
    if addr >= 0x50000000:
        raise OSError(5, "Input/output error")
    return bytes(size)


def _monitor(allocator: str) -> tuple[Cma, Monitor, list[int]]:
    cma = build(
        [("a", BASE, 16 * P), ("b", BASE + 32 * P, 8 * P), (None, BASE + 64 * P, 4 * P)], allocator
    )
    addresses = [cma.alloc_from("a", P, owner="guest:p").start, cma.alloc_from("b", 2 * P).start]
    return cma, Monitor(cma, read_memory=_read_memory), addresses


def _check_reply(out: bytes) -> dict[str, Any]:
    assert out.endswith(b"\n") and out.count(b"\n") == 1
    reply = json.loads(out)
    assert isinstance(reply, dict) and ("return" in reply) != ("error" in reply)
    if "error" in reply:
        cls, desc = reply["error"]["class"], reply["error"]["desc"]
        assert cls in QMP_CLASSES or error_class(cls).errno_name == cls, reply
        assert isinstance(desc, str) and desc and "\n" not in desc, reply
        assert "internal error" not in desc, reply
    return cast(dict[str, Any], reply)


@fuzz
@given(
    data=st.data(),
    allocator=st.sampled_from(["bf", "bitmap"]),
    negotiated=st.booleans(),
)
def test_monitor_lines(
    loop: asyncio.AbstractEventLoop,
    data: st.DataObject,
    allocator: str,
    negotiated: bool,
) -> None:
    cma, monitor, addresses = _monitor(allocator)
    client = _Client(writer=cast(Any, None), negotiated=negotiated)
    for line in data.draw(st.lists(monitor_lines(addresses), min_size=1, max_size=6)):
        line = line.replace(b"\n", b" ")
        before = snapshot(cma)
        was_negotiated = client.negotiated
        with no_hang():
            out = loop.run_until_complete(monitor.handle_line(client, line))
        if not line.strip():
            assert out == b""
            continue
        reply = _check_reply(out)
        try:
            request = json.loads(line)
            name = request.get("execute") if isinstance(request, dict) else None
        except (ValueError, RecursionError):
            name = None
        if "error" in reply or name in READ_ONLY or str(name).startswith("query-"):
            assert snapshot(cma) == before, (line, reply)
        if "error" not in reply and name != "qmp_capabilities":
            assert was_negotiated
        check_invariants(cma, {c.start: 0 for c in cma.chunks})


# --------------------------------------------------------------------------------------------
# splitting


_qmp_stream = st.lists(
    st.one_of(
        monitor_lines([BASE]),
        st.sampled_from([b"\n", b"\xff", b'"\\', b"}", b"[[", b"x", b" ", b'{"a":"\n']),
        mutated_bytes(st.just(b'{"execute":"query-cma-map"}')),
    ),
    max_size=6,
).map(b"".join)


@fuzz
@given(data=st.data(), stream=_qmp_stream, limit=st.sampled_from([8, 64, 1 << 20]))
def test_json_splitter_never_passes_on_more_than_its_limit(
    data: st.DataObject, stream: bytes, limit: int
) -> None:
    splitter = JsonSplitter(limit)
    got: list[bytes | Marker] = []
    for piece in data.draw(chunked(stream)):
        got += splitter.feed(piece)
        assert len(splitter._buffer) <= limit  # memory stays bounded
    for item in got:
        assert item is OVERSIZED or (isinstance(item, bytes) and 0 < len(item) <= limit)
        assert item is OVERSIZED or item.strip()


@fuzz
@given(data=st.data(), stream=_qmp_stream)
def test_json_splitter_does_not_depend_on_how_bytes_arrive(
    data: st.DataObject, stream: bytes
) -> None:
    # (Past the limit the rest of an oversized message's line is dropped wherever the read
    # boundary fell, so this compares cuts of streams the limit never applies to.)
    expected = JsonSplitter(1 << 20).feed(stream)
    pieces = JsonSplitter(1 << 20)
    got: list[bytes | Marker] = []
    for piece in data.draw(chunked(stream)):
        got += pieces.feed(piece)
    assert got == expected


def test_a_long_message_in_one_read_is_oversized_too() -> None:
    # found by the fuzzer: the limit was only checked on what was left buffered after a read,
    # so a message longer than the limit that arrived whole was passed on
    message = b'{"execute": "qmp_capabilities"}'
    assert JsonSplitter(8).feed(message) == [OVERSIZED]
    split = JsonSplitter(8)
    assert split.feed(message[:10]) + split.feed(message[10:]) == [OVERSIZED]
    assert JsonSplitter(len(message)).feed(message) == [message]


def test_a_newline_in_a_command_name_stays_inside_one_reply_line(
    loop: asyncio.AbstractEventLoop,
) -> None:
    # found by the fuzzer: the command name (and a device name) were quoted as given
    cma, monitor, _ = _monitor("bf")
    cma.set_asterisk("")
    client = _Client(writer=cast(Any, None), negotiated=True)
    for request, desc in (
        ({"execute": "no\nsuch"}, "The command no\\nsuch has not been found"),
        (
            {"execute": "cma-alloc", "arguments": {"dev": "x\n", "size": 1}},
            "cma-alloc: no region list for x\\n: no map rule and no asterisk list",
        ),
    ):
        out = loop.run_until_complete(monitor.handle_line(client, json.dumps(request).encode()))
        assert _check_reply(out)["error"]["desc"] == desc
