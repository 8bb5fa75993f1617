"""One guest's protocol session: its chunks, and the request loop over a stream pair.

The session object outlives connections: if the host-side socket drops and comes back the
guest still holds its chunks. Only :meth:`GuestSession.reset` (guest reset, port closed) gives
them back.
"""

from __future__ import annotations

import array
import asyncio
import fcntl
import logging
import termios
from collections.abc import Awaitable, Callable
from typing import Final

from cma_qemu.channel.commands import GUEST_COMMANDS
from cma_qemu.errors import EIO, CmaError, GenericError
from cma_qemu.framework import Chunk, Cma
from cma_qemu.wire.arguments import Arguments
from cma_qemu.wire.framing import MAX_LINE, LineSplitter, Marker
from cma_qemu.wire.messages import (
    RequestError,
    encode_error,
    encode_return,
    guest_id_ok,
    parse_request,
)

__all__ = [
    "KERNEL",
    "KERNEL_SUFFIX",
    "READ_SIZE",
    "FifoGate",
    "GuestSession",
]

log = logging.getLogger(__name__)

#: The request ``"owner"`` a guest daemon sends for kernel callers (cma_guest.ko's users).
KERNEL: Final = "kernel"

#: What ``"owner": "kernel"`` requests' chunks are recorded as: the port's owner plus this.
KERNEL_SUFFIX: Final = "/" + KERNEL

#: How much one read takes from the stream; big enough for a burst of pipelined requests.
READ_SIZE: Final = 64 * 1024

_OWNERS: Final = frozenset({KERNEL})

_OVERSIZED_REPLY: Final = encode_error(
    "GenericError", f"request line longer than {MAX_LINE} bytes: discarded up to the next newline"
)


class FifoGate:
    """Writes towards a guest UART only what its receive FIFO can take, and sees it drained.

    Two faults of QEMU 7.2's Exynos4210 UART, both measured here:

    * its receive FIFO is a ring in which "full" looks like "empty": the moment exactly
      ``size`` bytes are stored, all of them vanish. QEMU moves as much from the socket into
      the FIFO as has room, so whatever leaves ``size`` or more bytes outstanding (in our
      socket's send queue plus in the FIFO) can trigger it, however the writes are timed;
    * now and then the guest gets no receive-timeout interrupt for the last few bytes, which
      then sit in the FIFO until more arrive (seen: 6 bytes for 6 s).

    So the gate reads the FIFO level (``read_level``, over QMP) and our unsent bytes, never
    lets their sum reach ``size``, and after a write waits until the FIFO is empty; when the
    level has not moved for ``stall`` seconds it sends one ``\\n`` (a blank line, which the
    stub's reply reader skips) so QEMU raises the interrupt again.
    """

    def __init__(
        self,
        read_level: Callable[[], Awaitable[int]],
        size: int = 64,
        *,
        poll: float = 0.0005,
        stall: float = 0.01,
        give_up: float = 2.0,
        max_kicks: int = 8,
    ) -> None:
        self.read_level = read_level
        self.size = size
        self.poll = poll
        self.stall = stall
        self.give_up = give_up
        self.max_kicks = max_kicks
        #: Blank lines sent to wake a stuck receiver (a counter for tests and benchmarks).
        self.kicks = 0

    async def room(self, writer: asyncio.StreamWriter) -> tuple[int, int]:
        """(bytes that may be written now, bytes still outstanding)."""
        # Unsent bytes first, then the FIFO: bytes that move from the socket into the FIFO in
        # between are counted twice (safe), never missed.
        unsent = _unsent_bytes(writer)
        level = await self.read_level()
        outstanding = unsent + level
        return self.size - 1 - outstanding, outstanding

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        """Write ``data`` in pieces the FIFO can hold, and wait until the guest has read it."""
        loop = asyncio.get_running_loop()
        offset = 0
        kicks = 0
        last = -1
        since = loop.time()
        while True:
            room, outstanding = await self.room(writer)
            if offset < len(data) and room > 0:
                writer.write(data[offset : offset + room])
                await writer.drain()
                offset += room
                last, since = -1, loop.time()
                continue
            if offset >= len(data) and outstanding == 0:
                return
            now = loop.time()
            if outstanding != last:
                last, since = outstanding, now
            elif now - since > self.give_up:
                return  # nobody reads the UART (the stub exited): leave it to the guest
            elif now - since > self.stall and kicks < self.max_kicks and room > 0:
                writer.write(b"\n")
                await writer.drain()
                kicks += 1
                self.kicks += 1
                since = now
            await asyncio.sleep(self.poll)


