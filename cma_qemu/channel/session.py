"""One guest's protocol session: its chunks, and the request loop over a stream pair.

The session object outlives connections: if the host-side socket drops and comes back the
guest still holds its chunks. Only :meth:`GuestSession.reset` (guest reset, port closed) gives
them back.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Final

from cma_qemu.channel.arguments import Arguments
from cma_qemu.channel.commands import GUEST_COMMANDS
from cma_qemu.channel.framing import MAX_LINE, LineSplitter, Marker
from cma_qemu.channel.messages import (
    RequestError,
    encode_error,
    encode_return,
    guest_id_ok,
    parse_request,
)
from cma_qemu.errors import EIO, CmaError, GenericError
from cma_qemu.framework import Chunk, Cma

__all__ = [
    "READ_SIZE",
    "GuestSession",
    "Pacing",
]

log = logging.getLogger(__name__)

#: How much one read takes from the stream; big enough for a burst of pipelined requests.
READ_SIZE: Final = 64 * 1024

_OVERSIZED_REPLY: Final = encode_error(
    "GenericError", f"request line longer than {MAX_LINE} bytes: discarded up to the next newline"
)


@dataclass(frozen=True)
class Pacing:
    """Write at most ``burst`` bytes every ``interval`` seconds towards the guest.

    QEMU's Exynos4210 UART drops what arrives beyond its 64-byte receive FIFO while the guest
    driver is still draining it (measured: 64-byte bursts lose data, 32 bytes every 2 ms do
    not), so a UART channel is paced; virtio-serial is not.
    """

    burst: int = 32
    interval: float = 0.002


class GuestSession:
    """The agent's side of one guest port.

    ``owner`` is what the framework records on this guest's chunks; it is how ownership is
    checked (a guest can only free, get or put its own chunks) and what a reset releases.
    """

    def __init__(self, cma: Cma, owner: str) -> None:
        self.cma = cma
        self.owner = owner
        self.splitter = LineSplitter(MAX_LINE)
        #: Requests answered since creation (cheap liveness / test hook).
        self.requests = 0

    def handle_line(self, line: bytes) -> bytes:
        """Answer one request line; empty for a blank line (whitespace resyncs, like QGA)."""
        if not line.strip():
            return b""
        self.requests += 1
        try:
            request = parse_request(line, id_ok=guest_id_ok)
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
        try:
            value = handler(self.cma, self.owner, Arguments(request.arguments))
        except GenericError as err:  # the request itself is malformed: say which command
            return encode_error(err, f"{request.execute}: {err}", request.id, request.has_id)
        except CmaError as err:
            # The framework's own message, word for word: the stub prints it as
            # `CMD: CLASS: desc`, exactly what `cma-qemu replay` prints for the same line.
            return encode_error(err, str(err), request.id, request.has_id)
        except Exception as err:  # a framework bug must not take the guest's session down
            log.exception("guest %s: %s failed", self.owner, request.execute)
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
        pacing: Pacing | None = None,
    ) -> None:
        """Answer requests until the stream ends; the caller owns and closes ``writer``."""
        self.splitter.reset()
        while True:
            data = await reader.read(READ_SIZE)
            if not data:
                return
            replies = self.feed(data)
            if not replies:
                continue
            if pacing is None:
                writer.write(replies)
                await writer.drain()
                continue
            for offset in range(0, len(replies), pacing.burst):
                writer.write(replies[offset : offset + pacing.burst])
                await writer.drain()
                await asyncio.sleep(pacing.interval)

    def reset(self) -> list[Chunk]:
        """Give back every chunk of this guest and forget its partial input."""
        self.splitter.reset()
        return self.cma.release_owner(self.owner)

    @property
    def chunks(self) -> list[Chunk]:
        """This guest's live chunks in address order."""
        return [c for c in self.cma.chunks if c.owner == self.owner]
