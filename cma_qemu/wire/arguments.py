"""Checking a command's ``arguments`` object before anything touches the framework.

Handlers read each argument through :class:`Arguments` and then call :meth:`Arguments.done`,
so a missing, extra or wrong-typed argument is rejected before any state changes, with an
error that names the argument and shows the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from cma_qemu.errors import GenericError
from cma_qemu.wire.messages import describe_value

__all__ = ["U64_MAX", "Arguments"]

#: The largest number the wire accepts for sizes and addresses (``dma_addr_t`` on 64 bits).
U64_MAX: Final = 2**64 - 1

_MISSING: Final = object()


def _argument_error(name: str, message: str) -> GenericError:
    return GenericError(message, where=f"argument '{name}'")


class Arguments:
    """Typed, validated access to one request's arguments (bool is never an integer)."""

    __slots__ = ("_raw", "_read")

    def __init__(self, raw: Mapping[str, object]) -> None:
        self._raw = raw
        self._read: set[str] = set()  # a set: reading one argument twice counts it once

    def _get(self, name: str, required: bool) -> object:
        value = self._raw.get(name, _MISSING)
        if value is _MISSING:
            if required:
                raise GenericError(f"missing argument '{name}'")
        else:
            self._read.add(name)
        return value

    def u64(self, name: str, default: int | None = None) -> int:
        """An unsigned 64-bit integer; ``default`` makes it optional."""
        value = self._get(name, default is None)
        if value is _MISSING:
            assert default is not None
            return default
        if type(value) is not int or not 0 <= value <= U64_MAX:
            raise _argument_error(
                name, f"expected an unsigned integer, got {describe_value(value)}"
            )
        return value

    def integer(self, name: str, low: int = -(2**63), high: int = U64_MAX) -> int:
        """A required integer within [low, high]."""
        value = self._get(name, True)
        if type(value) is not int or not low <= value <= high:
            raise _argument_error(name, f"expected an integer, got {describe_value(value)}")
        return value

    def string(self, name: str, default: str | None = None) -> str:
        """A string; ``default`` makes it optional."""
        value = self._get(name, default is None)
        if value is _MISSING:
            assert default is not None
            return default
        if not isinstance(value, str):
            raise _argument_error(name, f"expected a string, got {describe_value(value)}")
        return value

    def optional_string(self, name: str) -> str | None:
        """A string that may be absent or null (None)."""
        value = self._get(name, False)
        if value is _MISSING or value is None:
            return None
        if not isinstance(value, str):
            raise _argument_error(name, f"expected a string or null, got {describe_value(value)}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        """An optional boolean."""
        value = self._get(name, False)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            raise _argument_error(name, f"expected a boolean, got {describe_value(value)}")
        return value

    def strings(self, name: str) -> list[str]:
        """An optional array of strings (absent: empty)."""
        value = self._get(name, False)
        if value is _MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise _argument_error(
                name, f"expected an array of strings, got {describe_value(value)}"
            )
        return value

    def done(self) -> None:
        """Reject any argument the handler did not read (call before changing state)."""
        if len(self._read) != len(self._raw):
            extra = sorted(set(self._raw) - self._read)
            raise GenericError(f"unexpected argument {extra[0][:64]!r}")
