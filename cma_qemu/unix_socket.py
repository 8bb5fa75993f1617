"""Is a live process listening on this AF_UNIX path, or is its socket file a dead one's?

The agent's monitor and a net channel's listener both bind a socket at a path a user or
harness chose. A file left there by an agent that died must be replaced; one a running agent
listens at must be left alone (its clients keep their connection), so both ask the same way.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket

__all__ = ["free_for_bind", "someone_listens"]


def someone_listens(path: str | os.PathLike[str]) -> bool:
    """Whether a live process accepts connections at the unix socket ``path``.

    A non-blocking connect never waits: it connects (or finds the backlog full, EAGAIN) when
    a listener is there, and is refused or finds no file otherwise. The listener sees one
    connection that closes at once with nothing sent (the net channel's listener does not
    count it as a guest). Cost: one connect attempt.
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.setblocking(False)
        return probe.connect_ex(os.fspath(path)) in (0, errno.EAGAIN, errno.EINPROGRESS)
    except OSError:
        return False  # an unusable path (too long, ...): the bind that follows says so
    finally:
        probe.close()


def free_for_bind(path: str | os.PathLike[str]) -> bool:
    """Make ``path`` free for a ``bind``: False, and nothing touched, when a live process
    listens there; otherwise True, with whatever file was there (a dead process's leftover
    socket) removed. Callers that must not remove other kinds of file check the type first.
    Cost: one connect attempt and at most one unlink.
    """
    if someone_listens(path):
        return False
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return True
