"""The guest protocol: requests from a guest stub, one session per port (wire format: wire)."""

from cma_qemu.channel.commands import GUEST_COMMANDS
from cma_qemu.channel.server import ChannelServer, ResetHook
from cma_qemu.channel.session import FifoGate, GuestSession

__all__ = [
    "GUEST_COMMANDS",
    "ChannelServer",
    "FifoGate",
    "GuestSession",
    "ResetHook",
]
