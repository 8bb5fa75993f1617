"""One exception hierarchy for the API, the guest protocol, the monitor and the CLI.

Every error is a :class:`CmaError`; its subclasses are named after the errno value the 2010
kernel code returned in the same situation, so a guest reply, a monitor error and a CLI message
all carry the same class name (``ENOMEM``, ``EINVAL``, ...).
"""

from __future__ import annotations

import errno as _errno
from typing import ClassVar

__all__ = [
    "EADDRINUSE",
    "EBADFD",
    "EBUSY",
    "EINVAL",
    "EIO",
    "ENODEV",
    "ENOENT",
    "ENOMEM",
    "ENOSPC",
    "EOPNOTSUPP",
    "ETIMEDOUT",
    "AttributeSyntaxError",
    "CmaError",
    "GenericError",
    "error_class",
    "from_os_error",
]


class CmaError(Exception):
    """Root of every error this package raises on purpose.

    ``where`` says which input the error is about (``"regions"``, ``"script.txt:4"``,
    ``"board virt"``), so a front end can print one line that names it.
    """

    errno_name: ClassVar[str] = "EIO"

    def __init__(self, message: str, *, where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where

    @property
    def errno(self) -> int:
        """The numeric errno of this class on the host (0 for ``GenericError``)."""
        return int(getattr(_errno, self.errno_name, 0))

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class EINVAL(CmaError):
    """Invalid argument: a malformed attribute, size, alignment or name."""

    errno_name = "EINVAL"


class ENOMEM(CmaError):
    """No region in the list had room (or no allocator is attached to it)."""

    errno_name = "ENOMEM"


class ENOENT(CmaError):
    """No such chunk, region, board or allocator; or no region list for a device."""

    errno_name = "ENOENT"


class EADDRINUSE(CmaError):
    """A range overlaps one that is already registered, reserved or loaded."""

    errno_name = "EADDRINUSE"


class EBUSY(CmaError):
    """The object is still in use (a region that holds chunks)."""

    errno_name = "EBUSY"


class ENOSPC(CmaError):
    """A documented bound was exceeded (too many regions, an attribute too long)."""

    errno_name = "ENOSPC"


class EOPNOTSUPP(CmaError):
    """The operation is not available here (for example a board without that feature)."""

    errno_name = "EOPNOTSUPP"


class EBADFD(CmaError):
    """The session or handle is not in a state that allows the operation."""

    errno_name = "EBADFD"


class EIO(CmaError):
    """QEMU, the guest or the host failed underneath us."""

    errno_name = "EIO"


class ENODEV(CmaError):
    """A device the board needs is missing (QEMU binary, channel port, guest image)."""

    errno_name = "ENODEV"


class ETIMEDOUT(CmaError):
    """QEMU or the guest did not answer in time."""

    errno_name = "ETIMEDOUT"


class GenericError(CmaError):
    """A malformed protocol message, named like QEMU's own ``GenericError`` class."""

    errno_name = "GenericError"


class AttributeSyntaxError(EINVAL):
    """A regions, map or asterisk string (or a script line) that does not parse.

    ``text`` is the input and ``position`` the 0-based offset of the offending character,
    so a front end can point at it.
    """

    def __init__(self, attribute: str, text: str, position: int, message: str) -> None:
        super().__init__(f"at column {position + 1}: {message}", where=attribute)
        self.attribute = attribute
        self.text = text
        self.position = position

    def pointer(self) -> str:
        """The input and a caret under the offending character, for a second line of detail."""
        return f"{self.text}\n{' ' * self.position}^"


_BY_NAME: dict[str, type[CmaError]] = {
    cls.errno_name: cls
    for cls in (
        EINVAL,
        ENOMEM,
        ENOENT,
        EADDRINUSE,
        EBUSY,
        ENOSPC,
        EOPNOTSUPP,
        EBADFD,
        EIO,
        ENODEV,
        ETIMEDOUT,
        GenericError,
    )
}


def error_class(name: str) -> type[CmaError]:
    """The class for an errno name from a protocol reply; unknown names map to ``CmaError``."""
    return _BY_NAME.get(name, CmaError)


def from_os_error(error: OSError, where: str) -> CmaError:
    """An ``OSError`` as the class of its errno name (``CmaError``, shown as EIO, if none)."""
    name = _errno.errorcode.get(error.errno or 0, "EIO")
    detail = (
        f"{error.strerror or error}: {error.filename}"
        if error.filename
        else str(error.strerror or error)
    )
    return error_class(name)(detail, where=where)
