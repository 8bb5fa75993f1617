"""Hypothesis strategies for the fuzz targets: well-formed input, its mutants, and garbage.

Built on the unit property tests' strategies (imported, not copied): those generate valid
values and uniformly random text; here valid input is also *mutated* (a few characters
inserted, dropped, replaced or repeated), which reaches the error paths just past a valid
prefix that random text rarely gets to.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st
from test_attributes_properties import (  # type: ignore[import-not-found]
    ASTERISK_ALPHABET,
    MAP_ALPHABET,
    REGIONS_ALPHABET,
    names,
    region_specs,
    small_maps,
    wide_maps,
)
from test_channel_properties import json_values  # type: ignore[import-not-found]
from test_framework_properties import random_lines  # type: ignore[import-not-found]

from cma_qemu.attributes import format_asterisk, format_map, format_regions
from cma_qemu.channel import GUEST_COMMANDS

__all__ = [
    "ASTERISK_ALPHABET",
    "MAP_ALPHABET",
    "REGIONS_ALPHABET",
    "asterisk_texts",
    "board_documents",
    "chunked",
    "guest_streams",
    "json_lines",
    "map_texts",
    "monitor_lines",
    "mutated",
    "mutated_bytes",
    "placeable_regions",
    "regions_texts",
    "script_lines",
]

# --------------------------------------------------------------------------------------------
# Mutation


# Strategies a draw uses are built once, here, not inside the draw: a strategy built in a draw
# is a new object each time, and a new ``one_of`` (``a | b``) or composite is validated and
# analysed again (emptiness, recursion) on every draw: a fifth of a protocol case's CPU.
_TEXT_EDITS = st.sampled_from(["insert", "delete", "replace", "repeat", "cut"])
_BYTE_EDITS = st.sampled_from(["insert", "delete", "replace", "cut"])
_SPECIAL_BYTES = st.sampled_from([0x0A, 0xFF, 0x00, 0x22, 0x5C, 0x7B, 0x7D, 0x80, 0xC3])
_BYTES = st.one_of(_SPECIAL_BYTES, st.integers(0, 255))


@functools.cache
def _edit_chars(alphabet: str) -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(alphabet), st.characters(codec="utf-8"))


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy[str], alphabet: str) -> str:
    """A valid text with up to four edits; characters come from ``alphabet`` or anywhere."""
    text = draw(valid)
    chars = _edit_chars(alphabet)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(text)))
        edit = draw(_TEXT_EDITS)
        if edit == "insert":
            text = text[:at] + draw(chars) + text[at:]
        elif edit == "delete":
            text = text[:at] + text[at + 1 :]
        elif edit == "replace":
            text = text[:at] + draw(chars) + text[at + 1 :]
        elif edit == "repeat":
            end = draw(st.integers(at, min(len(text), at + 16)))
            text = text[:end] + text[at:end] * draw(st.integers(1, 3)) + text[end:]
        else:
            text = text[:at]
    return text


@st.composite
def mutated_bytes(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    """Bytes with up to four edits (any byte value, newlines and 0xFF included)."""
    data = bytearray(draw(valid))
    byte = _BYTES
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data)))
        edit = draw(_BYTE_EDITS)
        if edit == "insert":
            data[at:at] = bytes([draw(byte)])
        elif edit == "delete":
            del data[at : at + 1]
        elif edit == "replace":
            data[at : at + 1] = bytes([draw(byte)])
        else:
            del data[at:]
    return bytes(data)


@st.composite
def chunked(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points, as a socket may deliver it."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------------------------
# Attributes

REGION_NAMES = ["a", "b", "c", "video", "fw", "a-b", "ä"]
_REGION_NAMES = st.sampled_from(REGION_NAMES)
_REGION_SIZES = st.sampled_from(["4K", "64K", "1M", "2M", "0x3000", "8M", "12345"])
_REGION_STARTS = st.sampled_from(["0x40000000", "0x40800000", "0x41000000", "0"])
_REGION_ALIGNMENTS = st.sampled_from(["0", "4K", "64K", "1M", "0x2000"])
_REGION_ALLOCATORS = st.sampled_from(["bf", "bitmap", "nosuch"])
_REGIONS_ENDS = st.sampled_from(["", ";"])


@st.composite
def placeable_regions(draw: st.DrawFn) -> str:
    """A regions attribute that often fits a small RAM (sizes of pages to a few MiB)."""
    parts = []
    for _ in range(draw(st.integers(0, 5))):
        name = draw(_REGION_NAMES)
        part = ("-" if draw(st.booleans()) else "") + name
        part += "=" + draw(_REGION_SIZES)
        if draw(st.booleans()):
            part += "@" + draw(_REGION_STARTS)
        if draw(st.booleans()):
            part += "/" + draw(_REGION_ALIGNMENTS)
        if draw(st.integers(0, 3)) == 0:
            part += ":" + draw(_REGION_ALLOCATORS)
        parts.append(part)
    return ";".join(parts) + draw(_REGIONS_ENDS)


_formatted_regions = st.lists(region_specs(), max_size=4).map(lambda s: format_regions(tuple(s)))

#: Regions attributes: placeable ones, any valid one, their mutants, and garbage.
regions_texts = st.one_of(
    placeable_regions(),
    _formatted_regions,
    mutated(st.one_of(placeable_regions(), _formatted_regions), REGIONS_ALPHABET),
    st.text(REGIONS_ALPHABET, max_size=40),
    st.text(max_size=40),
)

_formatted_maps = st.one_of(small_maps, wide_maps).map(format_map)
_useful_maps = st.sampled_from(
    ["d0=a,b;d1/k=b,nosuch;d2=*", "*/*=*", "d?/*=c;/x=a", "d0,/k=;*=b", "video=video\n"]
)
#: Map attributes: valid ones, their mutants, and garbage.
map_texts = st.one_of(
    _useful_maps,
    _formatted_maps,
    mutated(st.one_of(_useful_maps, _formatted_maps), MAP_ALPHABET),
    st.text(MAP_ALPHABET, max_size=30),
    st.text(max_size=30),
)

_formatted_asterisks = st.lists(st.one_of(names, _REGION_NAMES), max_size=4).map(
    lambda n: format_asterisk(tuple(n))
)
#: Asterisk attributes: valid ones, their mutants, and garbage.
asterisk_texts = st.one_of(
    _formatted_asterisks,
    mutated(_formatted_asterisks, ASTERISK_ALPHABET),
    st.text(ASTERISK_ALPHABET, max_size=20),
    st.text(max_size=20),
)

# --------------------------------------------------------------------------------------------
# The line format

_VALID_LINES = [
    "alloc d0 4K",
    "a d1/k 0x2000/0x2000",
    "a d2 8K/4K",
    "alloc-from a,b 4K",
    "r * 16K/64K",
    "r c 1",
    "free",
    "f 1",
    "list",
    "info d0",
    "i d1/k",
    "write 1 0xc0de0000",
    "verify 1 0xc0de0000",
    "v 2 7",
    "bench 3 d0 4K",
    "ping 2",
    "# comment",
    "",
]
_valid_lines = st.sampled_from(_VALID_LINES)


def _quick(line: str) -> bool:
    """False for a bench or ping of more than 100 round trips (up to 10^6 are valid and slow)."""
    words = [w for w in re.split(r"[ \t]+", line.partition("\0")[0]) if w]
    if len(words) < 2 or words[0] not in ("b", "bench", "p", "ping"):
        return True
    return not (words[1].isascii() and words[1].isdigit() and int(words[1]) > 100)


#: Script lines: valid ones, mutants, the unit tests' token lines and garbage. The counts of
#: bench and ping stay small, so an example is quick by construction.
script_lines = st.one_of(
    _valid_lines,
    mutated(_valid_lines, " \tafilrvwbp0123456789xK/#,*-"),
    random_lines,
    # lone surrogates: what a Python caller (or undecodable input) can hand the runner
    st.text(st.characters(categories=["Cs", "Ll", "Zs"]), max_size=8),
    mutated(_valid_lines, "\ud800\udcff\udfff "),
).filter(_quick)

# --------------------------------------------------------------------------------------------
# Board files


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return hex(value) if value >= 0 else str(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
        )
    return repr(value)  # floats: TOML reads Python's repr of a finite float


def toml_document(board: dict[str, Any]) -> str:
    """A board dict as TOML: scalars first, then tables and arrays of tables."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in board.items() if not _nested(v)]
    for key, value in board.items():
        if isinstance(value, dict):
            lines.append(f"[{json.dumps(key)}]")
            lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()]
        elif _nested(value):
            for entry in value:
                lines.append(f"[[{json.dumps(key)}]]")
                lines += [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


def _nested(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)
    )


