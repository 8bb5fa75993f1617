"""The guest protocol's commands: argument checks, ownership, and the framework call.

Each handler is synchronous and makes at most one state-changing framework call after all its
arguments are checked, so a request either fully happens or changes nothing, and no other
coroutine can run in the middle of it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, TypeAlias

from cma_qemu.errors import ENOENT
from cma_qemu.framework import Cma
from cma_qemu.wire.arguments import Arguments
from cma_qemu.wire.values import chunk_json, info_json

__all__ = ["GUEST_COMMANDS", "GuestHandler"]

#: A guest command: (framework, owner of this session's chunks, arguments) -> return value.
GuestHandler: TypeAlias = Callable[[Cma, str, Arguments], object]


def _own_chunk(cma: Cma, owner: str, addr: int) -> None:
    """ENOENT unless this session allocated the chunk at ``addr`` (others' look unknown)."""
    try:
        chunk = cma.chunk(addr)
    except ENOENT:
        chunk = None
    if chunk is None or chunk.owner != owner:
        raise ENOENT(f"no chunk of this guest starts at {addr:#x}")


def _alloc(cma: Cma, owner: str, args: Arguments) -> object:
    dev = args.string("dev")
    kind = args.string("kind", "")
    size = args.u64("size")
    alignment = args.u64("alignment", 0)
    args.done()
    return chunk_json(cma.alloc(dev, kind, size, alignment, owner=owner))


def _alloc_from(cma: Cma, owner: str, args: Arguments) -> object:
    regions = args.optional_string("regions")
    size = args.u64("size")
    alignment = args.u64("alignment", 0)
    args.done()
    return chunk_json(cma.alloc_from(regions, size, alignment, owner=owner))


def _free(cma: Cma, owner: str, args: Arguments) -> object:
    addr = args.u64("addr")
    args.done()
    _own_chunk(cma, owner, addr)
    cma.free(addr)
    return {}


def _get(cma: Cma, owner: str, args: Arguments) -> object:
    addr = args.u64("addr")
    args.done()
    _own_chunk(cma, owner, addr)
    cma.get(addr)
    return {}


def _put(cma: Cma, owner: str, args: Arguments) -> object:
    addr = args.u64("addr")
    args.done()
    _own_chunk(cma, owner, addr)
    return {"freed": cma.put(addr)}


def _info(cma: Cma, owner: str, args: Arguments) -> object:
    dev = args.string("dev")
    kind = args.string("kind", "")
    args.done()
    return info_json(cma.info(dev, kind))


def _info_about(cma: Cma, owner: str, args: Arguments) -> object:
    regions = args.optional_string("regions")
    args.done()
    return info_json(cma.info_about(regions))


def _list(cma: Cma, owner: str, args: Arguments) -> object:
    args.done()
    return [chunk_json(c) for c in cma.chunks if c.owner == owner]


def _ping(cma: Cma, owner: str, args: Arguments) -> object:
    args.done()
    return {}


def _sync(cma: Cma, owner: str, args: Arguments) -> object:
    value = args.integer("id")
    args.done()
    return value


#: Every command a guest may execute, by wire name.
GUEST_COMMANDS: Final[Mapping[str, GuestHandler]] = {
    "cma-alloc": _alloc,
    "cma-alloc-from": _alloc_from,
    "cma-free": _free,
    "cma-get": _get,
    "cma-put": _put,
    "cma-info": _info,
    "cma-info-about": _info_about,
    "cma-list": _list,
    "guest-ping": _ping,
    "guest-sync": _sync,
}
