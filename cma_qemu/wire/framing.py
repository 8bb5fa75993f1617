"""Splitting a byte stream into request lines, with the guest agent's resynchronisation rules.

Shared by the guest channel and the monitor: both read newline-terminated JSON, must survive
hostile input with bounded memory, and must be able to resync after garbage.
"""

from __future__ import annotations

import enum
import re
from typing import Final

__all__ = ["MAX_LINE", "OVERSIZED", "JsonSplitter", "LineSplitter", "Marker"]

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


# Outside strings: anything that is not plain number/literal/separator text.
_OUTSIDE: Final = re.compile(rb"[^ \t\r,:0-9.eE+\-truefalsn]")
# Inside strings: the end of the string, an escape, or a byte that ends the message anyway.
_IN_STRING: Final = re.compile(rb'["\\\n\xff]')
_LINE_END: Final = re.compile(rb"[\n\xff]")
_OPEN: Final = frozenset(b"{[")
_CLOSE: Final = frozenset(b"}]")


class JsonSplitter:
    """Cuts a byte stream into JSON texts the way QEMU's JSON streamer does.

    QMP clients (``qemu.qmp`` among them) send objects back to back without newlines, so a
    message ends where its outermost brace or bracket closes. For people typing into a raw
    socket a newline also ends whatever is pending, and a byte that cannot appear in JSON
    outside a string ends the message at once (the parser then reports it) and the rest of
    that line is dropped, so garbage is answered instead of waited on. 0xFF drops the partial
    message; a message longer than ``limit`` is reported once as :data:`OVERSIZED`.
    """

    __slots__ = ("_buffer", "_depth", "_escape", "_in_string", "_skipping", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._buffer = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._skipping = False

    def reset(self) -> None:
        """Forget any partial message."""
        self._buffer.clear()
        self._depth = 0
        self._in_string = False
        self._escape = False

    def _emit(self, out: list[bytes | Marker], tail: bytes) -> None:
        message = bytes(self._buffer) + tail
        self.reset()
        if len(message) > self.limit:
            # Complete within one read, so the check at the end of feed() never saw it.
            out.append(OVERSIZED)
        elif message.strip():
            out.append(message)

    def feed(self, data: bytes) -> list[bytes | Marker]:
        """Consume ``data``; return the complete JSON texts (undecoded) and markers."""
        out: list[bytes | Marker] = []
        pos = 0
        seg = 0  # data[seg:pos] belongs to the pending message but is not in the buffer yet
        end = len(data)
        while pos < end:
            if self._skipping:
                match = _LINE_END.search(data, pos)
                if match is None:
                    return out
                pos = seg = match.end()
                self._skipping = False
                continue
            if self._in_string:
                if self._escape:
                    self._escape = False
                    pos += 1
                    continue
                match = _IN_STRING.search(data, pos)
                if match is None:
                    pos = end
                    break
                byte = data[match.start()]
                pos = match.end()
                if byte == 0x5C:  # backslash
                    self._escape = True
                elif byte == 0x22:  # closing quote
                    self._in_string = False
                elif byte == 0x0A:  # a raw newline cannot be in a string: let the parser say so
                    self._emit(out, data[seg : pos - 1])
                    seg = pos
                else:  # 0xFF
                    self.reset()
                    seg = pos
                continue
            match = _OUTSIDE.search(data, pos)
            if match is None:
                pos = end
                break
            byte = data[match.start()]
            pos = match.end()
            if byte == 0x22:
                self._in_string = True
            elif byte in _OPEN:
                self._depth += 1
            elif byte in _CLOSE:
                self._depth -= 1
                if self._depth <= 0:
                    self._emit(out, data[seg:pos])
                    seg = pos
            elif byte == 0x0A:
                self._emit(out, data[seg : pos - 1])
                seg = pos
            elif byte == 0xFF:
                self.reset()
                seg = pos
            else:  # cannot start or continue JSON here: answer now, resync at the newline
                self._emit(out, data[seg:pos])
                seg = pos
                self._skipping = True
        if not self._skipping:
            self._buffer += data[seg:end]
            if len(self._buffer) > self.limit:
                self.reset()
                self._skipping = True
                out.append(OVERSIZED)
        return out
