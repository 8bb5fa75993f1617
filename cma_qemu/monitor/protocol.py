"""QMP wire details of the agent's monitor: greeting, negotiation errors, event lines.

Only what makes ``qemu.qmp.QMPClient`` and ``qmp-shell`` treat the agent like QEMU lives here;
request decoding is shared with the guest channel (:mod:`cma_qemu.channel.messages`).
"""

from __future__ import annotations

import json
import time
from typing import Final

__all__ = [
    "COMMAND_NOT_FOUND",
    "GREETING",
    "MAX_REQUEST",
    "encode_event",
]

#: QEMU's class for unknown commands and for commands before/after negotiation.
COMMAND_NOT_FOUND: Final = "CommandNotFound"

#: Requests can carry a whole map attribute (up to 64 KiB) plus JSON quoting.
MAX_REQUEST: Final = 1024 * 1024

#: The first line a client reads, shaped like QEMU's so QMP clients accept it.
GREETING: Final = (
    json.dumps(
        {
            "QMP": {
                "version": {
                    "qemu": {"major": 0, "minor": 1, "micro": 0},
                    "package": "cma-qemu",
                },
                "capabilities": [],
            }
        },
        separators=(",", ":"),
    )
    + "\n"
).encode()

_dumps: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def encode_event(name: str, data: dict[str, object], now: float | None = None) -> bytes:
    """A QMP event line with QEMU's ``timestamp`` (seconds and microseconds)."""
    stamp = time.time() if now is None else now
    seconds = int(stamp)
    message = {
        "event": name,
        "data": data,
        "timestamp": {"seconds": seconds, "microseconds": int((stamp - seconds) * 1_000_000)},
    }
    return (_dumps(message) + "\n").encode()
