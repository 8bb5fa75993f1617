"""The guest protocol: every command, ownership, resets, framing and every kind of bad input."""

from __future__ import annotations

import json
from typing import Any

import pytest
from cma_helpers import cma_state as state
from cma_helpers import make_cma

from cma_qemu.channel import GuestSession
from cma_qemu.errors import ENOMEM
from cma_qemu.framework import Cma
from cma_qemu.wire.framing import MAX_LINE, OVERSIZED, LineSplitter

MiB = 1024 * 1024


@pytest.fixture
def cma() -> Cma:
    return make_cma(map="dev/*=a;other/*=b")


@pytest.fixture
def guest(cma: Cma) -> GuestSession:
    return GuestSession(cma, "guest:one")


def replies(session: GuestSession, data: bytes) -> list[dict[str, Any]]:
    out = session.feed(data)
    assert out == b"" or out.endswith(b"\n")
    return [json.loads(line) for line in out.splitlines()]


def call(session: GuestSession, execute: str, rid: object = 1, **arguments: object) -> Any:
    request: dict[str, object] = {"execute": execute, "id": rid}
    if arguments:
        request["arguments"] = arguments
    [reply] = replies(session, json.dumps(request).encode() + b"\n")
    assert reply.get("id") == rid
    return reply


def ok(session: GuestSession, execute: str, **arguments: object) -> Any:
    reply = call(session, execute, **arguments)
    assert "return" in reply, reply
    return reply["return"]


def err(session: GuestSession, execute: str, **arguments: object) -> dict[str, str]:
    reply = call(session, execute, **arguments)
    assert "error" in reply, reply
    error: dict[str, str] = reply["error"]
    return error


# ---------------------------------------------------------------------------------- commands


def test_ping_and_sync(guest: GuestSession) -> None:
    assert ok(guest, "guest-ping") == {}
    assert ok(guest, "guest-sync", id=123456789) == 123456789
    assert ok(guest, "guest-sync", id=-5) == -5


def test_alloc_goes_where_the_map_says(guest: GuestSession, cma: Cma) -> None:
    got = ok(guest, "cma-alloc", dev="dev", kind="x", size=5000, alignment=0x10000)
    assert got["region"] == "a"
    assert got["size"] == 8192
    assert got["addr"] % 0x10000 == 0
    [chunk] = cma.chunks
    assert (chunk.start, chunk.owner, chunk.requested) == (got["addr"], "guest:one", 5000)
    # kind and alignment are optional
    assert ok(guest, "cma-alloc", dev="other", size=4096)["region"] == "b"


def test_alloc_from_and_asterisk(guest: GuestSession) -> None:
    assert ok(guest, "cma-alloc-from", regions="b", size=4096)["region"] == "b"
    assert ok(guest, "cma-alloc-from", regions="*", size=4096)["region"] in ("a", "b")
    assert ok(guest, "cma-alloc-from", regions=None, size=4096)["region"] in ("a", "b")
    assert ok(guest, "cma-alloc-from", size=4096, alignment=4096)["region"] in ("a", "b")


def test_free_get_put_and_list(guest: GuestSession, cma: Cma) -> None:
    one = ok(guest, "cma-alloc", dev="dev", size=4096)
    two = ok(guest, "cma-alloc", dev="other", size=8192)
    listed = ok(guest, "cma-list")
    assert sorted(listed, key=lambda c: c["addr"]) == sorted([one, two], key=lambda c: c["addr"])
    assert ok(guest, "cma-get", addr=one["addr"]) == {}
    assert ok(guest, "cma-put", addr=one["addr"]) == {"freed": False}
    assert ok(guest, "cma-put", addr=one["addr"]) == {"freed": True}
    assert ok(guest, "cma-free", addr=two["addr"]) == {}
    assert ok(guest, "cma-list") == []
    assert cma.chunks == []
    assert err(guest, "cma-free", addr=two["addr"])["class"] == "ENOENT"
    assert err(guest, "cma-put", addr=two["addr"])["class"] == "ENOENT"
    assert err(guest, "cma-get", addr=two["addr"])["class"] == "ENOENT"


def test_info_and_info_about(guest: GuestSession, cma: Cma) -> None:
    info = ok(guest, "cma-info", dev="dev")
    a = next(r for r in cma.regions if r.name == "a")
    assert info == {
        "lower_bound": a.start,
        "upper_bound": a.start + a.size,
        "total_size": 16 * MiB,
        "free_size": 16 * MiB,
        "count": 1,
    }
    assert ok(guest, "cma-info-about", regions="a,b")["count"] == 2
    assert ok(guest, "cma-info-about")["count"] == 2
    none = ok(guest, "cma-info-about", regions="nosuch")
    assert none["count"] == 0 and none["lower_bound"] == 2**64 - 1


