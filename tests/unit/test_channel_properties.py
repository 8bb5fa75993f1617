"""Property tests: no input crashes a guest session or changes state unless it is valid."""

from __future__ import annotations

import json
from typing import Any

from cma_helpers import allocator_registry
from cma_helpers import cma_state as snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cma_qemu.channel import GUEST_COMMANDS, GuestSession
from cma_qemu.framework import Cma

RAM = [(0x40000000, 0x20000000)]


def make() -> tuple[Cma, GuestSession, int]:
    cma = Cma.from_attributes(
        regions="a=1M;b=1M", map="dev/*=a", asterisk=None, ram=RAM, registry=allocator_registry()
    )
    session = GuestSession(cma, "guest:p")
    chunk = cma.alloc("dev", "", 4096, owner="guest:p")
    return cma, session, chunk.start


def parse_replies(out: bytes) -> list[dict[str, Any]]:
    assert out == b"" or out.endswith(b"\n")
    parsed = [json.loads(line) for line in out.splitlines()]
    for reply in parsed:
        assert isinstance(reply, dict)
        assert ("return" in reply) != ("error" in reply)
        if "error" in reply:
            assert isinstance(reply["error"]["class"], str)
            assert isinstance(reply["error"]["desc"], str)
    return parsed


def still_works(session: GuestSession, addr: int) -> None:
    # resync the way a guest would (0xFF, newline), then a valid request must succeed
    out = session.feed(b'\xff\n{"execute": "cma-get", "arguments": {"addr": %d}, "id": 1}\n' % addr)
    assert parse_replies(out)[-1] == {"return": {}, "id": 1}


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes_never_crash_or_change_state(chunks: list[bytes]) -> None:
    cma, session, addr = make()
    before = snapshot(cma)
    for data in chunks:
        parse_replies(session.feed(data))
    assert snapshot(cma) == before
    still_works(session, addr)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=10)
    | st.sampled_from(["dev", "a", "b", "*", "a,b", "", "other"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
argument_names = st.sampled_from(["dev", "kind", "size", "alignment", "regions", "addr", "id", "x"])


@st.composite
def requests(draw: st.DrawFn) -> dict[str, object]:
    request: dict[str, object] = {
        "execute": draw(st.sampled_from([*GUEST_COMMANDS, "bogus"]) | st.text(max_size=8))
    }
    if draw(st.booleans()):
        request["arguments"] = draw(st.dictionaries(argument_names, json_values, max_size=5))
    if draw(st.booleans()):
        request["id"] = draw(json_values)
    return request


@FAST
@given(st.lists(requests(), min_size=1, max_size=5))
def test_error_replies_never_change_state(batch: list[dict[str, object]]) -> None:
    cma, session, addr = make()
    for request in batch:
        before = snapshot(cma)
        [reply] = parse_replies(session.feed(json.dumps(request).encode() + b"\n"))
        if "error" in reply:
            assert snapshot(cma) == before, (request, reply)
        if "id" in reply:
            assert reply["id"] == request["id"]
    # every chunk any request made belongs to this guest
    assert {c.owner for c in cma.chunks} <= {"guest:p"}
    if any(c.start == addr for c in cma.chunks):
        still_works(session, addr)