def _unsent_bytes(writer: asyncio.StreamWriter) -> int:
    """What the peer has not read yet from our socket (SIOCOUTQ); 0 when unknown."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
    except OSError:
        return 0
    return int(buf[0])


class GuestSession:
    """The agent's side of one guest port.

    ``owner`` is what the framework records on this guest's chunks; it is how ownership is
    checked (a guest can only free, get or put its own chunks) and what a reset releases.
    A request with ``"owner": "kernel"`` (the daemon of the guest's kernel module) acts as
    :attr:`kernel_owner` instead, ``owner + "/kernel"``: kernel code and user space on one
    port cannot free each other's chunks, inspection shows which is which, and a reset
    releases both.
    """

    def __init__(self, cma: Cma, owner: str) -> None:
        self.cma = cma
        self.owner = owner
        self.kernel_owner = owner + KERNEL_SUFFIX
        self.splitter = LineSplitter(MAX_LINE)
        #: Requests answered since creation (cheap liveness / test hook).
        self.requests = 0

    def handle_line(self, line: bytes) -> bytes:
        """Answer one request line; empty for a blank line (whitespace resyncs, like QGA)."""
        if not line.strip():
            return b""
        self.requests += 1
        try:
            request = parse_request(line, id_ok=guest_id_ok, owners=_OWNERS)
        except RequestError as err:
            return encode_error(err, str(err), err.request_id, err.has_id)
        handler = GUEST_COMMANDS.get(request.execute)
        if handler is None:
            return encode_error(
                "GenericError",
                f"unknown command {request.execute[:64]!r}",
                request.id,
                request.has_id,
            )
        owner = self.kernel_owner if request.owner == KERNEL else self.owner
        try:
            value = handler(self.cma, owner, Arguments(request.arguments))
        except GenericError as err:  # the request itself is malformed: say which command
            return encode_error(err, f"{request.execute}: {err}", request.id, request.has_id)
        except CmaError as err:
            # The framework's own message, word for word: the stub prints it as
            # `CMD: CLASS: desc`, exactly what `cma-qemu replay` prints for the same line.
            return encode_error(err, str(err), request.id, request.has_id)
        except Exception as err:  # a framework bug must not take the guest's session down
            log.exception("guest %s: %s failed", owner, request.execute)
            return encode_error(
                EIO(str(err)),
                f"{request.execute}: internal error: {type(err).__name__}: {err}",
                request.id,
                request.has_id,
            )
        return encode_return(value, request.id, request.has_id)

    def feed(self, data: bytes) -> bytes:
        """Answer every request ``data`` completes; the replies, concatenated."""
        replies = []
        for item in self.splitter.feed(data):
            if isinstance(item, Marker):
                replies.append(_OVERSIZED_REPLY)
            else:
                reply = self.handle_line(item)
                if reply:
                    replies.append(reply)
        return b"".join(replies)

    async def serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        gate: FifoGate | None = None,
        *,
        first: bytes = b"",
    ) -> None:
        """Answer requests until the stream ends; the caller owns and closes ``writer``.

        ``first`` is what the caller already read from ``reader`` (a listener reads a
        connection's first bytes before it numbers it as a session).
        """
        self.splitter.reset()
        data = first or await reader.read(READ_SIZE)
        while data:
            replies = self.feed(data)
            if replies and gate is None:
                writer.write(replies)
                await writer.drain()
            elif replies and gate is not None:
                await gate.write(writer, replies)
            data = await reader.read(READ_SIZE)

    def reset(self) -> list[Chunk]:
        """Give back every chunk of this guest, user space's and kernel code's, and forget its
        partial input. Cost: two passes over the live chunks, O(c log c)."""
        self.splitter.reset()
        released = self.cma.release_owner(self.owner) + self.cma.release_owner(self.kernel_owner)
        return sorted(released, key=lambda c: c.start)

    @property
    def chunks(self) -> list[Chunk]:
        """This guest's live chunks (user space's and kernel code's) in address order."""
        mine = (self.owner, self.kernel_owner)
        return [c for c in self.cma.chunks if c.owner in mine]