_sizes = st.one_of(
    st.sampled_from(["512M", "256M", "128M", "1G", "64K", "0x1000", "4K"]),
    st.sampled_from([0x40000000, 0x10000000, 0x8000000, 0, 4096]),
    st.integers(-(2**65), 2**65),
    st.text("0x19KMG", max_size=6),
)
_addresses = st.one_of(st.sampled_from([0x40000000, 0x48000000, 0x50000000, 0x60000000]), _sizes)
_junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)
)


def _maybe_junk(draw: st.DrawFn, value: st.SearchStrategy[Any]) -> Any:
    return draw(_junk) if draw(st.integers(0, 15)) == 0 else draw(value)


@st.composite
def board_dicts(draw: st.DrawFn, stem: str) -> dict[str, Any]:
    """A board file's tree: usually close to valid, sometimes a key missing, extra or mistyped."""
    machine_type = draw(st.sampled_from(["virt", "virt", "smdkc210", "pc"]))
    banks = [
        {"base": _maybe_junk(draw, _addresses), "size": _maybe_junk(draw, _sizes)}
        for _ in range(draw(st.integers(0, 3)))
    ]
    reserve = [
        {
            "label": _maybe_junk(draw, st.sampled_from(["the kernel", "initrd", ""])),
            "start": _maybe_junk(draw, _addresses),
            "size": _maybe_junk(draw, _sizes),
        }
        for _ in range(draw(st.integers(0, 2)))
    ]
    channel: dict[str, Any] = {
        "kind": _maybe_junk(draw, st.sampled_from(["virtio-serial", "uart", "usb"])),
        "name": _maybe_junk(draw, st.sampled_from(["org.cma.0", "/dev/ttySAC1"])),
    }
    if draw(st.booleans()):
        channel["rx_fifo_size"] = _maybe_junk(draw, st.integers(-5, 5000))
    if draw(st.integers(0, 3)) == 0:
        channel["rx_fifo_status"] = _maybe_junk(draw, st.integers(-1, 2**66))
    cma: dict[str, Any] = {"regions": draw(regions_texts), "map": draw(map_texts)}
    if draw(st.booleans()):
        cma["asterisk"] = draw(asterisk_texts)
    board: dict[str, Any] = {
        "name": draw(st.sampled_from([stem, stem, "other"])),
        "description": "fuzzed",
        "machine": {
            "type": machine_type,
            "cpu": _maybe_junk(draw, st.sampled_from(["cortex-a15", "cortex-a9"])),
            "kernel": draw(st.sampled_from(["armmp", "armmp-lpae", "x86"])),
        },
        "ram": banks,
        "reserve": reserve,
        "channel": channel,
        "cma": cma,
    }
    for _ in range(draw(st.integers(0, 2))):  # drop a key or add an unknown one
        key = draw(st.sampled_from(sorted(board)))
        if draw(st.booleans()):
            del board[key]
        else:
            board[draw(st.sampled_from(["extra", "Machine", key]))] = draw(_junk)
    return board


