"""The guest protocol under garbage written from inside the guest, on the real channel device.

A busybox shell opens ``$CMA_CHANNEL`` read/write (fd 3), writes raw bytes, and reads the
agent's replies back; every bad line gets one error reply, nothing changes in the framework,
and the next valid request works.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from cma_qemu.channel import ChannelServer
from cma_qemu.framework import AllocEvent, CmaEvent, FreeEvent
from cma_qemu.pytest_plugin import BoardSession
from cma_qemu.wire.framing import MAX_LINE

pytestmark = pytest.mark.e2e

_GARBAGE = "/tmp/garbage.bin"


# On smdkc210-uart the agent meters its writes by the UART's receive FIFO level (FifoGate) and
# may send a blank line to wake a receiver that missed its interrupt: blank lines are not
# replies. The test below needs the UART: its shell opens the channel device as fd 3, and
# smdkc210's default channel is a TCP address, not a device.


def _talk(guest: Any, steps: list[tuple[str, int]], timeout: int = 20) -> list[dict[str, Any]]:
    """With fd 3 on the channel, run each step's shell text, then read its replies back.

    The last reply read is left in ``$line`` for the next step (``$addr`` is parsed from it).
    """
    parts = ['exec 3<>"$CMA_CHANNEL"']
    total = 0
    for body, replies in steps:
        parts.append(body)
        parts.append(
            f"n=0; while [ $n -lt {replies} ] && read -t {timeout} -r line <&3; do "
            '[ -n "$line" ] && { echo "reply: $line"; n=$((n + 1)); }; done'
        )
        parts.append('addr=$(echo "$line" | sed -n \'s/.*"addr":\\([0-9]*\\).*/\\1/p\')')
        total += replies
    parts.append("exec 3>&-")
    out = guest.check("\n".join(parts), timeout=timeout * total + 60)
    lines = [line[len("reply: ") :] for line in out.splitlines() if line.startswith("reply: ")]
    replies = [json.loads(line) for line in lines]
    assert len(replies) == total, out
    return replies


def _send(request: str) -> str:
    """Shell text writing one request line (no single quotes in it) to fd 3."""
    assert "'" not in request
    return f"printf '%s\\n' '{request}' >&3"


def _error(reply: dict[str, Any], cls: str, desc: str, request_id: object = None) -> None:
    assert reply.get("error", {}).get("class") == cls, reply
    assert desc in reply["error"]["desc"], reply
    if request_id is None:
        assert "id" not in reply, reply
    else:
        assert reply["id"] == request_id, reply


def _framework_events(session: BoardSession) -> tuple[list[CmaEvent], Any]:
    events: list[CmaEvent] = []
    return events, session.agent.cma.subscribe(events.append)


# (bytes written, expected class, a piece of the expected desc, echoed id)
_BAD: list[tuple[bytes, str, str, object]] = [
    (b'{"execute":\n', "GenericError", "invalid JSON at column 12", None),
    (b"\xc3\x28\n", "GenericError", "invalid UTF-8 at byte 1", None),
    (b'{"execute":"guest-ping","id":1}\xfe\n', "GenericError", "invalid UTF-8", None),
    (b"[1,2]\n", "GenericError", "a request must be a JSON object, got an array", None),
    (b'"cma-alloc"\n', "GenericError", "a request must be a JSON object", None),
    (b'{"execute":"cma-frob","id":2}\n', "GenericError", "unknown command 'cma-frob'", 2),
    (b'{"execute":42,"id":3}\n', "GenericError", "member 'execute' must be a string", 3),
    (b'{"execute":"guest-ping","extra":1,"id":4}\n', "GenericError", "'extra' is unexpected", 4),
    (
        b'{"execute":"cma-alloc","arguments":{"dev":5,"size":4096},"id":5}\n',
        "GenericError",
        "argument 'dev': expected a string, got 5",
        5,
    ),
    (
        b'{"execute":"cma-alloc","arguments":{"dev":"vpu","size":"4096"},"id":6}\n',
        "GenericError",
        "argument 'size': expected an unsigned integer",
        6,
    ),
    (
        b'{"execute":"cma-alloc","arguments":{"dev":"vpu","size":-4096},"id":7}\n',
        "GenericError",
        "expected an unsigned integer, got -4096",
        7,
    ),
    (
        b'{"execute":"cma-alloc","arguments":{"dev":"vpu","size":18446744073709551616},"id":8}\n',
        "GenericError",
        "argument 'size': expected an unsigned integer",
        8,
    ),
    (
        b'{"execute":"cma-alloc","arguments":{"dev":"vpu","size":true},"id":9}\n',
        "GenericError",
        "got true",
        9,
    ),
    (
        b'{"execute":"cma-alloc","arguments":{"dev":"vpu","size":4096,"bogus":1},"id":10}\n',
        "GenericError",
        "unexpected argument 'bogus'",
        10,
    ),
    (b'{"execute":"cma-free","arguments":{},"id":11}\n', "GenericError", "missing argument", 11),
    # Well-formed requests the framework refuses: errno classes, nothing allocated.
    (
        b'{"execute":"cma-alloc","arguments":{"dev":"vpu","size":0},"id":12}\n',
        "EINVAL",
        "invalid size",
        12,
    ),
    (
        b'{"execute":"cma-alloc","arguments":{"dev":"vpu","size":4096,"alignment":3},"id":13}\n',
        "EINVAL",
        "",
        13,
    ),
    (
        b'{"execute":"cma-free","arguments":{"addr":1073741824},"id":14}\n',
        "ENOENT",
        "no chunk of this guest starts at 0x40000000",
        14,
    ),
    # 0xFF mid-line drops the partial line: what follows it is parsed on its own.
    (
        b'{"execute":"cma-alloc","argu\xff{"execute":"cma-nope","id":15}\n',
        "GenericError",
        "unknown command 'cma-nope'",
        15,
    ),
    (b'{"execute":"guest-pi\xffng","id":16}\n', "GenericError", "invalid JSON at column 1", None),
]


_ALLOC = '{"execute":"cma-alloc","arguments":{"dev":"%s","kind":"%s","size":%d},"id":%d}'
# the address of the chunk the previous step's last reply named
_FREE = 'printf \'{"execute":"cma-free","arguments":{"addr":%%s},"id":%d}\\n\' "$addr" >&3'


def _stats(session: BoardSession) -> list[Any]:
    return session.agent.cma.stats()


def test_garbage_from_the_guest_gets_errors_and_the_session_survives(
    cma_board: BoardSession, agent: Any, guest: Any
) -> None:
    owner = ChannelServer.owner_for(agent.agent.port)
    channel_session = agent.agent.channel.session(agent.agent.port)
    before = _stats(cma_board)
    events, unsubscribe = _framework_events(cma_board)
    try:
        garbage = b"".join(data for data, *_ in _BAD)
        guest.put_file(_GARBAGE, garbage)
        requests = channel_session.requests
        replies = _talk(
            guest,
            [
                (
                    f"cat {_GARBAGE} >&3\n"
                    # a line over the 64 KiB limit, then the valid ping that must still work
                    "head -c 70000 /dev/zero | tr '\\0' a >&3; printf '\\n' >&3\n"
                    + _send('{"execute":"guest-ping","id":9}'),
                    len(_BAD) + 2,
                )
            ],
        )
        for reply, (_, cls, desc, request_id) in zip(replies, _BAD, strict=False):
            _error(reply, cls, desc, request_id)
        _error(replies[-2], "GenericError", f"request line longer than {MAX_LINE} bytes")
        assert replies[-1] == {"return": {}, "id": 9}
        assert channel_session.requests - requests == len(_BAD) + 1  # + the ping
        assert channel_session.splitter.pending == 0

        # Nothing was allocated, freed or counted; only the two framework refusals of an
        # alloc are events (failed allocations), and they touched no region.
        assert _stats(cma_board) == before
        assert [type(e).__name__ for e in events] == ["AllocFailedEvent"] * 2
        assert agent.guest_chunks() == []

        # The session is intact: a valid alloc works, shows up, and is freed by the guest.
        replies = _talk(
            guest,
            [
                (_send(_ALLOC % ("vpu", "dec", 65536, 20)), 1),
                (_send('{"execute":"cma-list","id":21}') + "\n" + _FREE % 22, 2),
            ],
        )
    finally:
        unsubscribe()
    alloc = replies[0]
    assert alloc["id"] == 20 and alloc["return"]["region"] == "video", alloc
    chunk = alloc["return"]
    assert chunk["size"] == 65536
    assert replies[1] == {"return": [chunk], "id": 21}
    assert replies[2] == {"return": {}, "id": 22}
    allocs = [e for e in events if isinstance(e, AllocEvent)]
    frees = [e for e in events if isinstance(e, FreeEvent)]
    assert [(e.chunk.start, e.chunk.owner, e.dev, e.kind) for e in allocs] == [
        (chunk["addr"], owner, "vpu", "dec")
    ]
    assert [e.chunk.start for e in frees] == [chunk["addr"]]
    assert agent.guest_chunks() == []
    after = {s.name: s for s in _stats(cma_board)}
    assert after["video"].alloc_pages_success == before_video(before).alloc_pages_success + 16
    assert after["video"].release_pages_success == before_video(before).release_pages_success + 16
    assert after["video"].available_pages == before_video(before).available_pages


def before_video(stats: list[Any]) -> Any:
    return next(s for s in stats if s.name == "video")


def test_garbage_then_valid_requests_on_the_uart(cma_boot: Any) -> None:
    session: BoardSession = cma_boot("smdkc210-uart")
    agent, guest = session.agent, session.guest
    session.agent.release_leftovers()
    before = _stats(session)
    bad = [_BAD[0], _BAD[1], _BAD[3], _BAD[5], _BAD[10], _BAD[19]]
    guest.put_file(_GARBAGE, b"".join(data for data, *_ in bad))
    try:
        replies = _talk(
            guest,
            [
                *((f"head -n {n} {_GARBAGE} | tail -n 1 >&3", 1) for n in range(1, len(bad) + 1)),
                (_send('{"execute":"guest-ping","id":9}'), 1),
                (_send(_ALLOC % ("s5p-mfc", "a", 8192, 10)), 1),
                (_FREE % 11, 1),
            ],
        )
        for reply, (_, cls, desc, request_id) in zip(replies, bad, strict=False):
            _error(reply, cls, desc, request_id)
        assert replies[len(bad)] == {"return": {}, "id": 9}
        alloc = replies[len(bad) + 1]
        assert alloc["id"] == 10 and alloc["return"]["region"] == "mfc_b1", alloc
        assert replies[-1] == {"return": {}, "id": 11}
    finally:
        leftovers = session.agent.release_leftovers()
    assert leftovers == []
    after = {s.name: s for s in _stats(session)}
    b1 = next(s for s in before if s.name == "mfc_b1")
    assert after["mfc_b1"].alloc_pages_success == b1.alloc_pages_success + 2
    assert after["mfc_b1"].release_pages_success == b1.release_pages_success + 2
    assert agent.guest_chunks() == []
