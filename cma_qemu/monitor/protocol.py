"""QMP wire details of the agent's monitor: greeting, version, negotiation errors, event lines.

Only what makes ``qemu.qmp.QMPClient`` and ``qmp-shell`` treat the agent like QEMU lives here;
request decoding is shared with the guest channel (:mod:`cma_qemu.wire.messages`).
"""

from __future__ import annotations

import json
import re
import time
from typing import Final

import cma_qemu

__all__ = [
    "COMMAND_NOT_FOUND",
    "GREETING",
    "MAX_REQUEST",
    "PACKAGE_VERSION",
    "VERSION_INFO",
    "encode_event",
    "version_info",
]

#: QEMU's class for unknown commands and for commands before/after negotiation.
COMMAND_NOT_FOUND: Final = "CommandNotFound"

#: Requests can carry a whole map attribute (up to 64 KiB) plus JSON quoting.
MAX_REQUEST: Final = 1024 * 1024


def version_info(version: str) -> dict[str, object]:
    """``query-version``'s reply in QEMU's shape for a version string.

    ``qemu`` holds the numbers (a part that is missing or not a number is 0, as in
    ``0.1.0.dev3`` -> 0.1.0); ``package`` names this package and its full version.
    """
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", version)
    parts = [int(p) if p else 0 for p in match.groups()] if match else [0, 0, 0]
    return {
        "qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
        "package": f"cma-qemu {version}",
    }


#: This package's version, as the monitor reports it.
PACKAGE_VERSION: Final = cma_qemu.__version__
#: ``query-version``'s reply; the greeting carries the same.
VERSION_INFO: Final = version_info(PACKAGE_VERSION)

#: The first line a client reads, shaped like QEMU's so QMP clients accept it.
GREETING: Final = (
    json.dumps({"QMP": {"version": VERSION_INFO, "capabilities": []}}, separators=(",", ":")) + "\n"
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
