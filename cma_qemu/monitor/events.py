"""The monitor's events, built from framework events and from the channel's resets.

:data:`EVENTS` declares each event's data (``query-qmp-schema`` lists them); the unit tests
check every event the builders below produce against it.
"""

from __future__ import annotations

from typing import Final

from cma_qemu.errors import CmaError
from cma_qemu.framework import AllocEvent, AllocFailedEvent, Chunk, CmaEvent, FreeEvent
from cma_qemu.monitor.schema import Event, Member, ObjectType

__all__ = [
    "CMA_ALLOC",
    "CMA_ALLOC_FAILED",
    "CMA_FREE",
    "CMA_GUEST_RESET",
    "EVENTS",
    "EVENT_TYPES",
    "from_cma_event",
    "guest_reset_data",
]

CMA_ALLOC: Final = "CMA_ALLOC"
CMA_FREE: Final = "CMA_FREE"
CMA_ALLOC_FAILED: Final = "CMA_ALLOC_FAILED"
CMA_GUEST_RESET: Final = "CMA_GUEST_RESET"

_CHUNK = (
    Member("addr", "uint64"),
    Member("size", "uint64"),
    Member("region", "StrOrNull"),
    Member("owner", "StrOrNull"),
)

#: Every event the monitor emits, with the members of its ``data``.
EVENTS: Final = (
    Event(
        CMA_ALLOC,
        (
            *_CHUNK,
            Member("requested", "uint64"),
            Member("dev", "StrOrNull"),
            Member("kind", "StrOrNull"),
        ),
        "A chunk was allocated (by the guest or through the monitor).",
    ),
    Event(CMA_FREE, _CHUNK, "A chunk was freed."),
    Event(
        CMA_ALLOC_FAILED,
        (
            Member("dev", "StrOrNull"),
            Member("kind", "StrOrNull"),
            Member("regions", "[str]"),
            Member("size", "uint64"),
            Member("alignment", "uint64"),
            Member("error", "CmaEventError"),
        ),
        "An allocation failed; ``error`` is what the caller got.",
    ),
    Event(
        CMA_GUEST_RESET,
        (
            Member("port", "str"),
            Member("reason", "str"),
            Member("released", "int"),
            Member("bytes", "uint64"),
            Member("chunks", "[uint64]"),
        ),
        "A guest port went away (reset, closed port) and its chunks were released.",
    ),
)

#: Types the events' data uses beyond the builtins and ``StrOrNull``.
EVENT_TYPES: Final = (ObjectType("CmaEventError", (Member("class", "str"), Member("desc", "str"))),)


def _chunk(chunk: Chunk) -> dict[str, object]:
    return {
        "addr": chunk.start,
        "size": chunk.size,
        "region": chunk.region.name,
        "owner": chunk.owner,
    }


def _error(error: CmaError) -> dict[str, object]:
    return {"class": type(error).errno_name, "desc": str(error)}


def from_cma_event(event: CmaEvent) -> tuple[str, dict[str, object]]:
    """(event name, data) for one framework event."""
    if isinstance(event, AllocEvent):
        data = _chunk(event.chunk)
        data["requested"] = event.chunk.requested
        data["dev"] = event.dev
        data["kind"] = event.kind
        return CMA_ALLOC, data
    if isinstance(event, FreeEvent):
        return CMA_FREE, _chunk(event.chunk)
    assert isinstance(event, AllocFailedEvent)
    return CMA_ALLOC_FAILED, {
        "dev": event.dev,
        "kind": event.kind,
        "regions": list(event.regions),
        "size": event.size,
        "alignment": event.alignment,
        "error": _error(event.error),
    }


def guest_reset_data(port: str, reason: str, released: list[Chunk]) -> dict[str, object]:
    """``CMA_GUEST_RESET`` data: which port, why, and what it gave back."""
    return {
        "port": port,
        "reason": reason,
        "released": len(released),
        "bytes": sum(c.size for c in released),
        "chunks": [c.start for c in released],
    }
