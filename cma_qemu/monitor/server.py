"""The agent's QMP server: Unix socket, greeting, negotiation, commands and events.

Scripts use ``qemu.qmp.QMPClient`` (or ``qmp-shell``) against it exactly as against QEMU.
Each client's commands are answered in order; events go to every negotiated client.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cma_qemu.closing import AsyncClosing
from cma_qemu.errors import EADDRINUSE, EIO, CmaError
from cma_qemu.framework import Chunk, Cma, CmaEvent
from cma_qemu.monitor.commands import MemoryReader, MonitorCommands
from cma_qemu.monitor.events import CMA_GUEST_RESET, from_cma_event, guest_reset_data
from cma_qemu.monitor.protocol import COMMAND_NOT_FOUND, GREETING, MAX_REQUEST, encode_event
from cma_qemu.unix_socket import free_for_bind
from cma_qemu.wire.arguments import Arguments
from cma_qemu.wire.framing import JsonSplitter, Marker
from cma_qemu.wire.messages import RequestError, encode_error, encode_return, parse_request

__all__ = ["MAX_CLIENT_BACKLOG", "MAX_UNENDED", "Monitor"]

log = logging.getLogger(__name__)

#: A client that lets this many bytes of replies and events pile up is dropped.
MAX_CLIENT_BACKLOG: Final = 8 * 1024 * 1024

#: A client that sends this many bytes in which no request ends (no newline, no complete
#: object) gets one error and is disconnected. A request over MAX_REQUEST is answered with an
#: error and the client may resync at its next newline, as QEMU allows; one that keeps
#: streaming past this is not resyncing, and reading on would only burn the agent's CPU.
MAX_UNENDED: Final = 4 * MAX_REQUEST


@dataclass(eq=False)
class _Client:
    writer: asyncio.StreamWriter
    negotiated: bool = False


_UNENDED_REPLY: Final = encode_error(
    "GenericError", f"no end of request in {MAX_UNENDED} bytes; closing the connection"
)


class Monitor(AsyncClosing):
    """A QMP server over one :class:`~cma_qemu.framework.Cma`.

    ``read_memory`` backs ``cma-read`` (the machine layer's guest memory reader); without it
    the command answers EOPNOTSUPP.
    """

    def __init__(self, cma: Cma, *, read_memory: MemoryReader | None = None) -> None:
        self.cma = cma
        self.commands = MonitorCommands(cma, read_memory)
        self.path: Path | None = None
        self._server: asyncio.Server | None = None
        self._clients: set[_Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsubscribe: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    @property
    def read_memory(self) -> MemoryReader | None:
        """The guest memory reader behind ``cma-read`` (settable once the machine is up)."""
        return self.commands.read_memory

    @read_memory.setter
    def read_memory(self, reader: MemoryReader | None) -> None:
        self.commands.read_memory = reader

    # ------------------------------------------------------------------ lifecycle
    async def start(self, path: str | os.PathLike[str]) -> None:
        """Listen on the Unix socket ``path`` (mode 0600; a missing directory is made 0700)."""
        sock_path = Path(path)
        directory = sock_path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
        elif directory.stat().st_mode & 0o077:
            log.warning("monitor socket directory %s is accessible to others", directory)
        self._remove_stale(sock_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.fchmod(sock.fileno(), 0o600)  # Linux: the socket file is created with this mode
            sock.bind(os.fspath(sock_path))
            os.chmod(sock_path, 0o600)
            self._server = await asyncio.start_unix_server(
                self._serve_client, sock=sock, limit=MAX_REQUEST
            )
        except BaseException:
            sock.close()
            raise
        self.path = sock_path
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._unsubscribe.append(self.cma.subscribe(self._on_cma_event))

    @staticmethod
    def _remove_stale(path: Path) -> None:
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise EADDRINUSE(f"{path} exists and is not a socket", where="monitor")
        if not free_for_bind(path):  # a dead agent's leftover is removed
            raise EADDRINUSE(f"another process serves {path}", where="monitor")

    async def close(self) -> None:
        """Stop listening, disconnect clients and remove the socket file."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe.clear()
        if self._server is not None:
            self._server.close()
        for client in list(self._clients):
            client.writer.close()  # the client's task then ends on its own
        if self._tasks:
            _, stuck = await asyncio.wait(list(self._tasks), timeout=1.0)
            for task in stuck:
                task.cancel()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ events
    def emit(self, name: str, data: dict[str, object]) -> None:
        """Send an event to every negotiated client (safe to call from any thread)."""
        if not self._clients:
            return
        line = encode_event(name, data)
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            loop.call_soon_threadsafe(self._broadcast, line)
        else:
            self._broadcast(line)

    def guest_reset(self, port: str, reason: str, released: list[Chunk]) -> None:
        """Emit ``CMA_GUEST_RESET``; fits :class:`~cma_qemu.channel.ChannelServer`'s hook."""
        self.emit(CMA_GUEST_RESET, guest_reset_data(port, reason, released))

    def _on_cma_event(self, event: CmaEvent) -> None:
        if self._clients:
            name, data = from_cma_event(event)
            self.emit(name, data)

    def _broadcast(self, line: bytes) -> None:
        for client in list(self._clients):
            if client.negotiated:
                self._write(client, line)

    def _write(self, client: _Client, data: bytes) -> None:
        writer = client.writer
        if writer.is_closing():
            return
        writer.write(data)
        if writer.transport.get_write_buffer_size() > MAX_CLIENT_BACKLOG:
            log.warning("monitor client is not reading; disconnecting it")
            self._clients.discard(client)
            writer.transport.abort()

    # ------------------------------------------------------------------ clients
    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        client = _Client(writer)
        self._clients.add(client)
        splitter = JsonSplitter(MAX_REQUEST)
        unended = 0  # bytes received since a request last ended
        try:
            writer.write(GREETING)
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                items = splitter.feed(data)
                unended = 0 if items or b"\n" in data else unended + len(data)
                if unended > MAX_UNENDED:
                    self._write(client, _UNENDED_REPLY)
                    log.warning("monitor client sent %d bytes with no end of request", unended)
                    break
                for item in items:
                    if isinstance(item, Marker):
                        reply = encode_error(
                            "GenericError", f"request longer than {MAX_REQUEST} bytes"
                        )
                    else:
                        reply = await self.handle_line(client, item)
                    if reply:
                        self._write(client, reply)
                if writer.is_closing():
                    break
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._clients.discard(client)
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def handle_line(self, client: _Client, line: bytes) -> bytes:
        """Answer one request line from ``client`` (empty for a blank line)."""
        if not line.strip():
            return b""
        try:
            request = parse_request(line)
        except RequestError as err:
            return encode_error(err, str(err), err.request_id, err.has_id)
        rid, has_id = request.id, request.has_id
        name = request.execute
        args = Arguments(request.arguments)
        if name == "qmp_capabilities":
            if client.negotiated:
                return encode_error(
                    COMMAND_NOT_FOUND,
                    "Capabilities negotiation is already complete, command ignored",
                    rid,
                    has_id,
                )
            try:
                self.commands.capabilities(args)
            except CmaError as err:
                return encode_error(err, f"qmp_capabilities: {err}", rid, has_id)
            client.negotiated = True
            return encode_return({}, rid, has_id)
        if not client.negotiated:
            return encode_error(
                COMMAND_NOT_FOUND,
                "Expecting capabilities negotiation with 'qmp_capabilities'",
                rid,
                has_id,
            )
        handler = self.commands.table.get(name)
        if handler is None:
            return encode_error(
                COMMAND_NOT_FOUND, f"The command {name[:64]} has not been found", rid, has_id
            )
        try:
            value = handler(args)
            if inspect.isawaitable(value):
                value = await value
        except CmaError as err:
            return encode_error(err, f"{name}: {err}", rid, has_id)
        except Exception as err:  # a bug below must not take the monitor down
            log.exception("monitor command %s failed", name)
            return encode_error(
                EIO(str(err)), f"{name}: internal error: {type(err).__name__}: {err}", rid, has_id
            )
        return encode_return(value, rid, has_id)
