"""QEMU's QMP events: one :class:`EventHub` per connection reads them all and fans them out
to subscriptions (async iterators) and callbacks, keeping a short history.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from qemu.qmp import QMPClient
from qemu.qmp.message import Message

from cma_qemu.errors import EIO, ETIMEDOUT

__all__ = ["EventCallback", "EventHub", "QmpEvent", "Subscription"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class QmpEvent:
    """A QMP event: its name, data and QEMU's timestamp (seconds since the epoch)."""

    name: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = 0.0

    @classmethod
    def from_message(cls, msg: Message | dict[str, Any]) -> QmpEvent:
        raw = cast(dict[str, Any], dict(msg))
        ts = cast(dict[str, Any], raw.get("timestamp") or {})
        stamp = float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6
        return cls(str(raw["event"]), dict(raw.get("data") or {}), stamp)


EventCallback = Callable[[QmpEvent], "Awaitable[None] | None"]
_CLOSED = object()


class Subscription:
    """An async iterator of events with the given names (all events if none were given)."""

    def __init__(self, hub: EventHub, names: frozenset[str]) -> None:
        self._hub = hub
        self.names = names
        self._queue: asyncio.Queue[object] = asyncio.Queue()

    def _offer(self, event: QmpEvent | object) -> None:
        if event is _CLOSED or not self.names or cast(QmpEvent, event).name in self.names:
            self._queue.put_nowait(event)

    def __aiter__(self) -> AsyncIterator[QmpEvent]:
        return self

    async def __anext__(self) -> QmpEvent:
        item = await self._queue.get()
        if item is _CLOSED:
            raise StopAsyncIteration
        return cast(QmpEvent, item)

    async def get(self, timeout: float | None = None) -> QmpEvent:
        """The next event; ETIMEDOUT after ``timeout`` s, EIO if the hub closed."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError:
            raise ETIMEDOUT(
                f"no QMP event {sorted(self.names) or 'at all'} in {timeout:g} s", where="qmp"
            ) from None
        except StopAsyncIteration:
            raise EIO("the QMP connection closed while waiting for an event", where="qmp") from None

    def close(self) -> None:
        self._hub._unsubscribe(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventHub:
    """Fans QEMU's events out to subscriptions and callbacks, and keeps a short history.

    It consumes the client's default listener (``qmp.events``), so it is the one place that
    reads events; RESET, SHUTDOWN, STOP, VSERPORT_CHANGE and friends all come through here.
    """

    def __init__(self, qmp: QMPClient, *, history: int = 256) -> None:
        self._qmp = qmp
        self.history: deque[QmpEvent] = deque(maxlen=history)
        self._subs: list[Subscription] = []
        self._callbacks: list[tuple[frozenset[str], EventCallback]] = []
        self._task: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[Any]] = set()
        #: Events the agent causes itself (the gdbstub's stop/continue), dropped on arrival.
        self._muted: dict[str, int] = {}

    def start(self) -> None:
        """Start dispatching (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="qmp-events")

    async def _run(self) -> None:
        try:
            while True:
                msg = await self._qmp.events.get()
                self.dispatch(QmpEvent.from_message(msg))
        finally:
            for sub in list(self._subs):
                sub._offer(_CLOSED)

    def dispatch(self, event: QmpEvent) -> None:
        """Deliver one event (public so fakes and tests can inject events)."""
        if self._muted.get(event.name, 0) > 0:
            self._muted[event.name] -= 1
            log.debug("QMP event %s was caused by the agent: not delivered", event.name)
            return
        self.history.append(event)
        for sub in list(self._subs):
            sub._offer(event)
        for names, cb in list(self._callbacks):
            if names and event.name not in names:
                continue
            try:
                result = cb(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._pending.add(task)
                    task.add_done_callback(self._pending.discard)
            except Exception:
                log.exception("QMP event callback %r failed on %s", cb, event.name)

    def mute_next(self, name: str) -> None:
        """Drop the next event ``name``: the agent is about to cause it (a gdbstub stop)."""
        self._muted[name] = self._muted.get(name, 0) + 1

    def unmute(self, name: str) -> None:
        """Undo one :meth:`mute_next` whose event will not come."""
        if self._muted.get(name, 0) > 0:
            self._muted[name] -= 1

    def subscribe(self, *names: str) -> Subscription:
        """A new subscription; use it as ``with hub.subscribe("RESET") as s: await s.get()``."""
        sub = Subscription(self, frozenset(names))
        self._subs.append(sub)
        if self._task is not None and self._task.done():
            sub._offer(_CLOSED)
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)

    def on(self, callback: EventCallback, *names: str) -> Callable[[], None]:
        """Call ``callback(event)`` (sync or async) for each event; returns an unsubscriber."""
        entry = (frozenset(names), callback)
        self._callbacks.append(entry)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(entry)

        return remove

    def seen(self, name: str, predicate: Callable[[QmpEvent], bool] | None = None) -> bool:
        """True if the history holds an event ``name`` (matching ``predicate``)."""
        return any(e.name == name and (predicate is None or predicate(e)) for e in self.history)

    async def wait_for(
        self,
        name: str,
        timeout: float,
        predicate: Callable[[QmpEvent], bool] | None = None,
        *,
        include_history: bool = False,
    ) -> QmpEvent:
        """The next event ``name`` (or one already in the history) that matches ``predicate``."""
        if include_history:
            for e in reversed(self.history):
                if e.name == name and (predicate is None or predicate(e)):
                    return e
        deadline = time.monotonic() + timeout
        with self.subscribe(name) as sub:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ETIMEDOUT(f"no QMP event {name} in {timeout:g} s", where="qmp")
                event = await sub.get(left)
                if predicate is None or predicate(event):
                    return event

    async def close(self) -> None:
        """Stop dispatching; subscriptions end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for sub in list(self._subs):
            sub._offer(_CLOSED)
        for task in list(self._pending):
            task.cancel()