_TOML_ALPHABET = "[]=.\"'#\n ,{}0x1M-_abc"


def board_documents(stem: str) -> st.SearchStrategy[str]:
    """Board files as text: generated trees, their textual mutants, and nesting bombs."""
    documents = board_dicts(stem).map(toml_document)
    return st.one_of(
        documents,
        documents,
        mutated(documents, _TOML_ALPHABET),
        st.text(_TOML_ALPHABET, max_size=60),
        st.integers(1, 5000).map(lambda n: "a = " + "[" * n + "]" * n + "\n"),
        st.integers(1, 5000).map(lambda n: "a = " + "{b = " * n + "1" + "}" * n + "\n"),
        st.integers(1, 6000).map(lambda n: f'name = "x"\n[[ram]]\nbase = {"9" * n}\n'),
    )


# --------------------------------------------------------------------------------------------
# Protocols

_guest_argument_names = st.sampled_from(
    ["dev", "kind", "size", "alignment", "regions", "addr", "id", "x", ""]
)
_guest_values = st.one_of(
    st.sampled_from(["d0", "d1", "k", "a", "b", "*", "a,b", "", "nosuch", "a\nb", "\x00"]),
    st.sampled_from([0, 1, 4096, 8192, 0x2000, 2**64 - 1, 2**64, -1, 3, 2**63]),
    json_values,
)


_ids = st.one_of(st.integers(-(2**64), 2**65), json_values)
_extra_keys = st.text(max_size=4)


@functools.cache
def _commands(commands: tuple[str, ...]) -> st.SearchStrategy[Any]:
    return st.sampled_from(commands) | st.text(max_size=8) | _junk


@st.composite
def _requests(draw: st.DrawFn, commands: Sequence[str], addresses: Sequence[int]) -> dict[str, Any]:
    request: dict[str, Any] = {"execute": draw(_commands(tuple(commands)))}
    if draw(st.integers(0, 7)):
        arguments = draw(st.dictionaries(_guest_argument_names, _guest_values, max_size=4))
        if addresses and draw(st.booleans()):
            arguments["addr"] = draw(st.sampled_from(addresses))
        request["arguments"] = arguments
    if draw(st.booleans()):
        request["id"] = draw(_ids)
    if draw(st.integers(0, 15)) == 0:
        request[draw(_extra_keys)] = draw(_junk)
    return request


