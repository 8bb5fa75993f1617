"""Allocators: the plug-in interface, the registry, and the two that ship ("bf", "bitmap")."""

from cma_qemu.allocators.base import Allocator
from cma_qemu.allocators.registry import ENTRY_POINT_GROUP, AllocatorRegistry

__all__ = ["ENTRY_POINT_GROUP", "Allocator", "AllocatorRegistry"]
