"""The unix-socket liveness probe the monitor and the net channel's listener share."""

from __future__ import annotations

import contextlib
import errno
import socket
from collections.abc import Iterator
from pathlib import Path

from cma_qemu.unix_socket import free_for_bind, someone_listens


@contextlib.contextmanager
def listener(path: Path, backlog: int = 8) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        sock.listen(backlog)
        yield sock
    finally:
        sock.close()


def dead_socket(path: Path) -> None:
    """A socket file nobody listens at: what a killed agent leaves behind."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()


def test_a_live_listener_is_found_and_its_socket_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    with listener(path):
        inode = path.stat().st_ino
        assert someone_listens(path) and someone_listens(str(path))
        assert free_for_bind(path) is False
        assert path.is_socket() and path.stat().st_ino == inode


def test_a_dead_socket_is_not_listened_at_and_is_removed(tmp_path: Path) -> None:
    path = tmp_path / "dead.sock"
    dead_socket(path)
    assert not someone_listens(path)
    assert path.is_socket()  # the probe alone removes nothing
    assert free_for_bind(path) is True
    assert not path.exists()
    with listener(path):  # and the path binds again
        assert someone_listens(path)


def test_nothing_at_the_path_is_free(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    assert not someone_listens(path)
    assert free_for_bind(path) is True
    assert not path.exists()


def test_a_listener_with_a_full_backlog_is_live_and_the_probe_does_not_wait(
    tmp_path: Path,
) -> None:
    path = tmp_path / "full.sock"
    clients: list[socket.socket] = []
    with listener(path, backlog=0):
        try:
            while True:  # fill the backlog: nobody accepts
                client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                client.setblocking(False)
                clients.append(client)
                if client.connect_ex(str(path)) == errno.EAGAIN:
                    break
                assert len(clients) < 100
            assert someone_listens(path)
            assert free_for_bind(path) is False and path.is_socket()
        finally:
            for client in clients:
                client.close()


def test_a_path_too_long_for_a_socket_is_not_listened_at(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 200)
    assert not someone_listens(path)
    path.write_text("a file")
    assert not someone_listens(path)


def test_free_for_bind_removes_a_plain_file_nobody_listens_at(tmp_path: Path) -> None:
    """The type check is the caller's (the monitor refuses a file that is not a socket)."""
    path = tmp_path / "plain"
    path.write_text("not a socket")
    assert not someone_listens(path)
    assert free_for_bind(path) is True and not path.exists()