# The three below are built from their arguments inside a test (the addresses a fresh framework
# handed out), so they are cached: a new strategy object per case costs Hypothesis its
# validation and its recursive-strategy analysis again, more than a guest session's checks.


def json_lines(commands: Sequence[str], addresses: Sequence[int]) -> st.SearchStrategy[bytes]:
    """One request as JSON text (no newline): well-formed, mutated or any bytes."""
    return _json_lines(tuple(commands), tuple(addresses))


@functools.cache
def _json_lines(commands: tuple[str, ...], addresses: tuple[int, ...]) -> st.SearchStrategy[bytes]:
    valid = _requests(commands, addresses).map(lambda r: json.dumps(r).encode())
    return st.one_of(
        valid,
        valid,
        mutated_bytes(valid),
        st.binary(max_size=40),
        st.integers(1, 3000).map(lambda n: b'{"execute": ' + b"[" * n + b"]" * n + b"}"),
    )


_GUEST_FILLERS = st.sampled_from([b"\n", b"\r\n", b"\xff", b"\xff\n", b"   \n"])


def guest_streams(addresses: Sequence[int]) -> st.SearchStrategy[bytes]:
    """What a guest might write to its port: request lines, blank lines, resync bytes, junk."""
    return _guest_streams(tuple(addresses))


@functools.cache
def _guest_streams(addresses: tuple[int, ...]) -> st.SearchStrategy[bytes]:
    line = json_lines(list(GUEST_COMMANDS), addresses)
    piece = st.one_of(
        line.map(lambda b: b + b"\n"),
        _GUEST_FILLERS,
        st.binary(max_size=20),
    )
    return st.lists(piece, max_size=6).map(b"".join)


MONITOR_COMMANDS = [
    "qmp_capabilities",
    "query-commands",
    "query-cma-regions",
    "query-cma-chunks",
    "query-cma-map",
    "query-cma-stats",
    "query-cma-info",
    "query-cma-info-about",
    "cma-set-map",
    "cma-set-asterisk",
    "cma-alloc",
    "cma-alloc-from",
    "cma-free",
    "cma-read",
    "query-cma-allocators",
    "cma-allocator-register",
]
#: ``cma-allocator-register`` imports code, so its ``class`` is only ever one of these.
SAFE_CLASSES = [
    "cma_qemu.errors:EINVAL",
    "cma_qemu.allocators.bitmap:BitmapAllocator",
    "cma_qemu.allocators.base:Allocator",
    "cma_qemu.no_such_module:X",
    "cma_qemu.errors:nothing",
    ":",
    "cma_qemu.errors",
    "a:b:c",
]


_safe_classes = st.sampled_from(SAFE_CLASSES)
_MONITOR_ARGUMENTS = {
    "map": map_texts,
    "asterisk": asterisk_texts,
    "holes": st.booleans() | _junk,
    "enable": st.lists(st.text(max_size=5), max_size=2) | _junk,
    "class": _safe_classes,
}
_monitor_argument_names = st.lists(st.sampled_from(sorted(_MONITOR_ARGUMENTS)), max_size=2)
_read_sizes = st.sampled_from([0, 1, 4096, 16 << 20, (16 << 20) + 1])


@functools.cache
def _monitor_shapes(addresses: tuple[int, ...]) -> st.SearchStrategy[dict[str, Any]]:
    return _requests(tuple(MONITOR_COMMANDS), addresses)


@st.composite
def monitor_requests(draw: st.DrawFn, addresses: Sequence[int]) -> dict[str, Any]:
    """A monitor request: the guest's shapes plus the monitor's own arguments."""
    request = draw(_monitor_shapes(tuple(addresses)))
    arguments = request.get("arguments")
    if isinstance(arguments, dict):
        for name in draw(_monitor_argument_names):
            arguments[name] = draw(_MONITOR_ARGUMENTS[name])
        if request.get("execute") == "cma-read" and draw(st.booleans()):
            arguments["size"] = draw(_read_sizes)
    if isinstance(arguments, dict) and (
        "class" in arguments or request.get("execute") == "cma-allocator-register"
    ):
        arguments["class"] = draw(_safe_classes)
    return request


def monitor_lines(addresses: Sequence[int]) -> st.SearchStrategy[bytes]:
    """A monitor request line: generated, mutated (but never naming another class), or junk."""
    return _monitor_lines(tuple(addresses))


@functools.cache
def _monitor_lines(addresses: tuple[int, ...]) -> st.SearchStrategy[bytes]:
    valid = monitor_requests(addresses).map(lambda r: json.dumps(r).encode())
    junk = st.one_of(mutated_bytes(valid), st.binary(max_size=40), json_lines(["x"], addresses))
    return st.one_of(valid, valid, junk.filter(lambda b: b"cma-allocator-register" not in b))