def test_framework_errors_keep_their_errno_class(guest: GuestSession, cma: Cma) -> None:
    before = state(cma)
    assert err(guest, "cma-alloc", dev="dev", size=0)["class"] == "EINVAL"
    assert err(guest, "cma-alloc", dev="dev", size=4096, alignment=3)["class"] == "EINVAL"
    assert err(guest, "cma-alloc", dev="", size=4096)["class"] == "EINVAL"
    nomem = err(guest, "cma-alloc", dev="dev", size=64 * MiB)
    assert nomem["class"] == "ENOMEM"
    assert state(cma) == before
    # the framework's message word for word, as `cma-qemu replay` prints it
    with pytest.raises(ENOMEM) as raised:
        cma.alloc("dev", "", 64 * MiB)
    assert nomem["desc"] == str(raised.value)


def test_id_is_echoed_or_omitted(guest: GuestSession) -> None:
    [reply] = replies(guest, b'{"execute": "guest-ping", "id": "abc"}\n')
    assert reply == {"return": {}, "id": "abc"}
    [reply] = replies(guest, b'{"execute": "guest-ping"}\n')
    assert reply == {"return": {}}
    for bad in (b"true", b"1.5", b"[1]", b"{}", b"null", str(2**64).encode()):
        [reply] = replies(guest, b'{"execute": "guest-ping", "id": ' + bad + b"}\n")
        assert "id" not in reply and reply["error"]["class"] == "GenericError"
    # an id is echoed on errors found after it was read
    [reply] = replies(guest, b'{"execute": "nope", "id": 7}\n')
    assert reply["id"] == 7 and reply["error"]["class"] == "GenericError"


# ---------------------------------------------------------------------------------- ownership


def test_a_guest_cannot_touch_another_guests_chunks(cma: Cma) -> None:
    one = GuestSession(cma, "guest:one")
    two = GuestSession(cma, "guest:two")
    mine = ok(one, "cma-alloc", dev="dev", size=4096)
    theirs = ok(two, "cma-alloc", dev="dev", size=4096)
    before = state(cma)
    for command in ("cma-free", "cma-get", "cma-put"):
        error = err(one, command, addr=theirs["addr"])
        assert error["class"] == "ENOENT"
        assert hex(theirs["addr"]) in error["desc"]
    assert state(cma) == before
    assert ok(one, "cma-list") == [mine]
    assert ok(two, "cma-list") == [theirs]
    assert ok(two, "cma-free", addr=theirs["addr"]) == {}
    assert [c.owner for c in cma.chunks] == ["guest:one"]


def test_reset_releases_only_that_guest(cma: Cma) -> None:
    one = GuestSession(cma, "guest:one")
    two = GuestSession(cma, "guest:two")
    for _ in range(3):
        ok(one, "cma-alloc", dev="dev", size=4096)
    kept = ok(two, "cma-alloc", dev="dev", size=4096)
    one.feed(b'{"execute": "cma-al')  # a partial line is dropped by the reset too
    released = one.reset()
    assert len(released) == 3
    assert ok(one, "cma-list") == []
    assert ok(two, "cma-list") == [kept]
    assert one.splitter.pending == 0


# ---------------------------------------------------------------------------------- framing


def test_pipelined_and_split_requests(guest: GuestSession) -> None:
    data = b'{"execute":"guest-ping","id":1}\n{"execute":"guest-ping","id":2}\n{"exec'
    assert [r["id"] for r in replies(guest, data)] == [1, 2]
    assert [r["id"] for r in replies(guest, b'ute":"guest-ping","id":3}\r\n')] == [3]
    assert replies(guest, b"\n   \n\t\n") == []  # blank lines resync silently


