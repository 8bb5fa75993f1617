"""The agent's own QMP server, so inspection scripts use the same client they use for QEMU."""

from cma_qemu.monitor.commands import MAX_READ, MONITOR_OWNER, MemoryReader, MonitorCommands
from cma_qemu.monitor.events import (
    CMA_ALLOC,
    CMA_ALLOC_FAILED,
    CMA_FREE,
    CMA_GUEST_RESET,
)
from cma_qemu.monitor.server import Monitor

__all__ = [
    "CMA_ALLOC",
    "CMA_ALLOC_FAILED",
    "CMA_FREE",
    "CMA_GUEST_RESET",
    "MAX_READ",
    "MONITOR_OWNER",
    "MemoryReader",
    "Monitor",
    "MonitorCommands",
]
