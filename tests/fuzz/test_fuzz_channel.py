"""Fuzz the guest protocol: framing, request decoding, arguments, and whole sessions.

Checked on every example: framing matches a byte-at-a-time model however the stream is cut;
every reply is one JSON line whose error class is an errno name; an error reply changes
nothing; and the session still answers a valid request afterwards.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from fuzzing import check_error, fuzz, no_hang
from hypothesis import given
from hypothesis import strategies as st
from strategies import chunked, guest_streams, json_lines, mutated_bytes
from test_channel_properties import (  # type: ignore[import-not-found]
    json_values,
    make,
    parse_replies,
    snapshot,
    still_works,
)

from cma_qemu.channel import GUEST_COMMANDS
from cma_qemu.errors import GenericError, error_class
from cma_qemu.wire.arguments import Arguments
from cma_qemu.wire.framing import OVERSIZED, LineSplitter, Marker

# --------------------------------------------------------------------------------------------
# framing


def reference_lines(data: bytes, limit: int) -> list[bytes | Marker]:
    """LineSplitter's contract, one byte at a time: 0xFF drops the partial line, a line that
    grows past ``limit`` is reported once and dropped up to its newline."""
    out: list[bytes | Marker] = []
    line = bytearray()
    dropping = False
    for byte in data:
        if byte == 0xFF:
            line.clear()
            dropping = False
        elif byte == 0x0A:
            if not dropping:
                out.append(bytes(line))
            line.clear()
            dropping = False
        elif not dropping:
            line.append(byte)
            if len(line) > limit:
                out.append(OVERSIZED)
                line.clear()
                dropping = True
    return out


_stream_bytes = st.one_of(
    st.binary(max_size=80),
    st.lists(st.sampled_from([b"ab", b"\n", b"\xff", b"xxxxxxxxxx", b"{}"]), max_size=20).map(
        b"".join
    ),
)


@fuzz
@given(data=st.data(), stream=_stream_bytes, limit=st.integers(1, 24))
def test_line_splitter_matches_the_byte_model(
    data: st.DataObject, stream: bytes, limit: int
) -> None:
    splitter = LineSplitter(limit)
    got: list[bytes | Marker] = []
    for piece in data.draw(chunked(stream)):
        got += splitter.feed(piece)
        assert splitter.pending <= limit  # memory stays bounded
    # (a partial line at the end is held, in both; an oversized one is reported at once)
    expected = reference_lines(stream, limit)
    assert got == expected


# --------------------------------------------------------------------------------------------
# arguments


_READERS = ["u64", "integer", "string", "optional_string", "boolean", "strings", "u64_default"]


@fuzz
@given(
    raw=st.dictionaries(st.sampled_from(["a", "b", "size", ""]), json_values, max_size=3),
    reads=st.lists(st.tuples(st.sampled_from(_READERS), st.sampled_from(["a", "b", "size"]))),
)
def test_arguments_return_the_type_asked_for_or_name_the_argument(
    raw: dict[str, Any], reads: list[tuple[str, str]]
) -> None:
    args = Arguments(raw)
    for reader, name in reads:
        try:
            if reader == "u64_default":
                value: Any = args.u64(name, 7)
            elif reader == "boolean":
                value = args.boolean(name, False)
            else:
                value = getattr(args, reader)(name)
        except GenericError as error:
            check_error(error)
            assert name in str(error)
            continue
        expected_type = {
            "u64": int,
            "u64_default": int,
            "integer": int,
            "string": str,
            "optional_string": (str, type(None)),
            "boolean": bool,
            "strings": list,
        }[reader]
        assert isinstance(value, expected_type)
        if reader in ("u64", "u64_default", "integer"):
            assert not isinstance(value, bool)
        if reader in ("u64", "u64_default"):
            assert 0 <= value < 2**64
    unread = set(raw) - {name for _, name in reads}
    try:
        args.done()
    except GenericError as error:
        check_error(error)
        assert unread, "done() refused although every argument was read"
    else:
        assert not unread, f"done() let {sorted(unread)} through"


def test_reading_an_argument_twice_still_rejects_the_unread_one() -> None:
    # found by the fuzzer: reads were counted, not named, so a second read of 'a' hid 'b'
    # from done() (and with 'a' alone, done() failed with an IndexError)
    args = Arguments({"a": 1, "b": 2})
    assert args.u64("a") == args.u64("a") == 1
    with pytest.raises(GenericError, match="unexpected argument 'b'"):
        args.done()
    args = Arguments({"a": 1})
    args.u64("a")
    args.u64("a")
    args.done()


# --------------------------------------------------------------------------------------------
# sessions


def check_reply_shapes(replies: list[dict[str, Any]]) -> None:
    for reply in replies:
        if "error" in reply:
            cls = reply["error"]["class"]
            assert error_class(cls).errno_name == cls, reply  # an errno name (or GenericError)
            desc = reply["error"]["desc"]
            assert desc and "\n" not in desc
            assert "internal error" not in desc, reply  # a non-project exception escaped


@fuzz
@given(data=st.data())
def test_guest_session_survives_any_stream(data: st.DataObject) -> None:
    unset = data.draw(st.booleans())  # no asterisk: unmatched devices get ENOENT
    cma, session, addr = make()
    if unset:
        cma.set_asterisk("")
    stream = data.draw(guest_streams([addr, addr + 4096, 0]))
    replies: list[dict[str, Any]] = []
    with no_hang():
        for piece in data.draw(chunked(stream)):
            before = snapshot(cma)
            out = session.feed(piece)
            got = parse_replies(out)
            check_reply_shapes(got)
            if got and all("error" in r for r in got):
                assert snapshot(cma) == before
            replies += got
    # cutting the stream differently gives the same replies and the same state
    twin_cma, twin, _ = make()
    if unset:
        twin_cma.set_asterisk("")
    twin_replies = parse_replies(twin.feed(stream))
    assert twin_replies == replies
    assert snapshot(twin_cma) == snapshot(cma)
    assert {c.owner for c in cma.chunks} <= {"guest:p"}
    if any(c.start == addr for c in cma.chunks):
        still_works(session, addr)


@fuzz
@given(line=json_lines(list(GUEST_COMMANDS), [0x40000000]))
def test_one_request_line_one_reply(line: bytes) -> None:
    cma, session, _ = make()
    line = line.replace(b"\n", b" ").replace(b"\xff", b" ")
    before = snapshot(cma)
    with no_hang():
        out = session.handle_line(line)
    if not line.strip():
        assert out == b""
        return
    [reply] = parse_replies(out)
    check_reply_shapes([reply])
    if "error" in reply:
        assert snapshot(cma) == before
    else:
        request = json.loads(line)
        assert request["execute"] in GUEST_COMMANDS


# Regression examples: deep nesting and bytes that only look like JSON.
@fuzz
@given(line=mutated_bytes(st.just(b'{"execute": "cma-alloc", "arguments": {"dev": "d"}}')))
def test_mutated_alloc_requests(line: bytes) -> None:
    cma, session, _ = make()
    for piece in (line, b"[" * 100_000, b'{"execute": "guest-sync", "arguments": {"id": 1e999}}'):
        before = snapshot(cma)
        out = session.handle_line(piece.replace(b"\n", b" "))
        replies = parse_replies(out)
        check_reply_shapes(replies)
        if replies and "error" in replies[0]:
            assert snapshot(cma) == before


def test_a_newline_in_a_device_name_stays_inside_one_reply_line() -> None:
    # found by the fuzzer: the framework quotes the device name as given, so its newline
    # reached the stub, which printed the error as two lines
    cma, session, _ = make()
    cma.set_asterisk("")
    request = {"execute": "cma-alloc", "arguments": {"dev": "a\nb", "size": 1}}
    [reply] = parse_replies(session.handle_line(json.dumps(request).encode()))
    assert reply["error"] == {
        "class": "ENOENT",
        "desc": "no region list for a\\nb: no map rule and no asterisk list",
    }
