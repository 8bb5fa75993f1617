"""Guest ports: connect to QEMU's chardev sockets, keep each guest's session, reset on demand.

A net channel turns this around (:meth:`ChannelServer.add_listener`): QEMU's user network
starts one ``socat`` per guest TCP connection, each connects to the agent's unix socket, and
each connection is a session of its own, released when it closes (a SIGKILLed stub's
connection closes too, so its chunks come back).

QEMU is the socket server (``-chardev socket,path=...,server=on,wait=off``), so the agent is a
client that retries until the socket is there and reconnects when it drops. A dropped socket
does not mean the guest went away; only :meth:`ChannelServer.reset` (the machine layer calls
it on QMP ``RESET``) and :meth:`ChannelServer.port_closed` (``VSERPORT_CHANGE`` with
``open: false``) give a guest's chunks back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from cma_qemu.channel.session import READ_SIZE, FifoGate, GuestSession
from cma_qemu.closing import AsyncClosing
from cma_qemu.errors import EADDRINUSE, ENOENT, ETIMEDOUT
from cma_qemu.framework import Chunk, Cma
from cma_qemu.unix_socket import free_for_bind

__all__ = ["ChannelServer", "ResetHook"]

log = logging.getLogger(__name__)

#: Called after a guest's chunks were released: (port, reason, released chunks).
ResetHook = Callable[[str, str, list[Chunk]], None]


@dataclass
class _Port:
    name: str
    path: str
    session: GuestSession
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    connections: int = 0
    gate: FifoGate | None = None


@dataclass
class _Listener:
    name: str
    path: str
    #: The listening socket (non-blocking); this server's own accept loop reads it.
    sock: socket.socket
    acceptor: asyncio.Task[None] | None = None
    #: Live connections' sessions by connection number (1, 2, ...).
    sessions: dict[int, GuestSession] = field(default_factory=dict)
    #: Connections numbered so far: those that sent something (a guest speaks first).
    numbered: int = 0
    #: One task per accepted connection, until it ends.
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    #: Accepted sockets whose task has not started yet: if close() cancels such a task, its
    #: code never runs, so close() closes these itself.
    unstarted: set[socket.socket] = field(default_factory=set)


class ChannelServer(AsyncClosing):
    """The guest sessions of one machine, one per channel port.

    Each port's chunks are owned by ``"guest:<port>"`` in the framework, so inspection tools
    can tell whose chunks they see and a reset frees exactly one guest's memory.
    """

    def __init__(
        self,
        cma: Cma,
        *,
        on_reset: ResetHook | None = None,
        retry_delay: float = 0.05,
        max_retry_delay: float = 1.0,
    ) -> None:
        self.cma = cma
        self.on_reset = on_reset
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self._ports: dict[str, _Port] = {}
        self._listeners: dict[str, _Listener] = {}

    @staticmethod
    def owner_for(port: str) -> str:
        """The framework owner string of a port's chunks."""
        return f"guest:{port}"

    @property
    def ports(self) -> list[str]:
        """Names of the ports (and listeners) being served."""
        return [*self._ports, *self._listeners]

    async def add_listener(self, name: str, path: str | os.PathLike[str]) -> None:
        """Listen on a unix socket at ``path``; every connection is a session of its own.

        Connection N's chunks belong to ``"guest:<name>:N"`` and are released when it closes;
        connections are numbered as they send their first bytes, so one that closes with
        nothing sent (another agent's liveness probe) is no session and takes no number.
        A socket nobody answers at is a dead agent's and is replaced; one a live process
        listens at (a second ``attach`` of the same QEMU) raises EADDRINUSE and is left alone,
        so that process's guests keep their channel. Cost: one connect attempt and one bind;
        each connection a task.
        """
        if name in self._ports or name in self._listeners:
            raise EADDRINUSE(f"guest channel port {name!r} is already served")
        spath = os.fspath(path)
        if not free_for_bind(spath):  # a dead agent's leftover is removed
            raise EADDRINUSE(f"another process serves this channel at {spath}", where=name)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(spath)
            sock.listen()
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            raise EADDRINUSE(f"cannot listen on {spath}: {err}", where=name) from None
        entry = _Listener(name, spath, sock)
        entry.acceptor = asyncio.create_task(self._accept(entry), name=f"cma-channel-{name}")
        self._listeners[name] = entry

    async def _accept(self, entry: _Listener) -> None:
        """Accept connections until cancelled, each one a task that close() can end.

        Its own loop rather than ``asyncio.start_unix_server``, whose connections exist
        before their handler runs: one accepted just before close() stayed open.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(entry.sock)
            except OSError as err:  # out of fds, say: the connection waits in the backlog
                log.warning("listener %s: accept failed: %s", entry.name, err)
                await asyncio.sleep(0.1)
                continue
            entry.unstarted.add(conn)
            task = asyncio.create_task(self._connection(entry, conn))
            entry.tasks.add(task)
            task.add_done_callback(entry.tasks.discard)

    async def _connection(self, entry: _Listener, conn: socket.socket) -> None:
        entry.unstarted.discard(conn)  # from here on this task closes it
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn)
        except BaseException:
            conn.close()
            raise
        with contextlib.suppress(asyncio.CancelledError):  # close() ends it; that is no error
            await self._serve_connection(entry, reader, writer)

    def connections(self, name: str) -> dict[str, GuestSession]:
        """The live sessions of listener ``name`` by owner (ENOENT if there is none)."""
        entry = self._listeners.get(name)
        if entry is None:
            raise ENOENT(f"no guest channel listener {name!r}")
        return {s.owner: s for s in entry.sessions.values()}

    async def _serve_connection(
        self, entry: _Listener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # A guest speaks first. A connection that closes with nothing sent is no guest's (the
        # liveness probe of another agent started at this path): it gets no session number,
        # so the first guest is always ``<owner>:1``.
        first = b""
        try:
            first = await reader.read(READ_SIZE)
        except (ConnectionError, OSError):
            pass
        finally:
            if not first:  # closed, failed or cancelled (the server closing) before a byte
                writer.close()
        if not first:
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return
        entry.numbered += 1
        number = entry.numbered
        session = GuestSession(self.cma, f"{self.owner_for(entry.name)}:{number}")
        entry.sessions[number] = session
        log.info("listener %s: connection %d", entry.name, number)
        try:
            await session.serve(reader, writer, first=first)
        except (ConnectionError, OSError) as err:
            log.info("listener %s: connection %d lost: %s", entry.name, number, err)
        finally:
            entry.sessions.pop(number, None)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            chunks = session.reset()
            if chunks and self.on_reset is not None:  # a clean exit freed its own chunks
                try:
                    self.on_reset(session.owner.removeprefix("guest:"), "port-closed", chunks)
                except Exception:
                    log.exception("reset hook failed for %s", session.owner)

    def session(self, port: str) -> GuestSession:
        """The session of ``port`` (ENOENT if there is no such port)."""
        try:
            return self._ports[port].session
        except KeyError:
            raise ENOENT(f"no guest channel port {port!r}") from None

    def add_port(
        self, name: str, path: str | os.PathLike[str], *, gate: FifoGate | None = None
    ) -> GuestSession:
        """Serve ``name`` on QEMU's chardev socket at ``path`` (connects in the background).

        ``gate`` meters writes to the guest for a UART whose receive FIFO must not fill up.
        """
        if name in self._ports:
            raise EADDRINUSE(f"guest channel port {name!r} is already served")
        session = GuestSession(self.cma, self.owner_for(name))
        port = _Port(name, os.fspath(path), session, gate=gate)
        self._ports[name] = port
        port.task = asyncio.create_task(self._run(port), name=f"cma-channel-{name}")
        return port.session

    async def wait_connected(self, port: str, timeout: float | None = None) -> None:
        """Wait until ``port``'s socket is connected (ETIMEDOUT after ``timeout`` seconds)."""
        if port in self._listeners:
            return  # listening from add_listener on; guests connect when they need to
        entry = self._ports.get(port)
        if entry is None:
            raise ENOENT(f"no guest channel port {port!r}")
        try:
            await asyncio.wait_for(entry.connected.wait(), timeout)
        except TimeoutError:
            raise ETIMEDOUT(f"channel socket {entry.path} did not connect", where=port) from None

    def is_connected(self, port: str) -> bool:
        """Whether ``port``'s socket is connected now."""
        if port in self._listeners:
            return True
        entry = self._ports.get(port)
        return entry is not None and entry.connected.is_set()

    def reset(self, port: str | None = None, *, reason: str = "reset") -> list[Chunk]:
        """Release the chunks of one guest port, or of all ports (None), and report it."""
        names = list(self._ports) if port is None else [port]
        released: list[Chunk] = []
        for listener in self._listeners.values():
            if port is None or port == listener.name:
                for session in list(listener.sessions.values()):
                    chunks = session.reset()
                    released.extend(chunks)
                    if self.on_reset is not None:
                        try:
                            self.on_reset(session.owner.removeprefix("guest:"), reason, chunks)
                        except Exception:
                            log.exception("reset hook failed for %s", session.owner)
        if port is not None and port in self._listeners:
            return released
        for name in names:
            chunks = self.session(name).reset()
            released.extend(chunks)
            if self.on_reset is not None:
                try:
                    self.on_reset(name, reason, chunks)
                except Exception:
                    log.exception("reset hook failed for port %s", name)
        return released

    def port_closed(self, port: str) -> list[Chunk]:
        """The guest closed ``port`` (``VSERPORT_CHANGE`` open=false): release its chunks."""
        return self.reset(port, reason="port-closed")

    async def remove_port(self, port: str, *, release: bool = True) -> list[Chunk]:
        """Stop serving ``port``; its chunks are released unless ``release`` is false."""
        entry = self._ports.get(port)
        if entry is None:
            raise ENOENT(f"no guest channel port {port!r}")
        released = self.reset(port, reason="port-removed") if release else []
        del self._ports[port]
        await self._stop(entry)
        return released

    async def close(self) -> None:
        """Stop every port without releasing chunks (the machine decides what a stop means)."""
        ports = list(self._ports.values())
        self._ports.clear()
        for entry in ports:
            await self._stop(entry)
        listeners = list(self._listeners.values())
        self._listeners.clear()
        for listener in listeners:
            if listener.acceptor is not None:
                listener.acceptor.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener.acceptor
            listener.sock.close()  # connections still in the backlog are refused
            tasks = list(listener.tasks)
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            for conn in listener.unstarted:  # their tasks were cancelled before they ran
                conn.close()
            listener.unstarted.clear()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listener.path)

    @staticmethod
    async def _stop(entry: _Port) -> None:
        if entry.task is not None:
            entry.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await entry.task

    async def _run(self, port: _Port) -> None:
        delay = self.retry_delay
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(port.path)
            except OSError as err:
                log.debug("port %s: connect to %s failed: %s", port.name, port.path, err)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_delay)
                continue
            delay = self.retry_delay
            port.connections += 1
            port.connected.set()
            log.info("port %s: connected to %s", port.name, port.path)
            try:
                await port.session.serve(reader, writer, port.gate)
            except (ConnectionError, OSError) as err:
                log.info("port %s: connection lost: %s", port.name, err)
            finally:
                port.connected.clear()
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
            log.info("port %s: disconnected; reconnecting", port.name)
            await asyncio.sleep(delay)
