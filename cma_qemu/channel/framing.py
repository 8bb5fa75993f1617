"""Splitting a byte stream into request lines, with the guest agent's resynchronisation rules.

Shared by the guest channel and the monitor: both read newline-terminated JSON, must survive
hostile input with bounded memory, and must be able to resync after garbage.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = ["MAX_LINE", "OVERSIZED", "LineSplitter", "Marker"]

#: The longest request line a guest may send (excluding the newline); the design's bound.
MAX_LINE: Final = 64 * 1024

_FLUSH: Final = b"\xff"


class Marker(enum.Enum):
    """A framing event that is not a line, so a reader can reply to it exactly once."""

    OVERSIZED = "oversized"


#: Emitted once per line that went over the limit; the rest of that line is dropped.
OVERSIZED: Final = Marker.OVERSIZED


class LineSplitter:
    """Turns arbitrary chunks of bytes into complete lines.

    Memory stays bounded by ``limit``: a line that grows past it is reported once as
    :data:`OVERSIZED` (as soon as it is known) and its bytes are thrown away up to the next
    newline. A 0xFF byte throws away the partial line before it, like the QEMU guest agent's
    parser reset, so a guest can resync after a timeout without knowing what we buffered.
    """

    __slots__ = ("_buffer", "_discarding", "limit")

    def __init__(self, limit: int = MAX_LINE) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._discarding = False

    def reset(self) -> None:
        """Forget any partial line (guest reset, new connection)."""
        self._buffer.clear()
        self._discarding = False

    @property
    def pending(self) -> int:
        """Bytes of the partial line held now (for tests and diagnostics)."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes | Marker]:
        """Consume ``data``; return the lines it completed (without ``\\n``) and markers."""
        out: list[bytes | Marker] = []
        if _FLUSH not in data:
            self._feed_plain(data, out)
            return out
        segments = data.split(_FLUSH)
        last = len(segments) - 1
        for index, segment in enumerate(segments):
            self._feed_plain(segment, out)
            if index < last:
                self.reset()
        return out

    def _feed_plain(self, data: bytes, out: list[bytes | Marker]) -> None:
        limit = self.limit
        buffer = self._buffer
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                if self._discarding or start == len(data):
                    return
                if len(buffer) + len(data) - start > limit:
                    buffer.clear()
                    self._discarding = True
                    out.append(OVERSIZED)
                else:
                    buffer += data[start:]
                return
            if self._discarding:
                self._discarding = False
            elif buffer:
                if len(buffer) + newline - start > limit:
                    out.append(OVERSIZED)
                else:
                    buffer += data[start:newline]
                    out.append(bytes(buffer))
                buffer.clear()
            elif newline - start > limit:
                out.append(OVERSIZED)
            else:
                out.append(data[start:newline])
            start = newline + 1