def test_0xff_discards_the_partial_line(guest: GuestSession, cma: Cma) -> None:
    assert replies(guest, b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "si') == []
    [reply] = replies(guest, b'\xff{"execute": "guest-sync", "arguments": {"id": 9}}\n')
    assert reply == {"return": 9}
    assert cma.chunks == []
    # complete lines before the 0xFF in the same read still count
    data = b'{"execute":"guest-ping","id":1}\n{"garbage\xff{"execute":"guest-ping"}\n'
    got = replies(guest, data)
    assert got == [{"return": {}, "id": 1}, {"return": {}}]


def test_oversized_line_is_answered_once_and_skipped(guest: GuestSession, cma: Cma) -> None:
    before = state(cma)
    huge = b'{"execute": "guest-ping", "arguments": {"x": "' + b"y" * (MAX_LINE + 10)
    # fed in pieces: one reply, as soon as the limit is passed
    got = replies(guest, huge[: MAX_LINE // 2])
    assert got == []
    got = replies(guest, huge[MAX_LINE // 2 :])
    assert len(got) == 1 and got[0]["error"]["class"] == "GenericError"
    assert "longer than" in got[0]["error"]["desc"]
    assert replies(guest, b"y" * 5000) == []
    assert replies(guest, b'yyy"}}\n{"execute": "guest-ping", "id": 2}\n') == [
        {"return": {}, "id": 2}
    ]
    assert state(cma) == before


def test_line_of_exactly_the_limit_is_accepted(guest: GuestSession) -> None:
    line = b'{"execute": "guest-ping", "id": 1}'
    line = line + b" " * (MAX_LINE - len(line))
    assert len(line) == MAX_LINE
    assert replies(guest, line + b"\n") == [{"return": {}, "id": 1}]
    assert replies(guest, line + b" \n")[0]["error"]["class"] == "GenericError"


def test_splitter_unit() -> None:
    s = LineSplitter(limit=4)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\nd") == [b"abc"]
    assert s.feed(b"efgh") == [OVERSIZED]
    assert s.feed(b"ijk\xffxy\n") == [b"xy"]
    assert s.feed(b"12345\n1234\n") == [OVERSIZED, b"1234"]


# ---------------------------------------------------------------------------------- bad input

BAD_LINES: list[tuple[bytes, str]] = [
    (b"{", "invalid JSON"),
    (b"nonsense", "invalid JSON"),
    (b'{"execute": "guest-ping"} x', "invalid JSON"),
    (b"\xc3\x28", "invalid UTF-8"),
    (b'{"execute": "guest-ping", "x": "\xed\xa0\x80"}', "invalid UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'"cma-alloc"', "must be a JSON object"),
    (b"42", "must be a JSON object"),
    (b"{}", "'execute' is missing"),
    (b'{"arguments": {}}', "'execute' is missing"),
    (b'{"execute": 1}', "'execute' must be a string"),
    (b'{"execute": "guest-ping", "arguments": []}', "'arguments' must be an object"),
    (b'{"execute": "guest-ping", "extra": 1}', "is unexpected"),
    (b'{"execute": "guest-ping", "execute": "cma-list"}', "duplicate key"),
    (b'{"execute": "guest-ping", "id": NaN}', "NaN"),
    (b'{"execute": "guest-sync", "arguments": {"id": 1e3}}', "expected an integer"),
    (b"[" * 100_00 + b"]" * 100_00, "invalid JSON"),
    (b'{"execute": "cma-bogus"}', "unknown command"),
    (b'{"execute": "guest-ping", "arguments": {"x": 1}}', "unexpected argument"),
    (b'{"execute": "cma-alloc", "arguments": {"size": 4096}}', "missing argument 'dev'"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "dev"}}', "missing argument 'size'"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": 1, "size": 1}}', "'dev': expected a string"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "size": true}}', "got true"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "size": -1}}', "got -1"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "size": 18446744073709551616}}', "got"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "size": "4096"}}', 'got "4096"'),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "size": 4096.0}}', "got 4096.0"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "d", "size": 1, "alignment": null}}', "null"),
    (b'{"execute": "cma-alloc", "arguments": {"dev": "dev", "size": 1, "x": 1}}', "'x'"),
    (b'{"execute": "cma-alloc-from", "arguments": {"regions": 5, "size": 1}}', "string or null"),
    (b'{"execute": "cma-free", "arguments": {"addr": -4096}}', "'addr'"),
    (b'{"execute": "cma-free", "arguments": {}}', "missing argument 'addr'"),
    (b'{"execute": "cma-put", "arguments": {"addr": [1]}}', "an array"),
    (b'{"execute": "cma-get", "arguments": {"addr": {"a": 1}}}', "an object"),
    (b'{"execute": "cma-info", "arguments": {"dev": "dev", "kind": false}}', "'kind'"),
    (b'{"execute": "cma-list", "arguments": {"dev": "dev"}}', "unexpected argument"),
    (b'{"execute": "guest-sync", "arguments": {}}', "missing argument 'id'"),
    (b'{"execute": "guest-sync", "arguments": {"id": "x"}}', "expected an integer"),
]


@pytest.mark.parametrize(("line", "desc"), BAD_LINES, ids=lambda v: repr(v)[:40])
def test_bad_input_gets_an_error_and_changes_nothing(
    guest: GuestSession, cma: Cma, line: bytes, desc: str
) -> None:
    chunk = ok(guest, "cma-alloc", dev="dev", size=4096)
    before = state(cma)
    [reply] = replies(guest, line + b"\n")
    assert reply["error"]["class"] == "GenericError", reply
    assert desc in reply["error"]["desc"], reply
    assert state(cma) == before
    assert ok(guest, "cma-list") == [chunk]
    assert ok(guest, "guest-ping") == {}


def test_argument_error_desc_names_command_and_argument(guest: GuestSession) -> None:
    error = err(guest, "cma-alloc", dev="dev", size=-1)
    assert error == {
        "class": "GenericError",
        "desc": "cma-alloc: argument 'size': expected an unsigned integer, got -1",
    }


def test_huge_valid_numbers_are_semantic_errors(guest: GuestSession) -> None:
    assert err(guest, "cma-alloc", dev="dev", size=2**64 - 1)["class"] in ("EINVAL", "ENOMEM")
    assert err(guest, "cma-free", addr=2**64 - 1)["class"] == "ENOENT"


def test_framework_bug_becomes_an_error_reply(guest: GuestSession, cma: Cma) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    cma.alloc = broken  # type: ignore[method-assign,assignment]
    error = err(guest, "cma-alloc", dev="dev", size=4096)
    assert error["class"] == "EIO" and "boom" in error["desc"]
    assert ok(guest, "guest-ping") == {}
