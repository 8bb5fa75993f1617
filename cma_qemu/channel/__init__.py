"""The guest protocol: line-delimited JSON requests from a guest stub, one session per port."""

from cma_qemu.channel.arguments import U64_MAX, Arguments
from cma_qemu.channel.commands import GUEST_COMMANDS
from cma_qemu.channel.framing import MAX_LINE, LineSplitter
from cma_qemu.channel.messages import Request, RequestError, parse_request
from cma_qemu.channel.server import ChannelServer, ResetHook
from cma_qemu.channel.session import FifoGate, GuestSession

__all__ = [
    "GUEST_COMMANDS",
    "MAX_LINE",
    "U64_MAX",
    "Arguments",
    "ChannelServer",
    "FifoGate",
    "GuestSession",
    "LineSplitter",
    "Request",
    "RequestError",
    "ResetHook",
    "parse_request",
]
