"""Framework values as the JSON both the guest channel and the monitor return."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cma_qemu.framework import Chunk, CmaInfo

__all__ = ["chunk_json", "info_json"]


def chunk_json(chunk: Chunk) -> dict[str, object]:
    """What the guest learns about a chunk: where it is, how big, and in which region."""
    return {"addr": chunk.start, "size": chunk.size, "region": chunk.region.name}


def info_json(info: CmaInfo) -> dict[str, object]:
    """``struct cma_info`` as a JSON object."""
    return {
        "lower_bound": info.lower_bound,
        "upper_bound": info.upper_bound,
        "total_size": info.total_size,
        "free_size": info.free_size,
        "count": info.count,
    }
