"""The wire format the guest channel and the monitor share: line framing with
resynchronisation, the QMP-style request/reply envelope, typed argument access, and the JSON
shape of framework values. It knows neither the channel nor the monitor.
"""

from cma_qemu.wire.arguments import U64_MAX, Arguments
from cma_qemu.wire.framing import MAX_LINE, OVERSIZED, JsonSplitter, LineSplitter, Marker
from cma_qemu.wire.messages import (
    Request,
    RequestError,
    encode_error,
    encode_return,
    parse_request,
)
from cma_qemu.wire.values import chunk_json, info_json

__all__ = [
    "MAX_LINE",
    "OVERSIZED",
    "U64_MAX",
    "Arguments",
    "JsonSplitter",
    "LineSplitter",
    "Marker",
    "Request",
    "RequestError",
    "chunk_json",
    "encode_error",
    "encode_return",
    "info_json",
    "parse_request",
]
